"""``apps/<app>/weights``: the value's rules, the integral per-instance weights both
backend modes balance by, and how the Loader routes an app with weights."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from routerd.errors import InvalidValue
from routerd.keys import parse_weights
from routerd.router.loader import Loader
from routerd.router.model import MAX_WEIGHT, App, instance_weights
from routerd.store import KeyValue, Snapshot

KEY = "/routerd/apps/shop/weights"
WEIGHTS = "apps/shop/weights"


# ------------------------------------------------------------ the value


def test_a_valid_value_is_read_as_release_to_share() -> None:
    """Shares 0..100 summing to 100 are read as they are, a zero share included."""
    assert parse_weights(KEY, b'{"v1": 90, "v2": 10, "v3": 0}') == {"v1": 90, "v2": 10, "v3": 0}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "must be an object"),
        (b"{}", "must be an object naming 1 to"),
        (json.dumps({f"r{n}": 0 for n in range(17)}).encode(), "naming 1 to 16"),
        (b'{"v1": 90, "v2": 11}', "must sum to 100, not 101"),
        (b'{"v1": 100, "v2": -1}', "weight of v2 must be 0..100"),
        (b'{"v1": 101}', "weight of v1 must be 0..100"),
        (b'{"v1": 50.0, "v2": 50}', "got 50.0"),
        (b'{"v1": true, "v2": 99}', "got True"),
        (b'{"v1": "100"}', "got '100'"),
        (b'{"v;1": 100}', "release name 'v;1' must match"),
        (b'{"": 100}', "release name '' must match"),
        (b"\xff", "not valid JSON"),
    ],
    ids=lambda value: value.decode("ascii", "replace")[:24] if isinstance(value, bytes) else None,
)
def test_a_bad_value_is_refused_naming_the_key(raw: bytes, fragment: str) -> None:
    """Anything but an object of release names to whole shares summing to 100 is refused,
    naming the key and what is wrong."""
    with pytest.raises(InvalidValue) as caught:
        parse_weights(KEY, raw)
    assert caught.value.key == KEY
    assert fragment in caught.value.message


# ------------------------------------------------------ instance weights


def test_instance_weights_are_exact_and_reduced() -> None:
    """90/10 over two instances each gives 9, 9, 1, 1; one instance against three gives
    the exact split too (3 : 1 per instance for 50/50)."""
    assert instance_weights({"v1": 90, "v2": 10}, {"v1": 2, "v2": 2}) == {"v1": 9, "v2": 1}
    assert instance_weights({"v1": 50, "v2": 50}, {"v1": 1, "v2": 3}) == {"v1": 3, "v2": 1}
    assert instance_weights({"v1": 100, "v2": 0}, {"v1": 4, "v2": 4}) == {"v1": 1}


def test_releases_without_share_or_instances_take_nothing() -> None:
    """A zero share, a release with no instance and a release the weights do not name
    are left out of the weights."""
    shares = {"v1": 70, "v2": 30, "v3": 0}
    assert instance_weights(shares, {"v1": 2, "v2": 0, "v3": 5, "v4": 1}) == {"v1": 1}
    assert instance_weights({"v1": 100}, {"v2": 3}) == {}


@pytest.mark.parametrize("counts", [(1, 1), (2, 3), (7, 9), (100, 99), (97, 98, 99), (3, 64, 81)])
def test_every_release_takes_its_share(counts: tuple[int, ...]) -> None:
    """For any instance counts, each release's instances together take its share of the
    total weight within 0.01 percentage point, every weight is 1..MAX_WEIGHT, and the
    split is exact whenever the counts' least common multiple allows it."""
    names = [f"v{n}" for n in range(len(counts))]
    for split in itertools.islice(_splits(len(counts)), 200):
        shares = dict(zip(names, split, strict=True))
        weights = instance_weights(shares, dict(zip(names, counts, strict=True)))
        total = sum(weights.get(n, 0) * c for n, c in zip(names, counts, strict=True))
        for name, count in zip(names, counts, strict=True):
            part = 100 * weights.get(name, 0) * count / total
            assert abs(part - shares[name]) <= 0.01, (shares, counts, weights)
        assert all(1 <= w <= MAX_WEIGHT for w in weights.values())


def _splits(releases: int) -> Any:
    """Shares summing to 100 over ``releases`` releases, the first few of every kind."""
    for head in itertools.product([0, 1, 10, 33, 50, 99], repeat=releases - 1):
        if sum(head) <= 100:
            yield (*head, 100 - sum(head))


# ---------------------------------------------------------------- loading


def kvs(values: dict[str, str], *, mod: int = 1) -> dict[str, KeyValue]:
    return {
        rel: KeyValue(v.encode(), n, max(n, mod)) for n, (rel, v) in enumerate(values.items(), 1)
    }


BASE = {
    "apps/shop/config": json.dumps({"domains": ["shop.example.com"]}),
    "apps/shop/active": "v1",
    "apps/shop/releases/v1/a": "10.0.0.1:5000",
    "apps/shop/releases/v1/b": "10.0.0.2:5000",
    "apps/shop/releases/v2/a": "10.0.0.3:5000",
    "apps/shop/releases/v2/b": "10.0.0.4:5000",
    "apps/shop/releases/v3/a": "10.0.0.5:5000",
    "apps/blog/config": json.dumps({"domains": ["blog.example.com"]}),
    "apps/blog/releases/v1/a": "10.0.1.1:5000",
}


def new_loader() -> Loader:
    return Loader(prefix="/routerd", pool="shared", resolves=lambda host, port: True)


def shop(loader: Loader, values: dict[str, str], revision: int = 100) -> tuple[App, list[str]]:
    table = loader.load(Snapshot(revision, kvs(values, mod=revision)))
    app = table.app("shop")
    assert app is not None
    return app, [e.key for e in table.errors]


def routed(app: App) -> list[tuple[str, int]]:
    return [(i.address, i.weight) for i in app.instances]


def test_weights_override_active() -> None:
    """With weights, the releases with a share are routed, weighted, whatever `active` says;
    a release they do not name (v3) takes nothing; the balancer line carries the weights."""
    app, errors = shop(new_loader(), {**BASE, WEIGHTS: '{"v1": 10, "v2": 90}'})
    assert errors == []
    assert routed(app) == [
        ("10.0.0.1:5000", 1),
        ("10.0.0.2:5000", 1),
        ("10.0.0.3:5000", 9),
        ("10.0.0.4:5000", 9),
    ]
    assert app.addresses == "10.0.0.1:5000,10.0.0.2:5000,10.0.0.3:5000=9,10.0.0.4:5000=9"
    assert {i.release for i in app.registered} == {"v1", "v2", "v3"}


def test_a_zero_share_routes_nothing_to_that_release() -> None:
    """A release with share 0 is not routed; the others keep weight 1 when they are alone."""
    app, _ = shop(new_loader(), {**BASE, WEIGHTS: '{"v1": 0, "v2": 100}'})
    assert routed(app) == [("10.0.0.3:5000", 1), ("10.0.0.4:5000", 1)]


def test_weights_naming_a_release_without_instances_are_refused_for_that_app() -> None:
    """Weights naming a release that has no instance are rejected under their key; the app
    keeps the weights in force before (here: none, so `active`), its neighbour is untouched."""
    loader = new_loader()
    app, errors = shop(loader, {**BASE, WEIGHTS: '{"v1": 50, "v9": 50}'})
    assert errors == [KEY]
    assert {i.release for i in app.instances} == {"v1"}

    shop(loader, {**BASE, WEIGHTS: '{"v1": 50, "v2": 50}'}, revision=101)
    app, errors = shop(loader, {**BASE, WEIGHTS: '{"v1": 50, "v9": 50}'}, revision=102)
    assert errors == [KEY]
    assert {i.release: i.weight for i in app.instances} == {"v1": 1, "v2": 1}


def test_a_bad_weights_value_keeps_the_last_valid_one() -> None:
    """A weights value that turns bad (not JSON, not summing to 100) keeps routing by the
    last valid value, and is listed once among the errors."""
    loader = new_loader()
    before, _ = shop(loader, {**BASE, WEIGHTS: '{"v1": 90, "v2": 10}'})
    for number, bad in enumerate(['{"v1": 90, "v2": 11}', "{", '{"v1": 90, "v9": 10}'], 101):
        app, errors = shop(loader, {**BASE, WEIGHTS: bad}, revision=number)
        assert app == before
        assert errors == [KEY]


def test_a_weighted_release_losing_its_instances_leaves_the_others() -> None:
    """When a weighted release loses every instance, its share goes to the others (the
    weights in force stay, the error says why); when every weighted release has lost
    them, `active` routes again."""
    loader = new_loader()
    shop(loader, {**BASE, WEIGHTS: '{"v2": 90, "v3": 10}'})
    without_v3 = {k: v for k, v in BASE.items() if "/v3/" not in k}
    app, errors = shop(loader, {**without_v3, WEIGHTS: '{"v2": 90, "v3": 10}'}, revision=101)
    assert errors == [KEY]
    assert routed(app) == [("10.0.0.3:5000", 1), ("10.0.0.4:5000", 1)]
    only_v1 = {k: v for k, v in without_v3.items() if "/v2/" not in k}
    app, _ = shop(loader, {**only_v1, WEIGHTS: '{"v2": 90, "v3": 10}'}, revision=102)
    assert {i.release for i in app.instances} == {"v1"}


def test_deleting_weights_routes_active_again() -> None:
    """Without the weights key (deleted), `active` alone decides again, at weight 1."""
    loader = new_loader()
    shop(loader, {**BASE, WEIGHTS: '{"v1": 50, "v2": 50}'})
    app, errors = shop(loader, BASE, revision=101)
    assert errors == []
    assert routed(app) == [("10.0.0.1:5000", 1), ("10.0.0.2:5000", 1)]


def test_a_weights_change_reroutes_only_its_app() -> None:
    """Loader.update takes a weights change as it takes an instance change: only that app
    is redone (dirty), and the table equals a full load's."""
    loader = new_loader()
    values = {**BASE, WEIGHTS: '{"v1": 90, "v2": 10}'}
    previous = loader.load(Snapshot(100, kvs(values)))
    changed = {**values, WEIGHTS: '{"v1": 50, "v2": 50}'}
    snapshot = Snapshot(101, {**kvs(values), WEIGHTS: KeyValue(changed[WEIGHTS].encode(), 10, 101)})
    updated = loader.update(previous, snapshot, {WEIGHTS})
    assert updated is not None
    assert updated.dirty == frozenset({"shop"})
    assert updated.apps == new_loader().load(snapshot).apps
    assert previous.app("blog") is updated.app("blog")
