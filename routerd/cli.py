"""Commands and exit codes; the only place that exits.

Exit codes: 0 success, 1 the work failed (invalid config, etcd error, a
deploy failed and was rolled back), 2 bad usage (a flag or argument is wrong;
the message names it), 130 interrupted (a deploy was rolled back).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from routerd import __version__, logs, validate
from routerd.errors import ConfigError, RenderError, RouterdError, ValidationError
from routerd.loader import Loader
from routerd.model import APP_NAME, OPTION_PARSERS, RELEASE_NAME, parse_app_config
from routerd.nginx import Installer, Nginx
from routerd.render import Rendered, Renderer
from routerd.settings import (
    PACKAGE_TEMPLATES,
    EtcdSettings,
    NginxSettings,
    Settings,
    env_default,
    env_flag,
    env_name,
    parse_endpoints,
    parse_listen,
)
from routerd.store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
SAFE_PATH = re.compile(r"[A-Za-z0-9._/+@-]+")  # rendered into nginx.conf as they are
INCLUDE = re.compile(r"^(\s*)include (routerd/apps/[^;]+\.conf);\n", re.MULTILINE)

EPILOG = """\
Every flag can also be set as ROUTERD_<FLAG> in the environment
(upper case, dashes as underscores), e.g. ROUTERD_ETCD=http://10.0.0.5:2379.

examples:
  routerd run --nginx-conf /etc/nginx/nginx.conf --supervise
  routerd render --dry-run --diff --nginx-conf /etc/nginx/nginx.conf
  routerd apps set shop --domain shop.example.com --option client_max_body_size=50m
  routerd deploy shop --image shop:42 --replicas 2 --env DATABASE_URL=postgres://db/shop
  routerd rollback shop
  routerd status shop
"""


# ------------------------------------------------------------------ parser


def _flag(
    parser: argparse._ActionsContainer, name: str, default: str | None = None, **kw: Any
) -> None:
    env = "ROUTERD_" + name.lstrip("-").upper().replace("-", "_")
    help_text = kw.pop("help", "")
    shown = f" (default: {default})" if default is not None else ""
    parser.add_argument(
        name, default=env_default(name, default), help=f"{help_text}{shown} [{env}]", **kw
    )


def apply_environment(parser: argparse.ArgumentParser) -> None:
    """Every flag of every command may come from ROUTERD_<FLAG> (SPEC 5).

    argparse checks neither choices nor repeatable flags on defaults, so the
    environment is read here, checked like the command line, and a bad value
    is a usage error naming the variable. Repeatable flags take a comma list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_environment(sub)
            continue
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or long in ("--help", "--version"):
            continue
        env = env_name(long)
        if env not in os.environ:
            continue
        action.default = _from_environment(action, env, os.environ[env])
        action.required = False


def _from_environment(action: argparse.Action, env: str, raw: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    values = (
        [v for v in raw.split(",") if v] if isinstance(action, argparse._AppendAction) else [raw]
    )
    converted: list[Any] = []
    for text in values:
        try:
            value: Any = action.type(text) if callable(action.type) else text
        except (TypeError, ValueError) as exc:
            raise ConfigError(env, f"{raw!r} is not valid for {action.option_strings[-1]}") from exc
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(env, f"{value!r} is not one of {choices}")
        converted.append(value)
    return converted if isinstance(action, argparse._AppendAction) else converted[0]


def _switch(parser: argparse._ActionsContainer, name: str, help_text: str) -> None:
    env = "ROUTERD_" + name.lstrip("-").upper().replace("-", "_")
    parser.add_argument(
        name, action="store_true", default=env_flag(name), help=f"{help_text} [{env}]"
    )


def _etcd_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("etcd")
    _flag(group, "--etcd", "http://127.0.0.1:2379", help="comma-separated endpoints, tried in turn")
    _flag(group, "--prefix", "/routerd", help="key prefix of every routerd key")
    _flag(group, "--etcd-ca", help="CA bundle to verify etcd's TLS certificate")
    _flag(group, "--etcd-cert", help="client certificate for etcd TLS")
    _flag(group, "--etcd-key", help="client key for etcd TLS")
    _flag(group, "--etcd-user", help="etcd user name")
    _flag(group, "--etcd-password", help="etcd password (prefer ROUTERD_ETCD_PASSWORD)")
    _flag(group, "--log-format", "text", choices=["text", "json"], help="log line format")
    _flag(
        group,
        "--log-level",
        "info",
        choices=["debug", "info", "warning", "error"],
        help="log level",
    )


def _nginx_flags(parser: argparse.ArgumentParser, *, conf_required: bool) -> None:
    group = parser.add_argument_group("nginx")
    conf_default = env_default("--nginx-conf")
    group.add_argument(
        "--nginx-conf",
        default=conf_default,
        required=conf_required and conf_default is None,
        help="the nginx.conf routerd owns; its folder holds routerd's files [ROUTERD_NGINX_CONF]",
    )
    _flag(group, "--nginx-bin", "nginx", help="nginx binary, packaged or custom-built")
    _flag(
        group,
        "--templates",
        str(PACKAGE_TEMPLATES),
        help="folder with nginx.conf.j2 and app.conf.j2",
    )
    _flag(
        group, "--runtime-dir", help="pid, logs and temp folders (default: folder of --nginx-conf)"
    )
    _flag(group, "--http-listen", "0.0.0.0:80", help="address of the HTTP servers")
    _flag(group, "--https-listen", "0.0.0.0:443", help="address of the HTTPS servers")
    _flag(
        group,
        "--status-listen",
        "127.0.0.1:18081",
        help="loopback server that answers with the served generation",
    )
    _flag(group, "--pool", "shared", help="serve only the apps of this pool")
    _flag(group, "--nginx-pid-file", help="pid file of the nginx master to signal (sidecar mode)")
    _flag(
        group,
        "--dynamic-backends",
        "auto",
        choices=["auto", "on", "off"],
        help="apply instance and release changes inside nginx, without a reload "
        "(needs the Lua module; auto: when this nginx has it)",
    )


def _docker_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("docker")
    _flag(group, "--docker-host", help="Docker engine URL (default: DOCKER_HOST or the socket)")
    _flag(group, "--advertise-host", "127.0.0.1", help="address routers reach containers at")


def _deploy_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deploy")
    _flag(group, "--health-timeout", "30", type=float, help="seconds for a container to be healthy")
    _flag(group, "--drain", "2", type=float, help="seconds between the switch and the old's stop")
    _flag(group, "--router-timeout", "30", type=float, help="seconds to wait for the routers")
    _switch(group, "--no-wait-routers", "go on without routers to confirm (none need run)")
    _flag(group, "--stop-timeout", "10", type=float, help="seconds from SIGTERM to SIGKILL")
    _flag(group, "--rollback-timeout", "30", type=float, help="seconds a rollback retries etcd")
    _docker_flags(parser)
    _etcd_flags(parser)


def _deploy_commands(commands: Any) -> None:
    deploy = commands.add_parser(
        "deploy", help="blue-green deploy of a new release: six steps, rolled back on failure"
    )
    deploy.add_argument("app")
    deploy.add_argument("--image", required=True, help="an image on the engine (never pulled)")
    deploy.add_argument("--replicas", type=int, default=1, help="containers (default: 1)")
    deploy.add_argument("--port", type=int, default=5000, help="$PORT on a bridge (default: 5000)")
    deploy.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment (repeatable)"
    )
    deploy.add_argument("--release", help="release name (default: r<UTC time>-<4 hex>)")
    _flag(
        deploy,
        "--network",
        "bridge",
        choices=["bridge", "host"],
        help="bridge publishes $PORT on a free host port; host makes $PORT a free host port",
    )
    _flag(deploy, "--health-path", "/", help="path each container must answer with 2xx or 3xx")
    _deploy_flags(deploy)

    rollback = commands.add_parser(
        "rollback", help="deploy the release before the active one again, by the same steps"
    )
    rollback.add_argument("app")
    rollback.add_argument("--to", metavar="RELEASE", help="a release from the app's history")
    _deploy_flags(rollback)

    gc = commands.add_parser("gc", help="remove releases and containers nothing routes to")
    gc.add_argument("app", nargs="?")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    gc.add_argument(
        "--force",
        action="store_true",
        help="also remove containers of apps etcd has no config for",
    )
    _docker_flags(gc)
    _etcd_flags(gc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routerd",
        description="Router configuration sidecar for nginx: etcd in, confirmed reloads out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"routerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    run = commands.add_parser(
        "run", help="the daemon: watch etcd, render, validate, reload, confirm"
    )
    _etcd_flags(run)
    _nginx_flags(run, conf_required=True)
    mode = run.add_argument_group("daemon")
    _switch(
        mode, "--supervise", "start nginx as a child and reload it (else signal --nginx-pid-file)"
    )
    _flag(mode, "--router-id", os.uname().nodename, help="name of this router's status key")
    _flag(mode, "--metrics-listen", "127.0.0.1:9145", help="/healthz, /readyz and /metrics")
    _switch(mode, "--allow-shrink", "apply snapshots that drop all apps or more than half of them")
    _flag(
        mode, "--debounce-min", "0.005", type=float, help="quiet seconds before applying a change"
    )
    _flag(mode, "--debounce-max", "1.0", type=float, help="longest wait in seconds during a burst")
    _flag(mode, "--resync-interval", "60", type=float, help="seconds between full rereads of etcd")
    _flag(
        mode,
        "--stale-after",
        "30",
        type=float,
        help="seconds without hearing from etcd before /healthz fails",
    )
    _flag(
        mode,
        "--reload-timeout",
        "15",
        type=float,
        help="seconds to wait for nginx to serve a new generation",
    )
    _flag(mode, "--keep-failed", "5", type=int, help="failed candidates kept for inspection")

    render = commands.add_parser("render", help="render from etcd, validate, print; change nothing")
    _etcd_flags(render)
    _nginx_flags(render, conf_required=False)
    render.add_argument(
        "--dry-run",
        action="store_true",
        required=True,
        help="required: render never installs anything",
    )
    render.add_argument(
        "--diff", action="store_true", help="print a unified diff against --nginx-conf"
    )

    apps = commands.add_parser("apps", help="edit app config in etcd (validated before writing)")
    apps_commands = apps.add_subparsers(dest="apps_command", required=True, metavar="action")
    app_set = apps_commands.add_parser("set", help="create or replace an app's config")
    app_set.add_argument("app")
    app_set.add_argument("--domain", action="append", required=True, help="a domain (repeatable)")
    app_set.add_argument("--pool", default="shared", help="router pool (default: shared)")
    app_set.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="K=V",
        help=f"option (repeatable): {', '.join(OPTION_PARSERS)}",
    )
    apps_ls = apps_commands.add_parser("ls", help="list apps")
    apps_rm = apps_commands.add_parser("rm", help="remove an app and its instances")
    apps_rm.add_argument("app")
    for sub in (app_set, apps_ls, apps_rm):
        _etcd_flags(sub)

    _deploy_commands(commands)

    status = commands.add_parser("status", help="apps, releases, instances and routers")
    status.add_argument("app", nargs="?")
    _etcd_flags(status)
    _flag(status, "--docker-host", help="Docker engine URL (default: DOCKER_HOST or the socket)")
    return parser


# --------------------------------------------------------------- settings


def _path(value: str | None) -> Path | None:
    return Path(value).resolve() if value else None


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    prefix = args.prefix if args.prefix.startswith("/") else "/" + args.prefix
    for flag in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ConfigError("--" + flag.replace("_", "-"), f"{path} is not a readable file")
    if bool(args.etcd_user) != bool(args.etcd_password):
        raise ConfigError("--etcd-user", "user and password go together")
    return EtcdSettings(
        endpoints=parse_endpoints("--etcd", args.etcd),
        prefix=prefix.rstrip("/") or "/",
        ca=_path(args.etcd_ca),
        cert=_path(args.etcd_cert),
        key=_path(args.etcd_key),
        user=args.etcd_user,
        password=args.etcd_password,
    )


def nginx_settings(args: argparse.Namespace, conf: Path) -> NginxSettings:
    for flag in ("http_listen", "https_listen", "status_listen"):
        parse_listen("--" + flag.replace("_", "-"), getattr(args, flag))
    templates = Path(args.templates).resolve()
    for name in ("nginx.conf.j2", "app.conf.j2"):
        if not (templates / name).is_file():
            raise ConfigError("--templates", f"{templates} has no {name}")
    if APP_NAME.fullmatch(args.pool) is None:
        raise ConfigError("--pool", f"{args.pool!r} must match {APP_NAME.pattern}")
    runtime = _path(args.runtime_dir) or conf.parent
    supervise = getattr(args, "supervise", False)
    pid_file = _path(args.nginx_pid_file)
    for flag, path in (
        ("--nginx-conf", conf),
        ("--runtime-dir", runtime),
        ("--nginx-pid-file", pid_file),
    ):
        if path is not None and SAFE_PATH.fullmatch(str(path)) is None:
            raise ConfigError(flag, f"{path} has characters nginx.conf cannot hold unquoted")
    return NginxSettings(
        conf=conf,
        runtime_dir=runtime,
        binary=args.nginx_bin,
        supervise=supervise,
        pid_file=pid_file,
        http_listen=args.http_listen,
        https_listen=args.https_listen,
        status_listen=args.status_listen,
        templates=templates,
        reload_timeout=getattr(args, "reload_timeout", 15.0),
        keep_failed=getattr(args, "keep_failed", 5),
    )


def run_settings(args: argparse.Namespace) -> Settings:
    conf = Path(args.nginx_conf).resolve()
    if not conf.parent.is_dir():
        raise ConfigError("--nginx-conf", f"folder {conf.parent} does not exist")
    if args.supervise == bool(args.nginx_pid_file):
        raise ConfigError("--supervise", "give exactly one of --supervise or --nginx-pid-file")
    parse_listen("--metrics-listen", args.metrics_listen)
    for flag in ("debounce_max", "resync_interval", "stale_after", "reload_timeout"):
        if getattr(args, flag) <= 0:
            raise ConfigError("--" + flag.replace("_", "-"), "must be positive")
    if args.debounce_min < 0:
        raise ConfigError("--debounce-min", "must not be negative")
    if args.keep_failed < 1:
        raise ConfigError("--keep-failed", "must be at least 1 (the candidate just refused)")
    return Settings(
        etcd=etcd_settings(args),
        nginx=nginx_settings(args, conf),
        pool=args.pool,
        router_id=args.router_id,
        dynamic_backends=args.dynamic_backends,
        metrics_listen=args.metrics_listen,
        allow_shrink=args.allow_shrink,
        debounce_min=args.debounce_min,
        debounce_max=args.debounce_max,
        resync_interval=args.resync_interval,
        stale_after=args.stale_after,
    )


# --------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from routerd.daemon import Daemon

    settings = run_settings(args)

    async def main() -> None:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with _suppress_cancel():
            await task

    asyncio.run(main())
    return EXIT_OK


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *_: Any) -> bool:
        return kind is asyncio.CancelledError


async def _with_store(
    args: argparse.Namespace, work: Callable[[Store], Coroutine[Any, Any, int]]
) -> int:
    store = Store(etcd_settings(args))
    try:
        return await work(store)
    finally:
        await store.close()


def cmd_render(args: argparse.Namespace) -> int:
    """Render what `run` would install, validate it in a scratch folder, print it."""
    if args.diff and not args.nginx_conf:
        raise ConfigError("--diff", "needs --nginx-conf to compare against")
    conf = Path(args.nginx_conf or "nginx.conf").resolve()
    live = nginx_settings(args, conf)
    scratch = Path(tempfile.mkdtemp(prefix="routerd-render-"))
    try:
        check = replace(live, conf=scratch / "nginx.conf", runtime_dir=scratch, pid_file=None)
        return asyncio.run(_with_store(args, lambda store: _render(args, store, live, check)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _render(
    args: argparse.Namespace, store: Store, live: NginxSettings, check: NginxSettings
) -> int:
    from routerd.pipeline import dynamic_backends, layout_of

    snapshot = await store.snapshot()
    table = Loader(prefix=store.settings.prefix, pool=args.pool).load(snapshot)
    for error in table.errors:
        print(f"routerd: rejected {error.key}: {error.error}", file=sys.stderr)

    def render(ns: NginxSettings, *, prepare: bool) -> Rendered:
        settings = Settings(
            etcd=store.settings, nginx=ns, pool=args.pool, dynamic_backends=args.dynamic_backends
        )
        backends, lua = dynamic_backends(settings)
        if backends is not None and prepare:
            backends.prepare()
        return Renderer(ns.templates, layout_of(settings, lua)).render(table)

    candidate = render(live, prepare=False)
    _validate_scratch(render(check, prepare=True), check)
    text = expand(candidate.main, candidate.shards)
    if args.diff:
        installed = expand_installed(live.conf)
        sys.stdout.writelines(
            difflib.unified_diff(
                installed.splitlines(True), text.splitlines(True), str(live.conf), "candidate"
            )
        )
    else:
        sys.stdout.write(text)
    print(
        f"routerd: valid: revision {snapshot.revision}, {len(table.apps)} apps, "
        f"generation {candidate.sha256[:12]}",
        file=sys.stderr,
    )
    return EXIT_OK


def _validate_scratch(rendered: Rendered, ns: NginxSettings) -> None:
    installer = Installer(ns.conf)
    installer.write_files(rendered)
    staged = installer.stage(rendered)
    for rel in rendered.shards:
        validate.check_app_file(ns.conf.parent / rel)
    validate.check_main_file(staged, list(rendered.shards))
    Nginx(
        binary=ns.binary,
        conf=ns.conf,
        runtime_dir=ns.runtime_dir,
        status_listen=ns.status_listen,
        supervise=True,
        pid_file=ns.runtime_dir / "nginx.pid",
    ).prepare_runtime()
    validate.nginx_test(ns.binary, staged, ns.runtime_dir)


def expand(main: str, files: dict[str, str]) -> str:
    """The main file with each include line replaced by the file it names."""

    def inline(match: re.Match[str]) -> str:
        body = files.get(match.group(2))
        return match.group(0) if body is None else f"{match.group(1)}# {match.group(2)}\n{body}"

    return INCLUDE.sub(inline, main)


def expand_installed(conf: Path) -> str:
    if not conf.exists():
        return ""
    main = conf.read_text()
    files = {}
    for match in INCLUDE.finditer(main):
        path = conf.parent / match.group(2)
        if path.is_file():
            files[match.group(2)] = path.read_text()
    return expand(main, files)


def _parse_option(text: str) -> tuple[str, Any]:
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


def cmd_apps(args: argparse.Namespace) -> int:
    if args.apps_command != "ls" and APP_NAME.fullmatch(args.app) is None:
        raise ConfigError("app", f"{args.app!r} must match {APP_NAME.pattern}")

    async def work(store: Store) -> int:
        if args.apps_command == "set":
            config = {
                "domains": args.domain,
                "pool": args.pool,
                "options": dict(_parse_option(o) for o in args.option),
            }
            raw = json.dumps(config).encode()
            key = f"{store.prefix}apps/{args.app}/config"
            parse_app_config(key, raw)  # refuse before writing, with the same rules as the router
            await store.put(f"apps/{args.app}/config", raw)
            print(f"routerd: set {key}")
        elif args.apps_command == "rm":
            await store.delete_prefix(f"apps/{args.app}/")
            print(f"routerd: removed {store.prefix}apps/{args.app}/")
        else:
            snapshot = await store.snapshot()
            names = sorted(
                {
                    k.split("/")[1]
                    for k in snapshot.kvs
                    if k.startswith("apps/") and k.count("/") >= 2
                }
            )
            for name in names:
                kv = snapshot.kvs.get(f"apps/{name}/config")
                print(f"{name}\t{kv.value.decode('utf-8', 'replace') if kv else '(no config)'}")
        return EXIT_OK

    return asyncio.run(_with_store(args, work))


def cmd_status(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        snapshot = await store.snapshot()
        print(f"revision {snapshot.revision}")
        routers = {
            k.split("/", 1)[1]: v for k, v in snapshot.kvs.items() if k.startswith("routers/")
        }
        print(f"routers ({len(routers)}):")
        for router_id, kv in sorted(routers.items()):
            try:
                status = json.loads(kv.value)
                print(
                    f"  {router_id}\tpool={status.get('pool')} revision={status.get('revision')} "
                    f"apps={status.get('apps')} config={str(status.get('config_sha256'))[:12]} "
                    f"applied_at={status.get('applied_at')} errors={len(status.get('errors', []))}"
                )
                for error in status.get("errors", []):
                    if args.app is None or f"/apps/{args.app}/" in error.get("key", ""):
                        print(f"    error {error.get('key')}: {error.get('error')}")
            except (ValueError, AttributeError):
                print(f"  {router_id}\t(unreadable status)")
        apps = sorted(
            {k.split("/")[1] for k in snapshot.kvs if k.startswith("apps/") and k.count("/") >= 2}
        )
        for name in apps if args.app is None else [args.app]:
            _print_app(snapshot, store.prefix, name)
        if args.app is not None:
            await _print_deploy_state(store, args)
        return EXIT_OK

    return asyncio.run(_with_store(args, work))


def _print_app(snapshot: Any, prefix: str, name: str) -> None:
    active = snapshot.kvs.get(f"apps/{name}/active")
    print(
        f"app {name}"
        + (f" (active release {active.value.decode('utf-8', 'replace')})" if active else "")
    )
    base = f"apps/{name}/releases/"
    for key in sorted(k for k in snapshot.kvs if k.startswith(base)):
        release, _, instance = key[len(base) :].partition("/")
        print(f"  {release}/{instance}\t{snapshot.kvs[key].value.decode('utf-8', 'replace')}")


# ------------------------------------------------------------------ deploy


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _say(line: str) -> None:
    print(line, flush=True)


def release_spec(args: argparse.Namespace) -> Any:
    from routerd.releases import ReleaseSpec

    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or ENV_NAME.fullmatch(name) is None:
            raise ConfigError("--env", f"{item!r} must be K=V with K a variable name")
        env[name] = value
    if not 1 <= args.replicas <= 100:
        raise ConfigError("--replicas", f"{args.replicas} is not 1..100")
    if not 1 <= args.port <= 65535:
        raise ConfigError("--port", f"{args.port} is not 1..65535")
    from routerd.releases import spec_problems

    spec = ReleaseSpec(
        image=args.image,
        env=env,
        replicas=args.replicas,
        port=args.port,
        network=args.network,
        health_path=args.health_path,
    )
    for problem in spec_problems(spec):  # the rules a release read back from etcd obeys too
        field = problem.split(" ", 1)[0]
        raise ConfigError("--" + field.replace("_", "-"), problem)
    return spec


def deploy_options(args: argparse.Namespace) -> Any:
    from routerd.controller import DeployOptions

    for flag in ("health_timeout", "router_timeout", "stop_timeout", "rollback_timeout", "drain"):
        if getattr(args, flag) < 0 or (flag != "drain" and getattr(args, flag) == 0):
            raise ConfigError("--" + flag.replace("_", "-"), "must be positive")
    return DeployOptions(
        health_timeout=args.health_timeout,
        drain=args.drain,
        router_timeout=args.router_timeout,
        wait_routers=not args.no_wait_routers,
        stop_timeout=args.stop_timeout,
        rollback_timeout=args.rollback_timeout,
    )


def _check_app(app: str) -> None:
    if APP_NAME.fullmatch(app) is None:
        raise ConfigError("app", f"{app!r} must match {APP_NAME.pattern}")


def cmd_deploy(args: argparse.Namespace) -> int:
    _check_app(args.app)
    if args.release and RELEASE_NAME.fullmatch(args.release) is None:
        raise ConfigError("--release", f"{args.release!r} must match {RELEASE_NAME.pattern}")
    spec = release_spec(args)
    return _drive(args, lambda deployer: deployer.deploy(args.app, spec, release=args.release))


def cmd_rollback(args: argparse.Namespace) -> int:
    _check_app(args.app)
    return _drive(args, lambda deployer: deployer.rollback(args.app, to=args.to))


def _drive(args: argparse.Namespace, work: Callable[[Any], Coroutine[Any, Any, Any]]) -> int:
    """Run a deploy; SIGINT or SIGTERM stops it and it rolls back (a second one waits)."""
    from routerd.controller import Deployer
    from routerd.runtime import DockerRuntime

    options, settings = deploy_options(args), etcd_settings(args)
    runtime = DockerRuntime(args.docker_host, advertise_host=args.advertise_host)

    async def main() -> int:
        store = Store(settings)
        deployer = Deployer(store, runtime, options, say=_say)
        task = asyncio.create_task(work(deployer))
        loop = asyncio.get_running_loop()

        def interrupt(sig: signal.Signals) -> None:
            if deployer.interruptible and not task.cancelling():
                _say(f"routerd: {sig.name}: stopping the deploy")
                task.cancel()
            else:
                _say(f"routerd: {sig.name}: rolling back or cleaning up; please wait")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, interrupt, sig)
        try:
            await task
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED
        finally:
            await store.close()
        return EXIT_OK

    return asyncio.run(main())


def cmd_gc(args: argparse.Namespace) -> int:
    from routerd.inventory import collect_garbage
    from routerd.runtime import DockerRuntime

    if args.app is not None:
        _check_app(args.app)
    runtime = DockerRuntime(args.docker_host, advertise_host=args.advertise_host)

    async def work(store: Store) -> int:
        count = await collect_garbage(
            store, runtime, app=args.app, dry_run=args.dry_run, force=args.force, say=_say
        )
        _say(f"gc: {'would remove' if args.dry_run else 'removed'} {count} container(s)")
        return EXIT_OK

    return asyncio.run(_with_store(args, work))


async def _print_deploy_state(store: Store, args: argparse.Namespace) -> None:
    """``status <app>``: its release history, containers and what each router serves."""
    from routerd.errors import ContainerError
    from routerd.inventory import describe
    from routerd.releases import pool_of
    from routerd.runtime import DockerRuntime

    runtime, runtime_error = None, None
    try:
        runtime = DockerRuntime(args.docker_host)
    except ContainerError as exc:
        runtime_error = str(exc)
    pool = pool_of(await store.get(f"apps/{args.app}/config"))
    state = await describe(store, runtime, args.app, pool=pool)
    print(f"  history ({len(state.history)}):")
    for release in state.history:
        spec = release.spec
        mark = "*" if release.name == state.active else " "
        print(
            f"   {mark}{release.name}\timage={spec.image} replicas={spec.replicas} "
            f"network={spec.network} created={release.created} "
            f"activated={release.activated or '-'}"
            + (f" rollback_of={release.rollback_of}" if release.rollback_of else "")
        )
    if state.containers is None:
        print(f"  containers: unknown ({state.runtime_error or runtime_error})")
    else:
        print(f"  containers ({len(state.containers)}):")
        for c in state.containers:
            print(f"    {c.name}\t{c.short_id} release={c.release} {c.state} port={c.port}")
    print(f"  routers of pool {pool} ({len(state.routers)}):")
    for line in state.routers:
        print(f"    {line}")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "render": cmd_render,
    "apps": cmd_apps,
    "status": cmd_status,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "gc": cmd_gc,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        apply_environment(parser)
    except ConfigError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    logs.setup(getattr(args, "log_format", "text"), getattr(args, "log_level", "info"))
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValidationError, RenderError) as exc:
        print(f"routerd: invalid: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RouterdError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
