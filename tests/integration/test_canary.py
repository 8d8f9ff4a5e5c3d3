"""Canary deploys against real Docker, etcd, routerd and nginx, in both backend modes:
a release that fails some of its requests is rolled back at its first step, having
failed no more users than that step's share; a healthy one reaches 100 % without a
failed request; Ctrl-C and ``routerd deploy --abort`` roll back mid-step; a router
whose figures cannot be read stops a canary before anything starts; the weights a
dead controller left keep routing, through gc and scale, until the next deploy.

The steps are short (``--canary-interval 2``, ``--min-requests 20``) and the load is
four threads sending requests on new connections (``deploy_helpers.Load``).
"""

from __future__ import annotations

import math
import secrets
import signal
from typing import Any

import pytest
from deploy_helpers import (
    Deploy,
    Load,
    app_containers,
    deploy_args,
    release_of,
    remove_app_containers,
    revoke_lease_of,
    run,
    served,
)
from helpers import PREFIX, app_config, config_key, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.docker]
MODES = ["on", "off"]
QUICK = ("--canary-interval", "2", "--min-requests", "20")


@pytest.fixture
def app(docker: Any, etcd: Any) -> Any:
    """A fresh app name with a config in etcd; its containers are removed afterwards."""
    name = f"canary-{secrets.token_hex(3)}"
    etcd.put(config_key(name), app_config([f"{name}.test"]))
    yield name
    remove_app_containers(docker, name)


@pytest.fixture(params=MODES)
def live(request: Any, etcd: Any, routerd: Any, app: str) -> tuple[Any, str]:
    """A router (--dynamic-backends on, then off) serving the app's first release."""
    router = routerd(extra_args=("--dynamic-backends", request.param))
    done = run(etcd.endpoint, "deploy", *deploy_args(app, env={"MESSAGE": "one"}))
    assert done.proc.returncode == 0, done.output
    return router, release_of(done)


def canary(etcd: Any, app: str, *flags: str, **env: str) -> Deploy:
    """A canary deploy of a new release, started (not waited for)."""
    return Deploy(etcd.endpoint, "deploy", *deploy_args(app, env=env, extra=flags))


def keys(etcd: Any, app: str) -> dict[str, str]:
    base = f"{PREFIX}/apps/{app}/"
    return {k[len(base) :]: v for k, v in etcd.get_prefix(base).items()}


def assert_rolled_back(etcd: Any, docker: Any, router: Any, app: str, old: str) -> None:
    """The old release alone serves and is active; no weights, no new container, no lock."""
    wait_for(lambda: "lock" not in keys(etcd, app), 15, message="the deploy lock released")
    assert served(router, app) == {old: 8}
    assert {c.labels["routerd.release"] for c in app_containers(docker, app)} == {old}
    left = keys(etcd, app)
    assert left["active"] == old
    assert "weights" not in left and "abort" not in left
    assert {k.split("/")[1] for k in left if k.startswith("releases/")} == {old}


def test_a_failing_release_is_rolled_back_at_its_first_step(etcd, docker, app, live):
    """A release answering 500 to 30 % of requests is rolled back after its 10 % step,
    which prints both releases' figures; users saw some 5xx, but no more than 10 % of
    the requests they sent from the step's start until the release was deregistered."""
    router, old = live
    with Load(router, f"{app}.test") as load:
        done = canary(etcd, app, "--canary", "10,50", *QUICK, FAIL_PERCENT="30")
        assert done.wait() == 1, done.output
    new = release_of(done)

    assert "failed at step 5 (canary): the 10 % step failed: 5xx rate" in done.output
    step = done.wait_line("[5/6] canary: 10 %: new ")
    assert f"new {new} " in step and f"; old {old} " in step
    assert not any(line.startswith("[5/6] canary: 50 %") for line in done.lines)
    window = (done.stamp(f"[5/6] canary: {new} takes"), done.stamp("rollback: deregistered"))
    bound = math.ceil(0.10 * load.sent_between(*window))
    failed = len(load.failures)
    assert 0 < failed <= bound, f"users saw {failed} 5xx; bound {bound} (10 % of the step's)"
    assert set(load.failures) == {"HTTP 500"}
    assert_rolled_back(etcd, docker, router, app, old)


def test_a_healthy_release_reaches_all_traffic_without_a_failed_request(etcd, docker, app, live):
    """A healthy release passes its 10 % and 50 % steps and takes every request, the
    old one is removed, and under load not one request failed meanwhile."""
    router, old = live
    with Load(router, f"{app}.test") as load:
        done = canary(etcd, app, "--canary", "10,50", *QUICK, MESSAGE="two")
        assert done.wait() == 0, done.output
    new = release_of(done)

    assert load.failures == [], load.failures[:5]
    assert load.ok[new] > 0 and load.ok[old] > 0, load.ok
    for percent in (10, 50):
        assert done.wait_line(f"[5/6] canary: {percent} %: go on: 5xx rate 0.00 %")
    assert done.wait_line(f"[5/6] switch: active {old} -> {new}, weights removed")
    assert served(router, app) == {new: 8}
    assert {c.labels["routerd.release"] for c in app_containers(docker, app)} == {new}
    assert "weights" not in keys(etcd, app)


def test_a_step_without_enough_requests_is_watched_again_then_rolled_back(etcd, docker, app, live):
    """With no traffic, a step watches its interval three times for --min-requests
    requests, saying so, then rolls back: nothing showed the new release works."""
    router, old = live
    done = canary(etcd, app, "--canary", "10", "--canary-interval", "1", "--min-requests", "5")
    assert done.wait() == 1, done.output
    new = release_of(done)
    again = [line for line in done.lines if "< --min-requests 5; watching 1 s more" in line]
    assert len(again) == 2, done.output
    assert "the 10 % step failed: too few requests to judge: 0 < --min-requests 5" in done.output
    assert f"new {new} 0 requests" in done.output
    assert_rolled_back(etcd, docker, router, app, old)


def test_ctrl_c_during_a_step_rolls_back(etcd, docker, app, live):
    """SIGINT while a step is watched rolls the canary back (exit 130): the weights go,
    the old release takes every request again, and no request failed meanwhile."""
    router, old = live
    with Load(router, f"{app}.test") as load:
        done = canary(etcd, app, "--canary", "10", "--canary-interval", "30", MESSAGE="two")
        done.wait_line("[5/6] canary: 10 %: weights")
        done.signal(signal.SIGINT)
        assert done.wait() == 130, done.output
    assert "interrupted: rolling back" in done.output
    assert "rollback: weights removed" in done.output
    assert load.failures == []
    assert_rolled_back(etcd, docker, router, app, old)


def test_abort_rolls_back_a_running_canary(etcd, docker, app, live):
    """`routerd deploy --abort` makes the canary roll back at once, mid-step, and waits
    for it; meanwhile `routerd status <app>` shows the weights in force."""
    router, old = live
    done = canary(etcd, app, "--canary", "10", "--canary-interval", "60", MESSAGE="two")
    done.wait_line("[5/6] canary: 10 %: weights")
    new = release_of(done)
    status = run(etcd.endpoint, "status", app)
    assert f"weights: {old} 90 %, {new} 10 %" in status.output, status.output
    assert f"serves weights {old} 90 %, {new} 10 %" in status.output, status.output

    aborted = run(etcd.endpoint, "deploy", app, "--abort")

    assert aborted.proc.returncode == 0, aborted.output
    assert f"abort of {app}: rolled back; {old} serves" in aborted.output
    assert done.wait() == 1, done.output
    assert done.elapsed < 60
    assert "(routerd deploy --abort)" in done.output
    assert_rolled_back(etcd, docker, router, app, old)


def test_an_abort_asked_for_before_the_steps_stops_them_before_any_weights(etcd, docker, app, live):
    """An abort that arrives while the new containers are still starting is seen before
    the first step: no weights are ever written, and the canary rolls back."""
    router, old = live
    done = canary(etcd, app, "--canary", "10", *QUICK, DELAY="3")
    done.wait_line("[1/6] start:")

    aborted = run(etcd.endpoint, "deploy", app, "--abort")

    assert aborted.proc.returncode == 0, aborted.output
    assert done.wait() == 1, done.output
    assert "failed at step 5 (canary): aborted by" in done.output
    assert not any("weights" in line for line in done.lines), done.output
    assert_rolled_back(etcd, docker, router, app, old)


def test_abort_without_a_canary_is_refused(etcd, docker, app):
    """--abort with no deploy running, or with a deploy that is no canary, exits 1 and
    says why, writing no abort request."""
    idle = run(etcd.endpoint, "deploy", app, "--abort")
    assert idle.proc.returncode == 1
    assert f"no deploy of {app} runs" in idle.output
    etcd.put(f"{PREFIX}/apps/{app}/lock", '{"holder": "x", "doing": "scale to 3", "since": "t"}')
    busy = run(etcd.endpoint, "deploy", app, "--abort")
    assert busy.proc.returncode == 1
    assert "only a deploy with --canary can be aborted" in busy.output
    assert "abort" not in keys(etcd, app)


def test_a_router_without_figures_stops_a_canary_before_it_starts(etcd, routerd, docker, app):
    """A router that counts no traffic (--no-traffic-metrics) cannot judge a step: the
    canary deploy fails naming it, before any container starts."""
    router = routerd(extra_args=("--no-traffic-metrics",))
    first = run(etcd.endpoint, "deploy", *deploy_args(app))
    assert first.proc.returncode == 0, first.output

    done = canary(etcd, app, "--canary", "10", *QUICK)

    assert done.wait() == 1, done.output
    assert f"router {router.router_id}'s figures cannot be read" in done.output
    assert "[1/6]" not in done.output
    assert {c.labels["routerd.release"] for c in app_containers(docker, app)} == {release_of(first)}


def test_weights_a_dead_canary_left_keep_routing_until_the_next_deploy(etcd, routerd, docker, app):
    """A canary controller killed mid-step leaves its weights in force: both releases
    keep serving by them, gc keeps the weighted release, scale adds to the active one
    (the weights now spread over more instances), and a rollback to the first version
    (a deploy like any other) switches, removing the weights and both old releases."""
    router = routerd()
    first = run(etcd.endpoint, "deploy", *deploy_args(app, replicas=1))
    assert first.proc.returncode == 0, first.output
    old = release_of(first)
    killed = canary(etcd, app, "--canary", "50", "--canary-interval", "60")
    killed.wait_line("[5/6] canary: 50 %: weights")
    killed.signal(signal.SIGKILL)
    killed.wait()
    new = release_of(killed)
    revoke_lease_of(etcd, f"{PREFIX}/apps/{app}/lock")
    assert set(served(router, app, 20)) == {old, new}

    collected = run(etcd.endpoint, "gc", app)
    assert collected.proc.returncode == 0, collected.output
    assert "removed 0 container(s)" in collected.output
    scaled = run(etcd.endpoint, "scale", app, "3", "--health-timeout", "10")
    assert scaled.proc.returncode == 0, scaled.output
    seen = served(router, app, 40)
    assert set(seen) == {old, new} and len(app_containers(docker, app)) == 5, seen

    last = run(etcd.endpoint, "rollback", app, "v1", "--drain", "0.5", "--stop-timeout", "5")
    assert last.proc.returncode == 0, last.output
    assert f"like v1 {old}" in last.output, last.output
    latest = release_of(last)
    assert served(router, app) == {latest: 8}
    assert {c.labels["routerd.release"] for c in app_containers(docker, app)} == {latest}
    assert "weights" not in keys(etcd, app)
