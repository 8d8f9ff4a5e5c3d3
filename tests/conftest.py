"""Fixtures that start real processes: etcd, routerd (with its nginx), backends.

etcd runs once per test module and every key is wiped before each test (a
start costs most of a second; a wipe costs a millisecond). A test that stops
or freezes etcd leaves it to the next test's wipe to bring it back. Each
routerd gets its own ports and folder, and is stopped after the test; when a
test fails its report carries the tail of routerd's log and nginx's error log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Backend, Etcd, Routerd

HANDLES = pytest.StashKey[list[Routerd]]()


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
