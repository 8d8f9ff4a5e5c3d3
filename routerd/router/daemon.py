"""``routerd run``: the tasks around the pipeline, and nothing else.

    etcd event -> Mirror (follow.py) -> debounce -> Router.apply (pipeline.py)
    -> Reporter: metrics, router status (revision N) to etcd (status.py)

Four tasks in one TaskGroup: follow etcd, apply (one at a time, debounced),
keep the status lease alive, and watch nginx (restart, adopt, readiness)
and the balancer table. A watchdog thread marks template edits, which are
swapped in between renders. /healthz, /readyz and /metrics are served
from here. Nothing here touches nginx.conf: that is the pipeline's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from routerd.logs import log
from routerd.router.debounce import Debouncer
from routerd.router.follow import Follower, Mirror
from routerd.router.metrics import HealthServer, Metrics
from routerd.router.pipeline import Router, lua_support
from routerd.router.settings import Settings
from routerd.router.status import Reporter, StatusWriter
from routerd.store import Store

logger = logging.getLogger("routerd.daemon")
WRITE_EVENTS = {"created", "modified", "deleted", "moved", "closed"}
APPLY_FAILED_RETRY_S = 1.0


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.router = Router.create(settings, self.metrics, lua_support(settings))
        self.store = Store(settings.etcd)
        self.mirror = Mirror()
        self.follower = Follower(
            self.store,
            self.mirror,
            changed=self.changed,
            live=lambda: self.router.nginx.ready,
            resync=settings.resync_interval,
        )
        self.status = StatusWriter(
            self.store, router_id=settings.router_id, ttl=settings.status_ttl
        )
        self.reporter = Reporter(
            self.metrics, self.status, pool=settings.pool, conf=str(settings.nginx.conf)
        )
        self.debouncer = Debouncer(settings.debounce_min, settings.debounce_max)
        self._wake = asyncio.Event()
        self._templates_dirty = False

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
        return (True, "ok") if self.router.nginx.ready else (False, "no config confirmed live yet")

    # -- tasks

    async def run(self) -> None:
        server = HealthServer(self.metrics, healthy=self.healthy, ready=self.is_ready)
        await server.start(self.settings.metrics_listen)
        self.metrics.etcd_age.set_function(lambda: time.monotonic() - self.store.last_heard)
        await self.router.start()
        observer = self._watch_templates()
        log(
            logger,
            "started",
            router_id=self.settings.router_id,
            pool=self.settings.pool,
            conf=str(self.settings.nginx.conf),
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.follower.run(), name="follow-etcd")
                tasks.create_task(self._apply_loop(), name="apply")
                tasks.create_task(self.status.run(), name="status")
                tasks.create_task(self._watch_nginx(), name="watch-nginx")
        finally:
            observer.stop()
            await self.status.withdraw()
            await self.store.close()
            await server.stop()
            self.router.nginx.stop()
            log(logger, "stopped")

    def _watch_templates(self) -> Any:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
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
                self.mirror.everything_changed()
            await self._apply()

    async def _apply(self) -> None:
        snapshot, changed = self.mirror.take()
        loop = asyncio.get_running_loop()
        try:
            result = await self.router.apply(snapshot, changed)
        except Exception as exc:  # noqa: BLE001  (disk full, a bug: keep serving, report, retry)
            self.mirror.everything_changed()
            self.router.table = None  # rebuild everything next time
            loop.call_later(APPLY_FAILED_RETRY_S, self.changed)
            self.reporter.failed(snapshot.revision, exc, self.router.nginx.served)
            return
        if result.retry_in is not None:
            loop.call_later(result.retry_in, self.changed)
        self.reporter.applied(snapshot.revision, result, self.router.nginx.served)

    async def _watch_nginx(self) -> None:
        """Every second: nginx's own checks, then the balancer table's."""
        while True:
            await asyncio.sleep(1.0)
            installed = self.router.installer.installed_generation()
            if await self.router.nginx.check(installed):
                self.changed()
            if await self.router.check_backends():
                self.changed()
