"""The deploy controller's pure parts: release history, the rollback target,
router reports, and how containers are addressed. No etcd, no Docker."""

from __future__ import annotations

import json

import pytest

from routerd.deploy.releases import (
    HISTORY_KEPT,
    Release,
    ReleaseSpec,
    history,
    pool_of,
    previous_release,
    prune_ops,
    read_history,
    registered_releases,
    spec_problems,
)
from routerd.deploy.runtime import ContainerSpec, _network_options, _published_port
from routerd.errors import DeployError, InvalidValue
from routerd.routerstatus import RouterStatus
from routerd.store import KeyValue, Snapshot

SPEC = ReleaseSpec(image="shop:1", env={"A": "b"}, replicas=2, port=5000, network="host")


def release(name: str, created: str, activated: str | None = None, **kw: str) -> Release:
    return Release(name, SPEC, created, activated, **kw)


def snapshot(items: dict[str, bytes]) -> Snapshot:
    return Snapshot(10, {k: KeyValue(v, 1, 1) for k, v in items.items()})


def test_release_round_trips_through_json() -> None:
    """A history record read back equals what was written."""
    made = release("r1", "2026-01-01T00:00:00.000001Z", "2026-01-01T00:00:01.000000Z")
    assert Release.from_json("r1", made.to_json()) == made


def test_unreadable_history_is_left_out() -> None:
    """history() skips a record that is not JSON or lacks an image, and sorts by creation."""
    found = history(
        snapshot(
            {
                "apps/shop/history/r2": release("r2", "2026-01-02").to_json(),
                "apps/shop/history/r1": release("r1", "2026-01-01").to_json(),
                "apps/shop/history/bad": b"{not json",
                "apps/shop/history/noimage": b"{}",
            }
        ),
        "shop",
    )
    assert [r.name for r in found] == ["r1", "r2"]


GOOD_RAW = release("r1", "2026-01-01", "2026-01-02").to_json()
GOOD = json.loads(GOOD_RAW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("health_path", "@other.host/"),
        ("health_path", "healthz"),
        ("health_path", ""),
        ("health_path", "/a b"),
        ("health_path", '/a"b'),
        ("health_path", "/a#b"),
        ("health_path", "/%zz"),
        ("health_path", "/a\\b"),
        ("health_path", 5),
        ("replicas", 0),
        ("replicas", 101),
        ("replicas", "2"),
        ("replicas", 2.5),
        ("replicas", True),
        ("port", 0),
        ("port", 65536),
        ("port", "5000"),
        ("network", "none"),
        ("network", "container:other"),
        ("env", {"A-B": "x"}),
        ("env", {"1A": "x"}),
        ("env", {"A": 1}),
        ("env", {"A": "a\0b"}),
        ("env", ["A=b"]),
        ("image", "-v"),
        ("image", "shop 1"),
        ("image", ""),
        ("image", None),
        ("created", 5),
        ("activated", ["x"]),
        ("rollback_of", "../x"),
    ],
)
def test_a_history_record_with_a_bad_field_is_rejected_naming_key_and_field(
    field: str, value: object
) -> None:
    """Every field of a record read back from etcd is checked before a rollback
    may run it; the error names the key and the field."""
    raw = json.dumps({**GOOD, field: value}).encode()
    with pytest.raises(InvalidValue) as caught:
        Release.from_json("r1", raw, key="apps/shop/history/r1")
    assert caught.value.key == "apps/shop/history/r1"
    assert caught.value.message.startswith(field)


@pytest.mark.parametrize("raw", [b"{not json", b"[1]", b'{"created": "1"}', b'{"image": "x"}'])
def test_an_unreadable_history_record_is_rejected(raw: bytes) -> None:
    """Not JSON, not an object, no image, no creation time: each is rejected."""
    with pytest.raises(InvalidValue):
        Release.from_json("r1", raw)


def test_a_valid_record_may_use_every_url_path_character() -> None:
    """Paths with a query, escapes and sub-delimiters, bridge or host, are fine."""
    record = {**GOOD, "health_path": "/health/z?full=1&x=%20;a:b@c~!$'()*+,=", "network": "bridge"}
    made = Release.from_json("r1", json.dumps(record).encode())
    assert made.spec.health_path.startswith("/health/z?")
    assert spec_problems(made.spec) == []


def test_read_history_reports_each_rejected_record() -> None:
    """read_history keeps the valid records and says why each other one was refused."""
    bad = json.dumps({**GOOD, "health_path": "@evil/"}).encode()
    snap = snapshot({"apps/shop/history/r1": GOOD_RAW, "apps/shop/history/r2": bad})
    known, rejected = read_history(snap, "shop")
    assert [r.name for r in known] == ["r1"]
    assert set(rejected) == {"r2"}
    assert rejected["r2"].key == "apps/shop/history/r2"
    assert "health_path '@evil/'" in str(rejected["r2"])


def test_previous_release_is_the_last_one_served_before_the_active() -> None:
    """Rollback goes to the release that took traffic last before the active one,
    never to one that never served (a failed or crashed deploy)."""
    known = [
        release("r1", "1", activated="1"),
        release("r2", "2", activated="2"),
        release("r3", "3"),  # never activated
        release("r4", "4", activated="4"),
    ]
    assert previous_release(known, "r4").name == "r2"
    assert previous_release(known, "r2").name == "r1"
    with pytest.raises(DeployError):
        previous_release(known, "r1")


def test_prune_keeps_the_newest_history_and_the_releases_in_use() -> None:
    """Only the oldest entries beyond HISTORY_KEPT go, never one still in use."""
    known = [release(f"r{i:03d}", f"{i:03d}") for i in range(HISTORY_KEPT + 3)]
    deleted = {op.key for op in prune_ops(known, {"r000"}, "shop")}
    assert deleted == {"apps/shop/history/r001", "apps/shop/history/r002", "apps/shop/history/r003"}


def test_registered_releases_and_pool() -> None:
    """Instances group by release; the pool falls back to shared on odd configs."""
    snap = snapshot(
        {
            "apps/shop/releases/r1/a": b"127.0.0.1:1",
            "apps/shop/releases/r1/b": b"127.0.0.1:2",
            "apps/shop/releases/r2/c": b"127.0.0.1:3",
        }
    )
    assert registered_releases(snap, "shop") == {
        "r1": {"a": "127.0.0.1:1", "b": "127.0.0.1:2"},
        "r2": {"c": "127.0.0.1:3"},
    }
    assert pool_of(json.dumps({"domains": ["x"], "pool": "high"}).encode()) == "high"
    assert pool_of(b"[1]") == "shared"
    assert pool_of(None) == "shared"


def test_router_errors_about_an_app() -> None:
    """The app's own keys and refused candidates count; other apps and old releases do not."""
    report = RouterStatus.from_json(
        "r",
        json.dumps(
            {
                "revision": 5,
                "pool": "shared",
                "errors": [
                    {"key": "/routerd/apps/shop/config", "error": "bad"},
                    {"key": "/routerd/apps/shop/releases/old/x", "error": "old"},
                    {"key": "/routerd/apps/blog/config", "error": "other app"},
                    {"key": "/etc/nginx/nginx.conf", "error": "nginx -t"},
                    {"key": "/routerd/apps/", "error": "held"},
                ],
            }
        ).encode(),
    )
    keys = {error.key for error in report.errors_about("/routerd", "shop", "new")}
    assert keys == {"/routerd/apps/shop/config", "/etc/nginx/nginx.conf", "/routerd/apps/"}
    with pytest.raises(InvalidValue, match="routers/r"):
        RouterStatus.from_json("r", b"not json")


def test_containers_read_their_port_from_the_environment() -> None:
    """Host network: $PORT is a free host port; bridge: $PORT is the given port, published."""
    host = _network_options(ContainerSpec("shop", "r1", 0, "img", network="host"))
    assert host["network_mode"] == "host" and 20000 <= host["port"] < 32768
    bridge = _network_options(ContainerSpec("shop", "r1", 0, "img", port=8080))
    assert bridge == {"ports": {"8080/tcp": None}, "port": 8080}
    assert (
        _published_port({"HostConfig": {"NetworkMode": "host"}, "Config": {"Env": ["PORT=7"]}}) == 7
    )
    published = {"NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "", "HostPort": "49153"}]}}}
    assert _published_port(published) == 49153
