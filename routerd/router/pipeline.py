"""One snapshot through the straight line: ``Router.apply``.

    load (validated model) -> render -> unchanged? -> shrink guard
    -> stage and validate (crossplane, then nginx -t) -> install and reload
    (rename, SIGHUP, confirm the generation) -> push instance lists

Each step is one method; a step that stops the line raises a typed error
(RenderError, ValidationError, Held, NginxNotRunning, RolledBack) that
``apply`` turns into the Result's Outcome. Any failure leaves the running
nginx untouched, or puts the previous file back. With dynamic backends the
instance lists still reach nginx when a candidate is refused: they are
valid on their own. The daemon decides what to log, report and retry.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from routerd import keys
from routerd.errors import (
    ConfigError,
    Held,
    InstallError,
    NginxNotRunning,
    ReloadError,
    RenderError,
    RolledBack,
    ValidationError,
)
from routerd.logs import log
from routerd.router import validate
from routerd.router.backends import Backends, LuaSupport, detect_lua, table_of
from routerd.router.guards import RefusedCandidates, shrink_error
from routerd.router.install import Installer
from routerd.router.loader import Loader
from routerd.router.master import Master
from routerd.router.metrics import Metrics
from routerd.router.model import RoutingTable
from routerd.router.nginx import Nginx
from routerd.router.render import Layout, Lua, Rendered, Renderer
from routerd.router.settings import Settings
from routerd.routerstatus import Rejection
from routerd.store import Snapshot

logger = logging.getLogger("routerd.pipeline")
RETRY_ROLLED_BACK_S = 30.0
PUSH_RETRY_S = (1.0, 30.0)  # first and longest wait before pushing again after a failure


class Outcome(enum.Enum):
    UNCHANGED = "unchanged"
    PUSHED = "pushed"  # instance lists changed inside nginx, no reload
    RELOADED = "reloaded"
    REJECTED = "rejected"  # a template, or a candidate crossplane or nginx -t refused
    ROLLED_BACK = "rolled_back"
    HELD = "held"  # the shrink guard kept the last config
    WAITING = "waiting"  # installed; the sidecar's nginx is not running to load it
    PUSH_FAILED = "push_failed"  # nginx did not take the instance lists; retried later


GOOD = frozenset({Outcome.UNCHANGED, Outcome.PUSHED, Outcome.RELOADED})


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    table: RoutingTable
    error: Rejection | None = None
    retry_in: float | None = None  # apply the same snapshot again after this many seconds


@dataclass
class Backoff:
    first: float
    longest: float
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.first

    def next(self) -> float:
        wait, self.current = self.current, min(self.current * 2, self.longest)
        return wait

    def reset(self) -> None:
        self.current = self.first


def layout_of(settings: Settings, lua: Lua | None = None) -> Layout:
    nginx = settings.nginx
    return Layout(
        http_listen=nginx.http_listen,
        https_listen=nginx.https_listen,
        status_listen=nginx.status_listen,
        runtime_dir=str(nginx.runtime_dir),
        pid_file=str(nginx.pid_path),
        lua=lua,
        edge=nginx.edge,
        traffic_log=None if nginx.traffic_log is None else str(nginx.traffic_log),
    )


def lua_support(settings: Settings) -> LuaSupport | None:
    """--dynamic-backends: how this nginx loads Lua, or None when it is off."""
    if settings.dynamic_backends == "off":
        return None
    support = detect_lua(settings.nginx.binary)
    if support is None and settings.dynamic_backends == "on":
        raise ConfigError(
            "--dynamic-backends",
            f"{settings.nginx.binary} has no Lua module (Debian: libnginx-mod-http-lua)",
        )
    return support


class Router:
    """Turns snapshots into confirmed nginx generations. Built from its parts,
    so a test can make one without nginx or folders; ``create`` makes the real one."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        renderer: Renderer,
        installer: Installer,
        nginx: Nginx,
        backends: Backends | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = Loader(prefix=settings.etcd.prefix, pool=settings.pool)
        self.renderer = renderer
        self.installer = installer
        self.nginx = nginx
        self.backends = backends
        self.clock = clock
        self.table: RoutingTable | None = None  # the last one built
        self.served_apps: frozenset[str] | None = None  # None: read the installed record
        self.refused = RefusedCandidates()
        self._checked: set[str] = set()  # app files crossplane already passed
        self._push_backoff = Backoff(*PUSH_RETRY_S)

    @classmethod
    def create(
        cls, settings: Settings, metrics: Metrics, support: LuaSupport | None = None
    ) -> Router:
        """The router for ``settings``: its folders made, Lua detected by the caller."""
        ns = settings.nginx
        backends = None
        if support is not None:
            backends = Backends(
                state_dir=ns.state_dir, runtime_dir=ns.runtime_dir, templates=ns.templates
            )
            backends.prepare()
        lua = backends.layout(support) if backends is not None and support is not None else None
        master = Master(
            binary=ns.binary,
            conf=ns.conf,
            runtime_dir=ns.runtime_dir,
            supervise=ns.supervise,
            pid_file=ns.pid_path,
        )
        if backends is not None:
            master.stale_sockets = [backends.socket]
        master.prepare_runtime()
        installer = Installer(ns.conf, keep_failed=ns.keep_failed)
        installer.prepare()
        nginx = Nginx(master, status_listen=ns.status_listen, reload_timeout=ns.reload_timeout)
        renderer = Renderer(ns.templates, layout_of(settings, lua))
        return cls(
            settings,
            metrics,
            renderer=renderer,
            installer=installer,
            nginx=nginx,
            backends=backends,
        )

    async def start(self) -> None:
        """Serve the installed config at once, before etcd is reached."""
        await self.nginx.take_over(self.installer.installed_generation())

    # -- the straight line

    async def apply(self, snapshot: Snapshot, changed: set[str] | None = None) -> Result:
        """One snapshot; ``changed`` names the keys changed since the last call
        (None: unknown, load everything)."""
        started = self.clock()
        table = await self.load(snapshot, changed)
        try:
            rendered = await self.render(table, started)
            if (unchanged := await self.unchanged(table, rendered)) is not None:
                return unchanged
            self.guard_shrink(table)
            staged, new_files = await self.stage_and_validate(rendered)
            await self.install_and_reload(table, rendered, staged, new_files)
        except Held as exc:
            return Result(Outcome.HELD, table, self._held(str(exc)))
        except (RenderError, ValidationError) as exc:
            return await self._refused(table, Outcome.REJECTED, exc)
        except NginxNotRunning as exc:
            return await self._refused(table, Outcome.WAITING, exc)
        except RolledBack as exc:
            return await self._refused(table, Outcome.ROLLED_BACK, exc)
        self._log_reloaded(table, rendered, started)
        pushed = await self.push(table)
        if pushed.outcome is Outcome.PUSH_FAILED:
            return pushed
        return Result(Outcome.RELOADED, table)

    async def preview(self, snapshot: Snapshot) -> tuple[RoutingTable, Rendered]:
        """Load, render, stage and validate, and stop there (``render --dry-run``)."""
        table = await self.load(snapshot, None)
        rendered = await self.render(table, self.clock())
        await self.stage_and_validate(rendered)
        return table, rendered

    async def load(self, snapshot: Snapshot, changed: set[str] | None) -> RoutingTable:
        """The validated model; only the changed apps when only instances moved.
        In a thread: a new DNS-named instance is looked up."""
        previous = self.table
        table = None
        if changed is not None and previous is not None:
            table = await asyncio.to_thread(self.loader.update, previous, snapshot, changed)
        if table is None:
            table = await asyncio.to_thread(self.loader.load, snapshot)
        self.table = table
        return table

    async def render(self, table: RoutingTable, started: float) -> Rendered:
        rendered = await asyncio.to_thread(self.renderer.render, table)
        self.metrics.render_seconds.observe(self.clock() - started)
        return rendered

    async def unchanged(self, table: RoutingTable, rendered: Rendered) -> Result | None:
        """nginx serves (or, sidecar, waits to load) these bytes already: push
        what changed inside nginx, if anything; None when there is a change."""
        if rendered.sha256 == self.nginx.served:
            if table.dirty is None:  # Loader.update keeps the same apps
                self.served_apps = rendered.app_names
            return await self.push(table)
        if rendered.sha256 == self.nginx.waiting:
            raise NginxNotRunning("installed; waiting for nginx to start")
        return None

    def guard_shrink(self, table: RoutingTable) -> None:
        if self.settings.allow_shrink:
            return
        served = self.served_apps
        if served is None:
            served = self.installer.installed_apps()
        if (error := shrink_error(served, {a.name for a in table.apps})) is not None:
            raise Held(error)

    async def stage_and_validate(self, rendered: Rendered) -> tuple[Path, list[Path]]:
        """Write the generation's new files and stage nginx.conf beside the live
        one; crossplane on what it has not parsed before, then nginx -t. A
        candidate refused once is refused again without touching the disk."""
        if (why := self.refused.why(rendered.sha256, self.clock())) is not None:
            raise ValidationError(why)
        new_files = await asyncio.to_thread(self.installer.write_files, rendered)
        staged = await asyncio.to_thread(self.installer.stage, rendered)
        try:
            await self._validate(staged, rendered)
        except ValidationError as exc:
            folder = self.installer.keep_failed_candidate(staged, new_files, str(exc))
            await asyncio.to_thread(self.installer.collect_garbage)  # its files are in folder
            reason = f"{exc} (candidate kept in {folder})"
            self.refused.refuse(rendered.sha256, reason, now=self.clock(), for_s=None)
            raise ValidationError(reason) from exc
        return staged, new_files

    async def install_and_reload(
        self, table: RoutingTable, rendered: Rendered, staged: Path, new_files: list[Path]
    ) -> None:
        """Rename the staged file into place and have nginx serve it; on a failed
        reload put the previous file back and raise RolledBack."""
        async with self.nginx.lock:
            if self.backends is not None:  # the new generation loads it as it starts
                await asyncio.to_thread(self.backends.write_file, table.revision, table_of(table))
            self.installer.install(staged)
            started = self.clock()
            try:
                await self.nginx.load(rendered.sha256)
            except NginxNotRunning as exc:
                log(logger, "installed; nginx not running", logging.WARNING, error=str(exc))
                raise NginxNotRunning(f"installed, not live: {exc}") from exc
            except ReloadError as exc:
                raise await self._roll_back(table, rendered, new_files, exc) from exc
        self.metrics.reloads.labels(result="ok").inc()
        self.metrics.reload_seconds.observe(self.clock() - started)
        self.served_apps = rendered.app_names
        self._checked.intersection_update(rendered.shards)
        await asyncio.to_thread(self.installer.collect_garbage)

    async def push(self, table: RoutingTable, *, removals: bool = True) -> Result:
        """Dynamic backends: hand nginx the instance lists that changed, no reload.
        PUSHED, UNCHANGED (nothing to send) or PUSH_FAILED, retried with backoff.
        Without ``removals`` (a refused candidate), apps it would remove keep
        what nginx holds."""
        if self.backends is None:
            return Result(Outcome.UNCHANGED, table)
        changes = self.backends.changes(table, removals=removals)
        if changes == {}:
            return Result(Outcome.UNCHANGED, table)
        started = self.clock()
        try:
            sent = await self.backends.push(table, changes)
        except ReloadError as exc:
            wait = self._push_backoff.next()
            log(logger, "push failed", logging.WARNING, error=str(exc), retry_in_s=wait)
            error = self._error(f"backend push failed (retrying in {wait:g} s): {exc}")
            return Result(Outcome.PUSH_FAILED, table, error, retry_in=wait)
        self._push_backoff.reset()
        took = round((self.clock() - started) * 1000, 1)
        # After the push, off the latency path: the file only serves nginx's next start.
        await asyncio.to_thread(self.backends.write_file, table.revision)
        log(logger, "pushed", revision=table.revision, apps=sent, took_ms=took)
        self.metrics.pushes.inc()
        return Result(Outcome.PUSHED, table)

    async def check_backends(self) -> bool:
        """An nginx that restarted loaded the table file, which may be older than
        the last push: True when the whole table must be pushed again."""
        backends = self.backends
        if backends is None or backends.pushed is None:
            return False
        held = await backends.held_revision()
        if held is not None and held < backends.revision:
            log(logger, "nginx holds an older backend table; pushing it whole", held=held)
            backends.stale = True
            return True
        return False

    # -- the steps' parts

    async def _validate(self, staged: Path, rendered: Rendered) -> None:
        """crossplane and nginx -t run side by side; crossplane's verdict wins
        when both refuse, so the same candidate always reports the same error."""
        started = self.clock()
        folder = self.settings.nginx.conf.parent
        unchecked = [rel for rel in rendered.shards if rel not in self._checked]

        def crossplane_checks() -> None:
            for rel in unchecked:
                validate.check_app_file(folder / rel)
            validate.check_main_file(staged, list(rendered.shards))

        ns = self.settings.nginx
        parsed, tested = await asyncio.gather(
            asyncio.to_thread(crossplane_checks),
            asyncio.to_thread(validate.nginx_test, ns.binary, staged, ns.runtime_dir),
            return_exceptions=True,
        )
        for outcome in (parsed, tested):
            if isinstance(outcome, BaseException):
                raise outcome
        self._checked.update(unchecked)
        self.metrics.validate_seconds.observe(self.clock() - started)

    async def _roll_back(
        self, table: RoutingTable, rendered: Rendered, new_files: list[Path], exc: ReloadError
    ) -> RolledBack:
        self.metrics.reloads.labels(result="failed").inc()
        folder = self.installer.keep_failed_candidate(self.installer.conf, new_files, str(exc))
        restored = self.installer.restore_previous()
        if not restored:  # the first install: no previous file, and none is better than this
            self.installer.conf.unlink(missing_ok=True)
        await asyncio.to_thread(self.installer.collect_garbage)
        reason = f"reload failed, previous config restored: {exc} (candidate kept in {folder})"
        if restored:
            try:
                await self.nginx.load_again()
            except ReloadError as again:
                reason += f"; reloading the previous config failed too: {again}"
        if self.backends is not None:  # the failed generation loaded the candidate's table
            try:
                await self.backends.restore(table.revision)
            except (ReloadError, InstallError, OSError) as failed:
                log(logger, "backend restore failed", logging.WARNING, error=str(failed))
        self.metrics.rollbacks.inc()  # counted once the previous state is back
        log(logger, "rolled back", logging.ERROR, revision=table.revision, error=str(exc))
        # A reload can fail for reasons that pass (a port held for a while): retry later.
        self.refused.refuse(rendered.sha256, reason, now=self.clock(), for_s=RETRY_ROLLED_BACK_S)
        return RolledBack(reason)

    async def _refused(self, table: RoutingTable, outcome: Outcome, exc: Exception) -> Result:
        """A candidate did not go live; its instance lists still may (dynamic backends)."""
        if isinstance(exc, RenderError):
            error = Rejection(str(self.settings.nginx.templates), str(exc))
        else:
            error = self._error(str(exc))
        pushed = await self.push(table, removals=False)
        return Result(outcome, table, error, retry_in=pushed.retry_in)

    def _log_reloaded(self, table: RoutingTable, rendered: Rendered, started: float) -> None:
        took = round((self.clock() - started) * 1000)
        log(
            logger,
            "reloaded",
            revision=table.revision,
            sha256=rendered.sha256[:12],
            apps=len(table.apps),
            took_ms=took,
        )

    def _error(self, message: str) -> Rejection:
        return Rejection(str(self.settings.nginx.conf), message)

    def _held(self, message: str) -> Rejection:
        return Rejection(keys.absolute(self.settings.etcd.prefix, keys.APPS), message)
