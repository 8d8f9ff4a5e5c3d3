"""One snapshot through the straight line: the pipeline behind the daemon.

    snapshot at revision N -> model (validated) -> render -> unchanged? push
    instance lists (dynamic backends) and stop -> write app files -> stage
    nginx.conf -> crossplane (new files) + nginx -t -> rename (previous kept)
    -> SIGHUP -> confirm the generation -> push instance lists

``Router.apply`` holds that sequence and returns an Outcome. Any failure
leaves the running nginx untouched (or puts the previous file back) and is
reported in the Result; the daemon decides what to log and when to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from routerd import validate
from routerd.backends import Backends, detect_lua, table_of
from routerd.errors import ConfigError, NginxNotRunning, ReloadError, RenderError, ValidationError
from routerd.loader import Loader
from routerd.logs import log
from routerd.metrics import Metrics
from routerd.model import Rejection, RoutingTable, Snapshot
from routerd.nginx import Installer, Nginx
from routerd.render import Layout, Lua, Rendered, Renderer
from routerd.settings import Settings

logger = logging.getLogger("routerd.pipeline")
RETRY_ROLLED_BACK_S = 30.0
OVERRIDE = "kept the last config (run with --allow-shrink to apply such a snapshot)"


class Outcome(enum.Enum):
    UNCHANGED = "unchanged"
    PUSHED = "pushed"  # instance lists changed inside nginx, no reload
    RELOADED = "reloaded"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    HELD = "held"  # the shrink guard kept the last config


@dataclass
class Result:
    outcome: Outcome
    error: Rejection | None = None
    retry: bool = False  # try the same snapshot again shortly


def layout_of(settings: Settings, lua: Lua | None = None) -> Layout:
    nginx = settings.nginx
    pid_file = nginx.pid_file if nginx.pid_file else nginx.runtime_dir / "nginx.pid"
    return Layout(
        http_listen=nginx.http_listen,
        https_listen=nginx.https_listen,
        status_listen=nginx.status_listen,
        runtime_dir=str(nginx.runtime_dir),
        pid_file=str(pid_file),
        lua=lua,
    )


def dynamic_backends(settings: Settings) -> tuple[Backends | None, Lua | None]:
    """--dynamic-backends: the balancer's table and layout when this nginx has Lua."""
    ns = settings.nginx
    if settings.dynamic_backends == "off":
        return None, None
    support = detect_lua(ns.binary)
    if support is None:
        if settings.dynamic_backends == "on":
            raise ConfigError(
                "--dynamic-backends",
                f"{ns.binary} has no Lua module (Debian: libnginx-mod-http-lua)",
            )
        return None, None
    backends = Backends(state_dir=ns.state_dir, runtime_dir=ns.runtime_dir, templates=ns.templates)
    return backends, backends.layout(support)


class Router:
    """Turns snapshots into confirmed nginx generations: ``apply`` is the straight line."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        ns = settings.nginx
        self.loader = Loader(prefix=settings.etcd.prefix, pool=settings.pool)
        self.backends, lua = dynamic_backends(settings)
        if self.backends is not None:
            self.backends.prepare()
        self.renderer = Renderer(ns.templates, layout_of(settings, lua))
        self.installer = Installer(ns.conf, keep_failed=ns.keep_failed)
        self.nginx = Nginx(
            binary=ns.binary,
            conf=ns.conf,
            runtime_dir=ns.runtime_dir,
            status_listen=ns.status_listen,
            supervise=ns.supervise,
            pid_file=Path(layout_of(settings).pid_file),
        )
        if self.backends is not None:
            self.nginx.stale_sockets = [self.backends.socket]
        self.nginx.prepare_runtime()
        self.installer.remove_stale_temporaries()
        self.served = self.installer.installed_generation()
        self.served_apps: set[str] | None = None  # unknown until the first apply
        self.table: RoutingTable | None = None  # the last one built
        self._checked: set[str] = set()  # shard files crossplane already passed
        self._refused: dict[str, tuple[str, float]] = {}  # sha -> (why, retry after)
        self._waiting: str | None = None  # installed while the sidecar's nginx was down
        self.busy = False  # an apply is under way (the daemon must not adopt meanwhile)

    # -- the straight line

    async def apply(
        self, snapshot: Snapshot, changed: set[str] | None = None
    ) -> tuple[RoutingTable, Result]:
        """One snapshot through the straight line; ``changed`` names the keys
        that changed since the last call (None: unknown, load everything)."""
        started = time.monotonic()
        # In a thread, like the full load: a new DNS-named instance is looked up.
        table = await asyncio.to_thread(self._load_changed, snapshot, changed)
        if table is None:
            table = await asyncio.to_thread(self.loader.load, snapshot)
        self.table = table
        self.busy = True
        try:
            result = await self._apply_table(table, started)
        finally:
            self.busy = False
        if result.outcome in (Outcome.REJECTED, Outcome.ROLLED_BACK):
            # Instance lists are valid on their own: a refused candidate must
            # not stop them reaching nginx (dynamic backends). Apps it would
            # remove stay as served; a held shrink pushes nothing at all.
            pushed = await self._push(table, removals=False)
            if pushed.retry:
                result = Result(result.outcome, result.error, retry=True)
        return table, result

    async def _apply_table(self, table: RoutingTable, started: float) -> Result:
        try:
            rendered = await asyncio.to_thread(self.renderer.render, table)
        except RenderError as exc:
            templates = str(self.settings.nginx.templates)
            return Result(Outcome.REJECTED, Rejection(templates, str(exc)))
        self.metrics.render_seconds.observe(time.monotonic() - started)
        if rendered.sha256 == self.served:
            if table.dirty is None:  # Loader.update keeps the same apps
                self.served_apps = {a.name for a in table.apps}
            return await self._push(table)
        if (shrink := self._shrink_error(table)) is not None:
            return self._hold(table, shrink)
        if rendered.sha256 == self._waiting:
            return Result(Outcome.REJECTED, self._error("installed; waiting for nginx to start"))
        refused = self._refused.get(rendered.sha256)
        if refused is not None and time.monotonic() < refused[1]:  # no disk churn
            return Result(Outcome.REJECTED, self._error(refused[0]))
        return await self._install(table, rendered, started)

    def adopt(self, generation: str) -> None:
        """nginx serves ``generation`` (a sidecar's nginx that started late)."""
        self.served = generation
        self._waiting = None

    def _load_changed(self, snapshot: Snapshot, changed: set[str] | None) -> RoutingTable | None:
        """Instance and release changes re-route only their apps (None: load all)."""
        if changed is None or self.table is None:
            return None
        return self.loader.update(self.table, snapshot, changed)

    async def _install(self, table: RoutingTable, rendered: Rendered, started: float) -> Result:
        new_files = await asyncio.to_thread(self.installer.write_files, rendered)
        staged = self.installer.stage(rendered)
        try:
            await self._validate(staged, rendered)
        except ValidationError as exc:
            folder = self.installer.keep_failed_candidate(staged, new_files, str(exc))
            await asyncio.to_thread(self.installer.collect_garbage)  # its files are in folder
            # The same bytes fail the same way: never try this candidate again.
            return self._refuse(rendered, f"{exc} (candidate kept in {folder})", for_s=None)
        if self.backends is not None:  # the new generation loads it as it starts
            entries = table_of(table)
            await asyncio.to_thread(self.backends.write_file, table.revision, entries)
        offset = self.nginx.error_log_offset()
        self.installer.install(staged)
        try:
            await self._reload(rendered.sha256, offset)
        except NginxNotRunning as exc:
            # Sidecar mode before its nginx started: the valid file waits for it.
            log(logger, "installed; nginx not running", logging.WARNING, error=str(exc))
            self._waiting = rendered.sha256
            return Result(Outcome.REJECTED, self._error(f"installed, not live: {exc}"))
        except ReloadError as exc:
            return await self._roll_back(table, rendered, new_files, exc)
        self.served, self.served_apps = rendered.sha256, {a.name for a in table.apps}
        self._waiting = None
        self._checked.intersection_update(rendered.shards)
        if (pushed := await self._push(table)).error is not None:
            return pushed
        await asyncio.to_thread(self.installer.collect_garbage)
        took = round((time.monotonic() - started) * 1000)
        log(
            logger,
            "reloaded",
            revision=table.revision,
            sha256=rendered.sha256[:12],
            apps=len(table.apps),
            took_ms=took,
        )
        return Result(Outcome.RELOADED)

    async def _push(self, table: RoutingTable, *, removals: bool = True) -> Result:
        """Dynamic backends: hand nginx the instance lists that changed, no reload."""
        if self.backends is None:
            return Result(Outcome.UNCHANGED)
        changes = self.backends.changes(table, removals=removals)
        if changes == {}:
            return Result(Outcome.UNCHANGED)
        started = time.monotonic()
        try:
            sent = await self.backends.push(table, changes)
        except ReloadError as exc:
            error = self._error(f"backend push failed (retrying): {exc}")
            return Result(Outcome.REJECTED, error, retry=True)
        took = round((time.monotonic() - started) * 1000, 1)
        # After the push, off the latency path: the file only serves nginx's next start.
        await asyncio.to_thread(self.backends.write_file, table.revision)
        log(logger, "pushed", revision=table.revision, apps=sent, took_ms=took)
        self.metrics.pushes.inc()
        return Result(Outcome.PUSHED)

    async def _validate(self, staged: Path, rendered: Rendered) -> None:
        started = time.monotonic()
        conf_dir = self.settings.nginx.conf.parent
        unchecked = [rel for rel in rendered.shards if rel not in self._checked]

        def crossplane_checks() -> None:
            for rel in unchecked:
                validate.check_app_file(conf_dir / rel)
            validate.check_main_file(staged, list(rendered.shards))

        ns = self.settings.nginx
        await asyncio.gather(
            asyncio.to_thread(crossplane_checks),
            asyncio.to_thread(validate.nginx_test, ns.binary, staged, ns.runtime_dir),
        )
        self._checked.update(unchecked)
        self.metrics.validate_seconds.observe(time.monotonic() - started)

    async def _reload(self, generation: str, offset: int) -> None:
        started = time.monotonic()
        retiring: set[int] = set()
        if self.nginx.needs_start():
            self.nginx.start()
        else:
            retiring = self.nginx.reload()
        await self.nginx.confirm(
            generation,
            offset=offset,
            timeout=self.settings.nginx.reload_timeout,
            retiring=retiring,
        )
        self.metrics.reloads.labels(result="ok").inc()
        self.metrics.reload_seconds.observe(time.monotonic() - started)

    async def _roll_back(
        self, table: RoutingTable, rendered: Rendered, new_files: list[Path], exc: ReloadError
    ) -> Result:
        self.metrics.reloads.labels(result="failed").inc()
        folder = self.installer.keep_failed_candidate(self.installer.conf, new_files, str(exc))
        restored = self.installer.restore_previous()
        if not restored:  # the first install: no previous file, and none is better than this
            self.installer.conf.unlink(missing_ok=True)
        await asyncio.to_thread(self.installer.collect_garbage)
        reason = f"reload failed, previous config restored: {exc} (candidate kept in {folder})"
        if restored and self.served is not None:
            offset = self.nginx.error_log_offset()
            try:
                retiring = self.nginx.reload()
                await self.nginx.confirm(
                    self.served,
                    offset=offset,
                    timeout=self.settings.nginx.reload_timeout,
                    retiring=retiring,
                    fail_fast=False,  # the failed reload may still be logging its [emerg]
                )
            except ReloadError as again:
                reason += f"; reloading the previous config failed too: {again}"
        if self.backends is not None:  # the failed generation loaded the candidate's table
            with contextlib.suppress(ReloadError, OSError):
                await self.backends.restore(table.revision)
        self.metrics.rollbacks.inc()  # counted once the previous state is back
        log(logger, "rolled back", logging.ERROR, revision=table.revision, error=str(exc))
        # A reload can fail for reasons that pass (a port held for a while): retry later.
        self._refuse(rendered, reason, for_s=RETRY_ROLLED_BACK_S)
        return Result(Outcome.ROLLED_BACK, self._error(reason))

    # -- refusals

    def _shrink_error(self, table: RoutingTable) -> str | None:
        if self.settings.allow_shrink:
            return None
        names = {a.name for a in table.apps}
        before = (
            len(self.served_apps)
            if self.served_apps is not None
            else self.installer.installed_apps()
        )
        vanished = (
            len(self.served_apps - names)
            if self.served_apps is not None
            else max(0, before - len(names))
        )
        if before and not names:
            return f"the snapshot has no apps (the served config has {before}); {OVERRIDE}"
        if before >= 10 and vanished * 2 > before:
            return f"{vanished} of {before} apps would vanish at once; {OVERRIDE}"
        return None

    def _error(self, message: str) -> Rejection:
        return Rejection(str(self.settings.nginx.conf), message)

    def _refuse(self, rendered: Rendered, reason: str, *, for_s: float | None) -> Result:
        """Remember a refused candidate (the last few): not tried again for
        ``for_s`` seconds (None: never)."""
        until = float("inf") if for_s is None else time.monotonic() + for_s
        self._refused[rendered.sha256] = (reason, until)
        while len(self._refused) > 16:
            del self._refused[next(iter(self._refused))]
        return Result(Outcome.REJECTED, self._error(reason))

    def _hold(self, table: RoutingTable, message: str) -> Result:
        return Result(
            Outcome.HELD, Rejection(self.settings.etcd.prefix.rstrip("/") + "/apps/", message)
        )
