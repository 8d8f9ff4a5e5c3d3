"""Canary steps: the part of step 5 that moves ``weights`` before the switch.

For each percentage of ``--canary`` (say 10, then 50):

1. write ``weights`` = {old: 100 - p, new: p}, only while the deploy lock
   is ours, ``active`` is as the plan read it and ``weights`` is as this
   deploy last left it;
2. wait until every live router of the pool has processed that revision
   and reports no error about the app;
3. read every router's figures for the app (``/traffic`` at the address
   its status names), wait the interval, read them again (and again after
   another interval, up to ``canary.WATCHES`` in all, while the new release
   has had fewer than ``--min-requests`` requests since the first reading);
4. judge the new release on the difference (``routerd.deploy.canary``),
   printing both releases' figures; a failing verdict, a router whose
   figures cannot be read, or an abort (``routerd deploy --abort``) fails
   the step, and so the deploy, which rolls back.

Every wait watches for an abort. The final 100 % is the controller's switch,
which sets ``active`` and deletes ``weights`` in one transaction. Never
talks to nginx or Docker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from routerd import keys
from routerd.deploy import abort, routers
from routerd.deploy.abort import unless_aborted
from routerd.deploy.canary import (
    WATCHES,
    Canary,
    Figures,
    Verdict,
    describe,
    judge,
    release_figures,
)
from routerd.deploy.plan import DeployOptions, Journal, Plan
from routerd.deploy.progress import Progress
from routerd.deploy.releases import Lock, describe_weights
from routerd.errors import DeployError
from routerd.routerstatus import RouterStatus
from routerd.store import Check, Put, Store
from routerd.traffic import AppTraffic


def weights_value(plan: Plan, percent: int) -> bytes:
    """The ``weights`` of one step: the old release first, as a person reads it."""
    assert plan.active is not None
    return json.dumps({plan.active: 100 - percent, plan.release.name: percent}).encode()


async def read_traffic(reports: list[RouterStatus], app: str) -> dict[str, AppTraffic]:
    """Every router's figures for ``app``; DeployError naming a router that gives none."""
    found = {}
    for router_id, traffic in await routers.traffic_of(reports, app):
        if isinstance(traffic, str):
            raise DeployError(f"router {router_id}'s figures cannot be read: {traffic}")
        found[router_id] = traffic
    return found


class CanarySteps:
    """The canary steps of one deploy, reported as step 5's ``canary`` lines."""

    def __init__(
        self,
        store: Store,
        options: DeployOptions,
        canary: Canary,
        progress: Progress,
        why_refused: Callable[[Plan, Lock], Awaitable[str]],
    ) -> None:
        self.store = store
        self.options = options
        self.canary = canary
        self.progress = progress
        self.why_refused = why_refused  # the controller's reading of a refused transaction

    def line(self, text: str) -> None:
        self.progress.line(5, "canary", text)

    async def run(self, plan: Plan, lock: Lock, journal: Journal) -> None:
        """Every step, in order; DeployError at the first that fails."""
        for percent in self.canary.steps:
            await self.step(plan, lock, journal, percent)

    async def step(self, plan: Plan, lock: Lock, journal: Journal, percent: int) -> None:
        new, old = plan.release.name, plan.active or ""
        value = weights_value(plan, percent)
        await abort.check(self.store, lock)  # asked for while nothing was watching
        revision = await self._write(plan, lock, journal, value)
        reports = await unless_aborted(self.store, lock, self._wait_routers(plan, revision))
        interval = self.canary.interval
        shares = describe_weights(json.loads(value))
        self.line(
            f"{percent} %: weights {shares} served by every router at revision {revision}; "
            f"watching {interval:g} s"
        )
        figures, old_figures = await self._watch(plan, lock, reports, percent)
        verdict = judge(figures, self.canary.thresholds)
        self.line(f"{percent} %: new {describe(new, figures)}; old {describe(old, old_figures)}")
        self._conclude(percent, verdict)

    async def _watch(
        self, plan: Plan, lock: Lock, reports: list[RouterStatus], percent: int
    ) -> tuple[Figures, Figures]:
        """The new and the old release's figures since the step's first reading,
        after one interval, or more while the new one has too few requests."""
        wanted, interval = self.canary.thresholds.min_requests, self.canary.interval
        before = await read_traffic(reports, plan.app)
        for watch in range(1, WATCHES + 1):
            await unless_aborted(self.store, lock, asyncio.sleep(interval))
            after = await read_traffic(reports, plan.app)
            figures = release_figures(before, after, plan.release.name)
            if figures.requests >= wanted or watch == WATCHES:
                break
            self.line(
                f"{percent} %: {figures.requests} request(s) of {plan.release.name} so far, "
                f"< --min-requests {wanted}; watching {interval:g} s more"
            )
        return figures, release_figures(before, after, plan.active or "")

    def _conclude(self, percent: int, verdict: Verdict) -> None:
        if not verdict.passed:
            self.line(f"{percent} %: roll back: {verdict.reason}")
            raise DeployError(f"the {percent} % step failed: {verdict.reason}")
        self.line(f"{percent} %: go on: {verdict.reason}")

    async def _write(self, plan: Plan, lock: Lock, journal: Journal, value: bytes) -> int:
        lock.ensure_held()
        key, active = keys.weights(plan.app), keys.active(plan.app)
        if journal.weights:
            as_left = Check(key, value=journal.weights[-1])
        else:
            as_left = Check(key, mod_revision=plan.weights_mod) if plan.weights_mod else Check(key)
        checks = [lock.check(), Check(active, mod_revision=plan.active_mod), as_left]
        journal.weights.append(value)  # sent: its outcome may be unknown
        revision = await self.store.transaction(checks, [Put(key, value)])
        if revision is None:
            raise DeployError(await self.why_refused(plan, lock))
        return revision

    async def _wait_routers(self, plan: Plan, revision: int) -> list[RouterStatus]:
        reports = await routers.wait_for_routers(
            self.store, pool=plan.pool, revision=revision, timeout=self.options.router_timeout
        )
        routers.check_serving(
            reports, prefix=self.store.prefix, app=plan.app, release=plan.release.name
        )
        return reports
