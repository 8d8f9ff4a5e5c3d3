"""The deploy controller's commands: ``deploy`` (with its canary flags and
``--abort``), ``rollback``, ``scale``, ``gc``, ``status``, and ``hosts``
(from ``host_commands``).

Flags are checked here, each failure naming its flag, before anything
starts; a deploy or a scale runs as one task that SIGINT or SIGTERM
cancels, which rolls it back (a second signal only says to wait). Each
works over the engines of every host under ``hosts/``, or without hosts
over the one engine of ``--docker-host``. Exit codes are the entry point's:
130 for an interrupted deploy.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import click

from routerd import keys
from routerd.deploy.canary import Canary, Thresholds
from routerd.deploy.engines import Engines, connect
from routerd.deploy.host_commands import hosts, pairs
from routerd.deploy.hosts import MAX_CPUS, MAX_MEMORY_MB, MIN_CPUS, MIN_MEMORY_MB
from routerd.deploy.releases import (
    ENV_NAME,
    MAX_REPLICAS,
    ReleaseSpec,
    describe_weights,
    pool_of,
    read_weights,
    spec_problems,
)
from routerd.deploy.routers import live_routers, router_statuses, traffic_of
from routerd.errors import ConfigError, ContainerError, InvalidValue
from routerd.keys import APP_NAME, RELEASE_NAME
from routerd.settings import Command, etcd_options, etcd_settings, flag
from routerd.store import Snapshot, Store

EXIT_INTERRUPTED = 130
POSITIVE = click.FloatRange(min=0, min_open=True)
MAX_CANARY_STEPS = 10
F = TypeVar("F", bound=Callable[..., Any])


def say(line: str) -> None:
    print(line, flush=True)


def docker_options(command: F) -> F:
    """The one engine used while no host is registered under hosts/."""
    for option in reversed(
        [
            flag(
                "--docker-host",
                help="Docker engine URL without hosts/ (default: DOCKER_HOST or the socket)",
            ),
            flag(
                "--advertise-host", default="127.0.0.1", help="address routers reach containers at"
            ),
        ]
    ):
        command = option(command)
    return command


def deploy_options(command: F) -> F:
    """How a deploy waits, drains and rolls back; shared by deploy and rollback."""
    options = [
        flag("--health-timeout", default=30.0, type=POSITIVE, help="seconds to get healthy"),
        flag(
            "--drain",
            default=2.0,
            type=click.FloatRange(min=0),
            help="seconds between the switch and the old release's stop",
        ),
        flag("--router-timeout", default=30.0, type=POSITIVE, help="seconds to wait for routers"),
        flag("--no-wait-routers", is_flag=True, help="go on without routers to confirm"),
        flag("--stop-timeout", default=10.0, type=POSITIVE, help="seconds from SIGTERM to KILL"),
        flag(
            "--rollback-timeout",
            default=30.0,
            type=POSITIVE,
            help="seconds a rollback retries etcd and the engines (step 6's removals too)",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return docker_options(etcd_options(command))


def check_app(app: str) -> str:
    if APP_NAME.fullmatch(app) is None:
        raise ConfigError("app", f"{app!r} must match {APP_NAME.pattern}")
    return app


def release_spec(params: Mapping[str, Any]) -> ReleaseSpec:
    env = {}
    for item in params["env"]:
        name, sep, value = item.partition("=")
        if not sep or ENV_NAME.fullmatch(name) is None:
            raise ConfigError("--env", f"{item!r} must be K=V with K a variable name")
        env[name] = value
    spec = ReleaseSpec(
        image=params["image"],
        env=env,
        replicas=params["replicas"],
        port=params["port"],
        network=params["network"],
        health_path=params["health_path"],
        cpus=params["cpus"],
        memory_mb=params["memory"],
        constraints=pairs("--constraint", params["constraint"]),
    )
    for problem in spec_problems(spec):  # the rules a release read back from etcd obeys too
        field = problem.split(" ", 1)[0]
        raise ConfigError(
            "--" + {"memory_mb": "memory"}.get(field, field).replace("_", "-"), problem
        )
    return spec


def canary_of(params: Mapping[str, Any]) -> Canary | None:
    """``--canary 10,50`` and its thresholds; None without --canary."""
    text = params.get("canary")
    if not text:
        return None
    try:
        steps = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ConfigError("--canary", f"{text!r} must be percentages like 10,50") from None
    ok = all(1 <= p <= 99 for p in steps) and list(steps) == sorted(set(steps))
    if not ok or len(steps) > MAX_CANARY_STEPS:
        raise ConfigError(
            "--canary",
            f"{text!r} must be 1 to {MAX_CANARY_STEPS} rising percentages, each 1..99",
        )
    if params["no_wait_routers"]:
        raise ConfigError("--canary", "judges the routers' figures: drop --no-wait-routers")
    thresholds = Thresholds(
        max_error_rate=params["max_error_rate"],
        min_requests=params["min_requests"],
        max_p99_ms=params["max_p99"],
    )
    return Canary(steps, params["canary_interval"], thresholds)


def options_of(params: Mapping[str, Any]) -> Any:
    from routerd.deploy.plan import DeployOptions

    return DeployOptions(
        health_timeout=params["health_timeout"],
        drain=params["drain"],
        router_timeout=params["router_timeout"],
        wait_routers=not params["no_wait_routers"],
        stop_timeout=params["stop_timeout"],
        rollback_timeout=params["rollback_timeout"],
        canary=canary_of(params),
    )


def drive(
    params: Mapping[str, Any],
    work: Callable[[Any], Coroutine[Any, Any, None]],
    *,
    scaling: bool = False,
) -> int:
    """Run a deploy (or a scale); SIGINT or SIGTERM stops it and it rolls back
    (a second one waits)."""
    from routerd.deploy.controller import Deployer
    from routerd.deploy.scaling import Scaler

    options, settings = options_of(params), etcd_settings(params)

    async def main() -> int:
        async with Store(settings) as store:
            engines = await open_for(store, params)
            deployer = (Scaler if scaling else Deployer)(store, engines, options, say=say)
            task = asyncio.create_task(work(deployer))
            loop = asyncio.get_running_loop()

            def interrupt(sig: signal.Signals) -> None:
                if deployer.interruptible and not task.cancelling():
                    say(f"routerd: {sig.name}: stopping the deploy")
                    task.cancel()
                else:
                    say(f"routerd: {sig.name}: rolling back or cleaning up; please wait")

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, interrupt, sig)
            try:
                await task
            except asyncio.CancelledError:
                return EXIT_INTERRUPTED
        return 0

    return asyncio.run(main())


async def open_for(store: Store, params: Mapping[str, Any]) -> Engines:
    return await connect(
        store,
        docker_host=params["docker_host"],
        advertise_host=params.get("advertise_host") or "127.0.0.1",
        say=say,
    )


def canary_options(command: F) -> F:
    """Canary steps of a deploy, and ``--abort`` of a running one."""
    options = [
        flag(
            "--canary",
            metavar="P,P...",
            help="canary steps: the new release's percent of requests at each, before 100 %",
        ),
        flag("--canary-interval", default=60.0, type=POSITIVE, help="seconds each step is watched"),
        flag(
            "--max-error-rate",
            default=1.0,
            type=click.FloatRange(0, 100),
            help="percent of the new release's requests answered 5xx that rolls back",
        ),
        flag(
            "--min-requests",
            default=50,
            type=click.IntRange(min=1),
            help="requests of the new release a step must see to be judged",
        ),
        flag(
            "--max-p99", type=POSITIVE, metavar="MS", help="its p99 upstream time that rolls back"
        ),
        flag("--abort", is_flag=True, help="make APP's running canary deploy roll back, and wait"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(cls=Command)
@click.argument("app")
@flag("--image", help="an image on the engine (never pulled); required unless --abort")
@flag("--replicas", default=1, type=int, help="containers")
@flag("--port", default=5000, type=int, help="$PORT inside the container on a bridge network")
@flag("--env", multiple=True, metavar="K=V", help="environment (repeatable)")
@flag("--release", help="release name (default: r<UTC time>-<4 hex>)")
@flag(
    "--network",
    default="bridge",
    type=click.Choice(["bridge", "host"]),
    help="bridge publishes $PORT on a free host port; host makes $PORT a free host port",
)
@flag("--health-path", default="/", help="path each container must answer with 2xx or 3xx")
@flag(
    "--cpus",
    type=click.FloatRange(MIN_CPUS, MAX_CPUS),
    help="CPU limit per container (placement reserves 0.25 without it)",
)
@flag(
    "--memory",
    type=click.IntRange(MIN_MEMORY_MB, MAX_MEMORY_MB),
    help="memory limit per container in MB (placement reserves 256 without it)",
)
@flag(
    "--constraint",
    multiple=True,
    metavar="K=V[,K=V]",
    help="run only on hosts with this tag (repeatable)",
)
@canary_options
@deploy_options
def deploy(app: str, **params: Any) -> int:
    """Blue-green deploy of a new release: six steps, rolled back on failure.

    Where hosts are registered (routerd hosts add), each container goes to a
    host of the app's pool that carries every --constraint and has room for
    --cpus and --memory beside what runs there, spreading the replicas.

    With --canary 10,50 the new release first takes 10 %, then 50 % of the
    requests (apps/<app>/weights), each step watched for --canary-interval
    seconds; it is rolled back as soon as the routers count more than
    --max-error-rate percent 5xx among its requests over a step (or a p99
    over --max-p99), once --min-requests requests were seen. --abort makes
    such a deploy, running elsewhere, roll back the same way."""
    check_app(app)
    if params["abort"]:
        return abort_deploy(app, params)
    if not params["image"]:
        raise ConfigError("--image", "is required (unless --abort)")
    release = params["release"]
    if release and RELEASE_NAME.fullmatch(release) is None:
        raise ConfigError("--release", f"{release!r} must match {RELEASE_NAME.pattern}")
    spec = release_spec(params)
    return drive(params, lambda deployer: deployer.deploy(app, spec, release=release))


def abort_deploy(app: str, params: Mapping[str, Any]) -> int:
    """``deploy --abort``: as long as the running deploy's rollback may take, at most."""
    from routerd.deploy.abort import abort

    timeout = params["rollback_timeout"] + params["router_timeout"] + params["stop_timeout"] + 10

    async def work() -> None:
        async with Store(etcd_settings(params)) as store:
            await abort(store, app, timeout=timeout, say=say)

    asyncio.run(work())
    return 0


@click.command(cls=Command)
@click.argument("app")
@click.argument("version", required=False)
@flag("--to", metavar="RELEASE", help="a release from the app's history, by name")
@deploy_options
def rollback(app: str, version: str | None, **params: Any) -> int:
    """Deploy an earlier release again (its image and config vars), by the same steps.

    Without VERSION (v7, as `routerd releases` lists them) or --to, the
    release that served before the active one."""
    check_app(app)
    if version and params["to"]:
        raise ConfigError("--to", "give a VERSION or --to, not both")
    target = version or params["to"]
    return drive(params, lambda deployer: deployer.rollback(app, to=target))


@click.command(cls=Command)
@click.argument("app")
@click.argument("count", type=click.IntRange(1, MAX_REPLICAS))
@deploy_options
def scale(app: str, count: int, **params: Any) -> int:
    """Run COUNT containers of the active release: add them where placement
    says, or take some out (deregistered, routers confirm, drained, stopped)."""
    check_app(app)
    return drive(params, lambda scaler: scaler.scale(app, count), scaling=True)


@click.command(cls=Command)
@click.argument("app", required=False)
@flag("--dry-run", is_flag=True, help="say what would go; remove nothing")
@flag("--force", is_flag=True, help="also remove containers of apps etcd has no config for")
@docker_options
@etcd_options
def gc(app: str | None, **params: Any) -> int:
    """Remove releases and containers nothing routes to, on every host."""
    from routerd.deploy.inventory import collect_garbage

    if app is not None:
        check_app(app)

    async def work() -> None:
        async with Store(etcd_settings(params)) as store:
            count = await collect_garbage(
                store,
                await open_for(store, params),
                app=app,
                dry_run=params["dry_run"],
                force=params["force"],
                say=say,
            )
        say(f"gc: {'would remove' if params['dry_run'] else 'removed'} {count} container(s)")

    asyncio.run(work())
    return 0


# ----------------------------------------------------------------- status


@click.command(cls=Command)
@click.argument("app", required=False)
@flag("--docker-host", help="Docker engine URL (default: DOCKER_HOST or the socket)")
@etcd_options
def status(app: str | None, **params: Any) -> int:
    """Routers and what each serves, apps, releases, instances; with an app,
    its history, containers and what each router of its pool serves."""

    async def work() -> None:
        async with Store(etcd_settings(params)) as store:
            snapshot = await store.snapshot()
            print(f"revision {snapshot.revision}")
            print_routers(snapshot, app)
            for name in keys.app_names(snapshot.kvs) if app is None else [app]:
                print_app(snapshot, name)
            if app is not None:
                await print_deploy_state(store, app, params)

    asyncio.run(work())
    return 0


def print_routers(snapshot: Snapshot, app: str | None) -> None:
    found, unreadable = router_statuses(snapshot)
    print(f"routers ({len(found) + len(unreadable)}):")
    for router in found:
        print(
            f"  {router.router_id}\tpool={router.pool} revision={router.revision} "
            f"apps={router.apps} config={router.config_sha256[:12]} "
            f"applied_at={router.applied_at} errors={len(router.errors)}"
        )
        for error in router.errors:
            if app is None or f"/{keys.app(app)}" in error.key:
                print(f"    error {error.key}: {error.error}")
    for router_id in unreadable:
        print(f"  {router_id}\t(unreadable status)")


def print_app(snapshot: Snapshot, name: str) -> None:
    active = snapshot.kvs.get(keys.active(name))
    print(
        f"app {name}"
        + (f" (active release {active.value.decode('utf-8', 'replace')})" if active else "")
    )
    try:
        shares = read_weights(snapshot, name)
    except InvalidValue as exc:
        print(f"  weights: unreadable ({exc.message})")
    else:
        if shares is not None:
            print(f"  weights: {describe_weights(shares)}")
    base = keys.releases(name)
    for key in sorted(k for k in snapshot.kvs if k.startswith(base)):
        release, _, instance = key[len(base) :].partition("/")
        print(f"  {release}/{instance}\t{snapshot.kvs[key].value.decode('utf-8', 'replace')}")


async def print_deploy_state(store: Store, app: str, params: Mapping[str, Any]) -> None:
    """``status <app>``: its release history, containers and what each router serves."""
    from routerd.deploy.inventory import describe

    engines, runtime_error = None, None
    try:
        engines = await open_for(store, params)
    except ContainerError as exc:
        runtime_error = str(exc)
    pool = pool_of(await store.get(keys.config(app)))
    state = await describe(store, engines, app, pool=pool)
    print(f"  history ({len(state.history)}):")
    for release in state.history:
        spec = release.spec
        mark = "*" if release.name == state.active else " "
        print(
            f"   {mark}{release.name}\t{release.label} image={spec.image} replicas={spec.replicas} "
            f"network={spec.network} created={release.created} "
            f"activated={release.activated or '-'}"
            + (f" rollback_of={release.rollback_of}" if release.rollback_of else "")
        )
    if state.containers is None:
        print(f"  containers: unknown ({state.runtime_error or runtime_error})")
    else:
        print(f"  containers ({len(state.containers)}):")
        for c in state.containers:
            where = f" host={c.engine}" if c.engine else ""
            print(
                f"    {c.name}\t{c.short_id} release={c.release} {c.state}{where} "
                f"address={c.address}"
            )
        if state.runtime_error:
            print(f"  not looked at: {state.runtime_error}")
    print(f"  routers of pool {pool} ({len(state.routers)}):")
    for line in state.routers:
        print(f"    {line}")
    await print_traffic(store, app, pool)


async def print_traffic(store: Store, app: str, pool: str) -> None:
    """Each router's requests and 5xx per release of ``app``, since it started."""
    print("  traffic (counted by each router since it started):")
    for router_id, traffic in await traffic_of(await live_routers(store, pool), app):
        if isinstance(traffic, str):
            print(f"    {router_id}: unknown ({traffic})")
            continue
        if not traffic.releases:
            print(f"    {router_id}: no requests")
        for release, figures in sorted(traffic.releases.items()):
            codes = " ".join(f"{c}={n}" for c, n in sorted(figures.codes.items()))
            print(
                f"    {router_id} {release}: requests={figures.requests} "
                f"5xx={figures.errors} ({codes})"
            )


COMMANDS = (deploy, rollback, scale, gc, status, hosts)
