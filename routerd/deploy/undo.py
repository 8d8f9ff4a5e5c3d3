"""Rolling a deploy back: what the ``Journal`` says was done, undone in reverse.

1. A canary's ``weights`` deleted, only if they still hold a value this
   deploy wrote (``active`` never stopped naming the old release, so it
   takes every request again); then ``active`` back to the old release,
   only if it still names the new one.
2. The new release's instances and history deregistered (not while
   ``active`` or the weights may still name it: that could leave the app
   nothing to serve).
3. Where the routers may have routed to the new release, they are waited
   for: nothing may route to a container about to stop. If they do not
   confirm, the new containers keep running and are reported, for the
   person to remove with ``routerd gc`` once the routers are back.
4. Its containers stopped and removed, found by label on every host's
   engine, after any runtime call an interruption left running has
   finished (so none is orphaned). An engine that fails (one restarting)
   is asked again until the rollback's deadline; one that still cannot be
   asked is named, with what the journal says runs there, for ``routerd gc``.

etcd may be down (that may be why the deploy failed): each etcd undo is
retried until the rollback's deadline. One failing undo never stops the
others. What could not be undone is returned in words, for the person to
act on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from routerd import keys
from routerd.deploy import routers
from routerd.deploy.engines import Engines, remove_release
from routerd.deploy.plan import DeployOptions, Journal, Plan
from routerd.deploy.progress import Say, brief, since
from routerd.errors import RouterdError, StoreError
from routerd.store import Check, Delete, Put, Store

T = TypeVar("T")


class Undo:
    def __init__(self, store: Store, engines: Engines, options: DeployOptions, say: Say) -> None:
        self.store = store
        self.engines = engines
        self.options = options
        self.say = say

    async def run(self, plan: Plan, journal: Journal) -> list[str]:
        """Undo the journal; what could not be undone, in words (empty: all of it)."""
        started, left = time.monotonic(), list[str]()
        deadline = started + self.options.rollback_timeout
        self.say(f"rollback: undoing the deploy of {plan.app} {plan.release.name}")
        await settle(journal)
        in_use = await self._undo_etcd(plan, journal, deadline, left)
        if in_use:
            left += await self._keep(plan, journal, in_use)
        else:
            left += await self._remove(plan, journal, deadline)
        outcome = f"left behind: {'; '.join(left)}" if left else "done"
        self.say(f"rollback: {outcome} in {since(started)}")
        return left

    async def _undo_etcd(
        self, plan: Plan, journal: Journal, deadline: float, left: list[str]
    ) -> str | None:
        """Remove the weights, restore ``active``, deregister; why the routers may
        still send traffic to the new containers, or None. Failures are
        appended to ``left``."""
        # A revision the routers must reach when they may have routed to the new release.
        new, routed = plan.release.name, None
        if journal.weights:
            try:
                routed = await self._retry(
                    "remove weights", lambda: self._unweight(plan, journal), deadline
                )
            except Exception as exc:  # noqa: BLE001  (as for active, below)
                left.append(f"remove weights ({brief(exc)})")
                if journal.registered:
                    left.append(f"{new} is still registered, as the weights may name it")
                return f"the weights may still give {new} a share"
        if journal.switched or (journal.registered and plan.first):
            try:
                restored = await self._retry(
                    "restore active", lambda: self._restore(plan), deadline
                )
            except Exception as exc:  # noqa: BLE001  (whatever it was, the containers are still decided on)
                left.append(f"restore active ({brief(exc)})")
                if journal.registered:  # deregistering would leave active naming nothing
                    left.append(f"{new} is still registered, as active may name it")
                return f"active may still name {new}"
            if restored is not None:
                routed = max(routed or 0, restored)
        revision = routed or 0
        if journal.registered:
            try:
                deregister = await self._retry(
                    "deregister", lambda: self._deregister(plan), deadline
                )
                revision = max(revision, deregister)
            except Exception as exc:  # noqa: BLE001  (one failed undo never stops the others)
                left.append(f"deregister {new} ({brief(exc)})")
        if routed is None or not self.options.wait_routers:
            return None  # the routers never routed to it, or the person chose not to wait
        return await self._confirm(plan, revision)

    async def _retry(self, what: str, undo: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Retry ``undo`` while etcd fails, until ``deadline``; then raise its error."""
        delay, warned = 0.2, False
        while True:
            try:
                return await undo()
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    self.say(f"rollback: {what}: {brief(exc)}; retrying")
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _restore(self, plan: Plan) -> int | None:
        """Put ``active`` back; its revision, None when it no longer named the new release."""
        active = keys.active(plan.app)
        undo: Put | Delete = Put(active, plan.active.encode()) if plan.active else Delete(active)
        ours = Check(active, value=plan.release.name.encode())
        revision = await self.store.transaction([ours], [undo])
        if revision is None:
            return None  # the switch never happened, or someone else moved active on
        self.say(f"rollback: active is {plan.active or '(none)'} again")
        return revision

    async def _unweight(self, plan: Plan, journal: Journal) -> int:
        """Delete ``weights`` if they hold a value this deploy wrote; a revision the
        routers must reach (the weights may have named the new release until then)."""
        key = keys.weights(plan.app)
        snapshot = await self.store.range(key)
        current = snapshot.kvs.get(key)
        if current is None:  # never written, or the switch removed them
            return snapshot.revision
        if current.value not in journal.weights:
            self.say("rollback: weights were changed by someone else; left as they are")
            return snapshot.revision
        revision = await self.store.transaction([Check(key, value=current.value)], [Delete(key)])
        if revision is None:
            self.say("rollback: weights were changed by someone else; left as they are")
            return snapshot.revision
        self.say(f"rollback: weights removed; {plan.active} takes every request again")
        return revision

    async def _deregister(self, plan: Plan) -> int:
        ops = [
            Delete(keys.release(plan.app, plan.release.name), prefix=True),
            Delete(keys.history(plan.app, plan.release.name)),
        ]
        revision = await self.store.transaction([], ops)
        self.say(f"rollback: deregistered {plan.release.name}")
        return revision or 0

    async def _confirm(self, plan: Plan, revision: int) -> str | None:
        """None once every router of the pool processed ``revision``; else why not."""
        try:
            await routers.wait_for_routers(
                self.store, pool=plan.pool, revision=revision, timeout=self.options.router_timeout
            )
        except RouterdError as exc:
            return f"the routers did not confirm they stopped routing to it ({brief(exc)})"
        return None

    async def _remove(self, plan: Plan, journal: Journal, deadline: float) -> list[str]:
        new = plan.release.name
        try:
            removed, unlisted = await remove_release(
                self.engines,
                plan.app,
                [new],
                self.options.stop_timeout,
                retry_for=deadline - time.monotonic(),
            )
        except Exception as exc:  # noqa: BLE001  (e.g. the engine went away: say so, do not raise)
            return [f"containers of {new} ({brief(exc)}; run: routerd gc)"]
        self.say(f"rollback: removed {removed} container(s) of {new}")
        placed = {c.engine for c in journal.containers} | set(plan.placement)
        return [
            f"containers of {new} on {host} ({why}; run: routerd gc once it is back)"
            for host, why in sorted(unlisted.items())
            if host in placed
        ]

    async def _keep(self, plan: Plan, journal: Journal, why: str) -> list[str]:
        """Leave the new containers running: stopping them could cut live traffic."""
        new = plan.release.name
        try:
            found, _ = await asyncio.to_thread(self.engines.list, plan.app, new)
            names = [c.name for c in found]
        except Exception:  # noqa: BLE001  (the names the journal knows will do)
            names = [c.name for c in journal.containers]
        self.say(f"rollback: keeping the containers of {new} running, as {why}")
        return [
            (
                f"containers of {new} left running ({', '.join(names) or 'none found'}); once "
                f"`routerd status {plan.app}` shows every router serving "
                f"{plan.active or 'without ' + new}, run: routerd gc {plan.app}"
            )
        ]


async def settle(journal: Journal) -> None:
    """Wait for runtime calls an interruption left running; their errors are moot."""
    if not journal.threads:
        return
    done, _ = await asyncio.wait(journal.threads, timeout=60)
    for future in done:
        if not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" warning later
