"""The status writer's own loop: a stop always stops it.

The store is a fake that answers at once: what is proved here is the
writer's handling of asyncio cancellation, which no etcd can make happen
on cue. The writer against a real etcd is proved in the integration tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from routerd.router.status import StatusWriter
from routerd.routerstatus import RouterStatus


class AnsweringStore:
    """Grants, puts and refreshes at once; ``written`` is set by a put."""

    def __init__(self) -> None:
        self.written = asyncio.Event()

    async def lease(self, ttl: int) -> str:
        return "lease"

    async def put(self, key: str, value: bytes, lease: Any = None) -> None:
        self.written.set()

    async def refresh(self, lease: Any) -> int:
        return 30


def test_a_stop_that_meets_a_status_update_still_stops() -> None:
    """A cancel (SIGTERM) arriving as a new status wakes the writer ends it:
    asyncio.wait_for on Python 3.11 swallowed such a cancel, and the router
    that got SIGTERM right after its first apply never stopped."""

    async def scenario() -> None:
        store = AnsweringStore()
        writer = StatusWriter(store, router_id="r1", ttl=30)  # type: ignore[arg-type]
        task = asyncio.create_task(writer.run())
        writer.update(RouterStatus(1, "0" * 64, "shared"))
        async with asyncio.timeout(2):
            await store.written.wait()  # the first status is written; now it waits
        for _ in range(3):
            await asyncio.sleep(0)
        writer.update(RouterStatus(2, "0" * 64, "shared"))  # wakes the wait...
        task.cancel()  # ...in the same turn of the loop as the stop
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(2):
                await task

    asyncio.run(scenario())
