"""The apply loop: etcd events in, confirmed nginx generations out.

    etcd event -> debounce -> snapshot at revision N -> model (validated)
    -> render -> unchanged? stop -> write shard files -> stage nginx.conf
    -> crossplane (new files) + nginx -t -> rename (previous kept)
    -> SIGHUP -> confirm generation -> status (revision N) to etcd

``Router.apply`` holds that sequence and returns an Outcome. Any failure
leaves the running nginx untouched (or puts the previous file back), is
logged with the revision and the reason, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routerd import validate
from routerd.backends import Backends, detect_lua, table_of
from routerd.debounce import Debouncer
from routerd.errors import (
    ConfigError,
    NginxNotRunning,
    ReloadError,
    RenderError,
    StoreError,
    ValidationError,
)
from routerd.logs import log
from routerd.metrics import HealthServer, Metrics
from routerd.model import Loader, Rejection, RoutingTable, Snapshot
from routerd.nginx import Installer, Nginx
from routerd.render import Layout, Lua, Rendered, Renderer
from routerd.settings import Settings
from routerd.status import StatusWriter
from routerd.store import Compacted, Mirror, Store

logger = logging.getLogger("routerd.daemon")
OVERRIDE = "kept the last config (run with --allow-shrink to apply such a snapshot)"
WRITE_EVENTS = {"created", "modified", "deleted", "moved", "closed"}


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
        self.nginx.prepare_runtime()
        self.installer.remove_stale_temporaries()
        self.served = self.installer.installed_generation()
        self.served_apps: set[str] | None = None  # unknown until the first apply
        self.table: RoutingTable | None = None  # the last one built
        self._checked: set[str] = set()  # shard files crossplane already passed
        self._refused: dict[str, str] = {}  # candidate sha -> why it was refused

    # -- the straight line

    async def apply(
        self, snapshot: Snapshot, changed: set[str] | None = None
    ) -> tuple[RoutingTable, Result]:
        """One snapshot through the straight line; ``changed`` names the keys
        that changed since the last call (None: unknown, load everything)."""
        started = time.monotonic()
        table = self._load_changed(snapshot, changed)
        if table is None:
            table = await asyncio.to_thread(self.loader.load, snapshot)
        self.table = table
        try:
            rendered = await asyncio.to_thread(self.renderer.render, table)
        except RenderError as exc:
            return table, Result(
                Outcome.REJECTED, Rejection(str(self.settings.nginx.templates), str(exc))
            )
        self.metrics.render_seconds.observe(time.monotonic() - started)
        if rendered.sha256 == self.served:
            if table.dirty is None:  # Loader.update keeps the same apps
                self.served_apps = {a.name for a in table.apps}
            return table, await self._push(table)
        if (shrink := self._shrink_error(table)) is not None:
            return table, self._hold(table, shrink)
        if rendered.sha256 in self._refused:  # the same bad candidate again: no disk churn
            return table, Result(Outcome.REJECTED, self._error(self._refused[rendered.sha256]))
        return table, await self._install(table, rendered, started)

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
            return self._refuse(rendered, f"{exc} (candidate kept in {folder})")
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
            return Result(Outcome.REJECTED, self._error(f"installed, not live: {exc}"))
        except ReloadError as exc:
            return await self._roll_back(table, rendered, new_files, exc)
        self.served, self.served_apps = rendered.sha256, {a.name for a in table.apps}
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

    async def _push(self, table: RoutingTable) -> Result:
        """Dynamic backends: hand nginx the instance lists that changed, no reload."""
        if self.backends is None:
            return Result(Outcome.UNCHANGED)
        changes = self.backends.changes(table)
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
        if self.settings.nginx.supervise and self.nginx.process is None:
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
        self.metrics.rollbacks.inc()
        folder = self.installer.keep_failed_candidate(self.installer.conf, new_files, str(exc))
        restored = self.installer.restore_previous()
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
                )
            except ReloadError as again:
                reason += f"; reloading the previous config failed too: {again}"
        log(logger, "rolled back", logging.ERROR, revision=table.revision, error=str(exc))
        self._refuse(rendered, reason)
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

    def _refuse(self, rendered: Rendered, reason: str) -> Result:
        """Remember a refused candidate (the last few) so it is not tried again."""
        self._refused[rendered.sha256] = reason
        while len(self._refused) > 16:
            del self._refused[next(iter(self._refused))]
        return Result(Outcome.REJECTED, self._error(reason))

    def _hold(self, table: RoutingTable, message: str) -> Result:
        return Result(
            Outcome.HELD, Rejection(self.settings.etcd.prefix.rstrip("/") + "/apps/", message)
        )


class Daemon:
    """``routerd run``: follows etcd, debounces, applies, reports."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.router = Router(settings, self.metrics)
        self.store = Store(settings.etcd)
        self.mirror = Mirror()
        self.status = StatusWriter(
            self.store, router_id=settings.router_id, ttl=settings.status_ttl
        )
        self.debouncer = Debouncer(settings.debounce_min, settings.debounce_max)
        self._wake = asyncio.Event()
        self._seen_errors: set[Rejection] = set()
        self.ready = False

    def changed(self) -> None:
        self.debouncer.notify(time.monotonic())
        self._wake.set()

    # -- health

    def healthy(self) -> tuple[bool, str]:
        age = time.monotonic() - self.store.last_heard
        if age > self.settings.stale_after:
            return False, f"etcd last heard {age:.0f} s ago"
        if (code := self.router.nginx.exited()) is not None:
            return False, f"nginx exited with code {code}"
        return True, "ok"

    def is_ready(self) -> tuple[bool, str]:
        return (True, "ok") if self.ready else (False, "no config confirmed live yet")

    # -- tasks

    async def run(self) -> None:
        server = HealthServer(self.metrics, healthy=self.healthy, ready=self.is_ready)
        await server.start(self.settings.metrics_listen)
        self.metrics.etcd_age.set_function(lambda: time.monotonic() - self.store.last_heard)
        await self._adopt_installed()
        observer = self._watch_templates()
        tasks = [
            asyncio.create_task(self._follow_etcd(), name="follow-etcd"),
            asyncio.create_task(self._apply_loop(), name="apply"),
            asyncio.create_task(self.status.run(), name="status"),
            asyncio.create_task(self._watch_nginx(), name="watch-nginx"),
        ]
        log(
            logger,
            "started",
            router_id=self.settings.router_id,
            pool=self.settings.pool,
            conf=str(self.settings.nginx.conf),
        )
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if observer is not None:
                observer.stop()
            await self.status.withdraw()
            await self.store.close()
            await server.stop()
            self.router.nginx.stop()
            log(logger, "stopped")

    async def _adopt_installed(self) -> None:
        """Serve the last good config at once, before etcd is even reached."""
        ns = self.settings.nginx
        if not (ns.supervise and ns.conf.exists()):
            return
        try:
            await asyncio.to_thread(validate.nginx_test, ns.binary, ns.conf, ns.runtime_dir)
        except ValidationError as exc:
            log(logger, "installed config not usable", logging.WARNING, error=str(exc))
            self.router.served = None
            return
        self.router.nginx.start()
        log(logger, "serving installed config", sha256=(self.router.served or "")[:12])

    def _watch_templates(self) -> Any:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                # watchdog also reports reads (opened, closed_no_write): only writes count
                if not event.is_directory and event.event_type in WRITE_EVENTS:
                    loop.call_soon_threadsafe(daemon._templates_changed)

        observer = Observer()
        observer.schedule(Handler(), str(self.settings.nginx.templates), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def _templates_changed(self) -> None:
        log(logger, "templates changed")
        self.router.renderer.reload_templates()
        self.mirror.changed = None  # render everything again
        self.changed()

    async def _follow_etcd(self) -> None:
        """Snapshot, then watch from its revision; resume or re-snapshot on failure."""
        need_snapshot, backoff = True, 0.2
        while True:
            try:
                if need_snapshot:
                    snapshot = await self.store.snapshot()
                    if self.mirror.reset(snapshot) or not self.ready:
                        self.changed()
                    need_snapshot = False
                    log(logger, "snapshot", revision=snapshot.revision, keys=len(snapshot.kvs))
                async with asyncio.timeout(self.settings.resync_interval):
                    async for event in self.store.watch(self.mirror.revision + 1):
                        if self.mirror.apply(event):
                            self.changed()
                        backoff = 0.2
            except TimeoutError:
                need_snapshot = True  # periodic resync: a watch can die silently
            except Compacted as exc:
                log(logger, "compacted; taking a new snapshot", logging.WARNING, error=str(exc))
                need_snapshot = True
            except StoreError as exc:
                log(
                    logger,
                    "etcd unreachable; retrying",
                    logging.WARNING,
                    error=str(exc),
                    retry_in_s=backoff,
                    resume_revision=self.mirror.revision + 1,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _apply_loop(self) -> None:
        while True:
            deadline = self.debouncer.deadline()
            if deadline is None or deadline > time.monotonic():
                self._wake.clear()
                timeout = None if deadline is None else deadline - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            self.debouncer.reset()
            await self._apply(*self.mirror.take())

    async def _apply(self, snapshot: Snapshot, changed: set[str] | None) -> None:
        try:
            table, result = await self.router.apply(snapshot, changed)
        except OSError as exc:  # disk full, permissions: keep serving, report, retry on next change
            log(logger, "apply failed", logging.ERROR, revision=snapshot.revision, error=str(exc))
            self.mirror.changed = None
            return
        self.metrics.applies.labels(outcome=result.outcome.value).inc()
        errors = list(table.errors) + ([result.error] if result.error else [])
        self._count_rejections(snapshot.revision, errors)
        if result.retry:
            asyncio.get_running_loop().call_later(1.0, self.changed)
        if (
            result.outcome in (Outcome.RELOADED, Outcome.UNCHANGED, Outcome.PUSHED)
            and self.router.served
        ):
            self.ready = True
            self.metrics.set_config(self.router.served)
        self.metrics.revision.set(snapshot.revision)
        self.metrics.apps.set(len(table.apps))
        self.status.update(
            {
                "revision": snapshot.revision,
                "config_sha256": self.router.served or "",
                "applied_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pool": self.settings.pool,
                "apps": len(table.apps),
                "errors": [{"key": e.key, "error": e.error} for e in errors],
            }
        )

    def _count_rejections(self, revision: int, errors: list[Rejection]) -> None:
        current = set(errors)
        for new in current - self._seen_errors:
            log(
                logger, "rejected", logging.WARNING, revision=revision, key=new.key, error=new.error
            )
            self.metrics.rejections.inc()
        self._seen_errors = current
        self.metrics.rejected_keys.set(len(current))

    async def _watch_nginx(self) -> None:
        """Every second: restart a supervised master that died, and adopt what
        nginx serves when it is the installed file (a sidecar's nginx that
        started after routerd, or restarted)."""
        nginx, installer = self.router.nginx, self.router.installer
        while True:
            await asyncio.sleep(1.0)
            code = nginx.exited()
            if code is not None and installer.conf.exists():
                log(logger, "nginx exited; restarting", logging.ERROR, code=code)
                nginx.start()
            live = await nginx.serving()
            adopt = live is not None and live != self.router.served
            if adopt and live == installer.installed_generation():
                log(logger, "nginx serves the installed config", sha256=live[:12])
                self.router.served = live
                self.changed()
            self.ready = live is not None and live == self.router.served
            await self._check_backends()

    async def _check_backends(self) -> None:
        """An nginx that restarted loaded the table file, which may be older
        than the last push: then push the whole table again."""
        backends = self.router.backends
        if backends is None or backends.pushed is None:
            return
        held = await backends.held_revision()
        if held is not None and held < backends.revision:
            log(logger, "nginx holds an older backend table; pushing it whole", held=held)
            backends.pushed = None
            self.changed()
