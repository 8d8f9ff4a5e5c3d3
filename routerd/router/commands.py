"""The router's commands: ``run``, ``render --dry-run`` and ``apps``.

Flags are checked here, each failure naming its flag, and turned into the
frozen ``Settings`` the daemon runs with. Exit codes are the entry point's.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import ipaddress
import json
import re
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from routerd import keys
from routerd.errors import ConfigError, InvalidValue
from routerd.keys import APP_NAME
from routerd.router.model import (
    MAX_DOMAINS,
    OPTION_PARSERS,
    parse_app_config,
    parse_domain,
    parse_options,
)
from routerd.router.pipeline import lua_support
from routerd.router.settings import PACKAGE_TEMPLATES, Edge, NginxSettings, Settings
from routerd.settings import (
    Command,
    Group,
    etcd_options,
    etcd_settings,
    flag,
    parse_listen,
    resolved,
)
from routerd.store import Store

SAFE_PATH = re.compile(r"[A-Za-z0-9._/+@-]+")  # rendered into nginx.conf as they are
POSITIVE = click.FloatRange(min=0, min_open=True)
F = TypeVar("F", bound=Callable[..., Any])


def nginx_options(*, conf_required: bool) -> Callable[[F], F]:
    """The flags that shape what is rendered: shared by ``run`` and ``render``."""
    options = [
        flag(
            "--nginx-conf",
            required=conf_required,
            help="the nginx.conf routerd owns; its folder holds routerd's files",
        ),
        flag("--nginx-bin", default="nginx", help="nginx binary, packaged or custom-built"),
        flag(
            "--templates",
            default=str(PACKAGE_TEMPLATES),
            show_default="the packaged templates/nginx",
            help="folder with nginx.conf.j2, app.conf.j2 and lua/routerd.lua",
        ),
        flag("--runtime-dir", help="pid, logs and temp folders (default: folder of --nginx-conf)"),
        flag("--http-listen", default="0.0.0.0:80", help="address of the HTTP servers"),
        flag("--https-listen", default="0.0.0.0:443", help="address of the HTTPS servers"),
        flag(
            "--status-listen",
            default="127.0.0.1:18081",
            help="loopback server that answers with the served generation",
        ),
        flag("--pool", default="shared", help="serve only the apps of this pool"),
        flag("--nginx-pid-file", help="pid file of the nginx master to signal (sidecar mode)"),
        flag(
            "--dynamic-backends",
            default="auto",
            type=click.Choice(["auto", "on", "off"]),
            help="apply instance and release changes inside nginx, without a reload "
            "(needs the Lua module; auto: when this nginx has it)",
        ),
        flag(
            "--proxy-protocol",
            is_flag=True,
            help="the HTTP and HTTPS listeners expect the PROXY protocol (v1 or v2) and take "
            "the client address from it (needs --trusted-proxies)",
        ),
        flag(
            "--trusted-proxies",
            default="",
            metavar="CIDR[,CIDR...]",
            show_default="none",
            help="peers believed about the client: their PROXY header, X-Forwarded-For "
            "(rightmost untrusted address wins), X-Forwarded-Proto/-Port, X-Request-Id",
        ),
        flag("--http2/--no-http2", default=True, help="HTTP/2 on the HTTPS listeners"),
        flag(
            "--keepalive-timeout",
            default=75,
            type=click.IntRange(1, 3600),
            help="seconds an idle client connection stays open (keep it above the "
            "balancer's idle timeout, 60 s on the cloud balancers)",
        ),
        flag(
            "--access-log",
            default="",
            metavar="PATH|stdout|off",
            show_default="access.log in the runtime folder",
            help="where routerd writes one line per request",
        ),
        flag(
            "--traffic-metrics/--no-traffic-metrics",
            default=True,
            help="per-app request counts and latency histograms on /metrics",
        ),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def daemon_options(command: F) -> F:
    options = [
        flag("--supervise", is_flag=True, help="start nginx as a child (else --nginx-pid-file)"),
        flag(
            "--router-id",
            default=socket.gethostname,
            show_default="the host name",
            help="name of this router's status key routers/<id>",
        ),
        flag("--metrics-listen", default="127.0.0.1:9145", help="/healthz, /readyz and /metrics"),
        flag(
            "--metrics-advertise",
            metavar="HOST:PORT",
            show_default="--metrics-listen, 0.0.0.0 and [::] read as 127.0.0.1",
            help="where others reach the metrics server (written in the router status)",
        ),
        flag(
            "--access-log-format",
            default="json",
            type=click.Choice(["json", "heroku"]),
            help="one JSON object per line, or Heroku's router line",
        ),
        flag("--allow-shrink", is_flag=True, help="apply snapshots that drop most or all apps"),
        flag(
            "--debounce-min",
            default=0.005,
            type=click.FloatRange(min=0),
            help="quiet seconds before applying a change",
        ),
        flag("--debounce-max", default=1.0, type=POSITIVE, help="longest wait during a burst"),
        flag("--resync-interval", default=60.0, type=POSITIVE, help="seconds between rereads"),
        flag(
            "--stale-after",
            default=30.0,
            type=POSITIVE,
            help="seconds without etcd before /healthz fails",
        ),
        flag(
            "--reload-timeout",
            default=15.0,
            type=POSITIVE,
            help="seconds to wait for nginx to serve a new generation",
        ),
        flag(
            "--keep-failed",
            default=5,
            type=click.IntRange(min=1),
            help="refused candidates kept for inspection",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# --------------------------------------------------------------- settings


def parse_trusted_proxies(value: str) -> tuple[str, ...]:
    cidrs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            if "%" in item:  # an IPv6 scope id may hold almost any byte
                raise ValueError("a scope id")
            cidrs.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ConfigError("--trusted-proxies", f"{item!r} is not an address or CIDR") from exc
    return tuple(dict.fromkeys(cidrs))


def edge_settings(params: Mapping[str, Any]) -> Edge:
    trusted = parse_trusted_proxies(params["trusted_proxies"])
    if params["proxy_protocol"] and not trusted:
        raise ConfigError(
            "--trusted-proxies",
            "--proxy-protocol believes the PROXY header of trusted proxies only: "
            "give the balancer's addresses",
        )
    return Edge(
        proxy_protocol=params["proxy_protocol"],
        trusted_proxies=trusted,
        http2=params["http2"],
        keepalive_timeout=params["keepalive_timeout"],
        traffic_log=params["access_log"] != "off" or params["traffic_metrics"],
    )


def access_log_of(params: Mapping[str, Any], runtime: Path) -> str:
    """--access-log: "off", "stdout" or an absolute path (default: in the runtime folder)."""
    value = params["access_log"]
    if value in ("off", "stdout"):
        return str(value)
    if not value:
        return str(runtime / "access.log")  # the runtime folder is made at start
    path = Path(value).resolve()
    if not path.parent.is_dir():
        raise ConfigError("--access-log", f"folder {path.parent} does not exist")
    return str(path)


def advertised(params: Mapping[str, Any]) -> str:
    if params["metrics_advertise"]:
        return parse_listen("--metrics-advertise", params["metrics_advertise"])
    host, _, port = params["metrics_listen"].rpartition(":")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"


def nginx_settings(params: Mapping[str, Any], conf: Path) -> NginxSettings:
    for name in ("http_listen", "https_listen", "status_listen"):
        parse_listen("--" + name.replace("_", "-"), params[name])
    templates = Path(params["templates"]).resolve()
    for name in ("nginx.conf.j2", "app.conf.j2"):
        if not (templates / name).is_file():
            raise ConfigError("--templates", f"{templates} has no {name}")
    if APP_NAME.fullmatch(params["pool"]) is None:
        raise ConfigError("--pool", f"{params['pool']!r} must match {APP_NAME.pattern}")
    runtime = resolved(params["runtime_dir"]) or conf.parent
    pid_file = resolved(params["nginx_pid_file"])
    for name, path in (
        ("--nginx-conf", conf),
        ("--runtime-dir", runtime),
        ("--nginx-pid-file", pid_file),
    ):
        if path is not None and SAFE_PATH.fullmatch(str(path)) is None:
            raise ConfigError(name, f"{path} has characters nginx.conf cannot hold unquoted")
    return NginxSettings(
        conf=conf,
        runtime_dir=runtime,
        binary=params["nginx_bin"],
        supervise=params.get("supervise", False),
        pid_file=pid_file,
        http_listen=params["http_listen"],
        https_listen=params["https_listen"],
        status_listen=params["status_listen"],
        templates=templates,
        reload_timeout=params.get("reload_timeout", 15.0),
        keep_failed=params.get("keep_failed", 5),
        edge=edge_settings(params),
    )


def run_settings(params: Mapping[str, Any]) -> Settings:
    conf = Path(params["nginx_conf"]).resolve()
    if not conf.parent.is_dir():
        raise ConfigError("--nginx-conf", f"folder {conf.parent} does not exist")
    if params["supervise"] == bool(params["nginx_pid_file"]):
        raise ConfigError("--supervise", "give exactly one of --supervise or --nginx-pid-file")
    parse_listen("--metrics-listen", params["metrics_listen"])
    nginx = nginx_settings(params, conf)
    return Settings(
        etcd=etcd_settings(params),
        nginx=nginx,
        pool=params["pool"],
        router_id=params["router_id"],
        dynamic_backends=params["dynamic_backends"],
        metrics_listen=params["metrics_listen"],
        allow_shrink=params["allow_shrink"],
        debounce_min=params["debounce_min"],
        debounce_max=params["debounce_max"],
        resync_interval=params["resync_interval"],
        stale_after=params["stale_after"],
        metrics_advertise=advertised(params),
        access_log=access_log_of(params, nginx.runtime_dir),
        access_log_format=params["access_log_format"],
        traffic_metrics=params["traffic_metrics"],
    )


# --------------------------------------------------------------- commands


@click.command(cls=Command)
@etcd_options
@nginx_options(conf_required=True)
@daemon_options
def run(**params: Any) -> int:
    """The daemon: watch etcd, render, validate, reload, confirm."""
    from routerd.router.daemon import Daemon

    settings = run_settings(params)

    async def main() -> None:
        task = asyncio.create_task(Daemon(settings).run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):  # a signal: a clean stop
            await task

    asyncio.run(main())
    return 0


@click.command(cls=Command)
@etcd_options
@nginx_options(conf_required=False)
@flag("--dry-run", is_flag=True, required=True, help="required: render never installs anything")
@flag("--diff", is_flag=True, help="print a unified diff against --nginx-conf")
def render(**params: Any) -> int:
    """Render from etcd, validate in a scratch folder, print; change nothing."""
    from routerd.router.preview import installed_text, preview

    if params["diff"] and not params["nginx_conf"]:
        raise ConfigError("--diff", "needs --nginx-conf to compare against")
    conf = Path(params["nginx_conf"] or "nginx.conf").resolve()
    settings = Settings(
        etcd=etcd_settings(params),
        nginx=nginx_settings(params, conf),
        pool=params["pool"],
        dynamic_backends=params["dynamic_backends"],
    )
    support = lua_support(settings)

    async def work() -> int:
        async with Store(settings.etcd) as store:
            snapshot = await store.snapshot()
        result = await preview(settings, snapshot, support)
        for error in result.table.errors:
            print(f"routerd: rejected {error.key}: {error.error}", file=sys.stderr)
        if params["diff"]:
            before = installed_text(settings, dynamic=support is not None)
            sys.stdout.writelines(
                difflib.unified_diff(
                    before.splitlines(True), result.text.splitlines(True), str(conf), "candidate"
                )
            )
        else:
            sys.stdout.write(result.text)
        print(
            f"routerd: valid: revision {result.revision}, {len(result.table.apps)} apps, "
            f"generation {result.generation[:12]}",
            file=sys.stderr,
        )
        return 0

    return asyncio.run(work())


# ------------------------------------------------------------------- apps


@click.group(cls=Group)
def apps() -> None:
    """Edit app config in etcd, validated before it is written."""


def check_app(app: str) -> str:
    if APP_NAME.fullmatch(app) is None:
        raise ConfigError("app", f"{app!r} must match {APP_NAME.pattern}")
    return app


def parse_option(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or name not in OPTION_PARSERS:
        raise ConfigError(
            "--option", f"{text!r} must be K=V with K one of {', '.join(OPTION_PARSERS)}"
        )
    if name == "allow":
        return name, [item for item in raw.split(",") if item]
    if name == "client_max_body_size":  # a size like "10m", and "10" stays text too
        return name, raw
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def refused_as(flag_name: str, check: Callable[[], object]) -> None:
    """Run one of the model's checks on a flag's value: its refusal is the flag's fault."""
    try:
        check()
    except InvalidValue as exc:
        raise ConfigError(flag_name, exc.message) from exc


def checked_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The app config ``apps set`` was given, each part held to the router's rules,
    a refusal naming its flag."""
    domains = list(params["domain"])
    if len(domains) > MAX_DOMAINS:
        raise ConfigError("--domain", f"at most {MAX_DOMAINS} domains")
    refused_as("--domain", lambda: [parse_domain("--domain", d) for d in domains])
    if APP_NAME.fullmatch(params["pool"]) is None:
        raise ConfigError("--pool", f"{params['pool']!r} must match {APP_NAME.pattern}")
    options = dict(parse_option(o) for o in params["option"])
    refused_as("--option", lambda: parse_options("--option", options))
    return {"domains": domains, "pool": params["pool"], "options": options}


def with_store(
    params: Mapping[str, Any], work: Callable[[Store], Coroutine[Any, Any, None]]
) -> int:
    async def main() -> None:
        async with Store(etcd_settings(params)) as store:
            await work(store)

    asyncio.run(main())
    return 0


@apps.command("set")
@click.argument("app")
@flag("--domain", multiple=True, required=True, help="a domain (repeatable)")
@flag("--pool", default="shared", help="router pool")
@flag(
    "--option",
    multiple=True,
    metavar="K=V",
    help=f"option (repeatable): {', '.join(OPTION_PARSERS)}",
)
@etcd_options
def apps_set(app: str, **params: Any) -> int:
    """Create or replace an app's config."""
    rel = keys.config(check_app(app))
    raw = json.dumps(checked_config(params)).encode()

    async def work(store: Store) -> None:
        key = keys.absolute(store.settings.prefix, rel)
        parse_app_config(key, raw)  # refuse before writing, with the same rules as the router
        await store.put(rel, raw)
        print(f"routerd: set {key}")

    return with_store(params, work)


@apps.command("ls")
@etcd_options
def apps_ls(**params: Any) -> int:
    """List apps and their config."""

    async def work(store: Store) -> None:
        snapshot = await store.range(keys.APPS)
        for name in keys.app_names(snapshot.kvs):
            kv = snapshot.kvs.get(keys.config(name))
            print(f"{name}\t{kv.value.decode('utf-8', 'replace') if kv else '(no config)'}")

    return with_store(params, work)


@apps.command("rm")
@click.argument("app")
@etcd_options
def apps_rm(app: str, **params: Any) -> int:
    """Remove an app and its instances."""
    rel = keys.app(check_app(app))

    async def work(store: Store) -> None:
        await store.delete_prefix(rel)
        print(f"routerd: removed {keys.absolute(store.settings.prefix, rel)}")

    return with_store(params, work)


COMMANDS = (run, render, apps)
