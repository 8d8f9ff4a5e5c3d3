"""What exists where: etcd's releases against the containers on every engine.

``collect_garbage`` removes what a crashed controller left behind: containers
labelled for a release nothing routes to (or that are no instance of the
release they are labelled for), and releases registered beside the
active one and any the weights give a share (a deploy that died between
register and switch; the history of such a release goes too unless it once
served). It takes each app's deploy
lock first, so it never touches a deploy in progress, and leaves alone the
containers of an app etcd has no config for (unless forced): those are
someone else's, or the prefix is wrong. Every host's engine is looked at;
one that cannot be reached is named, and gc then exits non-zero.
``describe`` gathers one app's releases, instances, containers and what each
router of its pool serves, for ``routerd status <app>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from routerd import keys
from routerd.deploy import releases, routers
from routerd.deploy.engines import Engines, remove_each
from routerd.deploy.releases import (
    Lock,
    Release,
    active_release,
    describe_weights,
    read_weights,
    registered_releases,
)
from routerd.deploy.runtime import Container
from routerd.errors import ContainerError, DeployError, InvalidValue, LockHeld
from routerd.routerstatus import RouterStatus
from routerd.store import Delete, Snapshot, Store

Say = Callable[[str], None]


def routed(snapshot: Snapshot, app: str) -> set[str]:
    """The releases routers may send traffic to: those the weights give a share
    (and the active one), else the active one, else every registered one.
    Weights that are not valid leave the routers on an earlier value: then
    every release may be routed."""
    active = {name} if (name := active_release(snapshot, app)) else set()
    every = set(registered_releases(snapshot, app))
    try:
        shares = read_weights(snapshot, app)
    except InvalidValue:
        return every | active
    if shares is not None:
        return {release for release, share in shares.items() if share} | active
    return active or every


# ---------------------------------------------------------------------- gc


async def collect_garbage(
    store: Store,
    engines: Engines,
    *,
    app: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    say: Say,
) -> int:
    """Remove stale releases and their containers; how many containers went.

    Containers of an app with no ``apps/<app>/config`` are only listed,
    unless ``force``: a wrong ``--prefix``, or another installation sharing
    the engine, would otherwise make every serving container look stale.
    A failed removal does not stop the others; at the end ContainerError
    names each container left.
    """
    containers, unlisted = await asyncio.to_thread(engines.list, app)
    for host, why in sorted(unlisted.items()):
        say(f"gc: host {host} not looked at: {why}")
    snapshot = await store.range(keys.app(app) if app else keys.APPS)
    apps = {c.app for c in containers if c.app} | _apps_with_releases(snapshot)
    removed, failed = 0, list[str]()
    for name in sorted(apps if app is None else apps & {app}):
        mine = [c for c in containers if c.app == name]
        if not force and keys.config(name) not in snapshot.kvs:
            _refuse(store, name, mine, say)
            continue
        gone, left = await _collect_app(
            store, engines, name, mine, dry_run=dry_run, force=force, say=say
        )
        removed, failed = removed + gone, failed + left
    if failed:
        say(f"gc: removed {removed} container(s); {len(failed)} could not be removed")
        raise ContainerError(f"gc: could not remove {'; '.join(failed)}")
    if unlisted:
        say(f"gc: removed {removed} container(s); {len(unlisted)} host(s) not looked at")
        raise ContainerError(f"gc: hosts not looked at: {', '.join(sorted(unlisted))}")
    return removed


def _apps_with_releases(snapshot: Snapshot) -> set[str]:
    return {k.app for k in map(keys.parse, snapshot.kvs) if k.kind == "instance" and k.app}


def _refuse(store: Store, app: str, containers: list[Container], say: Say) -> None:
    names = ", ".join(f"{c.name} ({c.release}, {c.state})" for c in containers) or "nothing"
    say(
        f"gc: skipped {app}: etcd has no {store.prefix}{keys.config(app)} "
        f"(wrong --prefix, or another installation's app?); would remove {names}; "
        "pass --force to remove them"
    )


async def _collect_app(
    store: Store,
    engines: Engines,
    app: str,
    containers: list[Container],
    *,
    dry_run: bool,
    force: bool,
    say: Say,
) -> tuple[int, list[str]]:
    """(containers removed, a line per one that could not be)."""
    lock = Lock(store, app, "gc")
    try:
        await lock.acquire()
    except LockHeld as exc:
        say(f"gc: skipped {app}: {exc}")
        return 0, []
    try:
        snapshot = await store.range(keys.app(app))
        if not force and keys.config(app) not in snapshot.kvs:  # removed meanwhile
            _refuse(store, app, containers, say)
            return 0, []
        live, registered = routed(snapshot, app), registered_releases(snapshot, app)
        stale_keys = sorted(set(registered) - live)
        # A container of a routed release that is no instance of it was left by
        # a scale or a deploy that died before registering it: nothing routes there.
        stale = [
            c
            for c in containers
            if c.release not in live or c.short_id not in registered.get(c.release, {})
        ]
        for release in stale_keys:
            say(f"gc: {app}: release {release} is registered but not active: deregistering")
        for c in stale:
            where = f" on {c.engine}" if c.engine else ""
            say(f"gc: {app}: removing {c.name}{where} ({c.release}, {c.state})")
        if dry_run:
            return len(stale), []
        never_served = {r.name for r in releases.history(snapshot, app) if not r.activated}
        ops = [Delete(keys.release(app, r), prefix=True) for r in stale_keys]
        ops += [Delete(keys.history(app, r)) for r in stale_keys if r in never_served]
        if ops and await store.transaction([lock.check()], ops) is None:
            raise DeployError(lock.lost_reason)
        failed = await remove_each(engines, stale, timeout=10)
        for line in failed:
            say(f"gc: {app}: could not remove {line}")
        return len(stale) - len(failed), [f"{app}: {line}" for line in failed]
    finally:
        await lock.release()


# ------------------------------------------------------------------ status


@dataclass(frozen=True)
class AppStatus:
    app: str
    active: str | None
    weights: str | None  # "v1 90 %, v2 10 %" when weights are set; unreadable ones say so
    history: list[Release]
    instances: dict[str, dict[str, str]]
    containers: list[Container] | None  # None: no engine could be asked
    runtime_error: str | None  # why some or every engine could not be asked
    routers: list[str]  # one line per router of the app's pool


async def describe(store: Store, engines: Engines | None, app: str, *, pool: str) -> AppStatus:
    snapshot = await store.range(keys.app(app))
    active_kv = snapshot.kvs.get(keys.active(app))
    containers, error = None, None
    if engines is not None:
        found, unlisted = await asyncio.to_thread(engines.list, app)
        every = len(engines.runtimes) + len(engines.unreachable)
        containers = None if len(unlisted) == every else found
        error = "; ".join(f"{h}: {why}" for h, why in sorted(unlisted.items())) or None
    reports = await routers.live_routers(store, pool)
    weights_kv = snapshot.kvs.get(keys.weights(app))
    since = max(kv.mod_revision if kv else 0 for kv in (active_kv, weights_kv))
    active = active_release(snapshot, app)
    shown = _weights_shown(snapshot, app)
    return AppStatus(
        app=app,
        active=active,
        weights=shown,
        history=releases.history(snapshot, app),
        instances=registered_releases(snapshot, app),
        containers=containers,
        runtime_error=error,
        routers=[_router_line(r, store.prefix, app, active, shown, since) for r in reports],
    )


def _weights_shown(snapshot: Snapshot, app: str) -> str | None:
    try:
        shares = read_weights(snapshot, app)
    except InvalidValue as exc:
        return f"unreadable ({exc.message})"
    return None if shares is None else describe_weights(shares)


def _router_line(
    report: RouterStatus,
    prefix: str,
    app: str,
    active: str | None,
    weights: str | None,
    since: int,
) -> str:
    errors = report.errors_about(prefix, app, active or "")
    if errors:
        return f"{report.router_id}: error {errors[0].key}: {errors[0].error}"
    if report.revision < since:
        return f"{report.router_id}: behind (revision {report.revision} < {since})"
    serves = f"weights {weights}" if weights else active or "every registered release"
    return f"{report.router_id}: serves {serves} (revision {report.revision})"
