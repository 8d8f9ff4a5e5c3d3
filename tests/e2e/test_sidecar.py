"""The container pair, end to end: routerd's image beside an nginx container.

pytest-docker brings up compose.yaml: etcd, an nginx container, the routerd
sidecar (both joining one PID namespace and sharing the config folder) and
two releases of a demo app, all on the host's network. Every check goes
through the nginx container's listener, as a client would. The tests share
the stack and run in file order; each writes the etcd state it relies on.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from helpers import app_config, free_ports, metric_sum, wait_for

from e2e.stack import Load, Stack, key, run

pytestmark = pytest.mark.docker

DOMAIN = "demo.e2e.test"


def instance(stack: Stack, release: str) -> dict[str, str]:
    port = stack.ports[f"APP_{release.upper()}"]
    return {key("apps", "demo", "releases", release, "web-1"): f"127.0.0.1:{port}"}


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_routerd_and_nginx_run_as_the_same_non_root_user(stack: Stack) -> None:
    """The routerd image runs as uid 10001, the nginx master too, and the image's
    HEALTHCHECK reports the sidecar healthy."""
    assert stack.inspect("routerd")["Config"]["User"] == "10001:10001"
    routerd_pid = int(stack.inspect("routerd")["State"]["Pid"])
    assert process_uid(routerd_pid) == 10001
    assert process_uid(stack.nginx_master()) == 10001

    def health() -> bool:
        return stack.inspect("routerd")["State"]["Health"]["Status"] == "healthy"

    wait_for(health, 30, interval=0.5, message="routerd container healthy")


def test_an_app_registered_in_etcd_is_routed(stack: Stack) -> None:
    """An app registered in etcd answers through the nginx container; a host
    no app claims gets 404."""
    revision = stack.etcd.txn(
        {key("apps", "demo", "config"): app_config([DOMAIN]), **instance(stack, "v1")}
    )
    stack.wait_applied(revision)

    assert stack.body(DOMAIN) == "200 demo v1"
    assert stack.http("nobody.e2e.test").status_code == 404


def test_a_change_goes_live(stack: Stack) -> None:
    """A new release made active is served once the router reports the revision,
    and the router's status names the generation nginx serves."""
    revision = stack.etcd.txn({**instance(stack, "v2"), key("apps", "demo", "active"): "v2"})
    status = stack.wait_applied(revision)

    assert {stack.body(DOMAIN) for _ in range(10)} == {"200 demo v2"}
    assert status["config_sha256"] == stack.generation()


def test_a_bad_value_is_rejected(stack: Stack) -> None:
    """A config that would smuggle nginx syntax and one that is not JSON are
    rejected and listed in the router's status; the app keeps its last good
    config and the bad app is not served."""
    demo_config, broken_config = key("apps", "demo", "config"), key("apps", "broken", "config")
    stack.etcd.put(broken_config, "{not json")
    revision = stack.etcd.put(demo_config, app_config([DOMAIN, "evil.e2e.test;"]))
    status = stack.wait_applied(revision)

    assert {demo_config, broken_config} <= {e["key"] for e in status["errors"]}
    assert stack.body(DOMAIN) == "200 demo v2"
    assert stack.http("evil.e2e.test").status_code == 404
    assert metric_sum(stack.routerd("/metrics").text, r"^routerd_rejections") >= 2

    stack.etcd.delete(broken_config)
    revision = stack.etcd.put(demo_config, app_config([DOMAIN]))
    assert stack.wait_applied(revision)["errors"] == []


def test_restarting_the_sidecar_drops_no_request(stack: Stack) -> None:
    """While the routerd container restarts, nginx answers every request with the
    same master; the restarted routerd then applies the next change."""
    master = stack.nginx_master()
    with Load(stack, DOMAIN) as load:
        time.sleep(0.5)
        stack.compose("restart", "--timeout", "10", "routerd")
        stack.wait_ready()
        time.sleep(0.5)

    assert load.failures == []
    assert load.answers["demo v2"] > 20
    assert stack.nginx_master() == master

    revision = stack.etcd.put(key("apps", "demo", "active"), "v1")
    stack.wait_applied(revision)
    stack.wait_body(DOMAIN, "200 demo v1", timeout=10)


def test_restarting_nginx_the_sidecar_applies_again(stack: Stack) -> None:
    """A change made while the nginx container is down is served when nginx comes
    back, and routerd signals the new master for the next change."""
    old_master = stack.nginx_master()
    stack.compose("stop", "--timeout", "10", "nginx")
    revision = stack.etcd.put(key("apps", "demo", "active"), "v2")
    stack.wait_applied(revision)  # processed: installed, waiting for its nginx

    stack.compose("start", "nginx")
    stack.wait_body(DOMAIN, "200 demo v2")
    assert stack.nginx_master() != old_master
    stack.wait_ready(timeout=15)

    revision = stack.etcd.put(key("apps", "demo", "active"), "v1")
    status = stack.wait_applied(revision)
    stack.wait_body(DOMAIN, "200 demo v1", timeout=10)
    assert status["config_sha256"] == stack.generation()


def test_the_nginx_target_supervises_its_own_nginx(stack: Stack) -> None:
    """The routerd-nginx image runs `routerd run --supervise`: it starts nginx
    itself, as uid 10001, and routes the same apps."""
    http, https, status, metrics = free_ports(4)
    name = f"{stack.project}-supervise"
    run([
        "docker", "run", "--detach", "--name", name, "--network", "host",
        "--env", f"ROUTERD_ETCD={stack.etcd.endpoint}",
        "--env", "ROUTERD_ROUTER_ID=e2e-supervise",
        "--env", f"ROUTERD_HTTP_LISTEN=127.0.0.1:{http}",
        "--env", f"ROUTERD_HTTPS_LISTEN=127.0.0.1:{https}",
        "--env", f"ROUTERD_STATUS_LISTEN=127.0.0.1:{status}",
        "--env", f"ROUTERD_METRICS_LISTEN=127.0.0.1:{metrics}",
        stack.images["routerd-nginx"],
    ])  # fmt: skip
    try:
        supervised = Stack(stack.compose_file, stack.project, {
            **stack.ports, "HTTP": http, "STATUS": status, "METRICS": metrics,
        }, stack.images)  # fmt: skip
        supervised.wait_ready(timeout=60)
        supervised.wait_body(DOMAIN, stack.body(DOMAIN), timeout=10)
        top = run(["docker", "top", name, "-eo", "pid,uid,args"])
        assert "nginx: master process" in top
        assert {line.split()[1] for line in top.splitlines()[1:]} == {"10001"}
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=60)
