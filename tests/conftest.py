"""Fixtures that start real processes: etcd, routerd (with its nginx), backends,
and extra Docker engines for placement.

etcd runs once per test module and every key is wiped before each test (a
start costs most of a second; a wipe costs a millisecond); the extra Docker
engines run once per session. A test that stops
or freezes etcd leaves it to the next test's wipe to bring it back. Each
routerd gets its own ports and folder, and is stopped after the test; when a
test fails its report carries the tail of routerd's log and nginx's error log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engines import Engine, make_engines, start_engines, stop_engines
from helpers import Backend, Etcd, Routerd

HANDLES = pytest.StashKey[list[Routerd]]()
FLEET = ["shared-a", "shared-b", "dedicated-a", "dedicated-b"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for number, handle in enumerate(item.stash.get(HANDLES, [])):
            report.sections.append(
                (f"routerd #{number} ({handle.workdir})", handle.failure_report())
            )
    return report


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Engine]]:
    """Four extra Docker engines, one per pretend host, started once per session
    (a start costs seconds); a test that stops one leaves it to the next to
    restart. The last is also reached over tcp:// with TLS."""
    root = tmp_path_factory.mktemp("engines")
    engines = make_engines(root, FLEET, tls=FLEET[-1])
    try:
        start_engines(engines)
        yield engines
    finally:
        stop_engines(engines, root)


@pytest.fixture
def etcd(etcd_server: Etcd) -> Etcd:
    """A running, thawed etcd with no keys at all."""
    etcd_server.ensure_running()
    etcd_server.wipe()
    return etcd_server


@pytest.fixture
def routerd(
    request: pytest.FixtureRequest, etcd: Etcd, tmp_path: Path
) -> Iterator[Callable[..., Routerd]]:
    """Factory: ``routerd(allow_shrink=False, extra_args=(), wait_ready=True, ...)``
    starts ``routerd run --supervise`` against the test's etcd."""
    handles: list[Routerd] = []
    request.node.stash[HANDLES] = handles

    def start(*, wait_ready: bool = True, **kwargs: Any) -> Routerd:
        handle = Routerd(etcd=etcd, workdir=tmp_path / f"router{len(handles)}", **kwargs)
        handles.append(handle)
        return handle.start(wait_ready=wait_ready)

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def backends() -> Iterator[Callable[[int], list[Backend]]]:
    """Factory: ``backends(n)`` starts n HTTP servers answering ``backend-<port>``."""
    started: list[Backend] = []

    def start(count: int) -> list[Backend]:
        new = [Backend() for _ in range(count)]
        started.extend(new)
        return new

    yield start
    for backend in started:
        backend.stop()
