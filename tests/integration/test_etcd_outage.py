"""etcd unreachable: nginx keeps serving; routerd catches up when etcd returns."""

from __future__ import annotations

import time

import pytest
from helpers import app_keys, config_key, instance_key, wait_for

pytestmark = pytest.mark.integration

# A resync interval longer than every timeout below: catching up must come from
# resuming the watch or re-snapshotting on compaction, not from the periodic reread.
NO_RESYNC = 600


def test_etcd_stopped_and_restarted(etcd, routerd, backends):
    """While etcd is down nginx keeps serving; a change made after etcd restarts goes live."""
    first, second = backends(2)
    router = routerd(resync_interval=NO_RESYNC)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))

    etcd.stop()
    until = time.monotonic() + 3
    while time.monotonic() < until:
        assert router.http("shop.example.com").text.strip() == first.name
        router.check_alive()
        time.sleep(0.1)

    etcd.start()
    revision = etcd.txn(app_keys("blog", ["blog.example.com"], [second]))
    router.wait_applied(revision, timeout=30)

    assert router.http("blog.example.com").text.strip() == second.name
    assert router.http("shop.example.com").text.strip() == first.name


def test_changes_made_while_the_watch_was_down_are_caught_up(etcd, routerd, backends):
    """Changes made between etcd coming back and routerd reconnecting are replayed."""
    first, second = backends(2)
    router = routerd(resync_interval=NO_RESYNC)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))

    router.freeze()
    try:
        etcd.stop()
        etcd.start()
        etcd.put(instance_key("shop", "v1", "i0"), second.address)
        revision = etcd.txn(app_keys("blog", ["blog.example.com"], [first]))
    finally:
        router.thaw()

    router.wait_applied(revision, timeout=30)
    assert router.http("shop.example.com").text.strip() == second.name
    assert router.http("blog.example.com").text.strip() == first.name


def test_compacted_history_triggers_a_new_snapshot(etcd, routerd, backends):
    """When the revision to resume from was compacted, routerd rereads everything and serves it."""
    first, second = backends(2)
    router = routerd(resync_interval=NO_RESYNC)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))

    # Freeze routerd, break its watch (restart etcd), change and compact
    # behind its back: the watch cannot resume, only a new snapshot helps.
    router.freeze()
    try:
        etcd.stop()
        etcd.start()
        etcd.put(instance_key("shop", "v1", "i0"), second.address)
        etcd.txn(app_keys("blog", ["blog.example.com"], [first]))
        etcd.delete(config_key("shop"))
        revision = etcd.txn(app_keys("shop", ["shop.example.com"], [second]))
        etcd.compact()
    finally:
        router.thaw()

    router.wait_applied(revision, timeout=30)
    assert router.http("shop.example.com").text.strip() == second.name
    assert router.http("blog.example.com").text.strip() == first.name
    assert "compact" in router.log_text().lower()


def test_frozen_etcd_does_not_stop_serving(etcd, routerd, backends):
    """With etcd frozen (TCP open, no answers) nginx keeps serving and routerd recovers after."""
    first, second = backends(2)
    router = routerd(resync_interval=NO_RESYNC)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))

    etcd.freeze()
    try:
        until = time.monotonic() + 3
        while time.monotonic() < until:
            assert router.http("shop.example.com").text.strip() == first.name
            time.sleep(0.1)
        router.check_alive()
    finally:
        etcd.thaw()

    revision = etcd.put(instance_key("shop", "v1", "i0"), second.address)
    router.wait_applied(revision, timeout=30)
    assert router.http("shop.example.com").text.strip() == second.name


def test_restart_while_etcd_is_down_serves_the_installed_config(etcd, routerd, backends):
    """routerd started while etcd is down serves the last installed config, then catches up."""
    first, second = backends(2)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))
    router.stop()
    etcd.stop()

    router.start(wait_ready=False)
    wait_for(
        lambda: router.http("shop.example.com").text.strip() == first.name,
        timeout=15,
        message="the installed config to be served without etcd",
    )

    etcd.start()
    revision = etcd.txn(app_keys("blog", ["blog.example.com"], [second]))
    router.wait_applied(revision, timeout=30)
    assert router.http("blog.example.com").text.strip() == second.name
