"""What a SIGKILLed etcd leader costs the routers, under traffic.

A 3-member etcd cluster and 3 routers (router n lists the members from member
n, so one of them is connected to the leader), one app, and a request with a
new connection through every router the whole time. Each round writes a new
instance address for the app and times until every router serves it: first
with nothing broken (the baseline), then with the leader SIGKILLed just
before the write. Then `routerd apps set` is run right after another leader
kill, with the dead leader first in --etcd, and timed. The old leader is
restarted between rounds. Uses the tests' cluster fixture (tests/cluster.py).

    python bench/election.py [--rounds 5] [--dynamic-backends off|on]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import ROOT, test_fixtures

test_fixtures()
from cluster import Cluster, Member, Traffic  # noqa: E402  (test fixtures, on the path just above)
from helpers import Backend, Routerd, app_keys, instance_key  # noqa: E402

HOST = "shop.example.com"


def live_everywhere(routers: list[Routerd], body: str, since: float, timeout: float = 30) -> float:
    """Seconds from ``since`` until every router answers ``body`` on a new connection."""
    deadline = time.monotonic() + timeout
    pending = list(routers)
    while pending and time.monotonic() < deadline:
        pending = [r for r in pending if _serves(r, body) is False]
        time.sleep(0.005)
    if pending:
        raise TimeoutError(f"{len(pending)} router(s) never served {body}")
    return time.monotonic() - since


def _serves(router: Routerd, body: str) -> bool:
    try:
        return router.http(HOST, timeout=1).text.strip() == body
    except OSError:
        return False


def change(
    cluster: Cluster, routers: list[Routerd], backend: Backend, *, kill: bool
) -> tuple[float, float, float]:
    """(seconds until etcd took the write, until every router served it, until a new
    leader was elected), all from just before the kill and the write."""
    leader = cluster.wait_leader()
    elected: list[float] = [0.0]
    started = time.monotonic()
    if kill:
        cluster.kill(leader)
        watcher = threading.Thread(target=_time_election, args=(cluster, leader, started, elected))
        watcher.start()
    cluster.put(instance_key("shop", "v1", "i0"), backend.address)
    written = time.monotonic() - started
    live = live_everywhere(routers, backend.name, started)
    if kill:
        watcher.join()
        cluster.restart(leader)
    return written, live, elected[0]


def _time_election(cluster: Cluster, old: Member, started: float, box: list[float]) -> None:
    cluster.wait_leader(not_=old)
    box[0] = time.monotonic() - started


def apps_set_during_election(cluster: Cluster, number: int) -> tuple[bool, float]:
    leader = cluster.wait_leader()
    endpoints = [leader.endpoint] + [m.endpoint for m in cluster.members if m is not leader]
    cluster.kill(leader)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "routerd", "apps", "set", f"app{number}", "--domain",
         f"app{number}.example.com", "--etcd", ",".join(endpoints)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    cluster.restart(leader)
    return done.returncode == 0, took


def p50(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dynamic-backends", default="off", choices=["off", "on"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="routerd-election-"))
    cluster = Cluster(folder / "etcd")
    backends = [Backend() for _ in range(2)]
    routers: list[Routerd] = []
    try:
        cluster.start()
        endpoints = cluster.endpoints
        for n in range(3):
            router = Routerd(
                etcd=cluster, workdir=folder / f"router{n}", router_id=f"r{n}",
                etcd_endpoint=",".join(endpoints[n:] + endpoints[:n]),
                extra_args=("--dynamic-backends", args.dynamic_backends),
            )  # fmt: skip
            routers.append(router.start())
        revision = cluster.txn(app_keys(HOST.split(".")[0], [HOST], backends[:1]))
        for router in routers:
            router.wait_applied(revision)
        quiet: list[float] = []
        killed: list[tuple[float, float, float]] = []  # written, live, elected
        applied: list[tuple[bool, float]] = []
        with Traffic(routers, HOST) as traffic:
            for number in range(args.rounds):
                quiet.append(change(cluster, routers, backends[1 - number % 2], kill=False)[1])
                killed.append(change(cluster, routers, backends[number % 2], kill=True))
                applied.append(apps_set_during_election(cluster, number))
        written, live, elected = ([row[i] for row in killed] for i in range(3))
        failed = traffic.failures()
        print(f"rounds: {args.rounds}, backends: {args.dynamic_backends}, 3 members, 3 routers")
        print(f"new leader elected after the kill: p50 {p50(elected)} (max {max(elected):.2f} s)")
        print(f"write accepted after the kill:    p50 {p50(written)} (max {max(written):.2f} s)")
        print(f"change live on every router:       p50 {p50(live)} after the kill; "
              f"{p50(quiet)} with nothing broken")  # fmt: skip
        lag = [row[1] - row[0] for row in killed]
        print(f"  of which after etcd took it:     p50 {p50(lag)} (ratio to quiet "
              f"{statistics.median(lag) / statistics.median(quiet):.1f}x)")  # fmt: skip
        ok = [took for success, took in applied if success]
        print(f"apps set during an election:       {len(ok)}/{len(applied)} succeeded, "
              f"p50 {p50(ok or [0.0])}")  # fmt: skip
        print(f"requests: {len(traffic.seen)}, failed: {len(failed)}")
    finally:
        for router in routers:
            router.stop()
        for backend in backends:
            backend.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
