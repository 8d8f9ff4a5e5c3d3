"""``routerd run``: the tasks around the pipeline, and nothing else.

    etcd event -> Mirror (follow.py) -> debounce -> Router.apply (pipeline.py)
    -> Reporter: metrics, router status (revision N) to etcd (status.py)

Four tasks in one TaskGroup: follow etcd, apply (one at a time, debounced),
keep the status lease alive, and watch nginx (restart, adopt, readiness)
and the balancer table. A watchdog thread marks template edits, which are
swapped in between renders; another thread tails nginx's traffic log
(traffic.py), told of each new routing table. /healthz, /readyz, /metrics
and /traffic are served from here. Nothing here touches nginx.conf: that
is the pipeline's alone.
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
from routerd.router.model import RoutingTable
from routerd.router.pipeline import GOOD, Router, lua_support
from routerd.router.settings import Settings
from routerd.router.status import Reporter, StatusWriter
from routerd.router.traffic import AccessLog, TrafficCounts, TrafficLog
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
            self.metrics,
            self.status,
            pool=settings.pool,
            conf=str(settings.nginx.conf),
            advertise=settings.metrics_advertise,
        )
        self.counts = TrafficCounts() if settings.traffic_metrics else None
        if self.counts is not None:
            self.metrics.registry.register(self.counts)
        self.traffic = self._traffic_log()
        self.debouncer = Debouncer(settings.debounce_min, settings.debounce_max)
        self._wake = asyncio.Event()
        self._templates_dirty = False
        self._traffic_table: RoutingTable | None = None  # what the traffic log names releases by

    def _traffic_log(self) -> TrafficLog | None:
        path, settings = self.settings.nginx.traffic_log, self.settings
        if path is None:
            return None
        access_log = None
        if settings.access_log != "off":
            access_log = AccessLog(settings.access_log, settings.access_log_format)
        return TrafficLog(
            path,
            counts=self.counts,
            access_log=access_log,
            reopen=self.router.nginx.master.reopen_logs,
        )

    def traffic_json(self, app: str) -> bytes:
        assert self.counts is not None  # served only with traffic metrics on
        return self.counts.report(app).to_json()

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
        server = HealthServer(
            self.metrics,
            healthy=self.healthy,
            ready=self.is_ready,
            traffic=self.traffic_json if self.counts is not None else None,
        )
        await server.start(self.settings.metrics_listen)
        if self.traffic is not None:
            self.traffic.start()
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
            if self.traffic is not None:
                self.traffic.stop()  # after nginx: its last lines are counted and logged
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
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
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
        # Only a table nginx serves: a held or refused one may lack apps still served.
        if (
            self.traffic is not None
            and result.outcome in GOOD
            and result.table is not self._traffic_table
        ):
            self._traffic_table = result.table
            await asyncio.to_thread(self.traffic.update, result.table)
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
