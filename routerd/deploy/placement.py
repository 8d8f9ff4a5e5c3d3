"""Where a release's containers go: the placement rule, as a pure function.

No I/O and no clock. The caller reads ``hosts/``, ``pools/`` and what every
engine's containers reserve, and hands over what it found; ``place``
answers with a host per container, or raises ``Unplaceable`` naming the
shortfall. The rule:

1. The candidates are the hosts that are reachable, schedulable, in the
   pool (``hosts.in_pool``) and carry every constraint.
2. A container fits a host when its reservation fits in what is free
   there, CPU and memory both: the capacity minus what every container on
   the engine reserves, routerd's or anyone else's.
3. Each container in turn goes, among the hosts it fits, to the one with
   the fewest containers of its release (replicas spread while there are
   hosts for them), then to the one left with the largest free share after
   placing it, where a host's free share is the smaller of its free CPU
   share and its free memory share (the dominant resource); ties by name.

All containers of one request have the same size, so placing them one at
a time refuses a request only when the room of every candidate, summed, is
short of it: never while some assignment could hold it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from routerd import keys
from routerd.deploy.hosts import in_pool, matches
from routerd.errors import Unplaceable

EPSILON = 1e-9  # float sums of reservations: 0.1 + 0.2 must still fit in 0.3


@dataclass(frozen=True)
class Resources:
    cpus: float
    memory_mb: float

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.memory_mb + other.memory_mb)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.memory_mb - other.memory_mb)

    def fits_in(self, room: Resources) -> bool:
        return self.cpus <= room.cpus + EPSILON and self.memory_mb <= room.memory_mb + EPSILON

    def how_many_in(self, room: Resources) -> int:
        """How many of these fit in ``room``."""
        if not self.fits_in(room):
            return 0
        counts = [
            int((have + EPSILON) // need)
            for have, need in ((room.cpus, self.cpus), (room.memory_mb, self.memory_mb))
            if need > 0
        ]
        return min(counts, default=1 << 30)

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU, {self.memory_mb:g} MB"


NOTHING = Resources(0, 0)


@dataclass(frozen=True)
class Candidate:
    """A host as the placement sees it."""

    name: str
    capacity: Resources
    reserved: Resources = NOTHING  # by every container on the engine now
    tags: Mapping[str, str] = field(default_factory=dict)
    schedulable: bool = True
    unreachable: str | None = None  # why its engine could not be read
    replicas: int = 0  # containers of the release being placed that run there already

    @property
    def free(self) -> Resources:
        return self.capacity - self.reserved

    def share(self, free: Resources) -> float:
        """The free share: the smaller of the free CPU and memory shares."""
        cap = self.capacity
        return min(free.cpus / max(cap.cpus, EPSILON), free.memory_mb / max(cap.memory_mb, EPSILON))


@dataclass(frozen=True)
class Request:
    replicas: int
    each: Resources
    pool: str
    pool_tags: Mapping[str, str] | None = None  # pools/<pool>; None: the tag pool=<pool>
    constraints: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        wanted = f"needs {self.replicas} x {self.each} in pool {self.pool}"
        if self.constraints:
            wanted += " with " + ",".join(f"{k}={v}" for k, v in sorted(self.constraints.items()))
        return wanted


def place(candidates: Sequence[Candidate], request: Request) -> list[str]:
    """A host name per container of ``request``, in order; Unplaceable when they do not fit."""
    slots = [_Slot(c) for c in candidates if _why_not(c, request) is None]
    chosen = []
    for _ in range(request.replicas):
        best = min(
            (slot.key(request.each) for slot in slots if slot.fits(request.each)), default=None
        )
        if best is None:
            raise Unplaceable(shortfall(candidates, request))
        slot = best[-1]
        slot.take(request.each)
        chosen.append(slot.name)
    return chosen


class _Slot:
    """A candidate's room while one request is placed, in plain floats (this is
    the inner loop: 100 hosts times each container)."""

    def __init__(self, candidate: Candidate) -> None:
        self.name = candidate.name
        self.cpus = candidate.capacity.cpus - candidate.reserved.cpus
        self.memory = candidate.capacity.memory_mb - candidate.reserved.memory_mb
        self.cap_cpus = max(candidate.capacity.cpus, EPSILON)
        self.cap_memory = max(candidate.capacity.memory_mb, EPSILON)
        self.replicas = candidate.replicas

    def fits(self, each: Resources) -> bool:
        return each.cpus <= self.cpus + EPSILON and each.memory_mb <= self.memory + EPSILON

    def key(self, each: Resources) -> tuple[int, float, str, _Slot]:
        """Fewest of the release first, then the largest free share left, then by name."""
        share = min(
            (self.cpus - each.cpus) / self.cap_cpus,
            (self.memory - each.memory_mb) / self.cap_memory,
        )
        return (self.replicas, -share, self.name, self)

    def take(self, each: Resources) -> None:
        self.cpus -= each.cpus
        self.memory -= each.memory_mb
        self.replicas += 1


def _in_pool(candidate: Candidate, request: Request) -> bool:
    return in_pool(candidate.tags, request.pool, request.pool_tags)


def _why_not(candidate: Candidate, request: Request) -> str | None:
    """Why the host is no candidate at all (room aside), or None."""
    if not _in_pool(candidate, request):
        return "is not in the pool"
    if candidate.unreachable is not None:
        return f"is unreachable ({candidate.unreachable})"
    if not candidate.schedulable:
        return "is cordoned"
    if not matches(candidate.tags, request.constraints):
        wanted = ",".join(f"{k}={v}" for k, v in sorted(request.constraints.items()))
        return f"does not carry {wanted}"
    return None


def shortfall(candidates: Sequence[Candidate], request: Request) -> str:
    """Why ``request`` does not fit: which hosts have room, and why the others do not."""
    fit, short, out = [], [], []
    for c in sorted(candidates, key=lambda c: c.name):
        why = _why_not(c, request)
        room = request.each.how_many_in(c.free) if why is None else 0
        if why is None and room:
            fit.append(f"{c.name}, room for {room}")
        elif why is None:
            short.append(f"{c.name} has {c.free.cpus:g} CPU, {c.free.memory_mb:g} MB free")
        elif _in_pool(c, request):
            short.append(f"{c.name} {why}")
        else:
            out.append(c.name)
    parts = [f"{len(fit)} host(s) fit" + (f" ({'; '.join(fit)})" if fit else "")]
    parts += short
    if out:
        parts.append(f"{len(out)} other host(s) are not in pool {request.pool}")
    if not any(_in_pool(c, request) for c in candidates):
        parts.append(_pool_rule(request))
    return f"{request}: " + ", ".join(parts)


def _pool_rule(request: Request) -> str:
    if request.pool_tags is None:
        return f"no host is tagged pool={request.pool} (and there is no {keys.pool(request.pool)})"
    wanted = ",".join(f"{k}={v}" for k, v in sorted(request.pool_tags.items()))
    return f"no host carries the tags {keys.pool(request.pool)} asks for ({wanted})"
