"""Routing: hosts, instances, releases, maintenance, allow lists, pools."""

from __future__ import annotations

import collections

import pytest
from helpers import (
    active_key,
    app_config,
    app_keys,
    children_of,
    config_key,
    instance_key,
)

pytestmark = pytest.mark.integration

# Instance and release changes go through nginx reloads (off) or through the
# Lua balancer without a reload (on); routing must not tell the difference.
dynamic = pytest.mark.parametrize("dynamic", ["off", "on"])


def start(routerd, dynamic, **kwargs):
    return routerd(extra_args=("--dynamic-backends", dynamic), **kwargs)


def bodies(router, host, count=12):
    """The backend names that answered ``count`` requests for ``host``."""
    seen = collections.Counter()
    for _ in range(count):
        answer = router.http(host)
        assert answer.status_code == 200, (host, answer.status_code, answer.text)
        seen[answer.text.strip()] += 1
    return seen


def test_host_routes_to_the_apps_instance(etcd, routerd, backends):
    """A request whose Host is one of an app's domains reaches that app's instance."""
    shop, blog = backends(2)
    etcd.txn(app_keys("shop", ["shop.example.com", "*.shop.example.org"], [shop]))
    revision = etcd.txn(app_keys("blog", ["blog.example.com"], [blog]))
    router = routerd()
    router.wait_applied(revision)

    assert router.http("shop.example.com").text.strip() == shop.name
    assert router.http("eu.shop.example.org").text.strip() == shop.name
    assert router.http("blog.example.com").text.strip() == blog.name
    assert router.http("blog.example.com", "/some/path?x=1").status_code == 200


def test_a_change_after_start_goes_live(etcd, routerd, backends):
    """An app added while routerd runs is served once the router reports its revision."""
    (backend,) = backends(1)
    router = routerd()
    assert router.http("late.example.com").status_code == 404

    revision = etcd.txn(app_keys("late", ["late.example.com"], [backend]))
    status = router.wait_applied(revision)

    assert router.http("late.example.com").text.strip() == backend.name
    assert status["config_sha256"] == router.generation()


@dynamic
def test_load_is_spread_over_instances(etcd, routerd, backends, dynamic):
    """Two instances of an app both receive requests."""
    first, second = backends(2)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [first, second]))
    router = start(routerd, dynamic)
    router.wait_applied(revision)

    seen = bodies(router, "shop.example.com", 12)

    assert set(seen) == {first.name, second.name}, seen


def test_unknown_host_gets_404(etcd, routerd, backends):
    """A Host that no app claims gets 404 from the default server."""
    (backend,) = backends(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    router = routerd()
    router.wait_applied(revision)

    assert router.http("nobody.example.com").status_code == 404
    assert router.http("example.com").status_code == 404
    assert backend.hits == 0


@dynamic
def test_app_without_instances_gets_503(etcd, routerd, backends, dynamic):
    """An app with no instance to route to answers 503 (and nginx still starts)."""
    revision = etcd.put(config_key("empty"), app_config(["empty.example.com"]))
    router = start(routerd, dynamic)
    router.wait_applied(revision)

    assert router.http("empty.example.com").status_code == 503

    (backend,) = backends(1)
    revision = etcd.put(instance_key("empty", "v1", "a"), backend.address)
    router.wait_applied(revision)
    assert router.http("empty.example.com").text.strip() == backend.name

    revision = etcd.delete(instance_key("empty", "v1", "a"))
    router.wait_applied(revision)
    assert router.http("empty.example.com").status_code == 503


@dynamic
def test_active_release_receives_all_traffic(etcd, routerd, backends, dynamic):
    """Without `active` all releases get traffic, with it only the active one; a switch moves it."""
    blue, green = backends(2)
    revision = etcd.txn(
        {
            config_key("shop"): app_config(["shop.example.com"]),
            instance_key("shop", "blue", "a"): blue.address,
            instance_key("shop", "green", "a"): green.address,
        }
    )
    router = start(routerd, dynamic)
    router.wait_applied(revision)
    assert set(bodies(router, "shop.example.com")) == {blue.name, green.name}

    router.wait_applied(etcd.put(active_key("shop"), "blue"))
    assert set(bodies(router, "shop.example.com")) == {blue.name}

    router.wait_applied(etcd.put(active_key("shop"), "green"))
    assert set(bodies(router, "shop.example.com")) == {green.name}


def test_active_release_without_instances_gets_503(etcd, routerd, backends):
    """An active release that has no instance routes nowhere: 503, not the other release."""
    (blue,) = backends(1)
    revision = etcd.txn(
        {
            config_key("shop"): app_config(["shop.example.com"]),
            instance_key("shop", "blue", "a"): blue.address,
            active_key("shop"): "green",
        }
    )
    router = routerd()
    router.wait_applied(revision)

    assert router.http("shop.example.com").status_code == 503
    assert blue.hits == 0


def test_maintenance_answers_503_with_a_page(etcd, routerd, backends):
    """An app in maintenance answers 503 with a maintenance page instead of reaching its instances.
    An app in maintenance answers 503 with a maintenance page instead of reaching its instances."""
    (backend,) = backends(1)
    keys = app_keys("shop", ["shop.example.com"], [backend], maintenance=True)
    revision = etcd.txn(keys)
    router = routerd()
    router.wait_applied(revision)

    answer = router.http("shop.example.com")

    assert answer.status_code == 503
    assert "maintenance" in answer.text.lower()
    assert backend.hits == 0

    revision = etcd.put(config_key("shop"), app_config(["shop.example.com"]))
    router.wait_applied(revision)
    assert router.http("shop.example.com").text.strip() == backend.name


def test_allow_list_limits_clients(etcd, routerd, backends):
    """An allow list without the client's address gives 403; one with it gives 200."""
    (backend,) = backends(1)
    keys = app_keys("shop", ["shop.example.com"], [backend], allow=["10.0.0.0/8"])
    router = routerd()
    router.wait_applied(etcd.txn(keys))

    assert router.http("shop.example.com").status_code == 403
    assert backend.hits == 0

    config = app_config(["shop.example.com"], allow=["10.0.0.0/8", "127.0.0.1"])
    router.wait_applied(etcd.put(config_key("shop"), config))
    assert router.http("shop.example.com").status_code == 200


def test_router_serves_only_its_pool(etcd, routerd, backends):
    """Apps of another pool are not served; moving one into the router's pool serves it."""
    shared, dedicated = backends(2)
    etcd.txn(app_keys("web", ["web.example.com"], [shared]))
    keys = app_keys("heavy", ["heavy.example.com"], [dedicated], pool="high")
    revision = etcd.txn(keys)
    router = routerd()
    router.wait_applied(revision)

    assert router.http("web.example.com").text.strip() == shared.name
    assert router.http("heavy.example.com").status_code == 404

    high = routerd(pool="high", router_id="high-router")
    high.wait_applied(revision)
    assert high.http("heavy.example.com").text.strip() == dedicated.name
    assert high.http("web.example.com").status_code == 404

    revision = etcd.put(config_key("heavy"), app_config(["heavy.example.com"]))
    router.wait_applied(revision)
    assert router.http("heavy.example.com").text.strip() == dedicated.name


def test_first_created_config_wins_a_duplicate_domain(etcd, routerd, backends):
    """A domain claimed twice goes to the app whose config key is oldest; the other is reported."""
    first, second = backends(2)
    etcd.txn(app_keys("first", ["shared.example.com", "first.example.com"], [first]))
    revision = etcd.txn(app_keys("second", ["shared.example.com", "second.example.com"], [second]))
    router = routerd()
    router.wait_applied(revision)

    assert router.http("shared.example.com").text.strip() == first.name
    assert config_key("second") in router.error_keys()

    # A later edit of the first app changes its mod revision, not its create revision.
    config = app_config(["shared.example.com", "first.example.com", "more.example.com"])
    router.wait_applied(etcd.put(config_key("first"), config))
    assert router.http("shared.example.com").text.strip() == first.name
    assert config_key("second") in router.error_keys()

    # Once the first app lets go of the domain, the second gets it.
    router.wait_applied(etcd.put(config_key("first"), app_config(["first.example.com"])))
    assert router.http("shared.example.com").text.strip() == second.name
    assert config_key("second") not in router.error_keys()


def test_dynamic_backends_change_instances_without_a_reload(etcd, routerd, backends):
    """With --dynamic-backends on, instance and release changes go live without an nginx reload."""
    blue, green = backends(2)
    router = start(routerd, "on")
    keys = app_keys("shop", ["shop.example.com"], [blue], release="blue")
    status = router.wait_applied(etcd.txn(keys))
    workers = sorted(children_of(router.nginx_master()))

    router.wait_applied(etcd.put(instance_key("shop", "green", "a"), green.address))
    assert set(bodies(router, "shop.example.com")) == {blue.name, green.name}
    router.wait_applied(etcd.put(active_key("shop"), "green"))
    assert set(bodies(router, "shop.example.com")) == {green.name}
    after = router.wait_applied(etcd.delete(instance_key("shop", "blue", "i0")))

    assert sorted(children_of(router.nginx_master())) == workers, "nginx was reloaded"
    assert after["config_sha256"] == status["config_sha256"] == router.generation()
