"""What the router says after each apply: metrics, a log line per new
rejection, and its status in etcd, ``routers/<router-id>``, on a lease.

``Reporter`` turns an apply's Result into all three. ``StatusWriter`` keeps
the status key alive by refreshing the lease, so a dead router's key
disappears within its TTL. A refresh of an expired lease raises nothing and
returns TTL 0: then a new lease is granted and the status put again. Writes
never block the apply loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from routerd import keys
from routerd.errors import RouterdError, StoreError
from routerd.logs import log
from routerd.router.metrics import Metrics
from routerd.router.pipeline import GOOD, Outcome, Result
from routerd.routerstatus import Rejection, RouterStatus
from routerd.store import Store

logger = logging.getLogger("routerd.status")
WITHDRAW_S = 2.0


class StatusWriter:
    def __init__(self, store: Store, *, router_id: str, ttl: int) -> None:
        self.store = store
        self.key = keys.router(router_id)
        self.ttl = ttl
        self.status: RouterStatus | None = None
        self._dirty = asyncio.Event()
        self._lease: Any = None
        self._refreshed = 0.0  # monotonic time the lease was last granted or refreshed

    def update(self, status: RouterStatus) -> None:
        self.status = status
        self._dirty.set()

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._write_or_refresh()
                backoff = 0.2
            except StoreError as exc:
                log(logger, "status write failed", logging.WARNING, error=str(exc))
                self._lease = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _write_or_refresh(self) -> None:
        if self._lease is None:
            self._lease = await self.store.lease(self.ttl)
            self._refreshed = time.monotonic()
            self._dirty.set()
        if self._dirty.is_set():
            self._dirty.clear()  # cleared even with no status yet, or the wait below spins
            if self.status is not None:
                await self.store.put(self.key, self.status.to_json(), lease=self._lease)
        woken = False
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
        # cancellation that meets the event being set, and a SIGTERM then never stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.ttl / 3):
                await self._dirty.wait()
            woken = True
        if woken and time.monotonic() - self._refreshed < self.ttl / 3:
            return
        # A put does not refresh its lease: refresh on time even while writes keep
        # coming, or a router that changes often vanishes from routers/ every ttl.
        if await self.store.refresh(self._lease) <= 0:
            log(logger, "status lease expired; granting a new one", logging.WARNING)
            self._lease = None
            return
        self._refreshed = time.monotonic()

    async def withdraw(self) -> None:
        """On a clean stop: revoke the lease so the router disappears at once. Only
        briefly: with etcd unreachable the lease expires by itself, and a stop must
        not wait out the store's retries."""
        if self._lease is not None:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(WITHDRAW_S):
                    await self.store.revoke(self._lease)


class Reporter:
    """Metrics, rejection log lines and the status key, from each apply's outcome."""

    def __init__(
        self, metrics: Metrics, writer: StatusWriter, *, pool: str, conf: str, advertise: str
    ) -> None:
        self.metrics = metrics
        self.writer = writer
        self.pool = pool
        self.conf = conf
        self.advertise = advertise
        self._seen: set[Rejection] = set()
        self._live = 0  # the last revision nginx served in full

    def applied(self, revision: int, result: Result, served: str | None) -> None:
        self.metrics.applies.labels(outcome=result.outcome.value).inc()
        errors = list(result.table.errors) + ([result.error] if result.error else [])
        self._rejections(revision, errors)
        if result.outcome in GOOD and served:
            self.metrics.set_config(served)
            self.metrics.revision.set(revision)
            self._live = revision
        self.metrics.apps.set(len(result.table.apps))
        # A failed push is tried again (nginx restarting has no push socket for a
        # moment): until then nginx does not serve this revision, so the status
        # keeps the last one it does, and a deploy waiting for it waits on.
        shown = self._live if result.outcome is Outcome.PUSH_FAILED else revision
        self._status(shown, served, len(result.table.apps), errors)

    def failed(self, revision: int, exc: BaseException, served: str | None) -> None:
        """An apply raised (a full disk, a bug): the router keeps serving and says so."""
        detail = str(exc) if isinstance(exc, RouterdError) else repr(exc)  # ours name the cause
        log(logger, "apply failed", logging.ERROR, revision=revision, error=detail)
        logger.debug("apply failed", exc_info=exc)
        error = Rejection(self.conf, f"apply failed (retrying): {detail}")
        self._rejections(revision, [error])
        self._status(revision, served, None, [error])

    def _status(
        self, revision: int, served: str | None, apps: int | None, errors: list[Rejection]
    ) -> None:
        self.writer.update(
            RouterStatus(
                revision=revision,
                config_sha256=served or "",
                pool=self.pool,
                apps=apps,
                errors=tuple(errors),
                metrics=self.advertise,
            )
        )

    def _rejections(self, revision: int, errors: list[Rejection]) -> None:
        """Log and count each rejection once, when it first appears."""
        current = set(errors)
        for new in current - self._seen:
            log(
                logger, "rejected", logging.WARNING, revision=revision, key=new.key, error=new.error
            )
            self.metrics.rejections.inc()
        self._seen = current
        self.metrics.rejected_keys.set(len(current))
