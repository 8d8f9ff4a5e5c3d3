"""``routerd scale <app> N``: more or fewer containers of the active release,
without one failed request (Heroku's ``ps:scale``).

Up, in three steps: place the new containers as a deploy does (what runs
now counts; hosts with the fewest of the release first), start them and
wait until each answers its health path; register their instances, and
the new count in the release's history record, in one transaction that
applies only while the app's lock is ours and ``active`` still names the
release; wait until every router of the pool serves them. A failure or an
interruption undoes it: the instances are deregistered, the routers waited
for (they may have routed to them), the containers removed.

Down, in four: take containers off the hosts that hold the most of the
release, newest first (an instance whose container no engine shows goes
first: it serves nothing); deregister them in one such transaction; wait
until every router of the pool processed it, so none routes to them any
more; drain; stop and remove them. Until the stop, a failure or an
interruption registers them again and stops nothing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from routerd import keys
from routerd.deploy import releases, routers
from routerd.deploy.controller import container_spec, start_container
from routerd.deploy.engines import Engines, place_release, remove_each
from routerd.deploy.plan import DeployOptions, Journal
from routerd.deploy.progress import Progress, Say, brief
from routerd.deploy.releases import MAX_REPLICAS, Lock, Release
from routerd.deploy.runtime import Container, run_all
from routerd.deploy.undo import settle
from routerd.errors import DeployError, RouterdError
from routerd.store import Check, Delete, Put, Store


@dataclass(frozen=True)
class Target:
    """The release being scaled, as found once the lock is held."""

    app: str
    pool: str
    release: Release  # the active release, from its history record
    instances: dict[str, str]  # its registered instances: name -> address
    containers: list[Container]  # its containers on every engine that answered

    def container(self, instance: str) -> Container | None:
        return next((c for c in self.containers if c.short_id == instance), None)


class Scaler:
    def __init__(
        self, store: Store, engines: Engines, options: DeployOptions, say: Say = print
    ) -> None:
        self.store = store
        self.engines = engines
        self.options = options
        self.say = say
        self.interruptible = True  # False while undoing or stopping

    async def scale(self, app: str, count: int) -> None:
        if not 1 <= count <= MAX_REPLICAS:
            raise DeployError(f"cannot scale {app} to {count}: 1..{MAX_REPLICAS} containers")
        lock = Lock(self.store, app, f"scale to {count}", ttl=self.options.lock_ttl)
        await lock.acquire()
        try:
            target = await self._target(app)
            have = len(target.instances)
            self.say(f"scale {app} {target.release.name}: {have} -> {count} container(s)")
            if count > have:
                await self._up(target, count, lock)
            elif count < have:
                await self._down(target, count, lock)
            else:
                self.say(f"{app} runs {count} container(s) already; nothing to do")
        finally:
            self.interruptible = False
            if not await lock.release():
                self.say(f"could not release the lock of {app}; it expires in {lock.ttl} s")

    async def _target(self, app: str) -> Target:
        snapshot = await self.store.range(keys.app(app))
        config = snapshot.kvs.get(keys.config(app))
        if config is None:
            raise DeployError(f"app {app} has no config; run: routerd apps set {app} --domain ...")
        active = releases.active_release(snapshot, app)
        if active is None:
            raise DeployError(f"app {app} has no active release to scale; deploy it first")
        known, rejected = releases.read_history(snapshot, app)
        if bad := rejected.get(active):
            raise DeployError(
                f"scale of {app} refused: history record {self.store.prefix}{bad.key} is "
                f"invalid: {bad.message}; correct it, or deploy again"
            ) from bad
        record = next((r for r in known if r.name == active), None)
        if record is None:
            raise DeployError(f"the active release {active} of {app} has no history record")
        pool = releases.pool_of(config.value)
        if self.options.wait_routers:
            await routers.require_routers(self.store, pool)
        found, unlisted = await asyncio.to_thread(self.engines.list, app, active)
        for host, why in sorted(unlisted.items()):
            self.say(f"note: host {host} not looked at ({why})")
        instances = releases.registered_releases(snapshot, app).get(active, {})
        return Target(app, pool, record, instances, [c for c in found if c.short_id in instances])

    # -- up

    async def _up(self, target: Target, count: int, lock: Lock) -> None:
        release, spec = target.release, target.release.spec
        hosts = await place_release(
            self.store,
            self.engines,
            app=target.app,
            release=release.name,
            spec=spec,
            pool=target.pool,
            count=count - len(target.instances),
            say=self.say,
        )
        progress, journal = Progress(self.say, steps=3), Journal()
        first = _next_index(await asyncio.to_thread(self.engines.list, target.app, release.name))
        wanted = [
            container_spec(target.app, release, first + n, host) for n, host in enumerate(hosts)
        ]
        try:
            where = ", ".join(sorted(set(hosts))) or f"the {self.engines.name}"
            async with progress.step(1, "start", f"{len(wanted)} container(s) on {where}") as notes:
                await run_all(
                    start_container(self.engines, w, spec, journal, self.options) for w in wanted
                )
                notes.append("healthy at " + ", ".join(c.address for c in journal.containers))
            puts = [
                Put(keys.instance(target.app, release.name, c.short_id), c.address.encode())
                for c in journal.containers
            ]
            async with progress.step(2, "register", f"{len(puts)} instance(s)") as notes:
                journal.registered = True  # from here on, the outcome may be unknown
                revision = await self._write(target, lock, count, puts)
                journal.registered = revision is not None
                notes.append(f"revision {self._applied(revision, lock)}")
            await self._confirm(3, progress, target, revision or 0)
        except (RouterdError, asyncio.CancelledError) as exc:
            self._uncancel(exc)
            await self._undo_up(target, journal, lock)
            raise
        self.say(f"scaled {target.app} {release.name} to {count}")

    async def _undo_up(self, target: Target, journal: Journal, lock: Lock) -> None:
        """Deregister the new containers, wait for the routers, remove them."""
        self.interruptible = False
        await settle(journal)
        release, names = target.release.name, ", ".join(c.name for c in journal.containers)
        if journal.registered:
            drops = [
                Delete(keys.instance(target.app, release, c.short_id)) for c in journal.containers
            ]
            try:
                revision = await self._write(target, lock, len(target.instances), drops)
                if self.options.wait_routers:
                    await routers.wait_for_routers(
                        self.store,
                        pool=target.pool,
                        revision=self._applied(revision, lock),
                        timeout=self.options.router_timeout,
                    )
            except RouterdError as exc:
                self.say(
                    f"undo: left running, as routers may still use them: {names} ({brief(exc)})"
                )
                return
        failed = await remove_each(self.engines, journal.containers, self.options.stop_timeout)
        self.say(f"undo: removed {len(journal.containers) - len(failed)} new container(s)")
        for line in failed:
            self.say(f"undo: could not remove {line}; run: routerd gc {target.app}")

    # -- down

    async def _down(self, target: Target, count: int, lock: Lock) -> None:
        going = _to_remove(target, len(target.instances) - count)
        progress, deregistered = Progress(self.say, steps=4), False
        names = ", ".join(f"{i} ({_where(target.container(i))})" for i in going)
        drops = [Delete(keys.instance(target.app, target.release.name, i)) for i in going]
        try:
            async with progress.step(1, "deregister", names) as notes:
                revision = await self._write(target, lock, count, drops)
                deregistered = revision is not None
                notes.append(f"revision {self._applied(revision, lock)}")
            await self._confirm(2, progress, target, revision or 0)
            async with progress.step(3, "drain", f"{self.options.drain:g} s"):
                await asyncio.sleep(self.options.drain)
        except (RouterdError, asyncio.CancelledError) as exc:
            self._uncancel(exc)
            self.interruptible = False
            if deregistered:
                await self._register_again(target, lock, going)
            raise
        self.interruptible = False
        stopping = [c for c in map(target.container, going) if c is not None]
        async with progress.step(4, "stop", f"{len(stopping)} container(s)") as notes:
            if failed := await remove_each(self.engines, stopping, self.options.stop_timeout):
                raise DeployError(
                    f"deregistered, but could not remove {'; '.join(failed)}; "
                    "remove them with docker rm -f"
                )
            notes.append(f"{len(stopping)} removed")
        self.say(f"scaled {target.app} {target.release.name} to {count}")

    async def _register_again(self, target: Target, lock: Lock, going: list[str]) -> None:
        back = [
            Put(keys.instance(target.app, target.release.name, i), target.instances[i].encode())
            for i in going
        ]
        try:
            self._applied(await self._write(target, lock, len(target.instances), back), lock)
        except RouterdError as exc:
            self.say(f"undo: could not register {', '.join(going)} again ({brief(exc)})")
            return
        self.say(f"undo: registered {len(back)} instance(s) again; nothing stopped")

    # -- shared

    async def _confirm(
        self, number: int, progress: Progress, target: Target, revision: int
    ) -> None:
        """Wait until every router of the pool processed ``revision`` and reports
        no error about the release."""
        if not self.options.wait_routers:
            progress.line(number, "confirm", "skipped (--no-wait-routers)")
            return
        what = f"waiting for the routers of pool {target.pool} to process revision {revision}"
        async with progress.step(number, "confirm", what) as notes:
            reports = await routers.wait_for_routers(
                self.store, pool=target.pool, revision=revision, timeout=self.options.router_timeout
            )
            routers.check_serving(
                reports, prefix=self.store.prefix, app=target.app, release=target.release.name
            )
            notes.append(", ".join(f"{r.router_id} at {r.revision}" for r in reports))

    async def _write(
        self, target: Target, lock: Lock, count: int, ops: Sequence[Put | Delete]
    ) -> int | None:
        """Apply ``ops`` and the record's new count, while the lock is ours and
        ``active`` still names the release; its revision, None when refused."""
        release = target.release
        record = replace(release, spec=replace(release.spec, replicas=count))
        history = Put(keys.history(target.app, release.name), record.to_json())
        still_active = Check(keys.active(target.app), value=release.name.encode())
        return await self.store.transaction([lock.check(), still_active], [*ops, history])

    def _applied(self, revision: int | None, lock: Lock) -> int:
        if revision is None:
            raise DeployError(f"{lock.lost_reason}, or active changed meanwhile; giving up")
        return revision

    def _uncancel(self, exc: BaseException) -> None:
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None:
            task.uncancel()  # let the undo's own waits work; the error is raised again after


# ------------------------------------------------------------------ helpers


def _index(container: Container) -> int:
    tail = container.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _next_index(found: tuple[list[Container], dict[str, str]]) -> int:
    """The first container number no container of the release uses on any engine."""
    containers, _ = found
    return max((_index(c) for c in containers), default=-1) + 1


def _to_remove(target: Target, number: int) -> list[str]:
    """The instances to take out: those no engine shows first, then one at a
    time from the host holding the most of the release, newest first."""
    gone = [i for i in sorted(target.instances) if target.container(i) is None][:number]
    left = [c for c in target.containers if c.short_id not in gone]
    while len(gone) < number and left:
        per_host = Counter(c.engine for c in left)
        pick = max(left, key=lambda c: (per_host[c.engine], _index(c)))
        gone.append(pick.short_id)
        left.remove(pick)
    return gone


def _where(container: Container | None) -> str:
    if container is None:
        return "no container found"
    return f"{container.name} on {container.engine}" if container.engine else container.name
