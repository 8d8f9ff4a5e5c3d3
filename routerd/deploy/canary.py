"""Judging one canary step: two readings of the routers' figures in, a verdict out.

Every router counts requests by app and release (``routerd.traffic``), from
the moment it started. A step reads every router of the pool once the new
weights are live, waits the interval, and reads them again; what a release
did over the step is the difference, summed over the routers:

- requests and 5xx answers (a router that restarted meanwhile counts from
  zero again: its second reading alone is what it saw);
- the upstream time's histogram, whose bucket differences give the p99 by
  linear interpolation inside the bucket that holds it, as Prometheus's
  ``histogram_quantile`` does (past the last finite bound: infinite).

The rule: the new release fails the step when it answered 5xx to more than
``max_error_rate`` percent of its requests, or its p99 exceeded
``max_p99_ms`` (when given). It is judged only on ``min_requests``
requests or more: a step with fewer is watched again (WATCHES intervals in
all), and one that never sees them fails, since nothing shows the release
works (a broken release must not reach the next step on too little
traffic). The old release's figures are shown beside it, never judged.
Pure: no etcd, network or clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from routerd.traffic import AppTraffic, ReleaseTraffic

WATCHES = 3  # intervals a step may watch to see min_requests requests


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 1.0  # percent of the new release's requests answered with a 5xx
    min_requests: int = 50  # fewer over a step: not judged
    max_p99_ms: float | None = None  # upstream time; None: not judged


@dataclass(frozen=True)
class Canary:
    """``--canary 10,50``: the new release's share at each step, before 100 %."""

    steps: tuple[int, ...]
    interval: float = 60.0  # seconds each step is watched
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class Figures:
    """What one release did over one step, summed over the routers."""

    requests: int = 0
    errors: int = 0  # answered with a 5xx
    buckets: tuple[tuple[float, int], ...] = ()  # upstream seconds: (bound, cumulative count)

    @property
    def error_rate(self) -> float | None:
        """Percent of the requests answered with a 5xx; None without requests."""
        return 100 * self.errors / self.requests if self.requests else None

    @property
    def p99_ms(self) -> float | None:
        seconds = quantile(0.99, self.buckets)
        return None if seconds is None else seconds * 1000

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            self.requests + other.requests,
            self.errors + other.errors,
            _add_buckets(self.buckets, other.buckets),
        )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str  # for a person, naming the flag the figure was held to


def step_figures(before: ReleaseTraffic | None, after: ReleaseTraffic | None) -> Figures:
    """One router's figures for one release between two readings."""
    after = after or ReleaseTraffic()
    before = before or ReleaseTraffic()
    if after.requests < before.requests or after.seconds_count < before.seconds_count:
        before = ReleaseTraffic()  # the router restarted between the readings
    earlier = dict(before.buckets)
    buckets = tuple((bound, count - earlier.get(bound, 0)) for bound, count in after.buckets)
    return Figures(after.requests - before.requests, after.errors - before.errors, buckets)


def release_figures(
    before: Mapping[str, AppTraffic], after: Mapping[str, AppTraffic], release: str
) -> Figures:
    """``release`` over the step, summed over the routers read both times."""
    total = Figures()
    for router in sorted(before.keys() & after.keys()):
        first = before[router].releases.get(release)
        total += step_figures(first, after[router].releases.get(release))
    return total


def quantile(q: float, buckets: Iterable[tuple[float, int]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram; None when it holds nothing."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0
    for bound, count in ordered:
        if count >= rank and count > below:
            if math.isinf(bound):
                return math.inf
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return math.inf  # not reached: the last bucket holds every observation


def judge(new: Figures, thresholds: Thresholds) -> Verdict:
    """Whether the new release may take more traffic after this step."""
    if new.requests < thresholds.min_requests:
        return Verdict(
            False,
            f"too few requests to judge: {new.requests} < --min-requests "
            f"{thresholds.min_requests} (lengthen --canary-interval or lower --min-requests)",
        )
    rate = new.error_rate or 0.0
    if rate > thresholds.max_error_rate:
        return Verdict(
            False,
            f"5xx rate {rate:.2f} % > --max-error-rate {thresholds.max_error_rate:g} % "
            f"({new.errors} of {new.requests} requests)",
        )
    reason = f"5xx rate {rate:.2f} % <= {thresholds.max_error_rate:g} %"
    if thresholds.max_p99_ms is not None:
        p99 = new.p99_ms
        if p99 is not None and p99 > thresholds.max_p99_ms:
            return Verdict(False, f"p99 {_ms(p99)} > --max-p99 {thresholds.max_p99_ms:g} ms")
        reason += f", p99 {_ms(p99)} <= {thresholds.max_p99_ms:g} ms"
    return Verdict(True, reason)


def describe(release: str, figures: Figures) -> str:
    """``r2 104 requests, 3 5xx (2.88 %), p99 12.3 ms``."""
    rate = figures.error_rate
    shown = "-" if rate is None else f"{rate:.2f} %"
    return (
        f"{release} {figures.requests} requests, {figures.errors} 5xx ({shown}), "
        f"p99 {_ms(figures.p99_ms)}"
    )


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return "past the last bucket" if math.isinf(value) else f"{value:.1f} ms"


def _add_buckets(
    one: tuple[tuple[float, int], ...], other: tuple[tuple[float, int], ...]
) -> tuple[tuple[float, int], ...]:
    if not one or not other:
        return one or other
    counts = dict(one)
    for bound, count in other:
        counts[bound] = counts.get(bound, 0) + count
    return tuple(sorted(counts.items()))
