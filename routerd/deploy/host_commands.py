"""The ``routerd hosts`` commands: add, ls, rm, cordon and uncordon the Docker
hosts containers are placed on (``hosts/<name>``).

``add`` checks every flag and reaches the engine before it writes anything;
the capacity it does not get from ``--cpus``/``--memory`` it takes from the
engine (``docker info``). ``ls`` asks every engine at once and prints one
line per host: whether it answers, its tags, its capacity, what routerd's
containers and everyone else's reserve, what is free and how full it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from routerd import keys
from routerd.deploy.engines import Engines, Usage, open_engines
from routerd.deploy.hosts import (
    MAX_CPUS,
    MAX_MEMORY_MB,
    MIN_CPUS,
    MIN_MEMORY_MB,
    TAG,
    Capacity,
    Host,
    Tls,
    host_problems,
    read_hosts,
)
from routerd.deploy.placement import Candidate, Resources
from routerd.errors import ConfigError, ContainerError, DeployError, InvalidValue
from routerd.keys import HOST_NAME
from routerd.settings import Command, Group, etcd_options, etcd_settings, flag
from routerd.store import Check, Delete, Put, Store

FIELD_FLAGS = {
    "docker": "--docker",
    "address": "--address",
    "tags": "--tag",
    "cpus": "--cpus",
    "memory_mb": "--memory",
    "tls": "--tls-ca",
}


def say(line: str) -> None:
    print(line, flush=True)


def pairs(flag_name: str, items: Iterable[str]) -> dict[str, str]:
    """``K=V`` items, each maybe a comma list (``a=1,b=2``, as fleet wrote tags)."""
    found = {}
    for item in (part for value in items for part in value.split(",") if part):
        name, sep, value = item.partition("=")
        if not sep or not (TAG.fullmatch(name) and TAG.fullmatch(value)):
            raise ConfigError(flag_name, f"{item!r} must be K=V, each matching {TAG.pattern}")
        found[name] = value
    return found


def check_host_name(name: str) -> str:
    if HOST_NAME.fullmatch(name) is None:
        raise ConfigError("NAME", f"{name!r} must match {HOST_NAME.pattern}")
    return name


@click.group(cls=Group)
def hosts() -> None:
    """The Docker hosts containers are placed on, by pool tags and free capacity."""


# ------------------------------------------------------------------- add


@hosts.command("add", cls=Command)
@click.argument("name")
@flag("--docker", required=True, help="the engine: unix:///path or tcp://host:port (TLS: 2376)")
@flag("--address", required=True, help="where routers reach its containers (IP or DNS name)")
@flag("--tag", multiple=True, metavar="K=V[,K=V]", help="a host tag (repeatable)")
@flag("--cpus", type=click.FloatRange(MIN_CPUS, MAX_CPUS), help="CPUs (default: docker info)")
@flag(
    "--memory", type=click.IntRange(MIN_MEMORY_MB, MAX_MEMORY_MB), help="MB (default: docker info)"
)
@flag("--tls-ca", help="CA that signed the engine's certificate (with --tls-cert, --tls-key)")
@flag("--tls-cert", help="client certificate for a tcp:// engine")
@flag("--tls-key", help="client key for a tcp:// engine")
@flag("--replace", is_flag=True, help="overwrite a host of that name")
@etcd_options
def hosts_add(name: str, **params: Any) -> int:
    """Register a Docker host, checked and reached before it is written."""
    host = Host(
        check_host_name(name),
        docker=params["docker"],
        address=params["address"],
        tags=pairs("--tag", params["tag"]),
        tls=tls_of(params),
    )
    for problem in host_problems(host):
        raise ConfigError(FIELD_FLAGS.get(problem.split(" ", 1)[0], "--docker"), problem)
    host = replace(host, capacity=capacity_of(host, params))

    async def write() -> None:
        async with Store(etcd_settings(params)) as store:
            checks = [] if params["replace"] else [Check(keys.host(name))]
            if await store.transaction(checks, [Put(keys.host(name), host.to_json())]) is None:
                raise DeployError(f"host {name} exists already; pass --replace to overwrite it")
            say(f"host {name} added: {describe(host)}")

    asyncio.run(write())
    return 0


def tls_of(params: Mapping[str, Any]) -> Tls | None:
    files = [params["tls_ca"], params["tls_cert"], params["tls_key"]]
    if not any(files):
        return None
    if not all(files):
        raise ConfigError("--tls-ca", "--tls-ca, --tls-cert and --tls-key go together")
    for flag_name, path in zip(("--tls-ca", "--tls-cert", "--tls-key"), files, strict=True):
        if not Path(path).is_file():
            raise ConfigError(flag_name, f"{path} is not a readable file")
    ca, cert, key = (str(Path(p).resolve()) for p in files)
    return Tls(ca, cert, key)


def capacity_of(host: Host, params: Mapping[str, Any]) -> Capacity:
    """The flags' figures, the rest from the engine (which must answer either way)."""
    engines = open_engines([host])
    if host.name in engines.unreachable:
        raise ContainerError(f"--docker {host.docker}: {engines.unreachable[host.name]}")
    cpus, memory = engines.of(host.name).capacity()
    return Capacity(
        params["cpus"] if params["cpus"] is not None else cpus,
        params["memory"] if params["memory"] is not None else int(memory),
    )


def describe(host: Host) -> str:
    tags = ",".join(f"{k}={v}" for k, v in sorted(host.tags.items())) or "no tags"
    capacity = host.capacity
    size = f"{capacity.cpus:g} CPU, {capacity.memory_mb} MB" if capacity else "engine's figures"
    tls = ", TLS" if host.tls else ""
    return f"docker {host.docker}{tls}, address {host.address}, {tags}, {size}"


# -------------------------------------------------------------------- ls


@hosts.command("ls", cls=Command)
@etcd_options
def hosts_ls(**params: Any) -> int:
    """Each host: reachable or not, tags, capacity, reserved, free, containers."""

    async def work() -> None:
        async with Store(etcd_settings(params)) as store:
            found, rejected = read_hosts(await store.range(keys.HOSTS))
        if not found and not rejected:
            print(f"no hosts under {store.prefix}{keys.HOSTS}: deploys use one Docker engine")
            return
        engines = await asyncio.to_thread(open_engines, found, rejected)
        usage = await asyncio.to_thread(engines.usage)
        for line in table(engines, usage):
            print(line)
        for error in rejected:
            print(f"invalid: {store.prefix}{error.key}: {error.message}")

    asyncio.run(work())
    return 0


HEADER = ("HOST", "STATE", "TAGS", "CAPACITY", "ROUTERD", "OTHERS", "FREE", "USED", "CONTAINERS")


def table(engines: Engines, usage: Mapping[str, Usage | str]) -> list[str]:
    """The hosts as aligned columns, then why each unreachable one is."""
    rows, notes = [HEADER], []
    for host in engines.hosts:
        seen = usage.get(host.name, "not read")
        tags = ",".join(f"{k}={v}" for k, v in sorted(host.tags.items())) or "-"
        if isinstance(seen, str):
            rows.append((host.name, "unreachable", tags, "-", "-", "-", "-", "-", "-"))
            notes.append(f"{host.name}: {seen}")
            continue
        state = "ready" if host.schedulable else "cordoned"
        used = 1 - Candidate(host.name, seen.capacity).share(seen.free)
        rows.append(
            (
                host.name,
                state,
                tags,
                amount(seen.capacity),
                amount(seen.routerd),
                amount(seen.others),
                amount(seen.free),
                f"{bar(used)} {used:4.0%}",
                str(seen.containers),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return lines + notes


def amount(resources: Resources) -> str:
    return f"{resources.cpus:.2f} CPU {resources.memory_mb:.0f} MB"


def bar(used: float, width: int = 10) -> str:
    """How full, at a glance: ``[######....]``; the dominant resource decides."""
    filled = max(0, min(width, round(used * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


# ------------------------------------------------------- rm, cordon, uncordon


@hosts.command("rm", cls=Command)
@click.argument("name")
@flag(
    "--force", is_flag=True, help="remove it even if routerd's containers run there, or it is down"
)
@etcd_options
def hosts_rm(name: str, **params: Any) -> int:
    """Forget a host; refused while routerd's containers run on it (unless --force)."""
    check_host_name(name)

    async def work() -> None:
        async with Store(etcd_settings(params)) as store:
            kv = await stored(store, name)
            if not params["force"]:
                refuse_busy(Host.from_json(name, kv, key=store.prefix + keys.host(name)))
            await store.transaction([], [Delete(keys.host(name))])
            say(f"host {name} removed")

    asyncio.run(work())
    return 0


def refuse_busy(host: Host) -> None:
    engines = open_engines([host])
    if host.name in engines.unreachable:
        raise DeployError(
            f"host {host.name} is unreachable ({engines.unreachable[host.name]}): cannot tell "
            "whether routerd's containers run there; pass --force to remove it anyway"
        )
    mine, failed = engines.list()
    if mine or failed:
        names = ", ".join(c.name for c in mine) or "; ".join(failed.values())
        raise DeployError(
            f"host {host.name} runs routerd's containers ({names}); scale or deploy them "
            "elsewhere first (cordon it), or pass --force"
        )


async def stored(store: Store, name: str) -> bytes:
    raw = await store.get(keys.host(name))
    if raw is None:
        raise DeployError(f"no host {name} under {store.prefix}{keys.HOSTS}")
    return raw


def schedulable_command(name: str, schedulable: bool) -> click.Command:
    doing = (
        "uncordoned: new containers may go there"
        if schedulable
        else "cordoned: no new containers go there"
    )

    @hosts.command(name, cls=Command)
    @click.argument("host")
    @etcd_options
    def command(host: str, **params: Any) -> int:
        check_host_name(host)

        async def work() -> None:
            async with Store(etcd_settings(params)) as store:
                await set_schedulable(store, host, schedulable)
                say(f"host {host} {doing}")

        asyncio.run(work())
        return 0

    command.help = (
        "Let placement use the host again."
        if schedulable
        else "Keep new containers off the host; those running there stay."
    )
    return command


async def set_schedulable(store: Store, name: str, schedulable: bool) -> None:
    snapshot = await store.range(keys.host(name))
    kv = snapshot.kvs.get(keys.host(name))
    if kv is None:
        raise DeployError(f"no host {name} under {store.prefix}{keys.HOSTS}")
    try:
        host = Host.from_json(name, kv.value, key=store.prefix + keys.host(name))
    except InvalidValue as exc:
        raise DeployError(
            f"{exc}; correct it with: routerd hosts add {name} --replace ..."
        ) from exc
    changed = replace(host, schedulable=schedulable)
    guard = Check(keys.host(name), mod_revision=kv.mod_revision)
    if await store.transaction([guard], [Put(keys.host(name), changed.to_json())]) is None:
        raise DeployError(f"host {name} was changed meanwhile; try again")


schedulable_command("cordon", False)
schedulable_command("uncordon", True)
