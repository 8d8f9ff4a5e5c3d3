"""Fixtures that start real processes: etcd, routerd (with its nginx), backends,
and extra Docker engines for placement, and a three-member etcd cluster with
TCP proxies in front of its members; and the machine's own Docker engine with
the test image on it.

etcd runs once per test module and every key is wiped before each test (a
start costs most of a second; a wipe costs a millisecond); the extra Docker
engines run once per session. A test that stops or freezes etcd leaves it to
the next test's wipe to bring it back; the cluster is healed the same way
(members restarted, removed ones replaced). Each routerd gets its own ports
and folder, and is stopped after the test; when a test fails its report
carries the tail of routerd's log and nginx's error log.

The property-based tests run a modest number of examples, so the suite stays
quick; ``HYPOTHESIS_PROFILE=thorough`` runs many more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, TcpProxy
from deploy_helpers import build_image, docker_client
from engines import Engine, make_engines, start_engines, stop_engines
from helpers import Backend, Etcd, EtcdApi, Routerd
from hypothesis import HealthCheck, settings

HANDLES = pytest.StashKey[list[Routerd]]()
FLEET = ["shared-a", "shared-b", "dedicated-a", "dedicated-b"]

# Examples are slow-ish (a real nginx -t, an etcd round trip): no deadline, and
# no complaint about slow generation or fixtures shared across examples.
_RELAXED = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("quick", max_examples=40, **_RELAXED)
settings.register_profile("thorough", max_examples=2000, **_RELAXED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for number, handle in enumerate(item.stash.get(HANDLES, [])):
            report.sections.append(
                (f"routerd #{number} ({handle.workdir})", handle.failure_report())
            )
    return report


@pytest.fixture(scope="session")
def docker() -> Any:
    """A client of the machine's Docker engine, with the test image on it."""
    client = docker_client()
    build_image(client)
    return client


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


def _routers(
    request: pytest.FixtureRequest, etcd: EtcdApi, tmp_path: Path
) -> Iterator[Callable[..., Routerd]]:
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
def routerd(
    request: pytest.FixtureRequest, etcd: Etcd, tmp_path: Path
) -> Iterator[Callable[..., Routerd]]:
    """Factory: ``routerd(allow_shrink=False, extra_args=(), wait_ready=True, ...)``
    starts ``routerd run --supervise`` against the test's etcd."""
    yield from _routers(request, etcd, tmp_path)


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(cluster_server: Cluster) -> Cluster:
    """Three healthy etcd members with a leader, and no keys at all."""
    cluster_server.heal()
    cluster_server.wipe()
    return cluster_server


@pytest.fixture
def cluster_routerd(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path
) -> Iterator[Callable[..., Routerd]]:
    """Factory like ``routerd``, for routers whose ``--etcd`` lists every cluster member
    (give each its own ``router_id``)."""
    yield from _routers(request, cluster, tmp_path)


@pytest.fixture
def proxies() -> Iterator[Callable[[list[str]], list[TcpProxy]]]:
    """Factory: ``proxies(endpoints)`` starts one TcpProxy per endpoint, closed after the test."""
    started: list[TcpProxy] = []

    def start(endpoints: list[str]) -> list[TcpProxy]:
        new = [TcpProxy.to(endpoint).start() for endpoint in endpoints]
        started.extend(new)
        return new

    yield start
    for proxy in started:
        proxy.close()


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
