"""--supervise across a routerd crash: the nginx master it started keeps
serving, and the next routerd takes it over instead of starting another."""

from __future__ import annotations

import pytest
from helpers import app_keys, nginx_masters

pytestmark = pytest.mark.integration


def test_a_restarted_routerd_adopts_the_master_a_killed_one_left(etcd, routerd, backends):
    """After routerd is SIGKILLed, nginx keeps serving and the next routerd reloads that master."""
    first, second = backends(2)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))
    (master,) = nginx_masters(router.conf_path)
    assert router.proc is not None
    router.proc.kill()
    router.proc.wait()
    assert router.http("shop.example.com").text.strip() == first.name

    router.start(reap=False)
    assert nginx_masters(router.conf_path) == [master]
    router.wait_applied(etcd.txn(app_keys("blog", ["blog.example.com"], [second])))
    assert router.http("blog.example.com").text.strip() == second.name
    assert router.http("shop.example.com").text.strip() == first.name
    assert nginx_masters(router.conf_path) == [master]
