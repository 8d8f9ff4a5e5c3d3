"""Emptiness is suspicious: mass deletions are held back unless --allow-shrink."""

from __future__ import annotations

import pytest
from helpers import app_keys, config_key, instance_key, wait_for

pytestmark = pytest.mark.integration

APPS = 12


def many_apps(etcd, backend):
    keys = {}
    for number in range(APPS):
        keys.update(app_keys(f"app{number}", [f"app{number}.example.com"], [backend]))
    return etcd.txn(keys)


def delete_apps(etcd, numbers):
    """Delete every key of these apps in one transaction (one revision)."""
    deletes = []
    for number in numbers:
        deletes += [config_key(f"app{number}"), instance_key(f"app{number}", "v1", "i0")]
    return etcd.txn(deletes=deletes)


def shrink_reported(router, marker_count):
    """The refusal shows in the status errors or in the log (a held snapshot must be "reported")."""
    status = router.status() or {}
    text = " ".join(e.get("error", "") for e in status.get("errors", []))
    return "shrink" in text.lower() or router.log_text().lower().count("shrink") > marker_count


def test_losing_more_than_half_of_many_apps_is_not_applied(etcd, routerd, backends):
    """With 12 apps, deleting 7 at once is not applied but reported; the old config serves on."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(many_apps(etcd, backend))
    served = router.status()["config_sha256"]
    mentions = router.log_text().lower().count("shrink")

    delete_apps(etcd, range(7))

    wait_for(lambda: shrink_reported(router, mentions), message="the shrink to be reported")
    for number in range(APPS):
        assert router.http(f"app{number}.example.com").text.strip() == backend.name
    assert router.generation() == served


def test_losing_half_or_less_is_applied(etcd, routerd, backends):
    """With 12 apps, deleting 6 at once is an ordinary change and goes live."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(many_apps(etcd, backend))

    router.wait_applied(delete_apps(etcd, range(6)))

    assert router.http("app0.example.com").status_code == 404
    assert router.http("app6.example.com").text.strip() == backend.name


def test_losing_every_app_is_not_applied(etcd, routerd, backends):
    """A snapshot with no apps at all, after one with some, is not applied and is reported."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))
    mentions = router.log_text().lower().count("shrink")

    etcd.delete_prefix("/routerd/apps/")

    wait_for(lambda: shrink_reported(router, mentions), message="the emptying to be reported")
    assert router.http("shop.example.com").text.strip() == backend.name


def test_allow_shrink_applies_mass_deletions(etcd, routerd, backends):
    """With --allow-shrink, deleting most apps, and then all, is applied."""
    (backend,) = backends(1)
    router = routerd(allow_shrink=True)
    router.wait_applied(many_apps(etcd, backend))

    router.wait_applied(delete_apps(etcd, range(10)))
    assert router.http("app0.example.com").status_code == 404
    assert router.http("app11.example.com").text.strip() == backend.name

    router.wait_applied(etcd.delete_prefix("/routerd/apps/"))
    assert router.http("app11.example.com").status_code == 404
