"""etcd calls across faults: a unary call made while the cluster elects a new leader
succeeds on another member, and a transaction whose reply was lost is neither lost
nor applied twice (the read-back after a refused repeat).

The lost reply is made by a TcpProxy that delivers the request and drops the answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import REPO, config_key, free_ports

from routerd.errors import Unavailable
from routerd.settings import EtcdSettings, parse_endpoints
from routerd.store import Check, Delete, Put, Store

pytestmark = pytest.mark.integration

KEY = "apps/shop/lock"


def store_for(endpoints, **settings):
    return Store(EtcdSettings(endpoints=parse_endpoints("--etcd", ",".join(endpoints)), **settings))


def raw_kv(etcd, key):
    """The gateway's view of one key (value, version, mod_revision), or None."""
    found = etcd._call("kv/range", {"key": base64.b64encode(key.encode()).decode()})
    kvs = found.get("kvs") or []
    return kvs[0] if kvs else None


def routerd_cli(*args, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "routerd", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def dead_leader_first(cluster):
    """Kill the leader; the member list with the dead one first, as a client had it."""
    leader = cluster.wait_leader()
    endpoints = [leader.endpoint] + [m.endpoint for m in cluster.members if m is not leader]
    cluster.kill(leader)
    return endpoints


def test_apps_set_during_an_election_succeeds(cluster):
    """`routerd apps set` run right after the leader was SIGKILLed, with the dead leader first
    in --etcd, writes its config once a new leader is elected, saying that it retried."""
    endpoints = dead_leader_first(cluster)

    done = routerd_cli(
        "apps", "set", "shop", "--domain", "shop.example.com", "--etcd", ",".join(endpoints)
    )

    assert done.returncode == 0, done.stderr
    assert "etcd unavailable; retrying" in done.stderr
    assert json.loads(cluster.get(config_key("shop")) or "{}")["domains"] == ["shop.example.com"]


def test_a_transaction_during_an_election_applies_once(cluster):
    """A guarded transaction (create the key if absent) sent during an election returns the
    revision at which it was applied, and was applied exactly once."""
    endpoints = dead_leader_first(cluster)

    async def work():
        async with store_for(endpoints) as store:
            return await store.transaction([Check(KEY)], [Put(KEY, b"token")])

    revision = asyncio.run(work())

    kv = raw_kv(cluster, f"/routerd/{KEY}")
    assert kv is not None and base64.b64decode(kv["value"]) == b"token"
    assert revision == int(kv["mod_revision"]) and kv["version"] == "1"


@pytest.fixture
def lossy(etcd, proxies):
    """A Store whose first endpoint is a proxy to ``etcd`` (muted once warmed up) and whose
    second is etcd itself; calls time out after 1 s."""
    (proxy,) = proxies([etcd.endpoint])
    return proxy, store_for([proxy.endpoint, etcd.endpoint], timeout=1.0)


def lose_replies_and(lossy, work):
    proxy, store = lossy

    async def run():
        async with store:
            await store.get("warm-up")  # connected through the proxy first
            proxy.mute()
            return await work(store)

    return asyncio.run(run())


def test_a_guarded_transaction_whose_reply_was_lost_counts_as_applied(etcd, lossy):
    """A transaction applied by etcd whose reply never came is repeated on the next member,
    refused there by its own compare, and recognised by its keys: its revision comes back and
    it was applied once."""
    ops = [Put(KEY, b"token"), Put("apps/shop/history/v2", b"{}"), Delete("apps/shop/gone")]
    etcd.put("/routerd/apps/shop/gone", "x")

    revision = lose_replies_and(lossy, lambda store: store.transaction([Check(KEY)], ops))

    kv = raw_kv(etcd, f"/routerd/{KEY}")
    assert kv is not None and revision == int(kv["mod_revision"]) and kv["version"] == "1"
    assert etcd.get("/routerd/apps/shop/gone") is None


def test_a_refusal_after_a_lost_reply_stands_when_the_keys_say_so(etcd, lossy):
    """A transaction refused by etcd whose refusal never came back is refused again on the
    next member; the keys do not hold what it would write, so it reports None."""
    etcd.put(f"/routerd/{KEY}", "someone else")

    refused = lose_replies_and(
        lossy, lambda store: store.transaction([Check(KEY)], [Put(KEY, b"me")])
    )

    assert refused is None
    assert etcd.get(f"/routerd/{KEY}") == "someone else"


def test_an_unguarded_repeat_writes_the_same_bytes(etcd, lossy):
    """A transaction with no compare whose reply was lost is applied again on the next member:
    etcd holds what it wrote, at the repeat's revision."""
    revision = lose_replies_and(lossy, lambda store: store.transaction([], [Put(KEY, b"v")]))

    kv = raw_kv(etcd, f"/routerd/{KEY}")
    assert kv is not None and base64.b64decode(kv["value"]) == b"v"
    assert revision == int(kv["mod_revision"])


def test_retries_end_after_retry_for(tmp_path):
    """With no endpoint answering, a read gives up after --etcd's retry budget with
    Unavailable, naming how long it tried."""
    dead = [f"http://127.0.0.1:{port}" for port in free_ports(2)]

    async def work():
        async with store_for(dead, retry_for=1.0) as store:
            await store.get("x")

    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"retried for 1 s"):
        asyncio.run(work())
    assert time.monotonic() - started < 5
