"""Containers: start, health, stop, list by label, on one Docker engine.

The controller talks to containers only through ``Runtime``, a small
interface one Docker host implements (``DockerRuntime``, given the engine's
URL and the address its containers are reached at), so placement over
several hosts can hand each container to its host's runtime later.

Every container carries the labels ``routerd.app`` and ``routerd.release``,
reads its port from ``$PORT`` (SPEC 5) and runs under an init, so PID 1
honours SIGTERM (FACTS.md: busybox httpd as PID 1 ignores it). Images are
never pulled: no registry may be reachable, and the engine answers a pull
of a missing image with an opaque 500. Calls block; the controller runs
them in threads. Knows nothing of etcd.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import docker
import docker.errors
import requests

from routerd.errors import ContainerError

LABEL_APP, LABEL_RELEASE = "routerd.app", "routerd.release"
HOST_PORTS = range(20000, 32768)  # below Linux's ephemeral range: no clash with client sockets
PROBE_TIMEOUT = 1.0


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

    @property
    def name(self) -> str:
        return f"routerd-{self.app}-{self.release}-{self.index}"


@dataclass(frozen=True)
class Container:
    """A container as found on the engine; ``address`` is what routers reach."""

    id: str
    name: str
    app: str
    release: str
    host: str
    port: int | None
    state: str = ""

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

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]: ...


class Unhealthy(ContainerError):
    """The container is gone for good (exited or removed): waiting longer is pointless."""


class DockerRuntime:
    """One Docker engine (``base_url``; None: ``DOCKER_HOST`` or the default socket)."""

    def __init__(self, base_url: str | None = None, *, advertise_host: str = "127.0.0.1") -> None:
        self.name = base_url or "local Docker engine"
        self.advertise_host = advertise_host
        try:
            self.client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
            self.client.ping()
        except docker.errors.DockerException as exc:
            raise ContainerError(f"cannot reach the {self.name}: {exc}") from exc

    def check_image(self, image: str) -> None:
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound as exc:
            raise ContainerError(
                f"image {image!r} is not on the {self.name}; load or build it there first "
                "(routerd never pulls)"
            ) from exc
        except docker.errors.DockerException as exc:
            raise ContainerError(f"cannot inspect image {image!r}: {exc}") from exc

    def create(self, spec: ContainerSpec) -> Container:
        """Create (not start) a container: its id is known before anything runs."""
        options = _network_options(spec)
        env = {**spec.env, "ROUTERD_APP": spec.app, "ROUTERD_RELEASE": spec.release}
        env["PORT"] = str(options.pop("port"))
        try:
            created = self.client.containers.create(
                spec.image,
                name=spec.name,
                labels={LABEL_APP: spec.app, LABEL_RELEASE: spec.release},
                environment=env,
                init=True,
                detach=True,
                **options,
            )
        except docker.errors.DockerException as exc:
            raise ContainerError(f"cannot create {spec.name}: {exc}") from exc
        return self._describe(created)

    def start(self, container: Container) -> Container:
        try:
            handle = self.client.containers.get(container.id)
            handle.start()
            handle.reload()
        except docker.errors.DockerException as exc:
            raise ContainerError(f"cannot start {container.name}: {exc}") from exc
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
        try:
            handle = self.client.containers.get(container.id)
        except docker.errors.NotFound as exc:
            raise Unhealthy(f"{container.name} was removed") from exc
        state = handle.attrs.get("State", {})
        if state.get("Status") != "running":
            logs = handle.logs(tail=5).decode("utf-8", "replace").strip()
            raise Unhealthy(
                f"{container.name} {state.get('Status')} with code {state.get('ExitCode')}"
                + (f"; last output: {logs!r}" if logs else "")
            )

    def remove(self, container: Container, *, timeout: float) -> None:
        """Stop gracefully (SIGTERM, SIGKILL after ``timeout``), then remove."""
        try:
            handle = self.client.containers.get(container.id)
            handle.stop(timeout=max(0, round(timeout)))
            handle.remove(v=True, force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException as exc:
            raise ContainerError(f"cannot remove {container.name}: {exc}") from exc

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]:
        labels = [f"{LABEL_APP}={app}" if app else LABEL_APP]
        if release:
            labels.append(f"{LABEL_RELEASE}={release}")
        try:
            found = self.client.containers.list(all=True, filters={"label": labels})
        except docker.errors.DockerException as exc:
            raise ContainerError(f"cannot list containers on the {self.name}: {exc}") from exc
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
        )


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


async def remove_release(runtime: Runtime, app: str, releases: list[str], timeout: float) -> int:
    """Stop and remove every container of these releases, in parallel; how many."""
    found = [c for name in releases for c in await asyncio.to_thread(runtime.list, app, name)]
    await run_all(asyncio.to_thread(runtime.remove, c, timeout=timeout) for c in found)
    return len(found)


async def run_all(coros: Iterable[Awaitable[Any]]) -> None:
    """Run concurrently; on the first failure cancel the rest, wait for them, raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
