"""``routerd deploy --abort <app>``: asking the running canary deploy to roll back.

The request is ``apps/<app>/abort``, holding the token of the deploy lock
it is meant for, on a lease that outlives the asking side's wait (a
request nobody answers expires by itself). A canary deploy watches for it
through every wait of its steps (``unless_aborted``) and, seeing its own
lock's token, fails the step, so it rolls back as on any failure (it also
looks before each step writes its weights); a request
holding another lock's token (meant for a deploy since finished) is
ignored. The asking side waits until the lock is released, withdraws the
request, and says what serves. Routers never read the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from routerd import keys
from routerd.deploy import releases
from routerd.deploy.progress import Say
from routerd.deploy.releases import Lock, describe_holder, read_holder
from routerd.errors import DeployError, StoreError
from routerd.store import Check, Delete, Put, Store

POLL_S = 0.25
T = TypeVar("T")


# ---------------------------------------------------------- the deploy's side


async def asked(store: Store, lock: Lock) -> str | None:
    """Who asked to abort ``lock``'s deploy, or None (also when etcd does not answer)."""
    try:
        raw = await store.get(keys.abort(lock.app))
    except StoreError:
        return None
    request = read_holder(raw) if raw else {}
    return str(request.get("by", "someone")) if request.get("token") == lock.secret else None


async def check(store: Store, lock: Lock) -> None:
    """DeployError if an abort of ``lock``'s deploy was asked for."""
    if (who := await asked(store, lock)) is not None:
        raise DeployError(_aborted(who))


async def unless_aborted(store: Store, lock: Lock, work: Awaitable[T]) -> T:
    """``work``'s result; DeployError as soon as an abort of ``lock``'s deploy is asked for."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_requested(store, lock))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task is cancelled (Ctrl-C): neither may outlive it
        for task in (job, watch):
            task.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    if not job.cancelled():
        return job.result()  # its own error, if it failed
    raise DeployError(_aborted(watch.result()))


async def _requested(store: Store, lock: Lock) -> str:
    """Who asked, once someone did: etcd is polled, as the request comes from elsewhere."""
    while True:
        if (who := await asked(store, lock)) is not None:
            return who
        await asyncio.sleep(POLL_S)


def _aborted(who: str) -> str:
    return f"aborted by {who} (routerd deploy --abort)"


# -------------------------------------------------------- the asking side


async def abort(store: Store, app: str, *, timeout: float, say: Say) -> None:
    """Ask the canary deploy holding ``app``'s lock to roll back and wait until it has;
    DeployError when there is none, it cannot be aborted, or it finished regardless."""
    raw = await store.get(keys.lock(app))
    if raw is None:
        raise DeployError(f"no deploy of {app} runs (no {store.prefix}{keys.lock(app)})")
    holder = read_holder(raw)
    if not holder.get("abortable"):
        raise DeployError(
            f"the lock of {app} is {describe_holder(raw)}: only a deploy with --canary can be "
            "aborted; interrupt that one where it runs (Ctrl-C)"
        )
    what = f"{holder.get('doing', 'deploy')} ({holder.get('holder', 'unknown')})"
    await _ask_and_wait(store, app, raw, holder, timeout=timeout, say=say, what=what)
    snapshot = await store.range(keys.app(app))
    active = releases.active_release(snapshot, app)
    release = str(holder.get("release", ""))
    if release and active == release:
        raise DeployError(
            f"abort of {app}: too late, {release} had passed its canary steps and serves; "
            f"run routerd rollback {app} to go back"
        )
    left = release in releases.registered_releases(snapshot, app)
    say(
        f"abort of {app}: rolled back; {active or '(none)'} serves"
        + (f"; {release} is still registered: see routerd status {app}" if left else "")
    )


async def _ask_and_wait(
    store: Store,
    app: str,
    lock_raw: bytes,
    holder: dict[str, Any],
    *,
    timeout: float,
    say: Say,
    what: str,
) -> None:
    """Put the request on its lease, wait while the lock holds ``lock_raw``, withdraw it."""
    key = keys.abort(app)
    request = json.dumps(
        {"token": holder.get("token"), "by": releases.whoami(), "at": releases.now()}
    ).encode()
    lease = await store.lease(int(timeout) + 10)
    try:
        if await store.transaction([], [Put(key, request, lease=lease.id)]) is None:
            raise DeployError(f"abort of {app}: etcd refused the request")
        say(f"abort of {app}: asked the {what} to roll back; waiting (at most {timeout:g} s)")
        deadline = time.monotonic() + timeout
        while await store.get(keys.lock(app)) == lock_raw:
            if time.monotonic() >= deadline:
                raise DeployError(
                    f"abort of {app}: the deploy still holds its lock after {timeout:g} s; "
                    f"see routerd status {app}"
                )
            await asyncio.sleep(POLL_S)
        say(f"abort of {app}: the deploy released its lock")
    finally:
        with contextlib.suppress(StoreError):
            await store.transaction([Check(key, value=request)], [Delete(key)])
            await store.revoke(lease)
