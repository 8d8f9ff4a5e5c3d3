"""The router's status in etcd (SPEC 2): ``routers/<router-id>`` on a lease.

Written after every processed snapshot and kept alive by refreshing the
lease, so a dead router's key disappears within its TTL. A refresh of an
expired lease raises nothing and returns TTL 0 (FACTS.md): then a new lease
is granted and the status put again. Writes never block the apply loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from routerd.errors import StoreError
from routerd.logs import log
from routerd.store import Store

logger = logging.getLogger("routerd.status")


class StatusWriter:
    def __init__(self, store: Store, *, router_id: str, ttl: int) -> None:
        self.store = store
        self.key = f"routers/{router_id}"
        self.ttl = ttl
        self.status: dict[str, Any] | None = None
        self._dirty = asyncio.Event()
        self._lease: Any = None
        self._refreshed = 0.0  # monotonic time the lease was last granted or refreshed

    def update(self, status: dict[str, Any]) -> None:
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
                await self.store.put(self.key, json.dumps(self.status).encode(), lease=self._lease)
        woken = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._dirty.wait(), self.ttl / 3)
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
        """On a clean stop: revoke the lease so the router disappears at once."""
        if self._lease is not None:
            with contextlib.suppress(StoreError):
                await self.store.revoke(self._lease)
