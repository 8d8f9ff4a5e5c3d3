"""Router traffic for Locust: many apps by Host header, two kinds of client.

    locust -f deploy/loadtest/locustfile.py --master --targets-file targets.json
    locust -f deploy/loadtest/locustfile.py --worker --master-host MASTER

The master resolves the targets once (``--targets-file``, or ``--etcd`` with
``--routers``, or ``--routers`` with ``--app``; see targets.py) and hands them
to every worker with the spawn message, so workers need neither the file nor
etcd. Each request picks an app by weight and a router in turn:

- ``KeepAliveUser`` keeps one connection per router open, as browsers and
  balancers do; ``NewConnectionUser`` opens a new connection per request.
  Both run by default; ``--class-picker`` or naming one class selects.
- Every answer is checked: a 5xx, 4xx or a connection error fails, and so
  does a 2xx whose body lacks the app's ``expect`` text (a misroute: the
  router sent the request to another app), named "misroute" in the report.

Each worker counts its requests per second (total, failures by kind,
response times) and ships the counts to the master with its regular
reports; the master writes them to ``--timeline`` (JSON), which
bench/loadtest.py turns into what users saw around each deploy.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import targets as target_sources
from locust import FastHttpUser, HttpUser, constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

TIMELINE: dict[int, dict[str, Any]] = defaultdict(lambda: {"n": 0, "fail": {}, "ms": {}})


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser  # Locust's own parser: its include_in_web_ui works there only
    group.add_argument("--targets-file", default="", help="JSON file of routers and apps")
    group.add_argument("--routers", default="", help="router base URLs, comma-separated")
    group.add_argument("--app", action="append", default=[], help="NAME=HOST[:WEIGHT]")
    group.add_argument("--etcd", default="", help="read the apps from etcd, as routerd does")
    group.add_argument("--prefix", default="/routerd", help="routerd's etcd prefix")
    group.add_argument("--pool", default="shared", help="the routers' pool")
    group.add_argument("--no-check", action="store_true", help="do not check answers' apps")
    group.add_argument("--timeline", default="", help="where the master writes per-second counts")
    group.add_argument("--think-time", type=float, default=0.0, help="seconds between requests")
    group.add_argument("--routerd-targets", default="", include_in_web_ui=False, help="(internal)")


@events.init.add_listener
def resolve_targets(environment: Environment, **_: Any) -> None:
    """On the master (or a lone process): read the targets once, for every worker."""
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return
    if options.targets_file:
        found = target_sources.from_file(options.targets_file)
    elif options.etcd:
        found = target_sources.from_etcd(
            options.routers, options.etcd, options.prefix, options.pool, not options.no_check
        )
    else:
        found = target_sources.from_flags(options.routers, options.app)
    options.routerd_targets = found.to_json()  # travels to the workers with the spawn
    environment.host = found.routers[0]  # Locust wants a base URL; requests name their router


@events.report_to_master.add_listener
def ship_timeline(data: dict[str, Any], **_: Any) -> None:
    data["routerd_timeline"] = dict(TIMELINE)
    TIMELINE.clear()


@events.worker_report.add_listener
def merge_timeline(data: dict[str, Any], **_: Any) -> None:
    for second, counts in data.get("routerd_timeline", {}).items():
        merge(TIMELINE[int(second)], counts)


@events.quitting.add_listener
def write_timeline(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.timeline or isinstance(environment.runner, WorkerRunner):
        return
    seconds = {str(s): TIMELINE[s] for s in sorted(TIMELINE)}
    Path(options.timeline).write_text(json.dumps(seconds))


def merge(into: dict[str, Any], counts: dict[str, Any]) -> None:
    into["n"] += counts["n"]
    for table in ("fail", "ms"):
        for key, value in counts[table].items():
            into[table][key] = into[table].get(key, 0) + value


def rounded_ms(seconds: float) -> str:
    """Response times kept as Locust keeps them: exact under 100 ms, then coarser."""
    ms = seconds * 1000
    step = 1 if ms < 100 else 10 if ms < 1000 else 100
    return str(int(round(ms / step) * step))


def record(started: float, failure: str | None) -> None:
    counts = TIMELINE[int(started)]
    counts["n"] += 1
    key = rounded_ms(time.time() - started)
    counts["ms"][key] = counts["ms"].get(key, 0) + 1
    if failure is not None:
        counts["fail"][failure] = counts["fail"].get(failure, 0) + 1


def failure_kind(status: int, body: str, error: BaseException | None, expect: str) -> str | None:
    """None for a good answer; else what kind of failure it was, for the report."""
    if status >= 400:  # first: FastHttpUser sets ``error`` for these answers too
        return f"http {status}"
    if error is not None or status == 0:
        text = f"{type(error).__name__}: {error}".lower() if error else ""
        return "timeout" if "timeout" in text or "timed out" in text else "connection"
    if expect and expect not in body:
        return "misroute"
    return None


class RouterTraffic:
    """What both user classes share: pick an app by weight, a router in turn, check."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        environment: Environment = self.environment  # type: ignore[attr-defined]
        options = environment.parsed_options
        assert options is not None and options.routerd_targets, "no targets from the master"
        found = target_sources.parse(json.loads(options.routerd_targets), "targets")
        self.apps = list(found.apps)
        self.weights = [a.weight for a in self.apps]
        self.routers = itertools.cycle(found.routers)
        self.think = options.think_time

    def one_request(self, client: Any, **options: Any) -> None:
        app = random.choices(self.apps, self.weights)[0]
        headers = {"Host": app.host, **options.pop("headers", {})}
        started = time.time()
        with client.get(
            f"{next(self.routers)}{app.path}",
            headers=headers,
            name=app.name,
            catch_response=True,
            **options,
        ) as answer:
            error = getattr(answer, "error", None)
            body = answer.text or "" if error is None else ""
            kind = failure_kind(answer.status_code or 0, body, error, app.expect)
            if kind is None:
                answer.success()
            else:
                answer.failure(kind if kind != "misroute" else f"misroute: {body[:60]!r}")
        record(started, kind)
        if self.think:
            time.sleep(self.think)


class KeepAliveUser(RouterTraffic, FastHttpUser):
    """One kept-alive connection per router, reused request after request."""

    abstract = False
    connection_timeout = network_timeout = 10.0

    @task
    def request(self) -> None:
        self.one_request(self.client)


class NewConnectionUser(RouterTraffic, HttpUser):
    """A new connection for every request (``Connection: close``)."""

    abstract = False

    @task
    def request(self) -> None:
        self.one_request(self.client, headers={"Connection": "close"}, timeout=10)
