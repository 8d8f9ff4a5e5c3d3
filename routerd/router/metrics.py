"""Prometheus metrics and the small HTTP server for /healthz, /readyz, /metrics
and /traffic.

The daemon updates the metrics; this module only defines them and serves
them, with two health answers: healthy while etcd was heard from recently
(and a supervised nginx runs), ready once a config is live. ``/traffic?app=``
answers one app's per-release figures as JSON, from whatever the daemon
hands in (the per-app counts live in ``routerd.router.traffic``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("routerd.metrics")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.applies = Counter(
            "routerd_applies", "Snapshots processed, by outcome", ["outcome"], registry=r
        )
        self.reloads = Counter(
            "routerd_reloads", "nginx reloads, by result", ["result"], registry=r
        )
        self.pushes = Counter(
            "routerd_backend_pushes", "Instance changes applied inside nginx", registry=r
        )
        self.rollbacks = Counter("routerd_rollbacks", "Failed reloads rolled back", registry=r)
        self.rejections = Counter(
            "routerd_rejections", "etcd values rejected (each key once per bad value)", registry=r
        )
        self.rejected_keys = Gauge("routerd_rejected_keys", "Keys currently rejected", registry=r)
        self.render_seconds = Histogram(
            "routerd_render_seconds", "Render time", buckets=BUCKETS, registry=r
        )
        self.validate_seconds = Histogram(
            "routerd_validate_seconds", "crossplane and nginx -t time", buckets=BUCKETS, registry=r
        )
        self.reload_seconds = Histogram(
            "routerd_reload_seconds",
            "SIGHUP until the new generation answers",
            buckets=BUCKETS,
            registry=r,
        )
        self.revision = Gauge("routerd_applied_revision", "etcd revision nginx serves", registry=r)
        self.config = Gauge(
            "routerd_config_info", "The config generation served", ["sha256"], registry=r
        )
        self.apps = Gauge("routerd_apps", "Apps routed", registry=r)
        self.etcd_age = Gauge(
            "routerd_etcd_last_heard_seconds", "Seconds since etcd last answered", registry=r
        )

    def set_config(self, sha256: str) -> None:
        self.config.clear()
        self.config.labels(sha256=sha256).set(1)


class HealthServer:
    """/healthz, /readyz and /metrics on --metrics-listen."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        traffic: Callable[[str], bytes] | None = None,
    ) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        self.traffic = traffic  # app -> its figures as JSON
        self._server: asyncio.Server | None = None

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(
            OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
        ):
            async with asyncio.timeout(5.0):
                request = await reader.readuntil(b"\r\n\r\n")
            parts = request.split(b" ", 2)
            target = parts[1].decode("ascii", "replace") if len(parts) > 1 else ""
            path, _, query = target.partition("?")
            status, content_type, body = self._route(path, query)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    def _route(self, path: str, query: str = "") -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/traffic" and self.traffic is not None:
            apps = parse_qs(query).get("app", [])
            if len(apps) != 1:
                return "400 Bad Request", "text/plain", b"give one app: /traffic?app=<app>\n"
            return "200 OK", "application/json", self.traffic(apps[0])
        checks = {"/healthz": self.healthy, "/readyz": self.ready}
        if path not in checks:
            return "404 Not Found", "text/plain", b"not found\n"
        ok, reason = checks[path]()
        status = "200 OK" if ok else "503 Service Unavailable"
        return status, "text/plain", (reason + "\n").encode()
