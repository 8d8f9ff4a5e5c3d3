"""Three etcd members and several routers: members killed, lost for good or all
stopped, a router cut off from etcd or reaching it slowly, nginx killed.

Every router's ``--etcd`` lists all three members (the cut-off and slow ones
reach them through TcpProxies). One cluster serves the whole module and is
healed between tests. Requests go through ``Traffic``: a new connection each,
from every router, for the whole fault.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from cluster import Traffic, endpoint_of, rotated
from helpers import (
    app_keys,
    children_of,
    instance_key,
    metric_sum,
    nginx_masters,
    pid_alive,
    wait_for,
)

pytestmark = pytest.mark.integration

STALE_AFTER = 10  # longer than one etcd call's timeout (5 s), which an election can use up
FOLLOW_S = 12  # "within seconds": a write to a leaderless follower waits out one timeout
FLAGS = ("--stale-after", str(STALE_AFTER))


def start_routers(cluster, cluster_routerd, count):
    """``count`` routers; router n lists the members starting at member n, so each
    member (the leader among them) has a router connected to it first."""
    return [
        cluster_routerd(
            router_id=f"r{n}", etcd_endpoint=rotated(cluster.endpoints, n), extra_args=FLAGS
        )
        for n in range(count)
    ]


def wait_all(routers, revision, timeout=FOLLOW_S):
    for router in routers:
        router.wait_applied(revision, timeout=timeout)


def healthz(router):
    answer = router.endpoint("/healthz")
    return answer.status_code, answer.text.strip()


def test_the_leader_killed_and_restarted(cluster, cluster_routerd, backends):
    """With the etcd leader SIGKILLed, every router keeps serving without one failed request
    and has a change made during the election live within seconds, /healthz staying ok; once
    the old leader is back, the next change is live on every router too."""
    first, second, third = backends(3)
    routers = start_routers(cluster, cluster_routerd, 3)
    wait_all(routers, cluster.txn(app_keys("shop", ["shop.example.com"], [first])))
    leader = cluster.wait_leader()

    with Traffic(routers, "shop.example.com") as traffic:
        cluster.kill(leader)
        revision = cluster.put(instance_key("shop", "v1", "i0"), second.address)
        wait_all(routers, revision)
        cluster.wait_leader(not_=leader)
    assert traffic.failures() == []
    assert traffic.bodies() <= {first.name, second.name}
    assert all(router.http("shop.example.com").text.strip() == second.name for router in routers)
    assert [healthz(router) for router in routers] == [(200, "ok")] * 3

    cluster.restart(leader)
    revision = cluster.put(instance_key("shop", "v1", "i0"), third.address)
    wait_all(routers, revision)
    assert all(router.http("shop.example.com").text.strip() == third.name for router in routers)


def test_a_follower_lost_for_good_then_every_member_stopped(cluster, cluster_routerd, backends):
    """A follower killed and removed from the cluster for good leaves every router serving,
    following changes and healthy past --stale-after; only with every member stopped does
    /healthz say etcd is stale, while nginx still serves; once they return, routers catch up."""
    first, second, third = backends(3)
    routers = start_routers(cluster, cluster_routerd, 2)
    wait_all(routers, cluster.txn(app_keys("shop", ["shop.example.com"], [first])))

    cluster.remove(cluster.followers()[0])
    revision = cluster.put(instance_key("shop", "v1", "i0"), second.address)
    wait_all(routers, revision)
    time.sleep(STALE_AFTER + 1)
    assert [healthz(router) for router in routers] == [(200, "ok")] * 2

    for member in cluster.members:
        member.stop()
    with Traffic(routers, "shop.example.com") as traffic:
        for router in routers:
            wait_for(
                lambda r=router: healthz(r)[0] == 503,
                timeout=STALE_AFTER + 10,
                message="/healthz to fail with no member answering",
            )
    assert "etcd last heard" in healthz(routers[0])[1]
    assert traffic.failures() == [] and traffic.bodies() == {second.name}

    cluster.heal()
    revision = cluster.put(instance_key("shop", "v1", "i0"), third.address)
    wait_all(routers, revision, timeout=30)
    assert [router.http("shop.example.com").text.strip() for router in routers] == [third.name] * 2
    wait_for(lambda: [healthz(r) for r in routers] == [(200, "ok")] * 2, message="healthy again")


def test_a_router_cut_off_from_etcd(cluster, cluster_routerd, backends, proxies):
    """A router whose way to every member is cut keeps serving its last config, drops out of
    routers/ when its lease expires, and catches up on the change it missed once the way is
    back; the router that was never cut follows the change at once. Cut again, it still
    stops cleanly at once on SIGTERM."""
    first, second = backends(2)
    (direct,) = start_routers(cluster, cluster_routerd, 1)
    cut = proxies(cluster.endpoints)
    behind = cluster_routerd(router_id="behind", etcd_endpoint=endpoint_of(cut), extra_args=FLAGS)
    wait_all([direct, behind], cluster.txn(app_keys("shop", ["shop.example.com"], [first])))

    for proxy in cut:
        proxy.stop()
    with Traffic([behind], "shop.example.com") as traffic:
        revision = cluster.put(instance_key("shop", "v1", "i0"), second.address)
        direct.wait_applied(revision)
        wait_for(lambda: behind.status() is None, timeout=20, message="the cut router's lease")
    assert traffic.failures() == [] and traffic.bodies() == {first.name}
    assert direct.http("shop.example.com").text.strip() == second.name

    for proxy in cut:
        proxy.start()
    behind.wait_applied(revision, timeout=FOLLOW_S)
    assert behind.http("shop.example.com").text.strip() == second.name

    for proxy in cut:  # cut again: a stop must not wait for etcd
        proxy.stop()
    started = time.monotonic()
    assert behind.stop() == 0
    assert time.monotonic() - started < 5


def test_slow_etcd_still_coalesces_a_burst(cluster, cluster_routerd, backends, proxies):
    """With every packet between a router and etcd held 200 ms, a burst of 30 puts still
    coalesces into a few reloads, and the router ends up serving all of them."""
    (backend,) = backends(1)
    slow = proxies(cluster.endpoints)
    (router,) = [
        cluster_routerd(router_id="slow", etcd_endpoint=endpoint_of(slow), extra_args=FLAGS)
    ]
    router.wait_applied(cluster.txn(app_keys("app0", ["app0.example.com"], [backend])))
    for proxy in slow:
        proxy.delay = 0.2
    reloads = metric_sum(router.metrics(), "routerd_reloads", 'result="ok"')

    revision = 0
    for number in range(1, 31):
        revision = cluster.txn(app_keys(f"app{number}", [f"app{number}.example.com"], [backend]))
    status = router.wait_applied(revision, timeout=30)

    done = metric_sum(router.metrics(), "routerd_reloads", 'result="ok"') - reloads
    assert 1 <= done <= 6, f"{done} reloads for 30 puts"
    assert status["errors"] == [] and status["apps"] == 31
    for number in range(31):
        assert router.http(f"app{number}.example.com").text.strip() == backend.name


@pytest.mark.parametrize("backends_mode", ["off", "on"])
def test_nginx_master_sigkilled_under_a_supervising_routerd(
    cluster, cluster_routerd, backends, backends_mode
):
    """An nginx master killed with SIGKILL (its orphaned workers still holding the listen
    sockets) is replaced by the supervising routerd, which serves again within seconds and
    takes the next change; the other router never notices."""
    first, second = backends(2)
    routers = [
        cluster_routerd(router_id=f"r{n}", extra_args=(*FLAGS, "--dynamic-backends", backends_mode))
        for n in range(2)
    ]
    wait_all(routers, cluster.txn(app_keys("shop", ["shop.example.com"], [first])))
    victim, other = routers
    killed = victim.nginx_master()
    orphans = children_of(killed)

    with Traffic([other], "shop.example.com") as traffic:
        os.kill(killed, signal.SIGKILL)
        wait_for(
            lambda: (
                nginx_masters(victim.conf_path) not in ([], [killed])
                and victim.http("shop.example.com", timeout=1).text.strip() == first.name
            ),
            timeout=10,
            message="a new nginx master serving",
        )
    assert traffic.failures() == []
    assert not any(pid_alive(pid) for pid in orphans), "the orphaned workers were not stopped"

    wait_all(routers, cluster.put(instance_key("shop", "v1", "i0"), second.address))
    assert [r.http("shop.example.com").text.strip() for r in routers] == [second.name] * 2
    assert healthz(victim) == (200, "ok")
