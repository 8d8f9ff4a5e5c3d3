"""Rolling a deploy back: what the ``Journal`` says was done, undone in reverse.

1. ``active`` back to the old release, only if it still names the new one,
   and the routers waited for: nothing may route to a container about to stop.
2. The new release's instances and history deregistered.
3. Its containers stopped and removed, found by label, after any runtime
   call an interruption left running has finished (so none is orphaned).

etcd may be down (that may be why the deploy failed): each etcd undo is
retried until the rollback's deadline. What could not be undone is returned
in words, for the person to act on (``routerd gc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from routerd import routers
from routerd.errors import DeployError, RouterdError, StoreError
from routerd.plan import DeployOptions, Journal, Plan
from routerd.progress import Say, brief, since
from routerd.releases import app_key
from routerd.runtime import Runtime, remove_release
from routerd.store import Check, Delete, Put, Store


class Undo:
    def __init__(self, store: Store, runtime: Runtime, options: DeployOptions, say: Say) -> None:
        self.store = store
        self.runtime = runtime
        self.options = options
        self.say = say

    async def run(self, plan: Plan, journal: Journal) -> list[str]:
        """Undo the journal; what could not be undone, in words (empty: all of it)."""
        started, left = time.monotonic(), []
        deadline = started + self.options.rollback_timeout
        self.say(f"rollback: undoing the deploy of {plan.app} {plan.release.name}")
        await _settle(journal)
        if journal.switched or (journal.registered and plan.first):
            left += await self._retry("restore active", lambda: self._restore(plan), deadline)
        if journal.registered:
            left += await self._retry("deregister", lambda: self._deregister(plan), deadline)
        try:
            removed = await remove_release(
                self.runtime, plan.app, [plan.release.name], self.options.stop_timeout
            )
            self.say(f"rollback: removed {removed} container(s) of {plan.release.name}")
        except RouterdError as exc:
            left.append(f"containers of {plan.release.name} ({brief(exc)}; run: routerd gc)")
        outcome = f"left behind: {'; '.join(left)}" if left else "done"
        self.say(f"rollback: {outcome} in {since(started)}")
        return left

    async def _retry(
        self, what: str, undo: Callable[[], Awaitable[None]], deadline: float
    ) -> list[str]:
        delay, warned = 0.2, False
        while True:
            try:
                await undo()
                return []
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    return [f"{what} ({brief(exc)})"]
                if not warned:
                    self.say(f"rollback: {what}: {brief(exc)}; retrying")
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _restore(self, plan: Plan) -> None:
        active = app_key(plan.app, "active")
        undo: Put | Delete = Put(active, plan.active.encode()) if plan.active else Delete(active)
        ours = Check(active, value=plan.release.name.encode())
        revision = await self.store.transaction([ours], [undo])
        if revision is None:
            return  # the switch never happened, or someone else moved active on
        self.say(f"rollback: active is {plan.active or '(none)'} again")
        if self.options.wait_routers:
            with contextlib.suppress(DeployError):
                await routers.wait_for_routers(
                    self.store,
                    pool=plan.pool,
                    revision=revision,
                    timeout=self.options.router_timeout,
                )

    async def _deregister(self, plan: Plan) -> None:
        ops = [
            Delete(app_key(plan.app, "releases", plan.release.name, ""), prefix=True),
            Delete(app_key(plan.app, "history", plan.release.name)),
        ]
        await self.store.transaction([], ops)
        self.say(f"rollback: deregistered {plan.release.name}")


async def _settle(journal: Journal) -> None:
    """Wait for runtime calls an interruption left running; their errors are moot."""
    if not journal.threads:
        return
    done, _ = await asyncio.wait(journal.threads, timeout=60)
    for future in done:
        if not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" warning later
