"""Deploys while the cluster breaks: the etcd leader SIGKILLed, a router cut off
from etcd, a router restarted, nginx's master SIGKILLed and a Docker engine
restarted, each in the middle of a real ``routerd deploy``.

Three etcd members (healed between tests) and two or three routers, each
listing every member; the deploy's ``--etcd`` lists every member too.
Containers run on the machine's engine with ``--network host``, except in
the engine test, which restarts one of the extra engines (tests/engines.py).
Every test ends with ``assert_settled``: the deploy finished or rolled back,
never half (one release registered and active, exactly its containers
running, the lock released), and ``routerd gc --dry-run`` finds nothing.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Mapping
from typing import Any

import pytest
from cluster import Traffic, endpoint_of, rotated
from deploy_helpers import (
    Deploy,
    deploy_args,
    gc_finds_nothing,
    release_of,
    remove_app_containers,
    run,
    served,
    settled_problems,
)
from engines import Engine
from helpers import PREFIX, app_config, config_key, nginx_masters, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.docker]

FLAGS = ("--stale-after", "10")
LEASE_S = 10  # a router's status lease (routerd's own default)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def app(docker: Any, cluster: Any) -> Any:
    """A fresh app with a config in the cluster; its containers are removed afterwards."""
    name = f"fault-{secrets.token_hex(3)}"
    cluster.put(config_key(name), app_config([f"{name}.test"]))
    yield name
    remove_app_containers(docker, name)


def start_routers(cluster: Any, cluster_routerd: Any, count: int) -> list[Any]:
    return [
        cluster_routerd(
            router_id=f"r{n}", etcd_endpoint=rotated(cluster.endpoints, n), extra_args=FLAGS
        )
        for n in range(count)
    ]


def deploy(cluster: Any, app: str, *, expect: int = 0, **kwargs: Any) -> Deploy:
    done = run(cluster.endpoint, "deploy", *deploy_args(app, **kwargs))
    assert done.proc.returncode == expect, done.output
    return done


def assert_settled(
    cluster: Any, app: str, engines: Mapping[str, Any], routers: list[Any], release: str
) -> None:
    """``release`` is active and served by every router; nothing else of the app is
    left in etcd or on any engine; ``routerd gc --dry-run`` would do nothing."""
    wait_for(
        lambda: f"{PREFIX}/apps/{app}/lock" not in cluster.get_prefix(f"{PREFIX}/apps/{app}/"),
        15,
        message="the deploy lock released",
    )
    assert settled_problems(cluster, app, engines) == []
    assert cluster.get(f"{PREFIX}/apps/{app}/active") == release
    for router in routers:
        wait_for(
            lambda r=router: served(r, app, 4) == {release: 4}, 15, message="the release served"
        )
    gc = run(cluster.endpoint, "gc", app, "--dry-run")
    assert gc_finds_nothing(gc), gc.output


# ---------------------------------------------------------------- etcd


@pytest.mark.parametrize("moment", ["[2/6] register:", "[5/6] switch:", "[6/6] destroy:"])
def test_the_etcd_leader_killed_mid_deploy(cluster, cluster_routerd, docker, app, moment):
    """The etcd leader SIGKILLed as the deploy (talking to it first) registers, switches
    or drains: the deploy still finishes and every router serves the new release, with
    not one request failed on any router; the old leader, restarted, changes nothing."""
    routers = start_routers(cluster, cluster_routerd, 3)
    deploy(cluster, app, env={"MESSAGE": "one"})
    leader = cluster.wait_leader()
    others = [m.endpoint for m in cluster.members if m is not leader]
    endpoint = ",".join([leader.endpoint, *others])
    args = deploy_args(app, env={"DELAY": "1"}, extra=["--drain", "1.5"])

    with Traffic(routers, f"{app}.test") as traffic:
        running = Deploy(endpoint, "deploy", *args)
        running.wait_line(moment)
        cluster.kill(leader)
        assert running.wait() == 0, running.output
    cluster.restart(leader)

    assert traffic.failures() == []
    assert_settled(cluster, app, {"local": docker}, routers, release_of(running))


# ---------------------------------------------------------------- a router cut off


def cut_mid_deploy(
    cluster: Any, cluster_routerd: Any, proxies: Any, app: str, *, router_timeout: float
) -> tuple[Any, Any, list[Any], str, Deploy]:
    """A router reaching etcd directly and one ("behind") through proxies, the app's
    first release, and a second deploy during whose step 1 the proxies are stopped:
    (direct, behind, the proxies, the first release, the running deploy)."""
    (direct,) = start_routers(cluster, cluster_routerd, 1)
    cut = proxies(cluster.endpoints)
    behind = cluster_routerd(router_id="behind", etcd_endpoint=endpoint_of(cut), extra_args=FLAGS)
    first = release_of(deploy(cluster, app, env={"MESSAGE": "one"}))
    extra = ["--router-timeout", f"{router_timeout:g}"]
    running = Deploy(cluster.endpoint, "deploy", *deploy_args(app, env={"DELAY": "1"}, extra=extra))
    running.wait_line("[1/6] start:")
    for proxy in cut:
        proxy.stop()
    return direct, behind, cut, first, running


def test_a_router_cut_off_mid_deploy_is_waited_for_until_its_lease_expires(
    cluster, cluster_routerd, docker, app, proxies
):
    """A router cut off from every member while the deploy starts its containers holds
    step 3 until its status lease expires; then it counts as gone and the deploy finishes
    on the router that is alive. Once its way to etcd is back, the cut router catches up
    and serves the new release."""
    direct, behind, cut, _, running = cut_mid_deploy(
        cluster, cluster_routerd, proxies, app, router_timeout=3 * LEASE_S
    )

    assert running.wait() == 0, running.output
    waited = running.wait_line("[3/6] render: done in ")
    assert float(waited.split("done in ")[1].split()[0]) > 2  # it did wait for the cut router
    assert "behind" not in waited  # ... and then went on without it
    second = release_of(running)
    assert served(direct, app) == {second: 8}

    for proxy in cut:
        proxy.start()
    assert_settled(cluster, app, {"local": docker}, [direct, behind], second)


def test_a_router_alive_but_cut_off_times_the_deploy_out_naming_it(
    cluster, cluster_routerd, docker, app, proxies
):
    """A router whose lease is still alive but that cannot see the registration fails
    step 3 once --router-timeout passes, with a message naming that router; the deploy
    rolls back, and the router, its way back, serves the old release still."""
    direct, behind, cut, first, running = cut_mid_deploy(
        cluster, cluster_routerd, proxies, app, router_timeout=2
    )

    assert running.wait() == 1, running.output
    assert "failed at step 3 (render)" in running.output
    failed = running.wait_line("[3/6] render: failed")
    assert "within 2 s: behind at " in failed and "r0" not in failed
    assert "rolled back;" in running.output

    for proxy in cut:
        proxy.start()
    assert_settled(cluster, app, {"local": docker}, [direct, behind], first)


# ---------------------------------------------------------------- a router restarted


@pytest.mark.parametrize(
    ("how", "moment"), [("SIGKILL", "[5/6] switch:"), ("SIGTERM", "[2/6] register:")]
)
def test_a_router_restarted_mid_deploy(cluster, cluster_routerd, docker, app, how, moment):
    """A routerd SIGKILLed as the deploy switches comes back at once, takes over the nginx
    it left serving (not one request fails through it), and confirms the switch the deploy
    waits for; one stopped with SIGTERM as the deploy registers drops out, and the deploy
    finishes on the other router; restarted, it serves the new release."""
    routers = start_routers(cluster, cluster_routerd, 2)
    victim = routers[1]
    deploy(cluster, app, env={"MESSAGE": "one"})
    watched = routers if how == "SIGKILL" else routers[:1]

    with Traffic(watched, f"{app}.test") as traffic:
        running = Deploy(cluster.endpoint, "deploy", *deploy_args(app, env={"DELAY": "1"}))
        running.wait_line(moment)
        if how == "SIGKILL":
            victim.kill(reap=False)
            victim.start(reap=False)
        else:
            assert victim.stop() == 0
            victim.start()
        assert running.wait() == 0, running.output
    if how == "SIGKILL":
        assert "adopted the running nginx master" in victim.log_text()

    assert traffic.failures() == []
    assert_settled(cluster, app, {"local": docker}, routers, release_of(running))


# ---------------------------------------------------------------- nginx killed


@pytest.mark.parametrize("backends_mode", ["off", "on"])
def test_nginx_sigkilled_mid_deploy(cluster, cluster_routerd, docker, app, backends_mode):
    """nginx's master SIGKILLed on one router as the deploy switches: the supervising
    routerd starts a new one, the deploy finishes, both routers serve the new release,
    and not one request through the other router fails."""
    routers = [
        cluster_routerd(
            router_id=f"r{n}",
            etcd_endpoint=rotated(cluster.endpoints, n),
            extra_args=(*FLAGS, "--dynamic-backends", backends_mode),
        )
        for n in range(2)
    ]
    victim, other = routers
    deploy(cluster, app, env={"MESSAGE": "one"})
    master = victim.nginx_master()

    with Traffic([other], f"{app}.test") as traffic:
        running = Deploy(cluster.endpoint, "deploy", *deploy_args(app, extra=["--drain", "1"]))
        running.wait_line("[5/6] switch:")
        os.kill(master, signal.SIGKILL)
        assert running.wait() == 0, running.output
    assert nginx_masters(victim.conf_path) not in ([], [master])

    assert traffic.failures() == []
    assert_settled(cluster, app, {"local": docker}, routers, release_of(running))


def test_a_switch_the_router_cannot_push_yet_is_waited_for(cluster, cluster_routerd, docker, app):
    """With nginx's push socket gone for a moment (as while a new master starts), the
    router does not report the switch's revision as served but tries the push again,
    so the deploy waits for it instead of rolling back, and finishes once it passes.
    (Found by the chaos run: the push error failed the deploy at step 5.)"""
    (router,) = start_routers(cluster, cluster_routerd, 1)
    deploy(cluster, app, env={"MESSAGE": "one"})
    channel = router.workdir / "private" / "backends.sock"
    moved = channel.with_name("moved.sock")
    channel.rename(moved)  # nginx still listens on it; routerd cannot reach it
    try:
        running = Deploy(cluster.endpoint, "deploy", *deploy_args(app))
        running.wait_line("[5/6] switch:")
        wait_for(lambda: "retrying in" in str(router.status()), 10, message="a failed push")
        time.sleep(1)
    finally:
        moved.rename(channel)

    assert running.wait() == 0, running.output
    assert_settled(cluster, app, {"local": docker}, [router], release_of(running))


# ---------------------------------------------------------------- an engine restarted


@pytest.fixture
def two_hosts(docker_engines: list[Engine], cluster: Any) -> dict[str, Engine]:
    """Two of the extra engines running and registered as the hosts of pool shared."""
    engines = {e.name: e for e in docker_engines if e.name in ("shared-a", "shared-b")}
    for engine in engines.values():
        engine.ensure_running()
        record = {**engine.registration(), "capacity": {"cpus": 2, "memory_mb": 2048}}
        cluster.put_json(f"{PREFIX}/hosts/{engine.name}", {**record, "tags": {"pool": "shared"}})
    cluster.put_json(f"{PREFIX}/pools/shared", {"hosts": {"pool": "shared"}})
    return engines


@pytest.fixture
def hosted_app(two_hosts: dict[str, Engine], cluster: Any) -> Any:
    """A fresh app placed over the two hosts; its containers go from both afterwards."""
    name = f"fault-{secrets.token_hex(3)}"
    cluster.put(config_key(name), app_config([f"{name}.test"]))
    yield name
    for engine in two_hosts.values():
        engine.ensure_running()
        engine.remove_app(name)


@pytest.mark.parametrize("moment", ["[1/6] start:", "[6/6] destroy:"])
def test_a_docker_engine_restarted_mid_deploy(
    cluster, cluster_routerd, two_hosts, hosted_app, moment
):
    """One host's engine restarted while the new release's containers start (the deploy
    rolls back, or finishes once the engine restarted its container), or while the old
    release drains (it finishes, removing the old containers once the engine answers):
    the containers the engine ran are back, and nothing of the losing release is left in
    etcd or on any engine (gc finds nothing)."""
    app = hosted_app
    (router,) = start_routers(cluster, cluster_routerd, 1)
    first = release_of(deploy(cluster, app, env={"MESSAGE": "one"}))
    restarted = two_hosts["shared-b"]
    assert len(restarted.containers(app)) == 1
    env = {"DELAY": "3"} if moment.startswith("[1/6]") else {}
    running = Deploy(
        cluster.endpoint, "deploy", *deploy_args(app, env=env, extra=["--drain", "0.5"])
    )
    running.wait_line(moment)
    if moment.startswith("[1/6]"):
        wait_for(lambda: len(restarted.containers(app)) == 2, 10, message="a new container")
    restarted.stop()
    restarted.start().wait_ready()

    code = running.wait()
    clients = {name: engine.client for name, engine in two_hosts.items()}
    if moment.startswith("[1/6]") and code == 1:  # else the restarted container got healthy
        assert "failed at step 1 (start)" in running.output and "; rolled back;" in running.output
        assert_settled(cluster, app, clients, [router], first)
    else:
        assert code == 0, running.output
        assert_settled(cluster, app, clients, [router], release_of(running))
