"""The load-test kit: a Locust master with two workers, as plain processes,
against a real routerd and nginx; its report adds up and a misroute fails."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, Backend, app_keys, free_ports, in_ci, wait_for

pytestmark = pytest.mark.integration
USERS = 6


def locust_or_fail() -> None:
    # Never imported here: Locust monkey-patches the whole process for gevent.
    if importlib.util.find_spec("locust") is None:
        reason = "locust is not installed (pip install -e '.[test]')"
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


def test_the_cluster_counts_every_request_and_calls_a_misroute_a_failure(
    etcd, routerd, tmp_path: Path
):
    """Master + 2 workers for a few seconds: the summary parses, every request the
    report counts is one nginx's access log saw (and the backends answered), give
    or take the requests in flight at the stop, and the host routed to the wrong
    app on purpose fails as a misroute while the others do not fail at all."""
    locust_or_fail()
    shop, blog = Backend("shop"), Backend("blog")
    try:
        etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
        etcd.txn(app_keys("blog", ["blog.example.com"], [blog]))
        # "wrong" is routed to shop's instance: its answers say shop, not wrong.
        router = routerd()
        router.wait_applied(etcd.txn(app_keys("wrong", ["wrong.example.com"], [shop])))
        targets = tmp_path / "targets.json"
        base = f"http://127.0.0.1:{router.http_port}"
        apps = [
            {"name": "shop", "host": "shop.example.com", "weight": 3, "expect": "shop"},
            {"name": "blog", "host": "blog.example.com", "expect": "blog"},
            {"name": "wrong", "host": "wrong.example.com", "expect": "wrong"},
        ]
        targets.write_text(json.dumps({"routers": [base], "apps": apps}))
        prefix = tmp_path / "report" / "run"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / "loadtest.py"), "--targets-file", str(targets),
             "--workers", "2", "--users", str(USERS), "--duration", "5", "--csv", str(prefix),
             "--master-port", str(free_ports(1)[0])],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    finally:
        shop.stop()
        blog.stop()

    seen = shop.hits + blog.hits
    assert summary["requests"] > 100, summary
    assert summary["requests"] <= seen <= summary["requests"] + USERS, (summary, seen)
    hosts = {"shop.example.com", "blog.example.com", "wrong.example.com"}
    logged = wait_for(
        lambda: (n := access_log_count(router.workdir / "access.log", hosts)) >= seen and n,
        timeout=10,
        message="the access log to hold every request",
    )
    assert logged == seen, (logged, seen)
    assert set(summary["failures"]) == {"misroute"}, summary["failures"]
    by_name = failures_by_name(f"{prefix}_stats.csv")
    assert by_name["wrong"] == by_name["wrong requests"] > 0
    assert by_name["shop"] == by_name["blog"] == 0
    assert Path(f"{prefix}.html").stat().st_size > 0


def access_log_count(path: Path, hosts: set[str]) -> int:
    """Lines of routerd's JSON access log for these hosts (each line must parse)."""
    if not path.exists():
        return 0
    return sum(json.loads(line)["host"] in hosts for line in path.read_text().splitlines())


def failures_by_name(stats_csv: str) -> dict[str, int]:
    found = {}
    with open(stats_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            found[row["Name"]] = int(row["Failure Count"])
            found[f"{row['Name']} requests"] = int(row["Request Count"])
    return found
