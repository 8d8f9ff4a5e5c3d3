"""The router status in etcd, the health endpoints and metrics."""

from __future__ import annotations

import datetime
import time

import pytest
from helpers import app_config, app_keys, config_key, instance_key, metric_sum, wait_for

pytestmark = pytest.mark.integration


def test_status_describes_what_nginx_serves(etcd, routerd, backends):
    """The router status carries the processed revision, served config hash, time and pool."""
    (backend,) = backends(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    router = routerd()

    status = router.wait_applied(revision)

    assert isinstance(status["revision"], int)
    assert status["revision"] >= revision
    assert status["config_sha256"] == router.generation()
    assert len(status["config_sha256"]) == 64
    applied = datetime.datetime.fromisoformat(status["applied_at"])
    assert abs(datetime.datetime.now(datetime.UTC) - applied).total_seconds() < 60
    assert status["pool"] == "shared"
    assert status["errors"] == []


def test_unchanged_config_still_advances_the_revision(etcd, routerd, backends):
    """A snapshot that does not change the rendered config still advances the reported revision."""
    (backend,) = backends(1)
    router = routerd()
    first = router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))

    # The same value written again, and an app of another pool: nothing to render.
    revision = etcd.put(config_key("shop"), app_config(["shop.example.com"]))
    status = router.wait_applied(revision)
    assert status["config_sha256"] == first["config_sha256"]

    revision = etcd.txn(app_keys("other", ["other.example.com"], [backend], pool="high"))
    status = router.wait_applied(revision)
    assert status["config_sha256"] == first["config_sha256"]


def test_reported_revision_is_served_to_every_new_connection(etcd, routerd, backends):
    """Right after the router reports a revision, every new connection gets it (no grace)."""
    apps = dict(zip(("first", "second"), backends(2), strict=True))
    router = routerd()
    late = []
    for round_ in range(20):
        # A domain moves between two apps: every round is a reload with a visible effect.
        owner = ("first", "second")[round_ % 2]
        keys = {}
        for name, backend in apps.items():
            domains = [f"{name}.example.com"] + (["moving.test"] if name == owner else [])
            keys.update(app_keys(name, domains, [backend]))
        router.wait_applied(etcd.txn(keys), settle=0)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 0.15:
            if router.http("moving.test").text.strip() != apps[owner].name:
                late.append((round_, round(elapsed * 1000)))

    assert late == [], "(round, ms after the status) of requests served by the old config"


def test_health_ready_and_metrics_endpoints(etcd, routerd, backends):
    """/healthz and /readyz answer 200 when serving; /metrics reports applies and the revision."""
    (backend,) = backends(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    router = routerd()
    router.wait_applied(revision)

    assert router.endpoint("/healthz").status_code == 200
    assert router.endpoint("/readyz").status_code == 200
    text = router.metrics()
    assert "# TYPE" in text
    assert metric_sum(text, r"appl") >= 1, "no apply counted"
    assert metric_sum(text, r"revision") >= revision, "applied revision not exported"


def test_health_fails_when_etcd_goes_silent(etcd, routerd, backends):
    """With etcd frozen, /healthz fails once nothing was heard for --stale-after, and recovers."""
    (backend,) = backends(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    router = routerd(extra_args=("--stale-after", "2"))
    router.wait_applied(revision)
    assert router.endpoint("/healthz").status_code == 200

    etcd.freeze()
    try:
        wait_for(
            lambda: router.endpoint("/healthz").status_code != 200,
            timeout=15,
            message="/healthz to fail while etcd is frozen",
        )
        assert router.http("shop.example.com").text.strip() == backend.name
    finally:
        etcd.thaw()

    wait_for(
        lambda: router.endpoint("/healthz").status_code == 200,
        timeout=20,
        message="/healthz to recover after etcd is thawed",
    )


def test_clean_stop_withdraws_the_status(etcd, routerd, backends):
    """A router stopped with SIGTERM removes its status key and its nginx."""
    (backend,) = backends(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    router = routerd()
    router.wait_applied(revision)

    assert router.stop() == 0
    assert router.status() is None
    with pytest.raises(OSError):
        router.http("shop.example.com")


def test_dead_router_status_expires(etcd, routerd, backends):
    """The status of a router killed with SIGKILL disappears when its lease runs out."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))

    router.kill()

    wait_for(lambda: router.status() is None, timeout=30, interval=0.25, message="status to expire")


def test_rejections_are_counted_listed_and_logged(etcd, routerd, backends):
    """A rejected key is logged with its key, counted in /metrics and listed in the status."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))
    before = metric_sum(router.metrics(), r"reject")

    key = instance_key("shop", "v1", "broken")
    router.wait_applied(etcd.put(key, "not an address"))

    assert key in router.error_keys()
    assert metric_sum(router.metrics(), r"reject") > before
    assert key in router.log_text()
