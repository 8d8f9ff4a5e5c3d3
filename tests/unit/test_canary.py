"""The canary's judging: figures over a step from two readings of every router,
the p99 from histogram bucket differences, and the rule with its thresholds; the
flags that make a canary, what gc counts as routed while weights are set, and how
a canary's rollback treats the weights (fakes for etcd and the engine)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from routerd.cli import EXIT_USAGE, main
from routerd.deploy.canary import (
    Canary,
    Figures,
    Thresholds,
    describe,
    judge,
    quantile,
    release_figures,
    step_figures,
)
from routerd.deploy.commands import canary_of
from routerd.deploy.engines import Engines
from routerd.deploy.inventory import routed
from routerd.deploy.plan import DeployOptions, Journal, Plan
from routerd.deploy.releases import Release, ReleaseSpec
from routerd.deploy.runtime import Container
from routerd.deploy.undo import Undo
from routerd.errors import StoreError
from routerd.store import Delete, KeyValue, Snapshot
from routerd.traffic import AppTraffic, ReleaseTraffic

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, math.inf)


def traffic(requests: int, errors: int = 0, per_bucket: tuple[int, ...] = ()) -> ReleaseTraffic:
    """A release's counts since the router started; ``per_bucket``: observations per bucket."""
    running, buckets = 0, []
    for bound, count in zip(BOUNDS, per_bucket or (requests,), strict=False):
        running += count
        buckets.append((bound, running))
    buckets += [(bound, running) for bound in BOUNDS[len(buckets) :]]
    codes = {"2xx": requests - errors, "5xx": errors}
    return ReleaseTraffic(requests, codes, tuple(buckets), 0.0, running)


def test_a_step_is_the_difference_of_two_readings() -> None:
    """Requests, 5xx and every bucket over the step are the second reading less the first."""
    figures = step_figures(traffic(100, 2, (90, 10)), traffic(160, 5, (140, 15, 5)))
    assert (figures.requests, figures.errors) == (60, 3)
    assert dict(figures.buckets) == {
        0.005: 50,
        0.01: 55,
        0.025: 60,
        0.05: 60,
        0.1: 60,
        math.inf: 60,
    }


def test_a_release_first_seen_after_the_first_reading_counts_whole() -> None:
    """A release the first reading did not list (no request yet) counts all it has."""
    assert step_figures(None, traffic(7, 1)).requests == 7
    assert step_figures(traffic(7, 1), None) == Figures(0, 0, ())


def test_a_router_that_restarted_counts_from_zero() -> None:
    """Counts lower in the second reading mean the router restarted: the second alone counts."""
    figures = step_figures(traffic(500, 50), traffic(30, 3))
    assert (figures.requests, figures.errors) == (30, 3)


def test_routers_are_summed_and_only_those_read_twice_count() -> None:
    """The step sums the routers read both times; one seen only once is left out."""
    before = {
        "a": AppTraffic("shop", {"v2": traffic(10, 1)}),
        "b": AppTraffic("shop", {"v2": traffic(0)}),
        "gone": AppTraffic("shop", {"v2": traffic(5)}),
    }
    after = {
        "a": AppTraffic("shop", {"v2": traffic(30, 2)}),
        "b": AppTraffic("shop", {"v2": traffic(25, 4), "v1": traffic(100)}),
        "new": AppTraffic("shop", {"v2": traffic(1000, 1000)}),
    }
    figures = release_figures(before, after, "v2")
    assert (figures.requests, figures.errors) == (45, 5)
    assert figures.buckets[-1] == (math.inf, 45)
    assert release_figures(before, after, "v1").requests == 100


def test_quantile_interpolates_inside_the_bucket() -> None:
    """The p99 of 100 observations, 90 under 5 ms and 10 between 10 and 25 ms, lies 90 %
    of the way through the 10-25 ms bucket, as Prometheus's histogram_quantile has it."""
    buckets = ((0.005, 90), (0.01, 90), (0.025, 100), (math.inf, 100))
    assert quantile(0.99, buckets) == pytest.approx(0.0235)
    assert quantile(0.5, buckets) == pytest.approx(0.005 * 50 / 90)


def test_quantile_past_the_last_bound_is_infinite_and_of_nothing_is_none() -> None:
    """Observations past every finite bound give an infinite p99; no observation gives None."""
    assert quantile(0.99, ((0.1, 0), (math.inf, 3))) == math.inf
    assert quantile(0.99, ((0.1, 0), (math.inf, 0))) is None
    assert quantile(0.99, ()) is None


def test_too_few_requests_fail_the_step() -> None:
    """Under --min-requests nothing shows the release works: the step fails, saying why
    and what to change, however few 5xx there were."""
    verdict = judge(Figures(requests=49, errors=0), Thresholds(min_requests=50))
    assert not verdict.passed
    assert verdict.reason.startswith("too few requests to judge: 49 < --min-requests 50")
    assert judge(Figures(requests=50, errors=0), Thresholds(min_requests=50)).passed


def test_a_5xx_rate_over_the_threshold_fails_the_step() -> None:
    """More than --max-error-rate percent 5xx fails; exactly the threshold passes."""
    failed = judge(Figures(requests=200, errors=3), Thresholds(max_error_rate=1))
    assert not failed.passed
    assert failed.reason == "5xx rate 1.50 % > --max-error-rate 1 % (3 of 200 requests)"
    assert judge(Figures(requests=200, errors=2), Thresholds(max_error_rate=1)).passed


def test_a_p99_over_the_threshold_fails_the_step_only_when_asked() -> None:
    """A p99 over --max-p99 fails the step; without --max-p99 latency is not judged."""
    slow = Figures(requests=100, errors=0, buckets=((0.05, 0), (0.1, 100), (math.inf, 100)))
    verdict = judge(slow, Thresholds(max_p99_ms=50))
    assert not verdict.passed
    assert verdict.reason == "p99 99.5 ms > --max-p99 50 ms"
    assert judge(slow, Thresholds(max_p99_ms=100)).passed
    assert judge(slow, Thresholds()).reason == "5xx rate 0.00 % <= 1 %"


def test_describe_shows_what_was_judged() -> None:
    """One line per release: requests, 5xx with their rate, and the p99."""
    figures = Figures(104, 3, ((0.01, 0), (0.025, 104), (math.inf, 104)))
    assert describe("v2", figures) == "v2 104 requests, 3 5xx (2.88 %), p99 24.9 ms"
    assert describe("v1", Figures()) == "v1 0 requests, 0 5xx (-), p99 -"


# ------------------------------------------------------------ the flags


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--canary", "50,10"], "--canary: '50,10' must be 1 to 10 rising percentages"),
        (["--canary", "10,10"], "rising percentages"),
        (["--canary", "0"], "each 1..99"),
        (["--canary", "100"], "each 1..99"),
        (["--canary", "ten"], "--canary: 'ten' must be percentages like 10,50"),
        (["--canary", "10", "--no-wait-routers"], "--canary: judges the routers' figures"),
        (["--canary", "10", "--max-error-rate", "101"], "--max-error-rate"),
        (["--canary", "10", "--min-requests", "0"], "--min-requests"),
        ([], "--image: is required (unless --abort)"),
    ],
)
def test_canary_flags_are_checked_before_anything_starts(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    """A bad canary flag exits 2 naming the flag, before etcd is reached (none listens)."""
    image = [] if fragment.startswith("--image") else ["--image", "shop:1"]
    code = main(["deploy", "shop", *image, *argv, "--etcd", "http://127.0.0.1:1"])
    assert code == EXIT_USAGE
    assert fragment in capsys.readouterr().err


def test_the_canary_flags_make_the_deploy_options() -> None:
    """--canary and its thresholds end up in the deploy's options; without it, none."""
    params = {
        "canary": "5,25,50",
        "canary_interval": 30.0,
        "max_error_rate": 0.5,
        "min_requests": 200,
        "max_p99": 250.0,
        "no_wait_routers": False,
    }
    assert canary_of(params) == Canary((5, 25, 50), 30.0, Thresholds(0.5, 200, 250.0))
    assert canary_of({**params, "canary": None}) is None


# ------------------------------------------------------------- gc's view


def test_gc_keeps_every_release_the_weights_give_a_share() -> None:
    """A release with a share is routed although not active; one with share 0 is not;
    weights that cannot be read keep every release (the routers may use older ones)."""
    instances = {f"apps/shop/releases/{r}/a": b"127.0.0.1:1" for r in ("v1", "v2", "v3")}

    def at(weights: bytes | None) -> Snapshot:
        values = {**instances, "apps/shop/active": b"v1"}
        if weights is not None:
            values["apps/shop/weights"] = weights
        return Snapshot(9, {k: KeyValue(v, 1, 1) for k, v in values.items()})

    assert routed(at(None), "shop") == {"v1"}
    assert routed(at(b'{"v1": 0, "v2": 100}'), "shop") == {"v1", "v2"}
    assert routed(at(b'{"v2": 90, "v3": 10}'), "shop") == {"v1", "v2", "v3"}
    assert routed(at(b'{"v2": 90}'), "shop") == {"v1", "v2", "v3"}


# ------------------------------------------------------------- the undo

OURS = b'{"r1": 90, "r2": 10}'
PLAN = Plan(
    app="shop",
    release=Release("r2", ReleaseSpec(image="shop:2"), "2"),
    pool="shared",
    active="r1",
    active_mod=5,
    registered=frozenset({"r1"}),
    served_by={},
)


class WeightsStore:
    """etcd as a canary's rollback sees it: the weights key, one router that has
    processed everything, and transactions that apply or fail as ``fail`` says."""

    prefix = "/routerd/"

    def __init__(self, weights: bytes | None, fail: Exception | None = None) -> None:
        self.kvs = {"routers/r": KeyValue(b'{"revision": 999, "pool": "shared"}', 1, 1)}
        if weights is not None:
            self.kvs["apps/shop/weights"] = KeyValue(weights, 2, 2)
        self.fail, self.applied = fail, list[list[Any]]()

    async def transaction(self, checks: list[Any], ops: list[Any]) -> int:
        if self.fail is not None:
            raise self.fail
        self.applied.append(ops)
        return 20 + len(self.applied)

    async def range(self, rel: str) -> Snapshot:
        return Snapshot(20, {k: v for k, v in self.kvs.items() if k.startswith(rel)})


class Runtime:
    name = "fake engine"

    def __init__(self) -> None:
        self.removed: list[str] = []

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]:
        return [Container("b" * 64, "routerd-shop-r2-0", "shop", "r2", "127.0.0.1", 5001)]

    def remove(self, container: Container, *, timeout: float) -> None:
        self.removed.append(container.name)


def undo_canary(store: WeightsStore) -> tuple[list[str], list[str], list[str]]:
    """(what was left, containers removed, what was said) after undoing a canary step."""
    runtime, said = Runtime(), list[str]()
    options = DeployOptions(router_timeout=0.5, rollback_timeout=0.3)
    undo = Undo(store, Engines.local(runtime), options, said.append)  # type: ignore[arg-type]
    journal = Journal(registered=True, weights=[b'{"r1": 50, "r2": 50}', OURS])
    return asyncio.run(undo.run(PLAN, journal)), runtime.removed, said


def test_a_canary_rollback_removes_its_weights_before_anything_else() -> None:
    """The weights the canary wrote are deleted first (active still names the old
    release), then the new release is deregistered, the routers confirm, and only
    then are its containers removed."""
    store = WeightsStore(OURS)
    left, removed, said = undo_canary(store)
    assert left == []
    assert [op.key for ops in store.applied for op in ops][:1] == ["apps/shop/weights"]
    assert isinstance(store.applied[0][0], Delete)
    assert store.applied[1][0].key == "apps/shop/releases/r2/"
    assert removed == ["routerd-shop-r2-0"]
    assert "rollback: weights removed; r1 takes every request again" in said


def test_weights_someone_else_wrote_are_left_alone() -> None:
    """Weights holding a value the canary never wrote are not deleted; the rest of the
    rollback goes on."""
    store = WeightsStore(b'{"r1": 70, "r2": 30}')
    left, removed, said = undo_canary(store)
    assert left == [] and removed == ["routerd-shop-r2-0"]
    assert all(op.key != "apps/shop/weights" for ops in store.applied for op in ops)
    assert "rollback: weights were changed by someone else; left as they are" in said


def test_the_new_containers_keep_running_while_the_weights_may_name_them() -> None:
    """When the weights cannot be removed (etcd down past the deadline), the new
    release stays registered and its containers keep running, named."""
    left, removed, _ = undo_canary(WeightsStore(OURS, fail=StoreError("etcd down")))
    assert removed == []
    assert left[:2] == [
        "remove weights (etcd down)",
        "r2 is still registered, as the weights may name it",
    ]
    assert "left running (routerd-shop-r2-0)" in left[2]
