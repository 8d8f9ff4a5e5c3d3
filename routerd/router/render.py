"""Jinja environment, the one quoting filter, and the nginx layout.

The layout keeps a change cheap: apps are spread over SHARDS include files
by a hash of their name, and every file is named by its content hash, so
``nginx.conf`` is a small manifest of which files make up one generation.
A change to one app rewrites and re-parses one shard, installing is one
atomic rename of the manifest, and the previous generation's files stay on
disk until the new one is confirmed. Does not write files or run nginx.
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from routerd.errors import RenderError
from routerd.router.model import App, Cert, Options, RoutingTable
from routerd.router.settings import Edge

SHARDS = 256
MAIN_TEMPLATE = "nginx.conf.j2"
APP_TEMPLATE = "app.conf.j2"
APPS_DIR = "routerd/apps"
CERTS_DIR = "routerd/certs"
# Everything a validated value may contain; none of it means anything to
# nginx's tokenizer, so such a value can stand unquoted in any directive.
SAFE = re.compile(r"[A-Za-z0-9._:/*\[\]-]+")


def q(value: Any) -> str:
    """The one filter between etcd data and nginx.conf: refuse, never escape."""
    text = str(value)
    if isinstance(value, bool) or SAFE.fullmatch(text) is None:
        raise RenderError(f"refusing to render unsafe value {text!r}")
    return text


def upstream_name(app: App) -> str:
    # nginx finds an upstream by scanning every declared one with strncasecmp;
    # a hash prefix makes names differ at their first byte, which halves
    # `nginx -t` at 10,000 apps.
    return f"{zlib.crc32(app.name.encode()):08x}-{app.name}"


def cert_path(cert: Cert) -> str:
    return f"{CERTS_DIR}/{cert.sha256[:32]}.pem"


@functools.lru_cache(maxsize=65536)
def shard_of(name: str) -> int:
    return zlib.crc32(name.encode()) % SHARDS


def _same_objects(old: list[str], new: list[str]) -> bool:
    """Unchanged apps keep their text object, so identity is a cheap proof."""
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Rendered:
    """One generation: the manifest, the shard files and the cert files it names."""

    main: str
    sha256: str
    apps: int
    shards: dict[str, str]
    certs: dict[str, bytes]
    app_names: frozenset[str] = frozenset()

    @property
    def files(self) -> set[str]:
        """Every file the manifest uses, relative to its folder."""
        return set(self.shards) | set(self.certs)


@dataclass(frozen=True)
class Lua:
    """Dynamic backends are on: where the balancer's pieces live."""

    modules: tuple[str, ...]  # load_module paths; empty when nginx has Lua built in
    package_dir: str
    backends_file: str
    socket: str
    source_sha256: str  # the balancer's Lua source: a new one makes a new generation


@dataclass(frozen=True)
class Layout:
    """What the main template needs from the flags."""

    http_listen: str
    https_listen: str
    status_listen: str
    runtime_dir: str
    pid_file: str
    lua: Lua | None = None
    edge: Edge = field(default_factory=Edge)
    traffic_log: str | None = None  # where nginx writes the lines routerd reads

    @property
    def listen_options(self) -> dict[str, str]:
        """What follows the address on the HTTP and HTTPS listeners."""
        proxy = " proxy_protocol" if self.edge.proxy_protocol else ""
        http2 = " http2" if self.edge.http2 else ""
        return {"http_options": proxy, "https_options": f" ssl{http2}{proxy}"}

    @property
    def variables(self) -> dict[str, str]:
        """The nginx variables behind the edge's headers: maps that weigh a
        trusted proxy's word, or, when no one's word is believed, the
        connection's own (then nothing is looked up per request)."""
        if self.edge.believes_headers:
            return {"scheme": "$routerd_scheme", "port": "$routerd_port",
                    "request_id": "$routerd_request_id"}  # fmt: skip
        return {"scheme": "$scheme", "port": "$server_port", "request_id": "$request_id"}

    @property
    def https_port(self) -> str:
        """The port part of a redirect to HTTPS: empty for 443."""
        port = self.https_listen.rpartition(":")[2]
        return "" if port == "443" else f":{port}"


class Renderer:
    """Renders RoutingTables; remembers each app's text so that unchanged
    apps are not rendered again."""

    def __init__(self, templates: Path, layout: Layout) -> None:
        self.templates = templates
        self.layout = layout
        self._env = self._environment()
        self._app_text: dict[str, tuple[App, str]] = {}
        self._shards: dict[int, tuple[list[str], str, str]] = {}  # texts, file name, text
        self._shard_apps: dict[int, list[str]] = {}  # shard -> its apps, in order
        self._context: dict[str, Any] | None = None  # main template context of the last full pass
        self._certs: dict[str, bytes] = {}  # cert files of the last full pass

    def _environment(self) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.templates)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        env.filters.update(q=q, upstream_name=upstream_name, cert_path=cert_path)
        return env

    def reload_templates(self) -> None:
        """Templates changed on disk: start from a fresh environment and cache."""
        self._env = self._environment()
        self._app_text.clear()
        self._shards.clear()
        self._context = None

    def render(self, table: RoutingTable) -> Rendered:
        if table.dirty is not None and self._context is not None:
            shards = self._render_dirty_shards(table)
        else:
            self._context = None  # until this full pass succeeds
            shards = self._render_shards(table.apps)
            self._certs = {cert_path(c): c.pem for app in table.apps for c in app.tls}
            self._context = self._main_context(table)
        certs = self._certs  # Loader.update never changes certs
        context = {**(self._context or {}), "includes": sorted(shards), "certs": sorted(certs)}
        body = self._render_template(MAIN_TEMPLATE, generation="0" * 64, **context)
        generation = sha256(body)
        main = self._render_template(MAIN_TEMPLATE, generation=generation, **context)
        names = frozenset(app.name for app in table.apps)
        return Rendered(main, generation, len(table.apps), shards, certs, names)

    def _render_shards(self, apps: tuple[App, ...]) -> dict[str, str]:
        """Every app: unchanged ones come from the cache, by identity or equality."""
        groups: dict[int, list[App]] = {}
        for app in apps:
            groups.setdefault(shard_of(app.name), []).append(app)
        self._app_text = {a.name: v for a in apps if (v := self._app_text.get(a.name))}
        self._shard_apps = {shard: [a.name for a in members] for shard, members in groups.items()}
        shards: dict[str, str] = {}
        for shard, members in groups.items():
            shards.update([self._shard_file(shard, [self._render_app(a) for a in members])])
        return shards

    def _render_dirty_shards(self, table: RoutingTable) -> dict[str, str]:
        """Only the apps Loader.update touched (same apps, domains, options)."""
        for app in table.apps:
            if app.name in table.dirty:  # type: ignore[operator]
                self._render_app(app)
        touched = {shard_of(name) for name in table.dirty or ()}
        shards: dict[str, str] = {}
        for shard, names in self._shard_apps.items():
            texts = [self._app_text[n][1] for n in names] if shard in touched else None
            shards.update([self._shard_file(shard, texts)])
        return shards

    def _shard_file(self, shard: int, texts: list[str] | None) -> tuple[str, str]:
        """(file name, text) of a shard; texts None: unchanged since last time."""
        cached = self._shards.get(shard)
        if cached is None or (texts is not None and not _same_objects(cached[0], texts)):
            assert texts is not None
            text = "".join(texts)
            cached = (texts, f"{APPS_DIR}/{shard:02x}-{sha256(text)[:20]}.conf", text)
            self._shards[shard] = cached
        return cached[1], cached[2]

    def _render_app(self, app: App) -> str:
        cached = self._app_text.get(app.name)
        if cached is not None and (cached[0] is app or cached[0] == app):
            return cached[1]
        dynamic = self.layout.lua is not None and app.ip_only
        text = self._render_template(
            APP_TEMPLATE,
            app=app,
            dynamic=dynamic,
            defaults=Options(),
            var=self.layout.variables,
            **self._listens(),
        )
        self._app_text[app.name] = (app, text)
        return text

    def _listens(self) -> dict[str, str]:
        return {
            "http_listen": self.layout.http_listen,
            "https_listen": self.layout.https_listen,
            **self.layout.listen_options,
        }

    def _main_context(self, table: RoutingTable) -> dict[str, Any]:
        longest = max((len(d) for a in table.apps for d in a.domains), default=0)
        return {
            "layout": self.layout,
            "lua": self.layout.lua,
            "edge": self.layout.edge,
            "var": self.layout.variables,
            "traffic_log": self.layout.traffic_log,
            "https_port": self.layout.https_port,
            **self.layout.listen_options,
            "tls": any(app.tls for app in table.apps),
            "apps": len(table.apps),
            "server_names_hash_bucket_size": _bucket_size(longest),
            "server_names_hash_max_size": max(512, 4 * sum(len(a.domains) for a in table.apps)),
        }

    def _render_template(self, name: str, **context: Any) -> str:
        try:
            return self._env.get_template(name).render(**context)
        except RenderError:
            raise
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"{exc.filename}:{exc.lineno}: {exc.message}") from exc
        except jinja2.TemplateError as exc:
            raise RenderError(f"{self.templates / name}: {exc}") from exc


def _bucket_size(longest_name: int) -> int:
    size = 64
    while size < longest_name + 32:
        size *= 2
    return size
