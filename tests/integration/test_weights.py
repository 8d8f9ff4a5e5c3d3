"""``apps/<app>/weights`` through a real etcd, routerd and nginx, in both backend modes:
the split over many requests, the spread within a release, the per-release figures
the routers count, what a change costs (a push with the balancer, a reload without),
and a bad value refused for its app alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import PREFIX, app_keys, instance_key, metric_sum, wait_for

pytestmark = pytest.mark.integration

MODES = ["on", "off"]
REQUESTS = 2000
WEIGHTS = f"{PREFIX}/apps/shop/weights"


def weights_key_value(shares: dict[str, int]) -> str:
    return json.dumps(shares)


def send(router, host: str, count: int) -> list[str]:
    """``count`` requests on new connections, 8 at a time; each answer's body."""

    def one(_: int) -> str:
        answer = requests.get(
            f"http://127.0.0.1:{router.http_port}/",
            headers={"Host": host, "Connection": "close"},
            timeout=5,
        )
        assert answer.status_code == 200, (answer.status_code, answer.text)
        return answer.text.strip()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def reloads(router) -> float:
    return metric_sum(router.metrics(), "routerd_reloads", 'result="ok"')


def counted(router, app: str) -> dict[str, int]:
    """Requests per release as the router counted them (/traffic)."""
    releases = router.endpoint(f"/traffic?app={app}").json()["releases"]
    return {name: figures["requests"] for name, figures in releases.items()}


@pytest.mark.parametrize("mode", MODES)
def test_weights_split_the_traffic_between_releases(etcd, routerd, backends, mode):
    """Weights 80/20 over two instances of each release send 80 % and 20 % of 2,000
    requests to the releases (within 2 points), spread evenly over each release's
    instances; the router's own per-release counts name the release that answered every
    request; moving the weights costs a push with the balancer and one reload without."""
    v1, v2 = backends(2), backends(2)
    keys = app_keys("shop", ["shop.example.com"], v1)
    keys.update({instance_key("shop", "v2", f"i{n}"): b.address for n, b in enumerate(v2)})
    keys[f"{PREFIX}/apps/shop/active"] = "v1"
    router = routerd(extra_args=("--dynamic-backends", mode))
    router.wait_applied(etcd.txn(keys))
    before = reloads(router)

    router.wait_applied(etcd.put(WEIGHTS, weights_key_value({"v1": 80, "v2": 20})))
    assert router.error_keys() == set()
    expected_reloads = 0 if mode == "on" else 1
    assert reloads(router) - before == expected_reloads
    bodies = send(router, "shop.example.com", REQUESTS)

    by_backend = {b.name: bodies.count(b.name) for b in v1 + v2}
    share_v2 = 100 * sum(by_backend[b.name] for b in v2) / REQUESTS
    assert abs(share_v2 - 20) <= 2, by_backend
    for release in (v1, v2):
        one, other = (by_backend[b.name] for b in release)
        assert abs(one - other) <= 0.05 * (one + other), by_backend
    wanted = {"v1": REQUESTS - by_backend[v2[0].name] - by_backend[v2[1].name]}
    wanted["v2"] = REQUESTS - wanted["v1"]
    wait_for(lambda: counted(router, "shop") == wanted, 10, message=f"/traffic says {wanted}")


@pytest.mark.parametrize("mode", MODES)
def test_a_bad_weights_value_is_refused_for_its_app_alone(etcd, routerd, backends, mode):
    """Weights that do not sum to 100, then weights naming a release with no instance, are
    listed under the weights key; the app keeps its last valid split (all on v2) and a
    neighbour app's change goes live meanwhile; deleting the weights routes `active` again."""
    v1, v2, blog = backends(1), backends(1), backends(2)
    keys = app_keys("shop", ["shop.example.com"], v1)
    keys[instance_key("shop", "v2", "i0")] = v2[0].address
    keys[f"{PREFIX}/apps/shop/active"] = "v1"
    keys[WEIGHTS] = weights_key_value({"v1": 0, "v2": 100})
    keys.update(app_keys("blog", ["blog.example.com"], blog[:1]))
    router = routerd(extra_args=("--dynamic-backends", mode))
    router.wait_applied(etcd.txn(keys))
    assert set(send(router, "shop.example.com", 10)) == {v2[0].name}

    for bad in ('{"v1": 50, "v2": 51}', '{"v1": 50, "v9": 50}'):
        router.wait_applied(etcd.put(WEIGHTS, bad))
        assert router.error_keys() == {WEIGHTS}, router.status()
        assert set(send(router, "shop.example.com", 10)) == {v2[0].name}
    router.wait_applied(etcd.put(instance_key("blog", "v1", "i1"), blog[1].address))
    assert router.error_keys() == {WEIGHTS}
    assert set(send(router, "blog.example.com", 10)) == {b.name for b in blog}

    router.wait_applied(etcd.delete(WEIGHTS))
    assert router.error_keys() == set()
    assert set(send(router, "shop.example.com", 10)) == {v1[0].name}
