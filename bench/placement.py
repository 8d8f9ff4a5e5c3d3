"""Placement over a simulated fleet: 100 hosts of mixed sizes and 10,000
containers of mixed sizes arriving as deploys, blue-green redeploys, scales
and removals, placed by routerd's rule and by fleet's (fewest containers).

routerd's rule is the real one (``routerd.deploy.placement.place``, a pure
function). Fleet's is run twice: as fleet did it (the host with the fewest
containers, blind to resources, so it can overcommit a host), and the same
choice among the hosts a container fits on, so that both rules refuse on
the same terms. Every rule sees the same stream of requests (one seeded
random generator); a refused request is dropped (a refused redeploy keeps
the old release). A redeploy places the new release while the old one
still runs, then removes the old one, as a blue-green deploy does.

Two workloads run: one whose containers need about 2 GB per CPU, so CPU
fills first on every host shape here (2 and 4 GB per CPU), and one that
needs about 5 GB per CPU, so memory fills first. The first 70% of the containers
arrive while the fleet is kept about 80% full, the rest while it is kept
97% full, where requests get refused. For each rule it prints, at the end
of the first phase and at its worst sample (taken every 100 requests once
the fleet is loaded): the most loaded host's CPU and memory use relative to the mean use
(and both in percent), the same for each host's dominant resource (the
larger of its two shares), the standard deviation of use, and the requests
refused, split into those no set of hosts could hold and those some set of
hosts could (the target is none), over both phases. Then it times one placement decision at
100 hosts (median and p99 of many; the p99 is the shared machine's noise).

    python bench/placement.py [--hosts 100] [--containers 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from routerd.deploy.placement import Candidate, Request, Resources, place
from routerd.errors import Unplaceable

HOST_SIZES = [
    (4, 16384),
    (8, 16384),
    (8, 32768),
    (16, 32768),
    (16, 65536),
    (32, 65536),
    (32, 131072),
]
WORKLOADS = {  # (cpus, memory MB) of one container: web, worker, cache, batch ...
    "CPU fills first": [
        (0.25, 256), (0.5, 512), (0.5, 1024), (1.0, 1024), (1.0, 2048), (2.0, 2048),
        (0.5, 4096), (2.0, 4096),
    ],
    "memory fills first": [
        (0.25, 1024), (0.5, 2048), (0.25, 2048), (1.0, 4096), (0.5, 4096), (1.0, 6144),
        (0.25, 512), (2.0, 8192),
    ],
}  # fmt: skip
STEADY, PRESSED = 0.8, 0.97  # how full the fleet is kept (dominant resource), by phase
STEADY_SHARE = 0.7  # of the containers arrive in the steady phase, the rest pressed
POOL = "shared"
TAGS = {"pool": POOL}
Rule = Callable[[list["Host"], str, int, Resources], list[str]]


NONE = Resources(0, 0)


@dataclass
class Host:
    name: str
    capacity: Resources
    used: Resources = NONE
    containers: dict[str, int] = field(default_factory=dict)  # release -> count

    @property
    def count(self) -> int:
        return sum(self.containers.values())

    def share(self) -> tuple[float, float]:
        return self.used.cpus / self.capacity.cpus, self.used.memory_mb / self.capacity.memory_mb


@dataclass
class App:
    name: str
    release: str
    replicas: int
    each: Resources


# ------------------------------------------------------------------ rules


def routerd_rule(hosts: list[Host], release: str, count: int, each: Resources) -> list[str]:
    candidates = [
        Candidate(h.name, h.capacity, h.used, tags=TAGS, replicas=h.containers.get(release, 0))
        for h in hosts
    ]
    return place(candidates, Request(count, each, POOL))


def fleet_rule(*, fit: bool) -> Rule:
    def rule(hosts: list[Host], _release: str, count: int, each: Resources) -> list[str]:
        counts = {h.name: h.count for h in hosts}
        free = {h.name: h.capacity - h.used for h in hosts}
        chosen = []
        for _ in range(count):
            fitting = [h for h in hosts if not fit or each.fits_in(free[h.name])]
            if not fitting:
                raise Unplaceable("no host fits")
            best = min(fitting, key=lambda h: (counts[h.name], h.name))
            counts[best.name] += 1
            free[best.name] -= each
            chosen.append(best.name)
        return chosen

    return rule


# ------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Balance:
    """How evenly the hosts are used at one moment: max and mean use per resource."""

    cpu: list[float]
    memory: list[float]

    @property
    def dominant(self) -> list[float]:
        return [max(c, m) for c, m in zip(self.cpu, self.memory, strict=True)]

    @staticmethod
    def ratio(use: list[float]) -> float:
        return max(use) / statistics.fmean(use)

    @staticmethod
    def text(use: list[float]) -> str:
        return f"{Balance.ratio(use):.2f}x ({max(use):.0%}/{statistics.fmean(use):.0%})"


@dataclass
class Outcome:
    refused_no_room: int = 0
    refused_with_room: int = 0
    refused_fragmented: int = 0  # no set of hosts could, but the pool's summed free could
    samples: list[Balance] = field(default_factory=list)
    final: Balance = Balance([0.0], [0.0])
    overcommitted: int = 0
    events: int = 0


class Fleet:
    def __init__(self, sizes: list[tuple[int, int]], rule: Rule) -> None:
        self.hosts = [Host(f"h{i:03d}", Resources(*size)) for i, size in enumerate(sizes)]
        self.by_name = {h.name: h for h in self.hosts}
        self.rule = rule
        self.outcome = Outcome()

    def load(self) -> float:
        cpu = sum(h.used.cpus for h in self.hosts) / sum(h.capacity.cpus for h in self.hosts)
        memory = sum(h.used.memory_mb for h in self.hosts)
        return max(cpu, memory / sum(h.capacity.memory_mb for h in self.hosts))

    def start(self, release: str, count: int, each: Resources) -> bool:
        try:
            chosen = self.rule(self.hosts, release, count, each)
        except Unplaceable:
            self._refused(count, each)
            return False
        for name in chosen:
            host = self.by_name[name]
            host.used += each
            host.containers[release] = host.containers.get(release, 0) + 1
        return True

    def stop(self, release: str, each: Resources, count: int | None = None) -> None:
        """Remove ``count`` containers of ``release`` (all when None), from the
        hosts holding the most of it first."""
        holding = [h for h in self.hosts if h.containers.get(release)]
        left = sum(h.containers[release] for h in holding) if count is None else count
        while left > 0 and holding:
            host = max(holding, key=lambda h: (h.containers[release], h.name))
            host.containers[release] -= 1
            host.used -= each
            if not host.containers[release]:
                del host.containers[release]
                holding.remove(host)
            left -= 1

    def _refused(self, count: int, each: Resources) -> None:
        room = sum(each.how_many_in(h.capacity - h.used) for h in self.hosts)
        free = Resources(0, 0)
        for h in self.hosts:
            free += h.capacity - h.used
        if room >= count:
            self.outcome.refused_with_room += 1
        elif Resources(each.cpus * count, each.memory_mb * count).fits_in(free):
            self.outcome.refused_fragmented += 1
        else:
            self.outcome.refused_no_room += 1

    def balance(self) -> Balance:
        return Balance([h.share()[0] for h in self.hosts], [h.share()[1] for h in self.hosts])


class Simulation:
    """Requests from one seeded stream; the same stream for every rule."""

    def __init__(self, rule: Rule, profiles: list[tuple[float, int]], hosts: int, seed: int):
        self.stream = random.Random(seed)
        self.fleet = Fleet([self.stream.choice(HOST_SIZES) for _ in range(hosts)], rule)
        self.profiles = profiles
        self.apps: list[App] = []
        self.arrived = self.events = self.serial = 0

    def run(self, containers: int) -> Outcome:
        outcome = self.fleet.outcome
        while self.arrived < containers * STEADY_SHARE:
            self.request(STEADY)
            if self.events % 100 == 0 and self.fleet.load() > STEADY * 0.8:
                outcome.samples.append(self.fleet.balance())
        outcome.final = self.fleet.balance()
        while self.arrived < containers:
            self.request(PRESSED)
        outcome.overcommitted = sum(1 for h in self.fleet.hosts if max(h.share()) > 1 + 1e-9)
        outcome.events = self.events
        return outcome

    def request(self, target: float) -> None:
        """One request: a new app, a redeploy, a scale or a removal, keeping the
        fleet about ``target`` full."""
        self.events += 1
        roll, load = self.stream.random(), self.fleet.load()
        if not self.apps or (load < target and roll < 0.45):
            self.new_app()
        elif roll < 0.70:
            self.redeploy(self.stream.choice(self.apps))
        elif roll < 0.85 or load < target:
            self.scale(self.stream.choice(self.apps), self.stream.choice([-2, -1, 1, 1, 2, 3]))
        else:
            app = self.apps.pop(self.stream.randrange(len(self.apps)))
            self.fleet.stop(app.release, app.each)

    def new_app(self) -> None:
        self.serial += 1
        each = Resources(*self.stream.choice(self.profiles))
        replicas = self.stream.choice([1, 2, 2, 3, 3, 4, 6, 8])
        app = App(f"a{self.serial}", f"a{self.serial}-r1", replicas, each)
        self.arrived += app.replicas
        if self.fleet.start(app.release, app.replicas, app.each):
            self.apps.append(app)

    def redeploy(self, app: App) -> None:
        """Blue-green: the new release is placed beside the old one, then the old goes."""
        self.serial += 1
        new = f"{app.name}-r{self.serial}"
        self.arrived += app.replicas
        if self.fleet.start(new, app.replicas, app.each):
            self.fleet.stop(app.release, app.each)
            app.release = new

    def scale(self, app: App, change: int) -> None:
        if change > 0:
            self.arrived += change
            if self.fleet.start(app.release, change, app.each):
                app.replicas += change
        elif app.replicas + change >= 1:
            self.fleet.stop(app.release, app.each, -change)
            app.replicas += change


# ------------------------------------------------------------------ timing


def time_decision(hosts: int, replicas: int, seed: int, repeat: int = 2000) -> tuple[float, float]:
    """Median and p99 of one ``place`` call at ``hosts`` loaded hosts, in ms."""
    stream = random.Random(seed)
    candidates = []
    for i in range(hosts):
        cpus, memory = stream.choice(HOST_SIZES)
        used = Resources(cpus * stream.uniform(0.3, 0.8), memory * stream.uniform(0.3, 0.8))
        candidates.append(Candidate(f"h{i:03d}", Resources(cpus, memory), used, tags=TAGS))
    request = Request(replicas, Resources(0.5, 512), POOL)
    took = []
    for _ in range(repeat):
        started = time.perf_counter()
        place(candidates, request)
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99)]


def table(labels: list[str], outcomes: list[Outcome]) -> list[str]:
    def worst(o: Outcome, use: Callable[[Balance], list[float]]) -> str:
        return f"{max((Balance.ratio(use(b)) for b in o.samples), default=0):.2f}x"

    def each(cell: Callable[[Outcome], object]) -> list[str]:
        return [str(cell(o)) for o in outcomes]

    rows = [
        ("most loaded host / mean, CPU (max/mean)", each(lambda o: Balance.text(o.final.cpu))),
        ("  memory", each(lambda o: Balance.text(o.final.memory))),
        ("  dominant resource of each host", each(lambda o: Balance.text(o.final.dominant))),
        ("  worst sample: CPU", each(lambda o: worst(o, lambda b: b.cpu))),
        ("  worst sample: memory", each(lambda o: worst(o, lambda b: b.memory))),
        ("  worst sample: dominant", each(lambda o: worst(o, lambda b: b.dominant))),
        ("std dev of use, CPU", each(lambda o: f"{statistics.pstdev(o.final.cpu):.1%}")),
        ("  memory", each(lambda o: f"{statistics.pstdev(o.final.memory):.1%}")),
        ("refused: no room anywhere", each(lambda o: o.refused_no_room)),
        ("refused: room summed, on no set of hosts", each(lambda o: o.refused_fragmented)),
        ("refused while a set of hosts could hold it", each(lambda o: o.refused_with_room)),
        ("hosts over capacity at the end", each(lambda o: o.overcommitted)),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}" + "".join(f"{label:>22}" for label in labels)]
    lines += [f"{label:{width}}" + "".join(f"{c:>22}" for c in cells) for label, cells in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--containers", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rules: list[Rule] = [routerd_rule, fleet_rule(fit=True), fleet_rule(fit=False)]
    labels = ["routerd", "fleet (fits)", "fleet (blind)"]
    for workload, profiles in WORKLOADS.items():
        outcomes = [
            Simulation(rule, profiles, args.hosts, args.seed).run(args.containers) for rule in rules
        ]
        print(
            f"\n{args.hosts} hosts, {args.containers:,} containers arriving in "
            f"{outcomes[0].events:,} requests, {workload} (seed {args.seed}); "
            f"{len(outcomes[0].samples)} samples"
        )
        print("\n".join(table(labels, outcomes)))

    print()
    for replicas in (1, 3, 10):
        median, p99 = time_decision(args.hosts, replicas, args.seed)
        print(
            f"one placement of {replicas:>2} container(s) at {args.hosts} hosts: "
            f"median {median:.3f} ms, p99 {p99:.3f} ms"
        )


if __name__ == "__main__":
    main()
