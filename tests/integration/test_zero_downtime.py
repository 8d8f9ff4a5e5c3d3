"""Applying changes under load drops no request."""

from __future__ import annotations

import collections

import pytest
import requests
from helpers import Background, app_keys, config_key, instance_key

pytestmark = pytest.mark.integration

CHANGES = 50


class Load(Background):
    """Requests in a loop, each on a new connection, counted by outcome."""

    def __init__(self, router, host):
        self.router, self.host = router, host
        self.statuses: collections.Counter[int] = collections.Counter()
        self.connection_errors: list[str] = []
        super().__init__()
        self.spawn(self.run)

    def run(self):
        while not self.stopping.is_set():
            try:
                self.statuses[self.router.http(self.host).status_code] += 1
            except requests.RequestException as exc:
                self.connection_errors.append(repr(exc))


@pytest.mark.parametrize("dynamic", ["off", "on"])
def test_no_request_fails_while_50_changes_are_applied(etcd, routerd, backends, dynamic):
    """A client sending requests on new connections throughout 50 applied changes (instances added
    and removed, other apps added and removed) gets only 200s and no connection error."""
    steady, *others = backends(4)
    router = routerd(extra_args=("--dynamic-backends", dynamic))
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [steady])))

    with Load(router, "shop.example.com") as load:
        for change in range(CHANGES):
            other = others[change % len(others)]
            match change % 5:
                case 0:
                    revision = etcd.put(instance_key("shop", "v1", f"x{change}"), other.address)
                case 1:
                    revision = etcd.delete(instance_key("shop", "v1", f"x{change - 1}"))
                case 2:
                    keys = app_keys(f"app{change}", [f"app{change}.example.com"], [other])
                    revision = etcd.txn(keys)
                case 3:
                    revision = etcd.txn(
                        deletes=[
                            config_key(f"app{change - 1}"),
                            instance_key(f"app{change - 1}", "v1", "i0"),
                        ]
                    )
                case _:
                    revision = etcd.put(f"/routerd/apps/shop/releases/v1/y{change}", other.address)
            router.wait_applied(revision, settle=0)
        reloads_under_load = sum(load.statuses.values())

    assert load.connection_errors == [], (
        f"{len(load.connection_errors)} connection errors, first: {load.connection_errors[:3]}"
    )
    assert set(load.statuses) == {200}, f"non-200 answers: {dict(load.statuses)}"
    assert reloads_under_load >= 100, f"only {reloads_under_load} requests were sent"
