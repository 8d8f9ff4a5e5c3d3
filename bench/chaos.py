"""A seeded chaos run: deploys back to back under traffic while etcd members,
routers, nginx masters and containers are killed and restarted.

A 3-member etcd cluster and 3 routers (the tests' fixtures: tests/cluster.py
and tests/helpers.py, on the path through ``harness.test_fixtures()``), and
several apps of 2 containers each on the machine's Docker engine (``--network
host``), deployed with ``routerd deploy`` one after another, app after app,
for the whole run. Every router takes requests on a new connection each from
a thread of its own, going round the apps, and from a keep-alive client
beside it, counted apart. A schedule drawn from ``--seed`` injects one fault
at a time, with a few quiet seconds between two:

    etcd       SIGKILL a member (the leader half the time), restarted 1-8 s later
    routerd    SIGKILL a routerd (its nginx goes on serving), restarted 0.5-4 s
               later, within its status lease (a supervisor's restart): it takes
               that nginx over
    nginx      SIGKILL a router's nginx master: its routerd starts another
    container  SIGKILL a container's init (a crash): the engine restarts it

After each deploy its app is checked (``deploy_helpers.settled_problems``,
given 20 s to settle: a container restarting, a lock not yet expired); at the
end everything is healed and every app is checked again and given to
``routerd gc --dry-run``. Prints the seed and the faults as they happened;
deploys done, rolled back and failed; requests and failures per router, each
failure's time beside the fault in force (or one that ended up to 3 s before),
grouped by fault unless ``--every-failure``; which
of them fall in the seconds right after that router's own nginx was killed;
orphans found by gc; apps left half done. Asserts nothing.

    python bench/chaos.py [--minutes 10] [--seed N] [--apps 4] [--dynamic-backends auto|on|off]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from harness import test_fixtures

test_fixtures()
# The tests' fixtures, on the path just above:
from cluster import Cluster, rotated  # noqa: E402
from deploy_helpers import (  # noqa: E402
    Deploy,
    app_containers,
    build_image,
    deploy_args,
    docker_client,
    gc_finds_nothing,
    remove_app_containers,
    run,
    settled_problems,
)
from helpers import Background, Routerd, app_config, config_key, wait_for  # noqa: E402

NGINX_EXCUSE_S = 5.0  # failures on a router this long after its own nginx was killed
AFTER_FAULT_S = 3.0  # a failure this long after a fault ended is put beside it
SETTLE_S = 20.0  # for an app to settle after its deploy


# ------------------------------------------------------------------ faults


@dataclass
class Fault:
    kind: str  # etcd, routerd, nginx, container
    target: str
    started: float
    ended: float = 0.0  # 0 while in force

    def label(self, zero: float) -> str:
        when = clock(self.started - zero)
        if self.ended - self.started >= 0.1:
            when += f"-{clock(self.ended - zero)}"
        return f"{self.kind} {self.target} {when}"


@dataclass
class Planned:
    """One fault as the seed drew it: what, on which index, held how long, after what gap."""

    gap: float
    kind: str
    index: int
    hold: float
    leader: bool


def schedule(seed: int, seconds: float) -> list[Planned]:
    """The whole run's faults, drawn up front so a seed always gives the same ones."""
    draw, planned, elapsed = random.Random(seed), [], 0.0
    kinds = ("etcd", "routerd", "nginx", "container")
    while elapsed < seconds:
        kind = draw.choice(kinds)
        hold = {"etcd": draw.uniform(1, 8), "routerd": draw.uniform(0.5, 4)}.get(kind, 0.0)
        gap = draw.uniform(3, 10)
        planned.append(Planned(gap, kind, draw.randrange(1000), hold, draw.random() < 0.5))
        elapsed += gap + hold
    return planned


class Chaos:
    """Injects the planned faults one at a time, each recorded with its times."""

    def __init__(self, cluster: Cluster, routers: list[Routerd], apps: list[str], docker: Any):
        self.cluster, self.routers, self.apps, self.docker = cluster, routers, apps, docker
        self.faults: list[Fault] = []

    def run(self, planned: list[Planned], until: float) -> None:
        for fault in planned:
            if time.monotonic() + fault.gap >= until:
                break
            time.sleep(fault.gap)
            getattr(self, f"_{fault.kind}")(fault)
        time.sleep(max(0.0, until - time.monotonic()))

    def _record(self, kind: str, target: str) -> Fault:
        fault = Fault(kind, target, time.monotonic())
        self.faults.append(fault)
        return fault

    def _etcd(self, planned: Planned) -> None:
        members = self.cluster.members
        leader = self.cluster.leader()
        member = leader if planned.leader and leader else members[planned.index % len(members)]
        role = "leader" if member is leader else "follower"
        fault = self._record("etcd", f"{member.name} ({role})")
        self.cluster.kill(member)
        time.sleep(planned.hold)
        self.cluster.restart(member)
        fault.ended = time.monotonic()

    def _routerd(self, planned: Planned) -> None:
        router = self.routers[planned.index % len(self.routers)]
        fault = self._record("routerd", router.router_id)
        router.kill(reap=False)
        time.sleep(planned.hold)
        router.start(reap=False)  # waits for /readyz
        fault.ended = time.monotonic()

    def _nginx(self, planned: Planned) -> None:
        router = self.routers[planned.index % len(self.routers)]
        try:
            master = router.nginx_master()
        except ValueError:  # none, or two while one starts: let the next fault come
            return
        fault = self._record("nginx", router.router_id)
        os.kill(master, signal.SIGKILL)
        fault.ended = time.monotonic()

    def _container(self, planned: Planned) -> None:
        running = [
            c
            for app in self.apps
            for c in app_containers(self.docker, app)
            if c.status == "running" and c.attrs["State"].get("Pid")
        ]
        if not running:
            return
        victim = running[planned.index % len(running)]
        fault = self._record("container", victim.name.removeprefix("routerd-"))
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.attrs["State"]["Pid"], signal.SIGKILL)  # its init: a crash
        fault.ended = time.monotonic()

    def in_force(self, at: float) -> Fault | None:
        """The fault in force at ``at``, else the last one that ended up to AFTER_FAULT_S before."""
        for fault in reversed(self.faults):
            if fault.started <= at and (not fault.ended or at <= fault.ended + AFTER_FAULT_S):
                return fault
        return None

    def nginx_killed(self, at: float, router: str) -> Fault | None:
        """The last kill of this router's own nginx up to NGINX_EXCUSE_S before ``at``."""
        for fault in reversed(self.faults):
            mine = fault.kind == "nginx" and fault.target == router
            if mine and 0 <= at - fault.started <= NGINX_EXCUSE_S:
                return fault
        return None


# ----------------------------------------------------------------- traffic


@dataclass
class Seen:
    requests: int = 0
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (at, app, what)


class Clients(Background):
    """Per router: a thread with a new connection per request, and a keep-alive
    client, each going round the apps and checking the answer names the app."""

    def __init__(self, routers: list[Routerd], apps: list[str]) -> None:
        self.routers, self.apps = routers, apps
        self.new = {r.router_id: Seen() for r in routers}
        self.kept = {r.router_id: Seen() for r in routers}
        super().__init__()
        for router in routers:
            self.spawn(self._run, router, False)
            self.spawn(self._run, router, True)

    def _run(self, router: Routerd, keep: bool) -> None:
        seen = (self.kept if keep else self.new)[router.router_id]
        session = requests.Session()
        url = f"http://127.0.0.1:{router.http_port}/"
        number = 0
        while not self.stopping.is_set():
            app = self.apps[number % len(self.apps)]
            number += 1
            at = time.monotonic()
            headers = {"Host": f"{app}.test"}
            if not keep:
                headers["Connection"] = "close"
            try:
                answer = (session if keep else requests).get(url, headers=headers, timeout=5)
                body = answer.text.split()
                if answer.status_code != 200:
                    seen.failures.append((at, app, f"HTTP {answer.status_code}"))
                elif not body or body[0] != app:
                    seen.failures.append((at, app, f"answered by {body[:1]}"))
            except requests.RequestException as exc:
                seen.failures.append((at, app, type(exc).__name__))
            seen.requests += 1
            time.sleep(0.01)


# ----------------------------------------------------------------- deploys


@dataclass
class Outcome:
    app: str
    started: float
    took: float
    result: str  # done, rolled back, failed
    why: str = ""
    unsettled: list[str] = field(default_factory=list)


class Deploys(Background):
    """``routerd deploy`` of each app in turn until stopped; each outcome, and
    whether the app settled after it."""

    join_timeout = 300.0  # the deploy under way ends first

    def __init__(self, cluster: Cluster, apps: list[str], docker: Any) -> None:
        self.cluster, self.apps, self.docker = cluster, apps, docker
        self.outcomes: list[Outcome] = []
        super().__init__()
        self.spawn(self._run)

    def _run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            app = self.apps[number % len(self.apps)]
            self.outcomes.append(self.one(app, number))
            number += 1

    def one(self, app: str, number: int) -> Outcome:
        endpoint = rotated(self.cluster.endpoints, number)
        extra = ["--drain", "1", "--router-timeout", "30"]
        args = deploy_args(app, env={"MESSAGE": f"d{number}"}, extra=extra)
        started = time.monotonic()
        deploy = Deploy(endpoint, "deploy", *args)
        try:
            code = deploy.wait(240)
        except subprocess.TimeoutExpired:  # hung: say so, and go on
            deploy.signal(signal.SIGKILL)
            deploy.wait(10)
            code = -9
        outcome = Outcome(app, started, time.monotonic() - started, *classify(code, deploy.output))
        outcome.unsettled = self.settled(app)
        return outcome

    def settled(self, app: str) -> list[str]:
        """Nothing, once the app settles; else what was still wrong after SETTLE_S."""
        last: list[list[str]] = [[]]

        def check() -> bool:
            last[0] = settled_problems(self.cluster, app, {"local": self.docker})
            return not last[0]

        with contextlib.suppress(AssertionError):
            wait_for(check, SETTLE_S, interval=0.5, message=f"{app} settled")
        return last[0]


def classify(code: int, output: str) -> tuple[str, str]:
    """(done | rolled back | failed, the line that says why)."""
    if code == 0:
        return "done", ""
    why = next((line for line in reversed(output.splitlines()) if "routerd:" in line), "")
    why = why or (output.splitlines() or [f"exit {code}"])[-1]
    if code == 1 and "; rolled back;" in why:
        return "rolled back", why.removeprefix("routerd: ")
    return "failed", f"exit {code}: {why.removeprefix('routerd: ')}"


# -------------------------------------------------------------------- run


def clock(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{rest:04.1f}"


def start(cluster: Cluster, routers: list[Routerd], apps: list[str], backends: str) -> None:
    """The cluster, then the routers (each added to ``routers`` as it starts), then
    the apps' configs."""
    cluster.start()
    for n in range(3):
        router = Routerd(
            etcd=cluster,
            workdir=cluster.workdir.parent / f"router{n}",
            router_id=f"r{n}",
            etcd_endpoint=rotated(cluster.endpoints, n),
            extra_args=("--dynamic-backends", backends),
        )
        routers.append(router)
        router.start()
    for app in apps:
        cluster.put(config_key(app), app_config([f"{app}.test"]))


def first_releases(cluster: Cluster, apps: list[str]) -> None:
    for app in apps:
        done = run(cluster.endpoint, "deploy", *deploy_args(app, extra=["--drain", "0"]))
        if done.proc.returncode != 0:
            raise RuntimeError(f"the first deploy of {app} failed:\n{done.output}")


def heal(cluster: Cluster, routers: list[Routerd]) -> None:
    cluster.heal()
    for router in routers:
        if router.proc is None or router.proc.poll() is not None:
            router.start(reap=False)


@dataclass(frozen=True, order=True)
class Failure:
    at: float
    router: str
    app: str
    what: str
    keep_alive: bool


class Report:
    """What the run printed, part by part; times are from the start of the faults."""

    def __init__(self, chaos: Chaos, clients: Clients, deploys: Deploys, audit: Audit) -> None:
        self.chaos, self.clients, self.deploys, self.audit = chaos, clients, deploys, audit
        self.zero = audit.zero
        self.failures = sorted(
            Failure(at, router, app, what, keep)
            for keep, table in ((False, clients.new), (True, clients.kept))
            for router, seen in table.items()
            for at, app, what in seen.failures
        )

    def beside(self, at: float) -> str:
        fault = self.chaos.in_force(at)
        return f"[{fault.label(self.zero) if fault else 'no fault'}]"

    def excused(self, failure: Failure) -> bool:
        return not failure.keep_alive and self.kill_before(failure) is not None

    def kill_before(self, failure: Failure) -> Fault | None:
        return self.chaos.nginx_killed(failure.at, failure.router)

    def faults(self, seed: int, seconds: float) -> None:
        faults = self.chaos.faults
        kinds = [f.kind for f in faults]
        leaders = sum(1 for f in faults if "(leader)" in f.target)
        print(
            f"seed {seed}, {seconds / 60:g} min, 3 etcd members, 3 routers, "
            f"{len(self.audit.apps)} apps x 2 containers"
        )
        print(
            f"faults: {len(kinds)} ({kinds.count('etcd')} etcd members, {leaders} of them "
            f"leaders; {kinds.count('routerd')} routerds; {kinds.count('nginx')} nginx masters; "
            f"{kinds.count('container')} containers)"
        )
        for number in range(0, len(faults), 4):
            print("  " + "; ".join(f.label(self.zero) for f in faults[number : number + 4]))

    def outcomes(self) -> None:
        outcomes = self.deploys.outcomes
        results = [o.result for o in outcomes]
        took = [o.took for o in outcomes if o.result == "done"] or [0.0]
        print(
            f"deploys: {len(outcomes)}: {results.count('done')} done, "
            f"{results.count('rolled back')} rolled back, {results.count('failed')} failed; "
            f"done in p50 {statistics.median(took):.1f} s, max {max(took):.1f} s"
        )
        for o in outcomes:
            if o.result != "done":
                print(
                    f"  {clock(o.started - self.zero)} {o.app} {o.result}: {o.why}  "
                    f"{self.beside(o.started + o.took)}"
                )

    def requests(self) -> int:
        """Per router; the number of failures not excused."""
        print(
            "requests on a new connection each (excused: right after that router's nginx "
            "was killed):"
        )
        for router, seen in self.clients.new.items():
            mine = [f for f in self.failures if f.router == router and not f.keep_alive]
            excused = sum(map(self.excused, mine))
            print(f"  {router}: {seen.requests:,} requests, {len(mine)} failed, {excused} excused")
        delays = [f.at - kill.started for f in self.failures if (kill := self.kill_before(f))]
        if delays:
            print(f"  the excused ones came {min(delays):.1f}-{max(delays):.1f} s after the kill")
        print("requests on keep-alive connections (counted apart):")
        for router, seen in self.clients.kept.items():
            failed = sum(1 for f in self.failures if f.router == router and f.keep_alive)
            print(f"  {router}: {seen.requests:,} requests, {failed} failed")
        return sum(1 for f in self.failures if not f.keep_alive and not self.excused(f))

    def each_failure(self, every: bool) -> None:
        """Failures beside the fault in force: each one, or grouped by fault and router."""
        if not self.failures:
            return
        print("failed requests, beside the fault in force:")
        if every:
            for f in self.failures:
                mark = " (excused)" if self.excused(f) else ""
                how = " keep-alive" if f.keep_alive else ""
                print(
                    f"  {clock(f.at - self.zero)} {f.router}{how} {f.app}: {f.what}{mark}  "
                    f"{self.beside(f.at)}"
                )
            return
        groups: dict[tuple[str, str], list[Failure]] = {}
        for f in self.failures:
            groups.setdefault((self.beside(f.at), f.router), []).append(f)
        for (beside, router), group in groups.items():
            new = [f for f in group if not f.keep_alive]
            excused = sum(map(self.excused, new))
            span = f"{clock(group[0].at - self.zero)}-{clock(group[-1].at - self.zero)}"
            whats = ", ".join(sorted({f.what for f in group}))
            print(
                f"  {span} {router}: {len(new)} new-connection ({excused} excused), "
                f"{len(group) - len(new)} keep-alive; {whats}  {beside}"
            )

    def end(self, unexcused: int) -> None:
        unsettled = [o for o in self.deploys.outcomes if o.unsettled]
        for o in unsettled:
            print(
                f"  not settled {SETTLE_S:g} s after its deploy at {clock(o.started - self.zero)}"
                f": {o.app}: {'; '.join(o.unsettled)}"
            )
        audit = self.audit
        print(
            f"at the end: orphans found by gc: {audit.orphans}; apps left half done: "
            f"{len(audit.half_done)}; deploys not settled after them: {len(unsettled)}"
        )
        for line in audit.lines:
            print(f"  {line}")
        print(
            f"targets: unexcused failed new-connection requests {unexcused} (0), orphans "
            f"{audit.orphans} (0), deploys left half done "
            f"{len(audit.half_done) + len(unsettled)} (0)"
        )


@dataclass
class Audit:
    zero: float
    apps: list[str]
    orphans: int = 0
    half_done: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def final(self, cluster: Cluster, deploys: Deploys) -> None:
        for app in self.apps:
            if problems := deploys.settled(app):
                self.half_done.append(app)
                self.lines.append(f"{app}: {'; '.join(problems)}")
            gc = run(cluster.endpoint, "gc", app, "--dry-run")
            if not gc_finds_nothing(gc):
                found = [line for line in gc.lines if "removing" in line or "deregistering" in line]
                self.orphans += max(1, len(found))
                self.lines += [f"gc: {line}" for line in found or gc.lines[-3:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long faults go on")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--apps", type=int, default=4)
    parser.add_argument("--dynamic-backends", default="auto", choices=["auto", "on", "off"])
    parser.add_argument(
        "--every-failure", action="store_true", help="list each failed request, not by fault"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    seconds = args.minutes * 60
    print(f"chaos: seed {seed} (replay with --seed {seed}), {args.minutes:g} min", flush=True)
    docker = docker_client()
    build_image(docker)
    folder = Path(tempfile.mkdtemp(prefix="routerd-chaos-"))
    cluster, routers = Cluster(folder / "etcd"), list[Routerd]()
    apps = [f"chaos{n}-{secrets.token_hex(2)}" for n in range(args.apps)]
    try:
        start(cluster, routers, apps, args.dynamic_backends)
        first_releases(cluster, apps)
        chaos = Chaos(cluster, routers, apps, docker)
        audit = Audit(time.monotonic(), apps)
        with Clients(routers, apps) as clients, Deploys(cluster, apps, docker) as deploys:
            chaos.run(schedule(seed, seconds), until=audit.zero + seconds)
            heal(cluster, routers)
        audit.final(cluster, deploys)
        report = Report(chaos, clients, deploys, audit)
        report.faults(seed, seconds)
        report.outcomes()
        unexcused = report.requests()
        report.each_failure(args.every_failure)
        report.end(unexcused)
    finally:
        cleanup(cluster, routers, apps, docker)
        shutil.rmtree(folder, ignore_errors=True)


def cleanup(cluster: Cluster, routers: list[Routerd], apps: list[str], docker: Any) -> None:
    for router in routers:
        router.stop()
    for app in apps:
        remove_app_containers(docker, app)
    cluster.stop()


if __name__ == "__main__":
    main()
