"""The blue-green deploy of SPEC 1 and 5: six steps, and what undoes each.

    1 start     the new release's containers, each answering its health path
    2 register  their instances and the release's history, one transaction
    3 render    every live router of the app's pool processed that revision
    4 reload    ... and reports no error about this app
    5 switch    ``active`` to the new release, only if nobody changed it
                meanwhile; then wait for the routers again
    6 destroy   drain, then remove the old release's keys and containers

A later release registers while ``active`` still names the old one, so the
routers render nothing new until the switch: one reload per deploy. The first
release of an app becomes active as it registers (nothing to switch from).

A ``Journal`` records what was done. A failure, or an interruption, up to the
end of the drain is undone in reverse order: ``active`` back (and the routers
waited for, so nothing routes to a container about to stop), instances
deregistered, new containers removed. After the drain step 6 only removes
what nothing routes to any more, and it is not interrupted. Talks to etcd
through ``Store`` and to containers through ``Runtime`` only; never to nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from routerd import releases, routers
from routerd.errors import DeployError, RouterdError, StoreError
from routerd.model import APP_NAME, RELEASE_NAME
from routerd.releases import Lock, Release, ReleaseSpec, app_key
from routerd.runtime import Container, ContainerSpec, Runtime, wait_healthy
from routerd.store import Check, Delete, Put, Store

Say = Callable[[str], None]
STEPS = 6


@dataclass(frozen=True)
class DeployOptions:
    health_timeout: float = 30.0
    drain: float = 2.0
    router_timeout: float = 30.0
    wait_routers: bool = True
    stop_timeout: float = 10.0
    lock_ttl: int = 10
    rollback_timeout: float = 30.0


@dataclass(frozen=True)
class Plan:
    """The deploy as decided from etcd once the lock is held."""

    app: str
    release: Release
    pool: str
    active: str | None
    active_mod: int  # mod revision of ``active``; 0 when there is none
    registered: frozenset[str]  # releases with instances, other than the new one
    served_by: dict[str, str]  # router id -> config hash before the deploy

    @property
    def first(self) -> bool:
        return self.active is None and not self.registered

    @property
    def old(self) -> list[str]:
        return sorted(self.registered | ({self.active} if self.active else set()))


@dataclass
class Journal:
    """What the deploy did so far: what a rollback must undo."""

    threads: list[asyncio.Future[Any]] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)
    registered: bool = False  # the register transaction was sent (outcome may be unknown)
    switched: bool = False  # the switch transaction was sent
    committed: bool = False  # the drain is over: no way back


@dataclass(frozen=True)
class DeployReport:
    app: str
    release: str
    previous: str | None
    durations: dict[str, float]
    total: float


class StepFailed(DeployError):
    def __init__(self, number: int, name: str, reason: str) -> None:
        super().__init__(f"step {number} ({name}) failed: {reason}")
        self.number, self.name, self.reason = number, name, reason


class Progress:
    """One line when a step starts, one when it ends, with its duration."""

    def __init__(self, say: Say) -> None:
        self.say = say
        self.durations: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def step(self, number: int, name: str, what: str) -> AsyncIterator[list[str]]:
        self.say(f"[{number}/{STEPS}] {name}: {what}")
        started, notes = time.monotonic(), list[str]()
        try:
            yield notes
        except asyncio.CancelledError:
            self.say(f"[{number}/{STEPS}] {name}: interrupted after {_since(started)}")
            raise
        except RouterdError as exc:
            reason = brief(exc)
            self.say(f"[{number}/{STEPS}] {name}: failed after {_since(started)}: {reason}")
            raise StepFailed(number, name, reason) from exc
        self.durations[name] = time.monotonic() - started
        detail = f" ({'; '.join(notes)})" if notes else ""
        self.say(f"[{number}/{STEPS}] {name}: done in {_since(started)}{detail}")


def _since(started: float) -> str:
    return f"{time.monotonic() - started:.2f} s"


def brief(exc: BaseException) -> str:
    """One line for a person: gRPC errors print as several lines of internals."""
    cause = exc.__cause__
    if isinstance(exc, StoreError) and callable(getattr(cause, "details", None)):
        return f"etcd unreachable ({cause.code().name}: {cause.details()})"  # type: ignore[union-attr]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_names(app: str, release: str) -> None:
    if APP_NAME.fullmatch(app) is None:
        raise DeployError(f"app name {app!r} must match {APP_NAME.pattern}")
    if RELEASE_NAME.fullmatch(release) is None:
        raise DeployError(f"release name {release!r} must match {RELEASE_NAME.pattern}")


class Deployer:
    """Runs deploys and rollbacks of one app at a time under its etcd lock."""

    def __init__(
        self, store: Store, runtime: Runtime, options: DeployOptions, say: Say = print
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.options = options
        self.say = say
        self.interruptible = True  # False while rolling back or finishing step 6

    # -- entry points

    async def deploy(
        self,
        app: str,
        spec: ReleaseSpec,
        *,
        release: str | None = None,
        rollback_of: str | None = None,
    ) -> DeployReport:
        name = release or releases.new_release_name()
        check_names(app, name)
        self.interruptible = True
        lock = Lock(self.store, app, f"deploy {name}", ttl=self.options.lock_ttl)
        await lock.acquire()
        try:
            new = Release(name, spec, releases.now(), rollback_of=rollback_of)
            plan = await self._plan(app, new)
            return await self._run(plan, lock)
        finally:
            self.interruptible = False
            if not await lock.release():
                self.say(f"could not release the lock of {app}; it expires in {lock.ttl} s")

    async def rollback(self, app: str, *, to: str | None = None) -> DeployReport:
        """Deploy again, as a new release, what served before the active release."""
        snapshot = await self.store.range(app_key(app, ""))
        active = releases.active_release(snapshot, app)
        known = releases.history(snapshot, app)
        if to is not None:
            target = next((r for r in known if r.name == to), None)
            if target is None:
                raise DeployError(f"release {to} of {app} is not in its history")
        else:
            target = releases.previous_release(known, active)
        self.say(
            f"rollback of {app}: from {active or '(none)'} to a new release made like "
            f"{target.name} (image {target.spec.image})"
        )
        return await self.deploy(app, target.spec, rollback_of=target.name)

    # -- deciding

    async def _plan(self, app: str, new: Release) -> Plan:
        snapshot = await self.store.range(app_key(app, ""))
        config = snapshot.kvs.get(app_key(app, "config"))
        if config is None:
            raise DeployError(f"app {app} has no config; run: routerd apps set {app} --domain ...")
        active_kv = snapshot.kvs.get(app_key(app, "active"))
        active = releases.active_release(snapshot, app)
        registered = set(releases.registered_releases(snapshot, app))
        if new.name in registered or new.name == active:
            raise DeployError(f"release {new.name} of {app} already exists; pick another name")
        pool = releases.pool_of(config.value)
        reports = await routers.live_routers(self.store, pool) if self.options.wait_routers else []
        if hosts := (await self.store.range("hosts/")).kvs:
            self.say(
                f"note: hosts/ lists {len(hosts)} host(s), but placement over hosts is not "
                f"implemented yet; using the {self.runtime.name}"
            )
        return Plan(
            app=app,
            release=new,
            pool=pool,
            active=active,
            active_mod=active_kv.mod_revision if active_kv else 0,
            registered=frozenset(registered),
            served_by={r.router_id: r.config_sha256 for r in reports},
        )

    # -- the six steps

    async def _run(self, plan: Plan, lock: Lock) -> DeployReport:
        journal, progress = Journal(), Progress(self.say)
        started = time.monotonic()
        try:
            await self._steps(plan, lock, journal, progress)
        except StepFailed as exc:
            if journal.committed:
                raise DeployError(
                    f"{plan.release.name} serves, but cleaning up failed: {exc.reason}; "
                    "run: routerd gc"
                ) from exc
            left = await self._roll_back(plan, journal)
            where = f"failed at step {exc.number} ({exc.name}): {exc.reason}"
            raise DeployError(_outcome(plan, where, left)) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # let the rollback's own waits and timeouts work
            self.say(f"interrupted: rolling back {plan.release.name}")
            left = await self._roll_back(plan, journal)
            self.say(_outcome(plan, "interrupted", left))
            raise
        total = time.monotonic() - started
        self.say(f"deployed {plan.app} {plan.release.name} in {total:.2f} s")
        return DeployReport(plan.app, plan.release.name, plan.active, progress.durations, total)

    async def _steps(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> None:
        await self._start(plan, journal, progress)
        revision = await self._register(plan, lock, journal, progress)
        await self._confirm(plan, revision, progress)
        await self._switch(plan, lock, journal, progress)
        await self._destroy(plan, journal, progress)

    async def _start(self, plan: Plan, journal: Journal, progress: Progress) -> None:
        spec = plan.release.spec
        what = (
            f"{spec.replicas} container(s) of {plan.app} {plan.release.name} "
            f"(image {spec.image}, network {spec.network}, on the {self.runtime.name})"
        )
        async with progress.step(1, "start", what) as notes:
            await self._thread(journal, self.runtime.check_image, spec.image)
            await _all(self._start_one(plan, i, journal) for i in range(spec.replicas))
            notes.append("healthy at " + ", ".join(c.address for c in journal.containers))

    async def _start_one(self, plan: Plan, index: int, journal: Journal) -> None:
        spec = plan.release.spec
        wanted = ContainerSpec(
            app=plan.app,
            release=plan.release.name,
            index=index,
            image=spec.image,
            env=spec.env,
            port=spec.port,
            network=spec.network,
        )
        created = await self._thread(journal, self.runtime.create, wanted)
        journal.containers.append(created)
        started = await self._thread(journal, self.runtime.start, created)
        journal.containers[journal.containers.index(created)] = started
        await wait_healthy(self.runtime, started, spec.health_path, self.options.health_timeout)

    async def _register(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> int:
        new = plan.release
        what = (
            f"{len(journal.containers)} instance(s) of {new.name} under apps/{plan.app}/releases/"
        )
        what += " as the active release (the app's first)" if plan.first else " (not active yet)"
        revision = 0
        async with progress.step(2, "register", what) as notes:
            ops: list[Put | Delete] = [
                Put(app_key(plan.app, "releases", new.name, c.short_id), c.address.encode())
                for c in journal.containers
            ]
            record = new.activated_now() if plan.first else new
            ops.append(Put(app_key(plan.app, "history", new.name), record.to_json()))
            checks = [lock.check()]
            if plan.first:
                ops.append(Put(app_key(plan.app, "active"), new.name.encode()))
                checks.append(Check(app_key(plan.app, "active")))
            journal.registered = True
            applied = await self.store.transaction(checks, ops)
            if applied is None:
                raise DeployError(await self._why_refused(plan, lock))
            revision = applied
            notes.append(f"revision {revision}")
        return revision

    async def _confirm(self, plan: Plan, revision: int, progress: Progress) -> None:
        if not self.options.wait_routers:
            for number, name in ((3, "render"), (4, "reload")):
                self.say(f"[{number}/{STEPS}] {name}: skipped (--no-wait-routers)")
            return
        what = f"waiting for the routers of pool {plan.pool} to process revision {revision}"
        async with progress.step(3, "render", what) as notes:
            reports = await self._wait_routers(plan, revision)
            notes.append(", ".join(f"{r.router_id} at {r.revision}" for r in reports))
        async with progress.step(4, "reload", "checking what the routers serve") as notes:
            routers.check_serving(
                reports, prefix=self.store.prefix, app=plan.app, release=plan.release.name
            )
            notes.extend(_served(plan, reports))

    async def _wait_routers(self, plan: Plan, revision: int) -> list[routers.RouterReport]:
        return await routers.wait_for_routers(
            self.store, pool=plan.pool, revision=revision, timeout=self.options.router_timeout
        )

    async def _switch(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> None:
        new = plan.release
        if plan.first:
            self.say(f"[5/{STEPS}] switch: nothing to switch from; {new.name} is active already")
            return
        what = f"active {plan.active or '(none)'} -> {new.name}"
        async with progress.step(5, "switch", what) as notes:
            active = app_key(plan.app, "active")
            guard = Check(active, mod_revision=plan.active_mod) if plan.active else Check(active)
            ops = [
                Put(active, new.name.encode()),
                Put(app_key(plan.app, "history", new.name), new.activated_now().to_json()),
            ]
            journal.switched = True
            revision = await self.store.transaction([lock.check(), guard], ops)
            if revision is None:
                raise DeployError(await self._why_refused(plan, lock))
            if self.options.wait_routers:
                reports = await self._wait_routers(plan, revision)
                routers.check_serving(
                    reports, prefix=self.store.prefix, app=plan.app, release=new.name
                )
                notes.extend(_served(plan, reports))

    async def _destroy(self, plan: Plan, journal: Journal, progress: Progress) -> None:
        old = plan.old
        what = f"drain {self.options.drain:g} s, then remove {', '.join(old) or 'nothing'}"
        async with progress.step(6, "destroy", what) as notes:
            await asyncio.sleep(self.options.drain)
            journal.committed, self.interruptible = True, False
            known = releases.history(
                await self.store.range(app_key(plan.app, "history/")), plan.app
            )
            ops: list[Put | Delete] = [
                Delete(app_key(plan.app, "releases", name, ""), prefix=True) for name in old
            ]
            ops += releases.prune_ops(known, {plan.release.name, *old}, plan.app)
            if ops:
                await self.store.transaction([], ops)
            removed = await self._remove_containers(plan.app, old)
            notes.append(f"{removed} container(s) removed")

    async def _remove_containers(self, app: str, names: list[str]) -> int:
        found = [c for name in names for c in await asyncio.to_thread(self.runtime.list, app, name)]
        timeout = self.options.stop_timeout
        await _all(asyncio.to_thread(self.runtime.remove, c, timeout=timeout) for c in found)
        return len(found)

    async def _why_refused(self, plan: Plan, lock: Lock) -> str:
        snapshot = await self.store.range(app_key(plan.app, ""))
        lock_kv = snapshot.kvs.get(lock.key)
        if lock_kv is None or lock_kv.value != lock.token:
            return "the deploy lock is no longer ours (it expired while etcd was unreachable?)"
        active = snapshot.kvs.get(app_key(plan.app, "active"))
        now = active.value.decode("utf-8", "replace") if active else "(none)"
        written = f"written at revision {active.mod_revision}" if active else "deleted"
        return (
            f"active was changed by someone else meanwhile ({written}, after revision "
            f"{plan.active_mod} that this deploy read; it names {now}); giving up"
        )

    # -- undoing

    async def _roll_back(self, plan: Plan, journal: Journal) -> list[str]:
        """Undo what the journal says was done; what could not be undone, in words."""
        self.interruptible = False
        started, left = time.monotonic(), []
        deadline = started + self.options.rollback_timeout
        self.say(f"rollback: undoing the deploy of {plan.app} {plan.release.name}")
        if journal.threads:  # runtime calls an interruption left running
            await asyncio.wait(journal.threads, timeout=60)
        if journal.switched or (journal.registered and plan.first):
            restore = lambda: self._restore_active(plan)  # noqa: E731
            left += await self._etcd_undo("restore active", restore, deadline)
        if journal.registered:
            left += await self._etcd_undo("deregister", lambda: self._deregister(plan), deadline)
        try:
            removed = await self._remove_containers(plan.app, [plan.release.name])
            self.say(f"rollback: removed {removed} container(s) of {plan.release.name}")
        except RouterdError as exc:
            left.append(f"containers of {plan.release.name} ({exc}; run: routerd gc)")
        outcome = f"left behind: {'; '.join(left)}" if left else "done"
        self.say(f"rollback: {outcome} in {_since(started)}")
        return left

    async def _etcd_undo(
        self, what: str, undo: Callable[[], Awaitable[None]], deadline: float
    ) -> list[str]:
        """Retry an etcd undo until ``deadline``: etcd may be down for a while."""
        delay, warned = 0.2, False
        while True:
            try:
                await undo()
                return []
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    return [f"{what} ({exc})"]
                if not warned:
                    self.say(f"rollback: {what}: {brief(exc)}; retrying")
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _restore_active(self, plan: Plan) -> None:
        """Put ``active`` back, only if it is still ours, and let the routers catch up."""
        active = app_key(plan.app, "active")
        undo: Put | Delete = Put(active, plan.active.encode()) if plan.active else Delete(active)
        revision = await self.store.transaction(
            [Check(active, value=plan.release.name.encode())], [undo]
        )
        if revision is None:
            return  # the switch never happened, or someone else moved active on
        self.say(f"rollback: active is {plan.active or '(none)'} again")
        if self.options.wait_routers:
            with contextlib.suppress(DeployError):
                await self._wait_routers(plan, revision)

    async def _deregister(self, plan: Plan) -> None:
        ops = [
            Delete(app_key(plan.app, "releases", plan.release.name, ""), prefix=True),
            Delete(app_key(plan.app, "history", plan.release.name)),
        ]
        await self.store.transaction([], ops)
        self.say(f"rollback: deregistered {plan.release.name}")

    async def _thread(self, journal: Journal, call: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking runtime call; if the deploy is interrupted, the call still
        finishes in its thread and the rollback waits for it (no orphan)."""
        future = asyncio.ensure_future(asyncio.to_thread(call, *args))
        journal.threads.append(future)
        return await asyncio.shield(future)


# ------------------------------------------------------------------ helpers


async def _all(coros: Any) -> None:
    """Run concurrently; on the first failure cancel the rest and wait for them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _served(plan: Plan, reports: list[routers.RouterReport]) -> list[str]:
    return [
        f"{r.router_id} serves {r.config_sha256[:12]}"
        + (" (unchanged)" if plan.served_by.get(r.router_id) == r.config_sha256 else "")
        for r in reports
    ]


def _outcome(plan: Plan, what: str, left: list[str]) -> str:
    serving = plan.active or "nothing (first release)"
    undone = "rolled back" if not left else f"rolled back partly, left behind: {'; '.join(left)}"
    return f"deploy of {plan.app} {plan.release.name} {what}; {undone}; {serving} still serves"
