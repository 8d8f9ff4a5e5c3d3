"""The Docker engines a command works with: one per registered host, or the
one local engine when ``hosts/`` is empty.

``connect`` reads ``hosts/`` and opens every host's engine at once, each in
a thread of its own, waiting at most ``OPEN_TIMEOUT``: an engine that does
not answer is marked unreachable, with why, and the command goes on
without it (a placement counts it out; ``gc`` and ``status`` name it).
``Engines`` then hands each container to its host's runtime, lists
containers over every engine (one that fails is named, not fatal), and
reads what runs on each for placement: the capacity (the host record's,
else ``docker info``) and what every container reserves, routerd's or
anyone else's; one without limits counts as ``hosts.DEFAULT_*``.

Without hosts, ``Engines.local`` wraps the engine of ``--docker-host`` (or
``DOCKER_HOST``, or the default socket) and nothing is placed: deploys work
as they did before hosts existed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Any, TypeVar

from routerd import keys
from routerd.deploy.hosts import DEFAULT_CPUS, DEFAULT_MEMORY_MB, Host, pool_tags, read_hosts
from routerd.deploy.placement import NOTHING, Candidate, Request, Resources, place
from routerd.deploy.releases import ReleaseSpec
from routerd.deploy.runtime import Container, DockerRuntime, Limits, Runtime
from routerd.errors import ContainerError, DeployError, InvalidValue, Unplaceable
from routerd.keys import APP_NAME
from routerd.store import Store

OPEN_TIMEOUT = 5.0  # seconds for every engine to answer its first call
READ_TIMEOUT = 20.0  # seconds for every engine to list its containers
RETRY_WAIT_S = 1.0  # between two attempts to remove containers on an engine that failed
T = TypeVar("T")
Say = Callable[[str], None]


@dataclass(frozen=True)
class Usage:
    """What one host's engine says runs on it."""

    capacity: Resources
    routerd: Resources = NOTHING  # reserved by routerd's containers
    others: Resources = NOTHING  # reserved by anyone else's
    containers: int = 0
    replicas: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (app, release) ->

    @property
    def reserved(self) -> Resources:
        return self.routerd + self.others

    @property
    def free(self) -> Resources:
        return self.capacity - self.reserved


@dataclass
class Engines:
    runtimes: Mapping[str, Runtime]  # host name -> its engine ("" for the one local engine)
    hosts: Sequence[Host] = ()
    unreachable: Mapping[str, str] = field(default_factory=dict)  # host name -> why
    rejected: Sequence[InvalidValue] = ()  # hosts/ records that failed validation

    @classmethod
    def local(cls, runtime: Runtime) -> Engines:
        return cls({"": runtime})

    @property
    def placing(self) -> bool:
        """Whether hosts are registered (containers are then placed over them)."""
        return bool(self.hosts or self.rejected)

    @property
    def name(self) -> str:
        if not self.placing:
            return next(iter(self.runtimes.values())).name
        return f"{len(self.hosts)} Docker host(s)"

    def only(self, hosts: Collection[str]) -> Engines:
        """The engines of these hosts (those reachable), for asking them again."""
        runtimes = {h: r for h, r in self.runtimes.items() if h in hosts}
        return Engines(runtimes, hosts=self.hosts)

    def of(self, host: str) -> Runtime:
        """The engine of ``host``; ContainerError when it could not be reached."""
        if host in self.runtimes:
            return self.runtimes[host]
        why = self.unreachable.get(host, "not registered under hosts/")
        raise ContainerError(f"the Docker engine of {host} is unreachable: {why}")

    def usage(self) -> dict[str, Usage | str]:
        """Each host's usage, or why its engine could not be read."""
        hosts = {h.name: h for h in self.hosts}
        calls = {h: _reader(r, hosts[h]) for h, r in self.runtimes.items() if h in hosts}
        found: dict[str, Usage | str] = dict(self.unreachable)
        for host, outcome in in_threads(calls, READ_TIMEOUT).items():
            found[host] = _brief(outcome) if isinstance(outcome, BaseException) else outcome
        return found

    def candidates(
        self, usage: Mapping[str, Usage | str], app: str, release: str
    ) -> list[Candidate]:
        """The hosts as placement sees them; ``replicas`` counts ``app``'s ``release``."""
        found = []
        for host in self.hosts:
            seen = usage.get(host.name, "not read")
            if isinstance(seen, str):
                capacity = _capacity_of(host) or NOTHING
                found.append(Candidate(host.name, capacity, tags=host.tags, unreachable=seen))
                continue
            found.append(
                Candidate(
                    host.name,
                    seen.capacity,
                    seen.reserved,
                    tags=host.tags,
                    schedulable=host.schedulable,
                    replicas=seen.replicas.get((app, release), 0),
                )
            )
        return found

    def list(
        self, app: str | None = None, release: str | None = None
    ) -> tuple[list[Container], dict[str, str]]:
        """Containers of ``app`` (and ``release``) on every engine, and why each
        engine that could not be listed was not (host name -> why)."""
        calls = {h: _lister(r, app, release) for h, r in self.runtimes.items()}
        found = in_threads(calls, READ_TIMEOUT)
        containers, failed = [], dict(self.unreachable)
        for host, outcome in found.items():
            if isinstance(outcome, BaseException):
                failed[host] = _brief(outcome)
            else:
                containers += outcome
        return sorted(containers, key=lambda c: (c.name, c.engine)), failed


# ------------------------------------------------------------------ connect


async def connect(
    store: Store, *, docker_host: str | None, advertise_host: str, say: Say
) -> Engines:
    """The engines of every host under ``hosts/``; without any, the local engine."""
    hosts, rejected = read_hosts(await store.range(keys.HOSTS))
    for error in rejected:
        say(f"warning: host {store.prefix}{error.key} is left out: {error.message}")
    if not hosts and not rejected:
        runtime = await asyncio.to_thread(DockerRuntime, docker_host, advertise_host=advertise_host)
        return Engines.local(runtime)
    if docker_host:
        say(f"note: {len(hosts)} host(s) under {keys.HOSTS}: --docker-host is not used")
    return await asyncio.to_thread(open_engines, hosts, rejected)


def open_engines(hosts: Sequence[Host], rejected: Sequence[InvalidValue] = ()) -> Engines:
    """Open every host's engine in parallel; those that fail or are slow are unreachable."""
    opened = in_threads({h.name: _opener(h) for h in hosts}, OPEN_TIMEOUT)
    runtimes, unreachable = {}, {}
    for name, outcome in opened.items():
        if isinstance(outcome, BaseException):
            unreachable[name] = _brief(outcome)
        else:
            runtimes[name] = outcome
    return Engines(runtimes, hosts=list(hosts), unreachable=unreachable, rejected=rejected)


def _opener(host: Host) -> Callable[[], Runtime]:
    tls = (host.tls.ca, host.tls.cert, host.tls.key) if host.tls else None
    return lambda: DockerRuntime(host.docker, advertise_host=host.address, host=host.name, tls=tls)


def _lister(runtime: Runtime, app: str | None, release: str | None) -> Callable[[], Any]:
    return lambda: runtime.list(app, release)


def _reader(runtime: Runtime, host: Host) -> Callable[[], Usage]:
    def read() -> Usage:
        capacity = _capacity_of(host) or Resources(*runtime.capacity())
        return usage_of(capacity, runtime.limits())

    return read


def _capacity_of(host: Host) -> Resources | None:
    return Resources(host.capacity.cpus, host.capacity.memory_mb) if host.capacity else None


def reservation(limits: Limits) -> Resources:
    """What a container reserves: its limits, the defaults where it has none."""
    cpus = DEFAULT_CPUS if limits.cpus is None else limits.cpus
    memory = DEFAULT_MEMORY_MB if limits.memory_mb is None else limits.memory_mb
    return Resources(cpus, memory)


def usage_of(capacity: Resources, limits: Sequence[Limits]) -> Usage:
    routerd, others = NOTHING, NOTHING
    for each in limits:
        if each.app:
            routerd += reservation(each)
        else:
            others += reservation(each)
    replicas = Counter((c.app, c.release) for c in limits if c.app)
    return Usage(capacity, routerd, others, len(limits), dict(replicas))


# --------------------------------------------------------------- placement


async def place_release(
    store: Store,
    engines: Engines,
    *,
    app: str,
    release: str,
    spec: ReleaseSpec,
    pool: str,
    count: int,
    say: Say,
) -> list[str]:
    """A host for each of ``count`` new containers of ``release``, decided on
    what every engine runs now; Unplaceable (before anything starts) when
    they do not fit. Without hosts, the one local engine ("") for each."""
    if not engines.placing:
        return [""] * count
    tags = await _pool_tags(store, pool)
    request = Request(count, Resources(*spec.reservation), pool, tags, dict(spec.constraints))
    for host, why in sorted(engines.unreachable.items()):
        say(f"note: host {host} is unreachable ({why}); placing without it")
    usage = await asyncio.to_thread(engines.usage)
    candidates = engines.candidates(usage, app, release)
    try:
        chosen = place(candidates, request)
    except Unplaceable as exc:
        raise Unplaceable(f"{app} {release} does not fit, so nothing was started: {exc}") from exc
    say(f"placement: {request}: {_placed(candidates, chosen, request.each)}")
    return chosen


async def _pool_tags(store: Store, pool: str) -> dict[str, str] | None:
    """The tags ``pools/<pool>`` asks for; None without that key."""
    if APP_NAME.fullmatch(pool) is None:
        raise DeployError(f"pool {pool!r} of the app's config must match {APP_NAME.pattern}")
    raw = await store.get(keys.pool(pool))
    return None if raw is None else pool_tags(raw, key=store.prefix + keys.pool(pool))


def _placed(candidates: Sequence[Candidate], chosen: Sequence[str], each: Resources) -> str:
    """Each chosen host, how many containers it takes and its free share after."""
    by_name = {c.name: c for c in candidates}
    parts = []
    for name, number in sorted(Counter(chosen).items()):
        host = by_name[name]
        after = host.free - Resources(each.cpus * number, each.memory_mb * number)
        parts.append(f"{name} x{number} (free after: {host.share(after):.0%})")
    return ", ".join(parts)


# ----------------------------------------------------------------- removal


async def remove_release(
    engines: Engines, app: str, releases: list[str], timeout: float, *, retry_for: float = 0.0
) -> tuple[int, dict[str, str]]:
    """Stop and remove every container of these releases on every engine, in
    parallel: (how many, why each engine that could not be listed was not).

    An engine that fails to list or to remove is asked again every
    ``RETRY_WAIT_S`` for ``retry_for`` seconds: one that restarts answers again
    within seconds, and brings back the containers it ran. One failed removal
    does not stop the others: each is tried, then one ContainerError names
    every container that is left. Engines unreachable from the start are not
    asked again.
    """
    deadline = time.monotonic() + retry_for
    unlisted, removed = dict(engines.unreachable), 0
    asked = engines.only(engines.runtimes)
    while True:
        found, missed = await _listed(asked, app, releases)
        failed = await _remove_all(engines, found, timeout)
        removed += len(found) - len(failed)
        for host in asked.runtimes:
            unlisted.pop(host, None)
        unlisted.update(missed)
        again = set(missed) | {c.engine for c, _ in failed}
        if not again or time.monotonic() + RETRY_WAIT_S > deadline:
            break
        await asyncio.sleep(RETRY_WAIT_S)
        asked = engines.only(again)
    if failed:
        raise ContainerError("; ".join(_failure(c, exc) for c, exc in failed))
    return removed, unlisted


async def _listed(
    engines: Engines, app: str, releases: list[str]
) -> tuple[list[Container], dict[str, str]]:
    found: list[Container] = []
    unlisted: dict[str, str] = {}
    for name in releases:
        containers, failed = await asyncio.to_thread(engines.list, app, name)
        found += containers
        unlisted.update(failed)
    return found, unlisted


async def remove_each(engines: Engines, containers: list[Container], timeout: float) -> list[str]:
    """Remove these containers in parallel, each on its own engine and whatever
    befalls the others; a line per one that could not be removed."""
    return [_failure(c, exc) for c, exc in await _remove_all(engines, containers, timeout)]


async def _remove_all(
    engines: Engines, containers: list[Container], timeout: float
) -> list[tuple[Container, Exception]]:
    def remove(container: Container) -> None:
        engines.of(container.engine).remove(container, timeout=timeout)

    outcomes = await asyncio.gather(
        *(asyncio.to_thread(remove, c) for c in containers), return_exceptions=True
    )
    failed = []
    for container, outcome in zip(containers, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome  # cancellation and the like: not a failed removal
            failed.append((container, outcome))
    return failed


def _failure(container: Container, exc: Exception) -> str:
    where = f" on {container.engine}" if container.engine else ""
    return f"{container.name}{where} ({_brief(exc)})"


# ------------------------------------------------------------------ threads


def in_threads(
    calls: Mapping[str, Callable[[], T]], timeout: float | None = None
) -> dict[str, T | BaseException]:
    """Run each call in a daemon thread of its own; its result or its exception.

    A call still running after ``timeout`` counts as TimeoutError; its thread
    is left to finish alone (a daemon, so it never holds up the exit)."""
    futures: dict[str, Future[T]] = {name: Future() for name in calls}
    for name, call in calls.items():
        threading.Thread(target=_run, args=(call, futures[name]), daemon=True).start()
    wait_all(futures.values(), timeout=timeout)
    outcomes: dict[str, T | BaseException] = {}
    for name, future in futures.items():
        if not future.done():
            outcomes[name] = TimeoutError(f"no answer within {timeout:g} s")
        else:
            outcomes[name] = future.exception() or future.result()
    return outcomes


def _run(call: Callable[[], T], future: Future[T]) -> None:
    try:
        future.set_result(call())
    except BaseException as exc:  # noqa: BLE001  (handed to the waiter, who decides)
        future.set_exception(exc)


def _brief(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
