"""How the deploy controller fails: every Docker SDK error becomes a
ContainerError at the runtime, and a rollback undoes all it can whatever one
of its steps raises. Fakes stand in for the engine and etcd; the real ones
are in tests/integration/test_deploy.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import docker.errors
import pytest
import requests

from routerd.deploy.engines import Engines
from routerd.deploy.plan import DeployOptions, Journal, Plan
from routerd.deploy.releases import Release, ReleaseSpec
from routerd.deploy.runtime import Container, ContainerSpec, DockerRuntime
from routerd.deploy.undo import Undo
from routerd.errors import ContainerError, StoreError, Unhealthy
from routerd.store import Delete, KeyValue, Put, Snapshot

# ------------------------------------------------------------ the runtime

ENGINE_ERRORS = [
    docker.errors.APIError("500 Server Error", explanation="injected"),
    docker.errors.DockerException("engine gone"),
    requests.exceptions.ConnectionError("Connection aborted."),  # docker-py leaves it unwrapped
    OSError("socket closed"),
]
CONTAINER = Container("a" * 64, "routerd-shop-r1-0", "shop", "r1", "127.0.0.1", 5000)


class Handle:
    """A container handle whose every call raises ``error`` once ``fail`` names it."""

    def __init__(self, fail: str, error: Exception) -> None:
        self.fail, self.error = fail, error
        self.id, self.name = CONTAINER.id, CONTAINER.name
        self.attrs = {"State": {"Status": "exited", "ExitCode": 3}, "Name": "/x"}

    def __getattr__(self, call: str) -> Callable[..., Any]:
        def method(*_: Any, **__: Any) -> Any:
            if call == self.fail:
                raise self.error
            return b"output" if call == "logs" else None

        return method


class Client:
    """Just enough of docker.DockerClient: ``containers`` and ``images``."""

    def __init__(self, fail: str, error: Exception) -> None:
        self.handle = Handle(fail, error)
        self.containers = self.images = self

    def __getattr__(self, call: str) -> Callable[..., Any]:
        def method(*_: Any, **__: Any) -> Any:
            if call == self.handle.fail:
                raise self.handle.error
            return [self.handle] if call == "list" else self.handle

        return method


def runtime_with(fail: str, error: Exception) -> DockerRuntime:
    runtime = object.__new__(DockerRuntime)
    runtime.name, runtime.advertise_host = "test engine", "127.0.0.1"
    runtime.client = Client(fail, error)
    return runtime


CALLS: dict[str, Callable[[DockerRuntime], Any]] = {
    "get": lambda r: r.probe(CONTAINER, "/"),
    "logs": lambda r: r.probe(CONTAINER, "/"),
    "create": lambda r: r.create(ContainerSpec("shop", "r1", 0, "img", network="host")),
    "start": lambda r: r.start(CONTAINER),
    "stop": lambda r: r.remove(CONTAINER, timeout=1),
    "remove": lambda r: r.remove(CONTAINER, timeout=1),
    "list": lambda r: r.list("shop"),
}


@pytest.mark.parametrize("error", ENGINE_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("fail", CALLS)
def test_every_engine_error_becomes_a_container_error(fail: str, error: Exception) -> None:
    """An engine error, a dropped connection or a socket error in any runtime
    call comes out as ContainerError with the cause chained, so the deploy
    step fails and rolls back instead of escaping with a traceback."""
    with pytest.raises(ContainerError) as caught:
        CALLS[fail](runtime_with(fail, error))
    assert caught.value.__cause__ is error
    assert not isinstance(caught.value, Unhealthy)
    assert "\n" not in str(caught.value)


def test_a_missing_container_is_unhealthy_or_already_removed() -> None:
    """NotFound while probing means the container is gone; while removing, done."""
    gone = docker.errors.NotFound("no such container")
    with pytest.raises(Unhealthy, match="was removed"):
        runtime_with("get", gone).probe(CONTAINER, "/")
    runtime_with("get", gone).remove(CONTAINER, timeout=1)


def test_a_missing_image_says_routerd_never_pulls() -> None:
    """ImageNotFound gets the explanation a person needs."""
    with pytest.raises(ContainerError, match="never pulls"):
        runtime_with("get", docker.errors.ImageNotFound("nope")).check_image("shop:1")


def test_the_probe_refuses_a_path_that_would_change_the_host() -> None:
    """A health path not starting with / would make the container's address a user name."""
    with pytest.raises(ContainerError, match="does not start with /"):
        runtime_with("", OSError()).probe(CONTAINER, "@other.host/")


# ------------------------------------------------------------ the rollback


class Store:
    """etcd as the rollback sees it: transactions, each failing as ``fail`` says."""

    prefix = "/routerd/"

    def __init__(self, fail: Callable[[list[Put | Delete]], Exception | None]) -> None:
        self.fail = fail
        self.revision = 10
        self.applied: list[list[Put | Delete]] = []

    async def transaction(self, checks: list[Any], ops: list[Put | Delete]) -> int | None:
        if error := self.fail(ops):
            raise error
        self.revision += 1
        self.applied.append(ops)
        return self.revision

    async def range(self, rel: str) -> Snapshot:
        """One router, stuck at revision 10: it never confirms an undo."""
        status = b'{"revision": 10, "pool": "shared"}'
        return Snapshot(self.revision, {"routers/r": KeyValue(status, 1, 1)})


class Runtime:
    name = "fake engine"

    def __init__(self) -> None:
        self.removed: list[str] = []

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]:
        return [CONTAINER]

    def remove(self, container: Container, *, timeout: float) -> None:
        self.removed.append(container.name)


PLAN = Plan(
    app="shop",
    release=Release("r2", ReleaseSpec(image="shop:2"), "2"),
    pool="shared",
    active="r1",
    active_mod=5,
    registered=frozenset(),
    served_by={},
)
OPTIONS = DeployOptions(router_timeout=0.2, rollback_timeout=0.5)


def undo(store: Store, journal: Journal) -> tuple[list[str], Runtime, list[str]]:
    runtime, said = Runtime(), list[str]()
    engines = Engines.local(runtime)  # type: ignore[arg-type]
    left = asyncio.run(Undo(store, engines, OPTIONS, said.append).run(PLAN, journal))  # type: ignore[arg-type]
    return left, runtime, said


def is_restore(ops: list[Put | Delete]) -> bool:
    return ops[0].key == "apps/shop/active"


def test_an_undo_step_that_raises_does_not_stop_the_others() -> None:
    """The deregistration failing with an unexpected error is reported, and the
    new containers are still removed."""
    store = Store(lambda ops: None if is_restore(ops) else RuntimeError("boom"))
    left, runtime, _ = undo(store, Journal(registered=True))
    assert left == ["deregister r2 (boom)"]
    assert runtime.removed == [CONTAINER.name]


def test_the_new_containers_keep_running_while_active_may_name_them() -> None:
    """active could not be restored (etcd down past the deadline): the new
    release stays registered and its containers keep running, named."""
    store = Store(lambda ops: StoreError("etcd down"))
    left, runtime, said = undo(store, Journal(registered=True, switched=True))
    assert runtime.removed == []
    assert left[0] == "restore active (etcd down)"
    assert left[1] == "r2 is still registered, as active may name it"
    assert left[2].startswith("containers of r2 left running (routerd-shop-r1-0)")
    assert "routerd gc shop" in left[2]
    assert "rollback: keeping the containers of r2 running, as active may still name r2" in said


def test_the_new_containers_keep_running_until_the_routers_confirm() -> None:
    """active is restored but the routers do not confirm it in time: the new
    containers keep running rather than cutting traffic still routed to them."""
    store = Store(lambda ops: None)
    left, runtime, said = undo(store, Journal(registered=True, switched=True))
    assert runtime.removed == []
    assert [ops[0].key for ops in store.applied] == ["apps/shop/active", "apps/shop/releases/r2/"]
    assert len(left) == 1 and "left running (routerd-shop-r1-0)" in left[0]
    assert "rollback: active is r1 again" in said
    assert any("as the routers did not confirm they stopped routing to it" in x for x in said)
