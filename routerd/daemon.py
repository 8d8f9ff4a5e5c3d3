"""``routerd run``: the tasks around the pipeline.

    etcd event -> mirror -> debounce -> Router.apply (pipeline.py)
    -> router status (revision N) to etcd, metrics, health

Follows etcd (snapshot, watch from its revision, resume or re-snapshot),
debounces changes, runs one apply at a time, writes the router status on a
lease, watches the templates and the nginx master. Nothing here touches
nginx.conf: that is the pipeline's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from routerd import validate
from routerd.debounce import Debouncer
from routerd.errors import (
    StoreError,
    ValidationError,
)
from routerd.logs import log
from routerd.metrics import HealthServer, Metrics
from routerd.model import Rejection, Snapshot
from routerd.pipeline import Outcome, Router
from routerd.settings import Settings
from routerd.status import StatusWriter
from routerd.store import Compacted, Mirror, Store

logger = logging.getLogger("routerd.daemon")
WRITE_EVENTS = {"created", "modified", "deleted", "moved", "closed"}


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
        self._templates_dirty = False
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
        """Serve the last good config at once, before etcd is even reached.

        Sidecar mode: trust the installed file only if nginx serves it (a
        routerd killed between rename and SIGHUP left one it never loaded)."""
        ns = self.settings.nginx
        if not ns.supervise:
            live = await self.router.nginx.serving()
            if live is not None and live != self.router.served:
                log(logger, "nginx serves another config than the installed one; will reload")
                self.router.served = live
            return
        if not ns.conf.exists():
            return
        if self.router.nginx.adopt_running():
            log(logger, "adopted the running nginx master", pid=self.router.nginx.master_pid())
            self.router.served = await self.router.nginx.serving()
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
        """Swapped in by the apply loop, between renders (one runs in a thread)."""
        log(logger, "templates changed")
        self._templates_dirty = True
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
            if self._templates_dirty:
                self._templates_dirty = False
                self.router.renderer.reload_templates()
                self.mirror.changed = None  # render everything again
            await self._apply(*self.mirror.take())

    async def _apply(self, snapshot: Snapshot, changed: set[str] | None) -> None:
        try:
            table, result = await self.router.apply(snapshot, changed)
        except Exception as exc:  # disk full, a bug: keep serving, report, retry in a second
            log(logger, "apply failed", logging.ERROR, revision=snapshot.revision, error=repr(exc))
            logger.debug("apply failed", exc_info=True)
            self.mirror.changed = None
            self.router.table = None  # rebuild everything next time
            asyncio.get_running_loop().call_later(1.0, self.changed)
            error = Rejection(str(self.settings.nginx.conf), f"apply failed: {exc!r}")
            self._count_rejections(snapshot.revision, [error])
            self._write_status(snapshot.revision, None, [error])
            return
        self.metrics.applies.labels(outcome=result.outcome.value).inc()
        errors = list(table.errors) + ([result.error] if result.error else [])
        self._count_rejections(snapshot.revision, errors)
        if result.retry:
            asyncio.get_running_loop().call_later(1.0, self.changed)
        good = result.outcome in (Outcome.RELOADED, Outcome.UNCHANGED, Outcome.PUSHED)
        if good and self.router.served:
            self.ready = True
            self.metrics.set_config(self.router.served)
            self.metrics.revision.set(snapshot.revision)
        self.metrics.apps.set(len(table.apps))
        self._write_status(snapshot.revision, len(table.apps), errors)

    def _write_status(self, revision: int, apps: int | None, errors: list[Rejection]) -> None:
        self.status.update(
            {
                "revision": revision,
                "config_sha256": self.router.served or "",
                "applied_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pool": self.settings.pool,
                "apps": apps,
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
            adopt = live is not None and live != self.router.served and not self.router.busy
            if adopt and live is not None and live == installer.installed_generation():
                log(logger, "nginx serves the installed config", sha256=live[:12])
                self.router.adopt(live)
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
            backends.stale = True  # the pipeline starts over at its next push
            self.changed()
