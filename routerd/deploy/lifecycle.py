"""Heroku's app lifecycle on routerd: ``config``, ``releases``, ``ps``, ``logs``,
``console``.

    routerd config shop [--show]          config:         (names; values with --show)
    routerd config set shop K=V ...       config:set      a new release rolls out
    routerd config unset shop K ...       config:unset    a new release rolls out
    routerd releases shop                 releases
    routerd ps shop                       ps
    routerd logs shop [-f] [--tail N]     logs
    routerd console shop [-- CMD ...]     run bash

A config change is written first (a transaction that applies only if no
one changed the vars meanwhile), then rolled out as a new release of the
active release's image by the six deploy steps, unless ``--no-restart``
(the next deploy takes it). Values are printed by ``config --show`` only.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import click

from routerd import keys
from routerd.deploy import configvars, releases
from routerd.deploy.commands import (
    check_app,
    deploy_options,
    docker_options,
    drive,
    open_for,
    say,
)
from routerd.deploy.engines import Engines, place_release
from routerd.deploy.releases import Release
from routerd.deploy.runtime import Container, DockerRuntime
from routerd.errors import ContainerError, DeployError, InvalidValue, LockHeld
from routerd.settings import Command, Group, etcd_options, etcd_settings, flag
from routerd.store import Check, Put, Snapshot, Store

DEFAULT_TAIL = 100


class DefaultGroup(Group):
    """A group whose first argument, when it names no subcommand, goes to ``default``:
    ``routerd config shop`` shows, ``routerd config set shop ...`` sets."""

    default = "show"

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default, *args]
        return super().resolve_command(ctx, args)


# ----------------------------------------------------------------- config


@click.group(cls=DefaultGroup)
def config() -> None:
    """An app's config vars (its environment): list, set, unset."""


@config.command("show", hidden=True)
@click.argument("app")
@flag("--show", "show_values", is_flag=True, help="print the values too (they are secrets)")
@etcd_options
def config_show(app: str, show_values: bool, **params: Any) -> int:
    """List an app's config vars: names, and values with --show."""
    check_app(app)

    async def work() -> None:
        async with Store(etcd_settings(params)) as store:
            current, _ = await read_config(store, app)
        for name, value in sorted(current.items()):
            print(f"{name}={value}" if show_values else f"{name}\t{configvars.MASK}")
        if not current:
            print(f"{app} has no config vars")

    asyncio.run(work())
    return 0


@config.command("set")
@click.argument("app")
@click.argument("assignments", nargs=-1, required=True, metavar="K=V...")
@flag("--no-restart", is_flag=True, help="only save; the next deploy takes them")
@deploy_options
def config_set(app: str, assignments: tuple[str, ...], **params: Any) -> int:
    """Set config vars and roll out a new release with them."""
    check_app(app)
    where = f"routerd config set {app}"
    try:
        wanted = configvars.assignments(where, assignments)
    except InvalidValue as exc:
        raise click.UsageError(exc.message) from None
    return change_config(app, params, lambda current: {**current, **wanted}, sorted(wanted))


@config.command("unset")
@click.argument("app")
@click.argument("names", nargs=-1, required=True, metavar="K...")
@flag("--no-restart", is_flag=True, help="only save; the next deploy takes them")
@deploy_options
def config_unset(app: str, names: tuple[str, ...], **params: Any) -> int:
    """Remove config vars and roll out a new release without them."""
    check_app(app)
    try:
        gone = set(configvars.names(f"routerd config unset {app}", names))
    except InvalidValue as exc:
        raise click.UsageError(exc.message) from None
    return change_config(
        app,
        params,
        lambda current: {k: v for k, v in current.items() if k not in gone},
        sorted(gone),
    )


async def read_config(store: Store, app: str) -> tuple[dict[str, str], int]:
    """The app's config vars and the mod revision of their key (0: none yet)."""
    snapshot = await store.range(keys.env(app))
    kv = snapshot.kvs.get(keys.env(app))
    where = store.prefix + keys.env(app)
    return configvars.parse(where, kv.value if kv else None), kv.mod_revision if kv else 0


def change_config(
    app: str,
    params: Mapping[str, Any],
    change: Callable[[dict[str, str]], dict[str, str]],
    named: list[str],
) -> int:
    """Write the changed vars, then (unless --no-restart) roll them out."""
    restart = not params["no_restart"]

    async def work(deployer: Any) -> None:
        store: Store = deployer.store
        current, mod = await read_config(store, app)
        wanted = change(current)
        if wanted == current:
            say(f"config of {app}: nothing changes ({', '.join(named)})")
            return
        key = keys.env(app)
        guard = Check(key, mod_revision=mod) if mod else Check(key)
        if await store.transaction([guard], [Put(key, configvars.to_json(wanted))]) is None:
            raise DeployError(f"the config vars of {app} changed meanwhile; try again")
        diff = configvars.changes(current, wanted)
        say(f"config of {app}: {diff.describe()} saved")
        if restart:
            await roll_out(deployer, app)

    if not restart:
        return run_without_docker(params, work)
    return drive(params, work)


def run_without_docker(params: Mapping[str, Any], work: Any) -> int:
    """``--no-restart``: only etcd is needed."""

    class Only:
        def __init__(self, store: Store) -> None:
            self.store = store

    async def main() -> None:
        async with Store(etcd_settings(params)) as store:
            await work(Only(store))

    asyncio.run(main())
    return 0


async def roll_out(deployer: Any, app: str) -> None:
    """A new release like the active one, with the app's config vars as they are
    now: a var just set wins even over the active release's own --env."""
    snapshot = await deployer.store.range(keys.app(app))
    active = releases.active_release(snapshot, app)
    base = next((r for r in releases.history(snapshot, app) if r.name == active), None)
    if base is None:
        say(f"config of {app}: no active release to restart; the next deploy takes it")
        return
    current, _ = await read_config(deployer.store, app)
    own = {k: v for k, v in base.own_env().items() if k not in current}
    try:
        await deployer.deploy(app, replace(base.spec, env=own))
    except LockHeld as exc:
        raise DeployError(f"saved, not rolled out: {exc}; the next deploy takes it") from exc


# --------------------------------------------------------------- releases


@click.command("releases", cls=Command)
@click.argument("app")
@etcd_options
def releases_command(app: str, **params: Any) -> int:
    """List an app's releases: version, image, what changed, when, which is active."""
    check_app(app)

    async def work() -> Snapshot:
        async with Store(etcd_settings(params)) as store:
            return await store.range(keys.app(app))

    snapshot = asyncio.run(work())
    known, rejected = releases.read_history(snapshot, app)
    active = releases.active_release(snapshot, app)
    for line in release_lines(known, active):
        print(line)
    for name, error in sorted(rejected.items()):
        print(f"  (unreadable record {name}: {error.message})")
    if not known:
        print(f"{app} has no releases yet")
    return 0


def release_lines(known: list[Release], active: str | None) -> list[str]:
    """Newest first: ``* v7  r2026...  shop:42  image shop:41 -> shop:42; +A ~B  when``."""
    lines, before = [], None
    for release in known:
        lines.append(_release_line(release, before, active))
        before = release
    return list(reversed(lines))


def _release_line(release: Release, before: Release | None, active: str | None) -> str:
    mark = "*" if release.name == active else " "
    changed = what_changed(before, release)
    when = release.activated or release.created
    state = (
        "active" if release.name == active else "served" if release.activated else "never served"
    )
    return (
        f"{mark} {release.label:<5} {release.name}  {release.spec.image}  {changed}  "
        f"{when}  ({state})"
    )


def what_changed(before: Release | None, after: Release) -> str:
    """Image, config var names and replicas that differ from the release before."""
    if after.rollback_of:
        head = f"rollback to {after.rollback_of}"
    elif before is None:
        head = "first release"
    else:
        head = ""
    parts = [head] if head else []
    if before is not None and before.spec.image != after.spec.image:
        parts.append(f"image {before.spec.image} -> {after.spec.image}")
    diff = configvars.changes(before.config_env() if before else {}, after.config_env())
    if diff:
        parts.append(f"config {diff.describe()}")
    if before is not None and before.spec.replicas != after.spec.replicas:
        parts.append(f"replicas {before.spec.replicas} -> {after.spec.replicas}")
    return "; ".join(parts) or "no change"


# -------------------------------------------------------------------- ps


def read_app(params: Mapping[str, Any], app: str) -> tuple[Snapshot, Engines]:
    """The app's keys, and the engines of every host (or the local one)."""

    async def work() -> tuple[Snapshot, Engines]:
        async with Store(etcd_settings(params)) as store:
            return await store.range(keys.app(app)), await open_for(store, params)

    return asyncio.run(work())


def app_containers(
    engines: Engines, app: str, release: str | None = None
) -> list[tuple[DockerRuntime, Container]]:
    """The app's containers on every engine, each with its engine; an engine
    that could not be listed is named, not fatal."""
    containers, failed = engines.list(app, release)
    for host, why in sorted(failed.items()):
        say(f"warning: host {host} is left out: {why}")
    found = []
    for container in containers:
        runtime = engines.of(container.engine)
        assert isinstance(runtime, DockerRuntime)
        found.append((runtime, container))
    return found


@click.command(cls=Command)
@click.argument("app")
@docker_options
@etcd_options
def ps(app: str, **params: Any) -> int:
    """Each container of an app: host, release, state, health, uptime, instance."""
    check_app(app)
    snapshot, engines = read_app(params, app)
    instances = releases.registered_releases(snapshot, app)
    health = {r.name: r.spec.health_path for r in releases.history(snapshot, app)}
    found = app_containers(engines, app)
    for runtime, container in found:
        served = instances.get(container.release, {}).get(container.short_id)
        checked = "-"
        if container.state == "running":
            why = runtime.probe(container, health.get(container.release, "/"))
            checked = "healthy" if why is None else f"unhealthy ({why})"
        print(
            f"{container.name}\thost={container.engine or runtime.name} "
            f"release={container.release} {container.state} {checked} "
            f"up={uptime(container.started)} "
            f"instance={f'{container.short_id}={served}' if served else '-'}"
        )
    if not found:
        print(f"{app} has no containers on {engines.name}")
    return 0


def uptime(started: str) -> str:
    if not started or started.startswith("0001"):
        return "-"
    since = datetime.fromisoformat(started[:26].rstrip("Z")).replace(tzinfo=UTC)
    seconds = int((datetime.now(UTC) - since).total_seconds())
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds}s"


# ------------------------------------------------------------------ logs


@click.command(cls=Command)
@click.argument("app")
@flag("--release", "only_release", help="only this release's containers")
@flag("-f", "--follow", is_flag=True, help="keep printing new lines")
@flag("--tail", default=DEFAULT_TAIL, type=click.IntRange(min=0), help="lines per container")
@docker_options
@etcd_options
def logs(app: str, only_release: str | None, follow: bool, tail: int, **params: Any) -> int:
    """What an app's containers print, on every host, merged by time."""
    from routerd.deploy import applogs

    check_app(app)
    _, engines = read_app(params, app)
    found = app_containers(engines, app, only_release)
    if not found:
        raise ContainerError(f"{app} has no containers on {engines.name}")
    if follow:
        try:
            applogs.follow(found, tail, say)
        except KeyboardInterrupt:
            return 0
    else:
        for line in applogs.recent(found, tail):
            say(str(line))
    return 0


# --------------------------------------------------------------- console


@click.command(cls=Command, context_settings={"ignore_unknown_options": True})
@click.argument("app")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@docker_options
@etcd_options
def console(app: str, command: tuple[str, ...], **params: Any) -> int:
    """A one-off container of the active release, attached: ``-- CMD...`` (default: a shell).

    It is placed like any container of the app (when hosts are registered),
    gets a TTY when there is a terminal and plain pipes otherwise, and its
    exit code is routerd's. It is never registered with the routers, and is
    removed when it exits or when routerd is interrupted."""
    from routerd.deploy.oneoff import run_console

    check_app(app)
    release, runtime = asyncio.run(console_place(params, app))
    env = {**release.spec.env, "ROUTERD_APP": app, "ROUTERD_RELEASE": release.name}

    def stop(*_: object) -> None:
        raise KeyboardInterrupt  # the finally in run_console removes the container

    signal.signal(signal.SIGTERM, stop)
    try:
        return run_console(
            runtime,
            app=app,
            image=release.spec.image,
            env=env,
            command=command,
            tty=sys.stdin.isatty() and sys.stdout.isatty(),
            cpus=release.spec.cpus,
            memory_mb=release.spec.memory_mb,
        )
    except KeyboardInterrupt:
        print(f"\nrouterd: console of {app} interrupted; removed", file=sys.stderr)
        return 130


async def console_place(params: Mapping[str, Any], app: str) -> tuple[Release, DockerRuntime]:
    """The active release, and the engine placement picks for one more container."""
    async with Store(etcd_settings(params)) as store:
        snapshot = await store.range(keys.app(app))
        active = releases.active_release(snapshot, app)
        release = next((r for r in releases.history(snapshot, app) if r.name == active), None)
        if release is None:
            raise DeployError(f"{app} has no active release to start a console of")
        engines = await open_for(store, params)
        pool = releases.pool_of(snapshot.kvs[keys.config(app)].value)
        (host,) = await place_release(
            store,
            engines,
            app=app,
            release=f"{release.name}-console",
            spec=release.spec,
            pool=pool,
            count=1,
            say=lambda line: print(line, file=sys.stderr),
        )
    runtime = engines.of(host)
    assert isinstance(runtime, DockerRuntime)
    return release, runtime


COMMANDS = (config, releases_command, ps, logs, console)
