"""Containers: start, health, stop, list by label, on one Docker engine.

The controller talks to containers only through ``Runtime``, a small
interface one Docker host implements (``DockerRuntime``, given the engine's
URL, the address its containers are reached at and the host's name);
``engines.Engines`` holds one per registered host. This module also reads
what an engine has to give: its capacity (``docker info``) and the limits
of every container on it, routerd's or not.

Every container carries the labels ``routerd.app`` and ``routerd.release``,
reads its port from ``$PORT``, as on Heroku, and runs under an init, so PID
1 honours SIGTERM (busybox httpd as PID 1 ignores it and waits out the stop
timeout; under an init it stops in 0.05 s). The engine restarts it when it
exits or when the engine itself restarts (``unless-stopped``): the address
registered for it stays good. Images are
never pulled: no registry may be reachable, and the engine answers a pull
of a missing image with an opaque 500. Calls block; the controller runs
them in threads. Knows nothing of etcd.

This is the boundary for Docker's errors: whatever the SDK or its transport
raises leaves here as ``ContainerError``, cause chained, so a deploy step
fails and rolls back instead of escaping with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import docker
import docker.errors
import docker.tls
import requests

from routerd.errors import ContainerError, Unhealthy

LABEL_APP, LABEL_RELEASE = "routerd.app", "routerd.release"
HOST_PORTS = range(20000, 32768)  # below Linux's ephemeral range: no clash with client sockets
PROBE_TIMEOUT = 1.0
# A container that exits (a crash, the OOM killer) or whose engine restarts is
# started again by the engine at the same address; one routerd stops stays stopped.
RESTART_POLICY = {"Name": "unless-stopped"}


@dataclass(frozen=True)
class ContainerSpec:
    """One container of a release, as the controller asks for it."""

    app: str
    release: str
    index: int
    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 5000  # $PORT inside the container on a bridge network
    network: str = "bridge"  # or "host"
    cpus: float | None = None  # Docker limits; None: none
    memory_mb: int | None = None
    host: str = ""  # the host it is placed on; "" for the one engine without hosts/

    @property
    def name(self) -> str:
        return f"routerd-{self.app}-{self.release}-{self.index}"


@dataclass(frozen=True)
class Limits:
    """What one container on an engine may use, as Docker reports it; None: no limit."""

    app: str  # its routerd.app label; "" for anyone else's container
    release: str
    cpus: float | None
    memory_mb: float | None


@dataclass(frozen=True)
class Container:
    """A container as found on the engine; ``address`` is what routers reach."""

    id: str
    name: str
    app: str
    release: str
    host: str  # the address routers reach it at
    port: int | None
    state: str = ""
    started: str = ""  # when it last started, as the engine says (RFC 3339)
    engine: str = ""  # the name of the host whose engine runs it; "" without hosts/

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Runtime(Protocol):
    """What the controller needs of one container host."""

    name: str

    def check_image(self, image: str) -> None: ...

    def create(self, spec: ContainerSpec) -> Container: ...

    def start(self, container: Container) -> Container: ...

    def probe(self, container: Container, path: str) -> str | None: ...

    def remove(self, container: Container, *, timeout: float) -> None: ...

    def capacity(self) -> tuple[float, float]: ...

    def limits(self) -> list[Limits]: ...

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]: ...


# Everything the Docker SDK lets escape: its own errors, and those of the
# transport under it (docker-py 7.1 does not wrap requests' ConnectionError
# or a socket's OSError). Each becomes a ContainerError here, the boundary.
ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError)


@contextlib.contextmanager
def engine_call(what: str) -> Iterator[None]:
    """Turn any engine or transport error inside into ContainerError(what: why)."""
    try:
        yield
    except ENGINE_ERRORS as exc:
        raise ContainerError(f"{what}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DockerRuntime:
    """One Docker engine (``base_url``; None: ``DOCKER_HOST`` or the default socket).

    ``tls`` is (CA, client certificate, client key) for a tcp:// engine;
    ``host`` the name of the host it belongs to, stamped on its containers."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        advertise_host: str = "127.0.0.1",
        host: str = "",
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        self.name = f"Docker engine of {host}" if host else base_url or "local Docker engine"
        self.advertise_host = advertise_host
        self.host = host
        with engine_call(f"cannot reach the {self.name}"):
            if tls is not None:
                self.client = _TlsDockerClient(base_url=base_url, tls=_tls_config(tls))
            elif base_url:
                self.client = docker.DockerClient(base_url=base_url)
            else:
                self.client = docker.from_env()
            self.client.ping()

    def capacity(self) -> tuple[float, float]:
        """(CPUs, memory in MB) as the engine reports its machine."""
        with engine_call(f"cannot read the capacity of the {self.name}"):
            info = self.client.info()
        return float(info["NCPU"]), int(info["MemTotal"]) / 2**20

    def limits(self) -> list[Limits]:
        """The limits of every container that may run here (any but exited or dead)."""
        with engine_call(f"cannot list containers on the {self.name}"):
            found = self.client.containers.list(all=True, ignore_removed=True)
        return [
            _limits(c.attrs)
            for c in found
            if c.attrs.get("State", {}).get("Status") not in ("exited", "dead")
        ]

    def check_image(self, image: str) -> None:
        try:
            with engine_call(f"cannot inspect image {image!r}"):
                self.client.images.get(image)
        except ContainerError as exc:
            if isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise ContainerError(
                    f"image {image!r} is not on the {self.name}; load or build it there first "
                    "(routerd never pulls)"
                ) from exc.__cause__
            raise

    def create(self, spec: ContainerSpec) -> Container:
        """Create (not start) a container: its id is known before anything runs."""
        options = _network_options(spec)
        env = {**spec.env, "ROUTERD_APP": spec.app, "ROUTERD_RELEASE": spec.release}
        env["PORT"] = str(options.pop("port"))
        if spec.cpus is not None:
            options["nano_cpus"] = round(spec.cpus * 1e9)
        if spec.memory_mb is not None:
            options["mem_limit"] = spec.memory_mb * 2**20
        with engine_call(f"cannot create {spec.name} on the {self.name}"):
            created = self.client.containers.create(
                spec.image,
                name=spec.name,
                labels={LABEL_APP: spec.app, LABEL_RELEASE: spec.release},
                environment=env,
                init=True,
                restart_policy=RESTART_POLICY,
                detach=True,
                **options,
            )
        return self._describe(created)

    def start(self, container: Container) -> Container:
        with engine_call(f"cannot start {container.name} on the {self.name}"):
            handle = self.client.containers.get(container.id)
            handle.start()
            handle.reload()
        started = self._describe(handle)
        if started.port is None:
            raise ContainerError(
                f"{container.name} has no host port: the engine published none "
                "(no bridge network? then deploy with --network host)"
            )
        return started

    def probe(self, container: Container, path: str) -> str | None:
        """None when the container answers ``path`` with 2xx/3xx, else why not yet.

        Raises Unhealthy when the container is no longer running.
        """
        if not path.startswith("/"):  # else it would become part of the URL's authority
            raise ContainerError(f"health path {path!r} does not start with /")
        self._check_running(container)
        try:
            answer = requests.get(
                f"http://{container.address}{path}",
                timeout=PROBE_TIMEOUT,
                headers={"Connection": "close"},
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return f"{type(exc).__name__}"
        return None if answer.status_code < 400 else f"HTTP {answer.status_code}"

    def _check_running(self, container: Container) -> None:
        what = f"cannot inspect {container.name} on the {self.name}"
        try:
            with engine_call(what):
                handle = self.client.containers.get(container.id)
        except ContainerError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                raise Unhealthy(f"{container.name} was removed") from exc.__cause__
            raise
        state = handle.attrs.get("State", {})
        status = state.get("Status")
        if status != "running" or state.get("Restarting"):
            with engine_call(f"cannot read the output of {container.name} on the {self.name}"):
                logs = handle.logs(tail=5).decode("utf-8", "replace").strip()
            # The engine restarts a container that exits: between two runs it is
            # "restarting", its code the last run's.
            how = "exited" if status == "restarting" else status
            raise Unhealthy(
                f"{container.name} {how} with code {state.get('ExitCode')}"
                + (f"; last output: {logs!r}" if logs else "")
            )

    def remove(self, container: Container, *, timeout: float) -> None:
        """Stop gracefully (SIGTERM, SIGKILL after ``timeout``), then remove."""
        try:
            with engine_call(f"cannot remove {container.name} on the {self.name}"):
                handle = self.client.containers.get(container.id)
                handle.stop(timeout=max(0, round(timeout)))
                handle.remove(v=True, force=True)
        except ContainerError as exc:
            if not isinstance(exc.__cause__, docker.errors.NotFound):
                raise

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]:
        labels = [f"{LABEL_APP}={app}" if app else LABEL_APP]
        if release:
            labels.append(f"{LABEL_RELEASE}={release}")
        with engine_call(f"cannot list containers on the {self.name}"):
            found = self.client.containers.list(
                all=True, filters={"label": labels}, ignore_removed=True
            )
        return sorted((self._describe(c) for c in found), key=lambda c: c.name)

    def _describe(self, handle: Any) -> Container:
        attrs = handle.attrs
        labels = attrs.get("Config", {}).get("Labels") or {}
        return Container(
            id=handle.id,
            name=attrs.get("Name", handle.name).lstrip("/"),
            app=labels.get(LABEL_APP, ""),
            release=labels.get(LABEL_RELEASE, ""),
            host=self.advertise_host,
            port=_published_port(attrs),
            state=attrs.get("State", {}).get("Status", ""),
            started=attrs.get("State", {}).get("StartedAt", ""),
            engine=self.host,
        )


def _tls_config(tls: tuple[str, str, str]) -> docker.tls.TLSConfig:
    ca, cert, key = tls
    return docker.tls.TLSConfig(client_cert=(cert, key), ca_cert=ca, verify=True)


class _TlsAPIClient(docker.APIClient):  # type: ignore[misc]  # docker ships no types
    """An engine client that verifies with the host's own CA, always.

    requests lets REQUESTS_CA_BUNDLE (set on many machines) replace a
    session's CA for every request, so the engine's certificate would be
    checked against the system's CAs and refused; docker-py leaves this to
    its callers."""

    def merge_environment_settings(self, *args: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(*args)
        settings["verify"] = self.verify
        return settings


class _TlsDockerClient(docker.DockerClient):  # type: ignore[misc]
    def __init__(self, **kwargs: Any) -> None:
        self.api = _TlsAPIClient(**kwargs)


def _limits(attrs: Mapping[str, Any]) -> Limits:
    """A container's CPU limit (``--cpus``, else a CFS quota) and memory limit."""
    config = attrs.get("HostConfig") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    cpus = None
    if config.get("NanoCpus"):
        cpus = config["NanoCpus"] / 1e9
    elif config.get("CpuQuota", 0) > 0 and config.get("CpuPeriod", 0) > 0:
        cpus = config["CpuQuota"] / config["CpuPeriod"]
    memory = config["Memory"] / 2**20 if config.get("Memory") else None
    return Limits(labels.get(LABEL_APP, ""), labels.get(LABEL_RELEASE, ""), cpus, memory)


def _network_options(spec: ContainerSpec) -> dict[str, Any]:
    """Host network: a free host port becomes $PORT. Bridge: $PORT is
    ``spec.port``, published on a host port the engine picks."""
    if spec.network == "host":
        return {"network_mode": "host", "port": free_port()}
    if spec.network == "bridge":
        return {"ports": {f"{spec.port}/tcp": None}, "port": spec.port}
    raise ContainerError(f"network {spec.network!r} is not bridge or host")


def _published_port(attrs: Mapping[str, Any]) -> int | None:
    config = attrs.get("HostConfig", {})
    if config.get("NetworkMode") == "host":
        env = dict(item.partition("=")[::2] for item in attrs.get("Config", {}).get("Env") or [])
        return int(env["PORT"]) if env.get("PORT", "").isdigit() else None
    for bindings in (attrs.get("NetworkSettings", {}).get("Ports") or {}).values():
        for binding in bindings or []:
            if str(binding.get("HostPort", "")).isdigit():
                return int(binding["HostPort"])
    return None


def free_port() -> int:
    """A port no socket holds now, outside the ephemeral range outgoing connections use."""
    for port in random.sample(HOST_PORTS, 50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise ContainerError("no free host port found")


async def wait_healthy(
    runtime: Runtime, container: Container, path: str, timeout: float, interval: float = 0.1
) -> None:
    """Probe until the container answers ``path``; fail at once if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        reason = await asyncio.to_thread(runtime.probe, container, path)
        if reason is None:
            return
        if time.monotonic() >= deadline:
            raise ContainerError(
                f"{container.name} did not answer {path} on {container.address} "
                f"within {timeout:g} s (last: {reason})"
            )
        await asyncio.sleep(interval)


async def run_all(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run concurrently; on the first failure cancel the rest, wait for them, and
    raise that first failure (a person reads one error, not a group)."""
    try:
        async with asyncio.TaskGroup() as tasks:
            for coro in coros:
                tasks.create_task(coro)
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
