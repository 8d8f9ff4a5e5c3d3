"""Property-based tests of the boundary where etcd's bytes meet nginx's syntax,
without nginx itself (tests/integration/test_fuzz.py adds ``nginx -t``).

For arbitrary keys and values beside a few fixed good apps: the loader raises
nothing, every rejection names a fuzzed key, the good apps come out exactly
as without the fuzz and render to the same text, the rendering parses with
crossplane and holds no byte that is not a template's own or a validated
value's. The incremental paths (``Loader.update``, the renderer's dirty
shards) give what the full ones give.
"""

from __future__ import annotations

import ipaddress
import json
import tempfile
from pathlib import Path
from typing import Any

import fuzz
from hypothesis import given
from hypothesis import strategies as st

from routerd import keys
from routerd.errors import InvalidValue
from routerd.router import validate
from routerd.router.loader import Loader
from routerd.router.model import DOMAIN, SIZE, RoutingTable, parse_app_config, parse_host
from routerd.router.render import APPS_DIR, SAFE, Layout, Lua, Rendered, Renderer, shard_of
from routerd.router.settings import PACKAGE_TEMPLATES
from routerd.store import KeyValue, Snapshot

PREFIX = "/routerd"
LUA = Lua((), "/run/routerd/lua", "/run/routerd/backends.txt", "/run/routerd/b.sock", "0" * 64)
LAYOUTS = {
    dynamic: Layout(
        http_listen="127.0.0.1:8080",
        https_listen="127.0.0.1:8443",
        status_listen="127.0.0.1:18081",
        runtime_dir="/run/routerd",
        pid_file="/run/routerd/nginx.pid",
        lua=LUA if dynamic else None,
    )
    for dynamic in (False, True)
}
GOOD = {
    "apps/good1/config": json.dumps(
        {
            "domains": ["good1.example.com", "*.good1.example.org"],
            "options": {
                "allow": ["10.0.0.0/8"],
                "client_max_body_size": "50m",
                "proxy_read_timeout": 5,
                "websockets": True,
            },
        }
    ),
    "apps/good1/releases/v1/a": "10.0.0.1:8080",
    "apps/good1/releases/v1/b": "[2001:db8::1]:8080",
    "apps/good2/config": json.dumps({"domains": ["good2.example.com"]}),
    "apps/good2/releases/v2/a": "localhost:9000",
    "apps/good2/active": "v2",
    "apps/good3/config": json.dumps(
        {"domains": ["good3.example.com"], "options": {"maintenance": True}}
    ),
    "apps/good4/config": json.dumps({"domains": ["good4.example.com"]}),  # no instance: 503
}
GOOD_APPS = {"good1", "good2", "good3", "good4"}


def resolves(host: str, port: int) -> bool:
    """No DNS in unit tests: only localhost resolves, as it would for nginx."""
    return host == "localhost"


def snapshot_of(good: dict[str, str], fuzzed: dict[str, bytes]) -> Snapshot:
    """The good keys created first (so they win any contested domain), then the fuzz."""
    kvs = {rel: KeyValue(value.encode(), n, n) for n, (rel, value) in enumerate(good.items(), 1)}
    for n, (rel, value) in enumerate(fuzzed.items(), 100):
        kvs[rel] = KeyValue(value, n, n)
    return Snapshot(1000, kvs)


def load(snapshot: Snapshot) -> RoutingTable:
    return Loader(prefix=PREFIX, pool="shared", resolves=resolves).load(snapshot)


def app_texts(layout: Layout) -> dict[str, str]:
    """The text each good app renders to, alone."""
    table = load(snapshot_of(GOOD, {}))
    texts = {}
    for app in table.apps:
        alone = RoutingTable(table.revision, (app,))
        (texts[app.name],) = Renderer(PACKAGE_TEMPLATES, layout).render(alone).shards.values()
    return texts


def shard_text(rendered: Rendered, name: str) -> str:
    """The app file that holds app ``name``."""
    (text,) = [
        t
        for rel, t in rendered.shards.items()
        if rel.startswith(f"{APPS_DIR}/{shard_of(name):02x}-")
    ]
    return text


def template_constants() -> set[str]:
    """Every directive argument the templates themselves write that q would refuse
    (``$host``, the maintenance page, ...), from a rendering of every option."""
    found: set[str] = set()
    for layout in LAYOUTS.values():
        rendered = Renderer(PACKAGE_TEMPLATES, layout).render(load(snapshot_of(GOOD, {})))
        with tempfile.TemporaryDirectory() as folder:
            for directive in directives(write(Path(folder), rendered)):
                found |= {arg for arg in directive["args"] if not SAFE.fullmatch(arg)}
    return found


def write(folder: Path, rendered: Rendered) -> list[Path]:
    """The generation's files under ``folder``; the app files' paths."""
    (folder / "nginx.conf").write_text(rendered.main)
    paths = []
    for rel, text in rendered.shards.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


def directives(paths: list[Path]) -> list[dict[str, Any]]:
    """Every directive of the app files, nested ones included."""
    found: list[dict[str, Any]] = []
    pending = [d for path in paths for d in validate.parse(path)]
    while pending:
        directive = pending.pop()
        found.append(directive)
        pending.extend(directive.get("block", ()))
    return found


CONSTANTS = template_constants()
BASELINE = load(snapshot_of(GOOD, {}))
TEXTS = {dynamic: app_texts(layout) for dynamic, layout in LAYOUTS.items()}


def check_arguments(directive: dict[str, Any]) -> None:
    """An argument is the template's own, or a value of a validated form."""
    name, args = directive["directive"], directive["args"]
    for arg in args:
        assert SAFE.fullmatch(arg) or arg in CONSTANTS, (name, arg)
    if name == "server_name":
        assert all(DOMAIN.fullmatch(arg) or arg == "_" for arg in args), args
    elif name == "allow":
        ipaddress.ip_network(args[0])
    elif name == "server" and args:  # inside an upstream
        host, _, port = args[0].rpartition(":")
        assert parse_host("x", host) == host and 1 <= int(port) <= 65535, args
    elif name == "client_max_body_size":
        assert SIZE.fullmatch(args[0]), args


@given(
    fuzzed=st.dictionaries(fuzz.keys(GOOD_APPS), fuzz.values(), max_size=12),
    dynamic=st.booleans(),
)
def test_bad_input_stays_alone_and_never_reaches_a_file(
    fuzzed: dict[str, bytes], dynamic: bool
) -> None:
    """Arbitrary keys and values beside good apps: every rejection names a fuzzed key, the good
    apps render exactly as without them, and the rendering parses with crossplane, holding only
    printable ASCII, the templates' own words and values of the validated forms."""
    table = load(snapshot_of(GOOD, fuzzed))

    fuzzed_keys = {keys.absolute(PREFIX, rel) for rel in fuzzed}
    for rejection in table.errors:
        assert rejection.key in fuzzed_keys, rejection
        assert rejection.error
    rendered = Renderer(PACKAGE_TEMPLATES, LAYOUTS[dynamic]).render(table)
    for name in GOOD_APPS:
        assert table.app(name) == BASELINE.app(name), name
        assert TEXTS[dynamic][name] in shard_text(rendered, name), name
    with tempfile.TemporaryDirectory() as folder:
        paths = write(Path(folder), rendered)
        for path in paths:
            validate.check_app_file(path)
            text = path.read_bytes()
            assert all(byte == 0x0A or 0x20 <= byte < 0x7F for byte in text), path
        validate.check_main_file(Path(folder) / "nginx.conf", list(rendered.shards))
        for directive in directives(paths):
            check_arguments(directive)


@given(config=st.one_of(fuzz.encoded(fuzz.app_configs()), fuzz.values()))
def test_an_app_config_is_refused_naming_its_key_or_holds_only_valid_forms(config: bytes) -> None:
    """parse_app_config either raises InvalidValue naming the key, or returns domains, a pool
    and options each within its rule (no other exception, whatever the bytes)."""
    key = "/routerd/apps/x/config"
    try:
        parsed = parse_app_config(key, config)
    except InvalidValue as exc:
        assert exc.key == key and exc.message
        return
    assert 1 <= len(parsed.domains) <= 100
    assert all(DOMAIN.fullmatch(d) and len(d) <= 253 for d in parsed.domains)
    options = parsed.options
    assert SIZE.fullmatch(options.client_max_body_size)
    for timeout in (options.proxy_connect_timeout, options.proxy_read_timeout):
        assert type(timeout) is int and 1 <= timeout <= 3600
    assert all(SAFE.fullmatch(cidr) for cidr in options.allow)
    assert all(type(flag) is bool for flag in (options.websockets, options.maintenance))


ROUTING_KEYS = st.sampled_from(
    [
        "apps/good1/releases/v1/a",
        "apps/good1/releases/v2/c",
        "apps/good1/active",
        "apps/good2/releases/v2/a",
        "apps/good2/active",
        "apps/good3/releases/v1/x",
        "apps/good1/weights",
        "apps/good2/weights",
    ]
)
CHANGE_VALUES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            b"10.0.0.9:80",
            b"v1",
            b"v2",
            b"bad value",
            b"[::1]:1",
            b'{"v1": 90, "v2": 10}',
            b'{"v1": 0, "v2": 100}',
            b'{"v1": 50, "v3": 50}',
            b'{"v1": 50, "v2": 40}',
        ]
    ),
    fuzz.values(),
)


@given(
    changes=st.lists(
        st.lists(st.tuples(ROUTING_KEYS, CHANGE_VALUES), min_size=1, max_size=3), max_size=6
    )
)
def test_the_incremental_load_and_render_equal_the_full_ones(
    changes: list[list[tuple[str, bytes | None]]],
) -> None:
    """A sequence of instance, active and weights changes (puts, deletes, bad values) gives, through
    Loader.update and the renderer's dirty shards, the table and files that full loads and
    full renders of the same snapshots give."""
    incremental = Loader(prefix=PREFIX, pool="shared", resolves=resolves)
    full = Loader(prefix=PREFIX, pool="shared", resolves=resolves)
    renderer = Renderer(PACKAGE_TEMPLATES, LAYOUTS[True])
    kvs = dict(snapshot_of(GOOD, {}).kvs)
    revision = 1000
    previous = incremental.load(Snapshot(revision, dict(kvs)))
    full.load(Snapshot(revision, dict(kvs)))
    renderer.render(previous)
    for batch in changes:
        revision += 1
        for rel, value in batch:
            if value is None:
                kvs.pop(rel, None)
            else:
                created = kvs[rel].create_revision if rel in kvs else revision
                kvs[rel] = KeyValue(value, created, revision)
        snapshot = Snapshot(revision, dict(kvs))
        updated = incremental.update(previous, snapshot, {rel for rel, _ in batch})
        assert updated is not None  # only instance, active and weights keys changed
        expected = full.load(snapshot)
        assert updated.apps == expected.apps
        assert set(updated.errors) == set(expected.errors)
        fresh = Renderer(PACKAGE_TEMPLATES, LAYOUTS[True]).render(expected)
        got = renderer.render(updated)
        assert (got.main, got.shards) == (fresh.main, fresh.shards)
        previous = updated
