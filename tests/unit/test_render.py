"""The Renderer: golden nginx output per case, the `q` filter, the app cache, template errors.

Set ROUTERD_UPDATE_GOLDEN=1 to rewrite tests/golden/<case>/expected/ from the current
templates instead of comparing; then read the diff, since those files are the spec.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from routerd.errors import RenderError
from routerd.router.loader import Loader
from routerd.router.model import App, Instance, Options, RoutingTable
from routerd.router.render import (
    APP_TEMPLATE,
    MAIN_TEMPLATE,
    Layout,
    Lua,
    Rendered,
    Renderer,
    q,
)
from routerd.router.settings import Edge
from routerd.store import KeyValue, Snapshot

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates" / "nginx"
GOLDEN = ROOT / "tests" / "golden"
LAYOUT = Layout(
    "127.0.0.1:8080",
    "127.0.0.1:8443",
    "127.0.0.1:18081",
    "/run/routerd",
    "/run/routerd/nginx.pid",
    traffic_log="/run/routerd/traffic.log",
)
# Dynamic backends, as Debian's nginx with libnginx-mod-http-lua gets them.
LUA = Lua(
    modules=(
        "/usr/lib/nginx/modules/ndk_http_module.so",
        "/usr/lib/nginx/modules/ngx_http_lua_module.so",
    ),
    package_dir="/var/lib/routerd/routerd/lua",
    backends_file="/var/lib/routerd/routerd/backends.txt",
    socket="/run/routerd/private/backends.sock",
    source_sha256="5" * 64,
)
LAYOUTS = {
    "dynamic": dataclasses.replace(LAYOUT, lua=LUA),
    # Behind an HTTP balancer that terminates TLS and sets X-Forwarded-*.
    "edge_forwarded": dataclasses.replace(
        LAYOUT, edge=Edge(trusted_proxies=("10.0.0.0/8", "2001:db8::/32"))
    ),
    # Behind a TCP balancer speaking the PROXY protocol; no log, no HTTP/2.
    "edge_proxy_protocol": dataclasses.replace(
        LAYOUT,
        edge=Edge(
            proxy_protocol=True,
            trusted_proxies=("10.0.0.0/8",),
            http2=False,
            keepalive_timeout=120,
            traffic_log=False,
        ),
        traffic_log=None,
    ),
}
UPDATE = os.environ.get("ROUTERD_UPDATE_GOLDEN") == "1"
CASES = sorted(p.parent.name for p in GOLDEN.glob("*/input.json"))
EXPECTED_CASES = [
    "active_release",
    "allow_list",
    "basic",
    "dynamic",
    "edge_forwarded",
    "edge_proxy_protocol",
    "empty",
    "https",
    "maintenance",
    "no_instances",
    "options",
    "weights",
]


def any_host(host: str, port: int) -> bool:
    """Unit tests need no DNS: every made-up host name resolves."""
    return True


def load_case(case: str) -> RoutingTable:
    """The routing table of tests/golden/<case>/input.json (rel_key -> value, create, mod)."""
    data = json.loads((GOLDEN / case / "input.json").read_text())
    kvs = {
        rel: KeyValue(item["value"].encode(), item["create"], item["mod"])
        for rel, item in data.items()
    }
    revision = max((kv.mod_revision for kv in kvs.values()), default=1)
    return Loader(prefix="/routerd", pool="shared", resolves=any_host).load(Snapshot(revision, kvs))


def output_tree(rendered: Rendered) -> dict[str, str]:
    """Every file of one generation by its path: the manifest, shards and cert files."""
    tree = {"nginx.conf": rendered.main, **rendered.shards}
    tree.update({path: pem.decode() for path, pem in rendered.certs.items()})
    return tree


def read_tree(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def write_tree(root: Path, tree: dict[str, str]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for rel, text in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "nginx"
    shutil.copytree(TEMPLATES, target)
    return target


# ------------------------------------------------------------------ golden


def test_every_golden_case_is_present() -> None:
    """The golden folder holds exactly the cases this suite is meant to cover."""
    assert CASES == EXPECTED_CASES


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    """Rendering the case's snapshot yields exactly the files under expected/, byte for byte."""
    table = load_case(case)
    assert table.errors == (), "golden inputs must be valid"
    rendered = Renderer(TEMPLATES, LAYOUTS.get(case, LAYOUT)).render(table)
    assert rendered.apps == len(table.apps)
    assert f'return 200 "{rendered.sha256}";' in rendered.main
    tree = output_tree(rendered)
    expected_dir = GOLDEN / case / "expected"
    if UPDATE:
        write_tree(expected_dir, tree)
    expected = read_tree(expected_dir)
    assert sorted(tree) == sorted(expected), "the set of files differs"
    for path, text in tree.items():
        assert text == expected[path], f"{case}/expected/{path} differs"


def test_rendering_is_deterministic() -> None:
    """Two renderers given equal tables produce the same generation hash and files."""
    one = Renderer(TEMPLATES, LAYOUT).render(load_case("basic"))
    two = Renderer(TEMPLATES, LAYOUT).render(load_case("basic"))
    assert one == two


def test_generation_hash_follows_content() -> None:
    """A different routing table gives a different generation hash and shard file name."""
    basic = Renderer(TEMPLATES, LAYOUT).render(load_case("basic"))
    options = Renderer(TEMPLATES, LAYOUT).render(load_case("options"))
    assert basic.sha256 != options.sha256
    assert not set(basic.shards) & set(options.shards)


# ------------------------------------------------------------ the q filter

UNSAFE = {
    "semicolon": "a;b",
    "open-brace": "a{b",
    "close-brace": "a}b",
    "double-quote": 'a"b',
    "single-quote": "a'b",
    "dollar": "$host",
    "newline": "a\nb",
    "space": "a b",
    "backslash": "a\\b",
    "tab": "a\tb",
    "hash": "a#b",
    "nul": "a\x00b",
    "non-ascii": "shöp",
    "empty": "",
}


@pytest.mark.parametrize("value", list(UNSAFE.values()), ids=list(UNSAFE))
def test_q_refuses_nginx_syntax(value: str) -> None:
    """q raises RenderError for any value holding a character nginx could read as syntax."""
    with pytest.raises(RenderError, match="refusing to render unsafe value"):
        q(value)


def test_q_refuses_booleans() -> None:
    """q refuses a bool, which would otherwise render as the word True or False."""
    with pytest.raises(RenderError):
        q(True)


@pytest.mark.parametrize(
    "value",
    [
        "shop.example.com",
        "*.shop.example.org",
        "[2001:db8::1]:8080",
        "10.0.0.0/8",
        "100m",
        60,
        "127.0.0.1:8080",
        "routerd/certs/0123abcd.pem",
        "1a2b3c4d-shop",
    ],
)
def test_q_passes_validated_values(value: Any) -> None:
    """q returns the text of every kind of value the model can produce, unchanged."""
    assert q(value) == str(value)


SMUGGLED = {
    "domain": {"domains": ("shop.example.com;",)},
    "instance": {"instances": (Instance("v1", "web.1", "10.0.0.1;", 80),)},
    "allow": {"options": Options(allow=("10.0.0.0/8; allow all",))},
    "body-size": {"options": Options(client_max_body_size="1m;")},
    "timeout": {"options": Options(proxy_read_timeout="5s; x")},  # type: ignore[arg-type]
}


@pytest.mark.parametrize("change", list(SMUGGLED.values()), ids=list(SMUGGLED))
def test_unvalidated_app_never_renders(change: dict[str, Any]) -> None:
    """An App built around the Loader with a smuggled value makes the render fail, not leak."""
    app = App("shop", ("shop.example.com",), Options(), (Instance("v1", "web.1", "10.0.0.1", 80),))
    table = RoutingTable(1, (dataclasses.replace(app, **change),))
    with pytest.raises(RenderError, match="refusing to render unsafe value"):
        Renderer(TEMPLATES, LAYOUT).render(table)


# ---------------------------------------------------------------- the cache


def _touch_later(path: Path) -> None:
    """Move a file's mtime forward so Jinja's auto-reload surely notices the edit."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))


def test_equal_app_is_served_from_cache(tmp_path: Path) -> None:
    """An app equal to the last one rendered is served from the cache, so a template edit
    shows only after reload_templates()."""
    templates = copy_templates(tmp_path)
    renderer = Renderer(templates, LAYOUT)
    first = renderer.render(load_case("basic"))

    app_template = templates / APP_TEMPLATE
    app_template.write_text(app_template.read_text() + "# edited\n")
    _touch_later(app_template)
    second = renderer.render(load_case("basic"))  # a fresh but equal model
    assert second.shards == first.shards
    assert second.main == first.main

    renderer.reload_templates()
    third = renderer.render(load_case("basic"))
    assert sum(text.count("# edited\n") for text in third.shards.values()) == 2
    assert third.shards != first.shards
    assert third.sha256 != first.sha256


def test_cache_renders_only_changed_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Of two apps, only the one whose model changed goes through the app template again."""
    renderer = Renderer(TEMPLATES, LAYOUT)
    table = load_case("basic")
    renderer.render(table)
    rendered_apps: list[str] = []
    original = renderer._render_template

    def spy(name: str, **context: Any) -> str:
        if name == APP_TEMPLATE:
            rendered_apps.append(context["app"].name)
        return original(name, **context)

    monkeypatch.setattr(renderer, "_render_template", spy)
    renderer.render(table)
    assert rendered_apps == []
    shop = table.app("shop")
    assert shop is not None
    changed = dataclasses.replace(shop, instances=shop.instances[:1])
    apps = tuple(changed if a.name == "shop" else a for a in table.apps)
    renderer.render(dataclasses.replace(table, apps=apps))
    assert rendered_apps == ["shop"]


# ------------------------------------------------------------ template errors


@pytest.mark.parametrize("template", [APP_TEMPLATE, MAIN_TEMPLATE])
def test_template_syntax_error_names_file_and_line(tmp_path: Path, template: str) -> None:
    """A template syntax error raises RenderError naming the template file and the line."""
    templates = copy_templates(tmp_path)
    (templates / template).write_text("# one\n# two\n{% if %}\n# four\n")
    with pytest.raises(RenderError) as info:
        Renderer(templates, LAYOUT).render(load_case("basic"))
    assert f"{templates / template}:3:" in str(info.value)


@pytest.mark.parametrize(
    ("template", "text", "name"),
    [
        (APP_TEMPLATE, "{{ app.name | q }} {{ no_such_name }}\n", "no_such_name"),
        (APP_TEMPLATE, "{{ app.no_such_field }}\n", "no_such_field"),
        (
            APP_TEMPLATE,
            "{% set o = app.options %}{% if o.no_such_option %}x{% endif %}\n",
            "no_such_option",
        ),
        (MAIN_TEMPLATE, "{{ layout.http_listen }} {{ no_such_name }}\n", "no_such_name"),
    ],
)
def test_unknown_name_in_template_raises(
    tmp_path: Path, template: str, text: str, name: str
) -> None:
    """StrictUndefined: a template using an unknown name raises RenderError naming it."""
    templates = copy_templates(tmp_path)
    (templates / template).write_text(text)
    with pytest.raises(RenderError) as info:
        Renderer(templates, LAYOUT).render(load_case("basic"))
    assert name in str(info.value)
    assert template in str(info.value)


def test_missing_template_raises_render_error(tmp_path: Path) -> None:
    """A template folder without the main template raises RenderError, not a Jinja error."""
    with pytest.raises(RenderError, match=MAIN_TEMPLATE):
        Renderer(tmp_path, LAYOUT).render(load_case("empty"))
