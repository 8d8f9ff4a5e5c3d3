"""The blue-green deploy: six steps, and what undoes each.

    1 start     the new release's containers, each answering its health path
    2 register  their instances and the release's history, one transaction
    3 render    every live router of the app's pool processed that revision
    4 reload    ... and reports no error about this app
    5 switch    ``active`` to the new release (and any ``weights`` gone),
                only if nobody changed it meanwhile; then wait for the
                routers again. With ``--canary``, first the canary steps
                (``routerd.deploy.progressive``): the new release takes a
                growing share of ``weights``, judged on the routers' figures
    6 destroy   drain, then remove the old release's keys and containers

The plan, before step 1, fails at once when the pool has no live router
(unless told not to wait for routers): step 3 could only fail later. Where
hosts are registered it also places each container (``engines.place_release``):
a release that does not fit fails there, having started nothing. The old
release still runs then and counts against the room, as it does.
A later release registers while ``active`` still names the old one, so the
routers render nothing new until the switch: at most one reload per deploy.
The first release of an app becomes active as it registers (nothing to
switch from). One deploy per app at a time: ``releases.Lock``; every etcd
write of steps 2, 5 and 6 applies only while the lock key still holds this
deploy's token, so a deploy whose lock expired stops and rolls back.

A ``Journal`` records what was done. A failure up to step 6's etcd
transaction, or an interruption (the CLI cancels the task) up to the end of
the drain, is undone by ``routerd.undo``. After that transaction step 6 only
removes what nothing routes to any more, and it is not interrupted; an
engine that fails meanwhile (one restarting) is asked again for
``--rollback-timeout``. Talks to
etcd through ``Store`` and to containers through ``Engines`` (each
container on its own host's engine) only; never to nginx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from routerd import keys
from routerd.deploy import configvars, releases, routers
from routerd.deploy.engines import Engines, place_release, remove_release
from routerd.deploy.plan import DeployOptions, Journal, Plan
from routerd.deploy.progress import Progress, Say, brief
from routerd.deploy.progressive import CanarySteps, read_traffic
from routerd.deploy.releases import Lock, Release, ReleaseSpec
from routerd.deploy.runtime import Container, ContainerSpec, run_all, wait_healthy
from routerd.deploy.undo import Undo
from routerd.errors import DeployError, InvalidValue, StepFailed
from routerd.keys import APP_NAME, RELEASE_NAME
from routerd.routerstatus import RouterStatus
from routerd.store import Check, Delete, Put, Snapshot, Store


def check_names(app: str, release: str) -> None:
    if APP_NAME.fullmatch(app) is None:
        raise DeployError(f"app name {app!r} must match {APP_NAME.pattern}")
    if RELEASE_NAME.fullmatch(release) is None:
        raise DeployError(f"release name {release!r} must match {RELEASE_NAME.pattern}")


class Deployer:
    """Runs deploys and rollbacks of one app at a time under its etcd lock."""

    def __init__(
        self, store: Store, engines: Engines, options: DeployOptions, say: Say = print
    ) -> None:
        self.store = store
        self.engines = engines
        self.options = options
        self.say = say
        self.interruptible = True  # False while rolling back or finishing step 6
        self.undo = Undo(store, engines, options, say)

    # -- entry points

    async def deploy(
        self,
        app: str,
        spec: ReleaseSpec,
        *,
        release: str | None = None,
        rollback_of: Release | None = None,
    ) -> None:
        """Deploy ``spec`` as a new release: its env is the app's config vars
        overlaid by ``spec.env`` (the deploy's own --env); a rollback runs the
        target's env as it was and, once it serves, puts its config vars back."""
        name = release or releases.new_release_name()
        check_names(app, name)
        if problems := releases.spec_problems(spec):
            raise DeployError(f"cannot deploy {app} {name}: {'; '.join(problems)}")
        self.interruptible = True
        canary = self.options.canary
        doing, extra = f"deploy {name}", {}
        if canary is not None:  # routerd deploy --abort can stop it
            doing += " with canary steps " + ",".join(map(str, canary.steps))
            extra = {"abortable": True, "release": name}
        lock = Lock(self.store, app, doing, ttl=self.options.lock_ttl, **extra)
        await lock.acquire()
        try:
            back_to = rollback_of.name if rollback_of else None
            new = Release(name, spec, releases.now(), rollback_of=back_to)
            plan = await self._plan(app, new, rollback_of)
            await self._run(plan, lock)
        finally:
            self.interruptible = False
            if not await lock.release():
                self.say(f"could not release the lock of {app}; it expires in {lock.ttl} s")

    async def rollback(self, app: str, *, to: str | None = None) -> None:
        """Deploy again, as a new release, what served before the active release,
        or the release ``to`` names (a version like v7, or a release name)."""
        snapshot = await self.store.range(keys.app(app))
        active = releases.active_release(snapshot, app)
        known, rejected = releases.read_history(snapshot, app)
        if bad := rejected.get(to) if to else next(iter(rejected.values()), None):
            # A record is checked before anything is made from it; and without
            # --to, one that cannot be read might be the release to go back to.
            raise DeployError(
                f"rollback of {app} refused: history record {self.store.prefix}{bad.key} is "
                f"invalid: {bad.message}; correct or delete it"
                + ("" if to else ", or name a valid release with --to")
            ) from bad
        if to is not None:
            target = releases.by_version(known, to) or next(
                (r for r in known if r.name == to), None
            )
            if target is None:
                raise DeployError(
                    f"{to} is not in the history of {app}; `routerd releases {app}` lists it"
                )
        else:
            target = releases.previous_release(known, active)
        self.say(
            f"rollback of {app}: from {active or '(none)'} to a new release made like "
            f"{target.label} {target.name} (image {target.spec.image}, its config vars)"
        )
        await self.deploy(app, target.spec, rollback_of=target)

    # -- deciding

    async def _plan(self, app: str, new: Release, rollback_of: Release | None) -> Plan:
        snapshot = await self.store.range(keys.app(app))
        config = snapshot.kvs.get(keys.config(app))
        if config is None:
            raise DeployError(f"app {app} has no config; run: routerd apps set {app} --domain ...")
        active_kv = snapshot.kvs.get(keys.active(app))
        weights_kv = snapshot.kvs.get(keys.weights(app))
        active = releases.active_release(snapshot, app)
        registered = set(releases.registered_releases(snapshot, app))
        if new.name in registered or new.name == active:
            raise DeployError(f"release {new.name} of {app} already exists; pick another name")
        pool = releases.pool_of(config.value)
        # Before anything starts: without a live router, step 3 could only fail.
        reports = (
            await routers.require_routers(self.store, pool) if self.options.wait_routers else []
        )
        if self.options.canary is not None and (active or registered):
            await self._check_canary(app, active, reports)
        version, version_mod = releases.next_version(snapshot, app)
        if rollback_of is not None:
            new = replace(new, config_vars=rollback_of.config_vars, version=version)
            restore = rollback_of.config_env()
        else:
            config_vars = self._config_vars(app, snapshot)
            spec = replace(new.spec, env={**config_vars, **new.spec.env})
            names = tuple(sorted(config_vars))
            new = replace(new, spec=spec, config_vars=names, version=version)
            restore = None
        placement = await place_release(
            self.store,
            self.engines,
            app=app,
            release=new.name,
            spec=new.spec,
            pool=pool,
            count=new.spec.replicas,
            say=self.say,
        )
        return Plan(
            app=app,
            release=new,
            pool=pool,
            active=active,
            active_mod=active_kv.mod_revision if active_kv else 0,
            registered=frozenset(registered),
            served_by={r.router_id: r.config_sha256 for r in reports},
            version_mod=version_mod,
            restore_config=restore,
            placement=tuple(placement),
            weights_mod=weights_kv.mod_revision if weights_kv else 0,
        )

    async def _check_canary(
        self, app: str, active: str | None, reports: list[RouterStatus]
    ) -> None:
        """Canary steps need a release to take traffic from and every router's figures."""
        if active is None:
            raise DeployError(
                f"--canary needs an active release of {app} to take traffic from; there is "
                "none (every registered release serves): deploy without --canary"
            )
        try:
            await read_traffic(reports, app)
        except DeployError as exc:
            raise DeployError(f"cannot judge canary steps of {app}: {exc}") from exc

    def _config_vars(self, app: str, snapshot: Snapshot) -> dict[str, str]:
        kv = snapshot.kvs.get(keys.env(app))
        where = self.store.prefix + keys.env(app)
        try:
            return configvars.parse(where, kv.value if kv else None)
        except InvalidValue as exc:
            raise DeployError(f"cannot read the config vars: {exc}") from exc

    # -- the six steps

    async def _run(self, plan: Plan, lock: Lock) -> None:
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
        except Exception as exc:  # a bug, not a RouterdError: still leave nothing behind
            if not journal.committed:
                left = await self._roll_back(plan, journal)
                self.say(_outcome(plan, f"failed unexpectedly ({brief(exc)})", left))
            raise
        total = time.monotonic() - started
        self.say(f"deployed {plan.app} {plan.release.name} in {total:.2f} s")

    async def _steps(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> None:
        await self._start(plan, journal, progress)
        revision = await self._register(plan, lock, journal, progress)
        await self._confirm(plan, revision, progress)
        await self._canary(plan, lock, journal, progress)
        await self._switch(plan, lock, journal, progress)
        await self._destroy(plan, lock, journal, progress)

    async def _start(self, plan: Plan, journal: Journal, progress: Progress) -> None:
        spec = plan.release.spec
        hosts = sorted(set(plan.placement))
        where = ", ".join(hosts) if self.engines.placing else f"the {self.engines.name}"
        what = (
            f"{spec.replicas} container(s) of {plan.app} {plan.release.name} "
            f"({plan.release.label}, image {spec.image}, network {spec.network}, on {where})"
        )
        async with progress.step(1, "start", what) as notes:
            await run_all(
                self._thread(journal, self.engines.of(h).check_image, spec.image) for h in hosts
            )
            await run_all(self._start_one(plan, i, journal) for i in range(spec.replicas))
            notes.append("healthy at " + ", ".join(_at(c) for c in journal.containers))

    async def _start_one(self, plan: Plan, index: int, journal: Journal) -> None:
        wanted = container_spec(plan.app, plan.release, index, plan.host_of(index))
        await start_container(self.engines, wanted, plan.release.spec, journal, self.options)

    async def _register(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> int:
        new = plan.release
        what = (
            f"{len(journal.containers)} instance(s) of {new.name} under {keys.releases(plan.app)}"
        )
        what += " as the active release (the app's first)" if plan.first else " (not active yet)"
        revision = 0
        async with progress.step(2, "register", what) as notes:
            ops: list[Put | Delete] = [
                Put(keys.instance(plan.app, new.name, c.short_id), c.address.encode())
                for c in journal.containers
            ]
            record = new.activated_now() if plan.first else new
            ops.append(Put(keys.history(plan.app, new.name), record.to_json()))
            ops.append(Put(keys.version(plan.app), str(new.version).encode()))
            version_key = keys.version(plan.app)  # taken once: never given twice
            checks = [lock.check(), Check(version_key, mod_revision=plan.version_mod)]
            if not plan.version_mod:
                checks[-1] = Check(version_key)
            if plan.first:
                ops.append(Put(keys.active(plan.app), new.name.encode()))
                checks.append(Check(keys.active(plan.app)))
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
                progress.line(number, name, "skipped (--no-wait-routers)")
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

    async def _wait_routers(self, plan: Plan, revision: int) -> list[RouterStatus]:
        return await routers.wait_for_routers(
            self.store, pool=plan.pool, revision=revision, timeout=self.options.router_timeout
        )

    async def _canary(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> None:
        canary = self.options.canary
        if canary is None:
            return
        new = plan.release.name
        if plan.first:
            progress.line(5, "canary", f"nothing to compare with: {new} is the app's first release")
            return
        shares = ", ".join(f"{p} %" for p in canary.steps)
        what = f"{new} takes {shares} for {canary.interval:g} s each, then 100 %"
        async with progress.step(5, "canary", what):
            steps = CanarySteps(self.store, self.options, canary, progress, self._why_refused)
            await steps.run(plan, lock, journal)

    async def _switch(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> None:
        new = plan.release
        if plan.first:
            progress.line(5, "switch", f"nothing to switch from; {new.name} is active already")
            return
        what = f"active {plan.active or '(none)'} -> {new.name}"
        if journal.weights:
            what += ", weights removed"
        async with progress.step(5, "switch", what) as notes:
            lock.ensure_held()
            active, weights = keys.active(plan.app), keys.weights(plan.app)
            guard = Check(active, mod_revision=plan.active_mod) if plan.active else Check(active)
            checks = [lock.check(), guard]
            if journal.weights:  # as the canary's last step left them
                checks.append(Check(weights, value=journal.weights[-1]))
            ops: list[Put | Delete] = [
                Put(active, new.name.encode()),
                Delete(weights),  # weights would override active
                Put(keys.history(plan.app, new.name), new.activated_now().to_json()),
            ]
            journal.switched = True
            revision = await self.store.transaction(checks, ops)
            if revision is None:
                raise DeployError(await self._why_refused(plan, lock))
            if self.options.wait_routers:
                reports = await self._wait_routers(plan, revision)
                routers.check_serving(
                    reports, prefix=self.store.prefix, app=plan.app, release=new.name
                )
                notes.extend(_served(plan, reports))

    async def _destroy(self, plan: Plan, lock: Lock, journal: Journal, progress: Progress) -> None:
        old = plan.old
        what = f"drain {self.options.drain:g} s, then remove {', '.join(old) or 'nothing'}"
        async with progress.step(6, "destroy", what) as notes:
            await asyncio.sleep(self.options.drain)
            self.interruptible = False
            lock.ensure_held()
            known = releases.history(await self.store.range(keys.history(plan.app)), plan.app)
            ops: list[Put | Delete] = [
                Delete(keys.release(plan.app, name), prefix=True) for name in old
            ]
            ops += releases.prune_ops(known, {plan.release.name, *old}, plan.app)
            if plan.restore_config is not None:
                ops.append(Put(keys.env(plan.app), configvars.to_json(plan.restore_config)))
            # Committed once this is sent: should etcd fail to answer, it may have
            # applied it, and putting ``active`` back could name a deleted release.
            journal.committed = True
            if await self.store.transaction([lock.check()], ops) is None:
                journal.committed = False  # refused, so nothing was written: roll back
                raise DeployError(lock.lost_reason)
            removed, unlisted = await remove_release(
                self.engines,
                plan.app,
                old,
                self.options.stop_timeout,
                retry_for=self.options.rollback_timeout,
            )
            notes.append(f"{removed} container(s) removed")
            notes += [
                f"not looked at on {h} ({why}); run: routerd gc" for h, why in unlisted.items()
            ]

    async def _why_refused(self, plan: Plan, lock: Lock) -> str:
        snapshot = await self.store.range(keys.app(plan.app))
        lock_kv = snapshot.kvs.get(lock.key)
        if lock.lost or lock_kv is None or lock_kv.value != lock.token:
            return lock.lost_reason
        active = snapshot.kvs.get(keys.active(plan.app))
        if active is not None and active.mod_revision == plan.active_mod:
            return f"weights of {plan.app} were changed by someone else meanwhile; giving up"
        now = active.value.decode("utf-8", "replace") if active else "(none)"
        written = f"written at revision {active.mod_revision}" if active else "deleted"
        return (
            f"active was changed by someone else meanwhile ({written}, after revision "
            f"{plan.active_mod} that this deploy read; it names {now}); giving up"
        )

    async def _roll_back(self, plan: Plan, journal: Journal) -> list[str]:
        self.interruptible = False
        return await self.undo.run(plan, journal)

    async def _thread(self, journal: Journal, call: Callable[..., Any], *args: Any) -> Any:
        return await in_thread(journal, call, *args)


# ------------------------------------------------------------------ helpers


def container_spec(app: str, release: Release, index: int, host: str) -> ContainerSpec:
    spec = release.spec
    return ContainerSpec(
        app=app,
        release=release.name,
        index=index,
        image=spec.image,
        env=spec.env,
        port=spec.port,
        network=spec.network,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        host=host,
    )


async def start_container(
    engines: Engines,
    wanted: ContainerSpec,
    spec: ReleaseSpec,
    journal: Journal,
    options: DeployOptions,
) -> None:
    """Create and start one container on its host's engine, then wait until it
    answers its health path; the journal knows of it from its creation on."""
    runtime = engines.of(wanted.host)
    created = await in_thread(journal, runtime.create, wanted)
    journal.containers.append(created)
    started = await in_thread(journal, runtime.start, created)
    journal.containers[journal.containers.index(created)] = started
    await wait_healthy(runtime, started, spec.health_path, options.health_timeout)


async def in_thread(journal: Journal, call: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking runtime call; if the deploy is interrupted, the call still
    finishes in its thread and the rollback waits for it (no orphan)."""
    future = asyncio.ensure_future(asyncio.to_thread(call, *args))
    journal.threads.append(future)
    return await asyncio.shield(future)


def _at(container: Container) -> str:
    return f"{container.address} ({container.engine})" if container.engine else container.address


def _served(plan: Plan, reports: list[RouterStatus]) -> list[str]:
    return [
        f"{r.router_id} serves {r.config_sha256[:12]}"
        + (" (unchanged)" if plan.served_by.get(r.router_id) == r.config_sha256 else "")
        for r in reports
    ]


def _outcome(plan: Plan, what: str, left: list[str]) -> str:
    undone = "rolled back" if not left else f"rolled back partly, left behind: {'; '.join(left)}"
    return f"deploy of {plan.app} {plan.release.name} {what}; {undone}; {plan.serving} still serves"
