"""Following etcd: a snapshot, then a watch from its revision, kept current.

``Mirror`` holds the routing keys as last seen and which of them changed
since the apply loop last took them. ``Follower.run`` fills it: it lists the
whole prefix, watches from the next revision, resumes from the last revision
seen when the stream breaks (with backoff), lists again when that revision
was compacted, and lists again every ``resync`` seconds anyway, since a
watch can die silently. Does not parse values or render anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from routerd import keys
from routerd.errors import Compacted, StoreError
from routerd.logs import log
from routerd.store import Event, KeyValue, Snapshot, Store

logger = logging.getLogger("routerd.follow")


class Mirror:
    """The routing keys as last seen: a snapshot kept current by watch events.

    Only ``apps/`` and ``certs/`` are routing input; ``routers/`` (where this
    router writes its own status), ``hosts/`` and ``pools/`` are left out, so
    a status write never comes back as a change.
    """

    def __init__(self) -> None:
        self.revision = 0
        self.kvs: dict[str, KeyValue] = {}
        self.changed: set[str] | None = None  # keys changed since taken; None: everything

    def reset(self, snapshot: Snapshot) -> bool:
        """Take a fresh snapshot; True when it differs from what was mirrored."""
        kvs = {k: v for k, v in snapshot.kvs.items() if k.startswith(keys.ROUTING)}
        differs = kvs != self.kvs
        self.kvs = kvs
        self.revision = max(self.revision, snapshot.revision)
        if differs:
            self.changed = None
        return differs

    def apply(self, event: Event) -> bool:
        """Apply one event; False when it is not routing input.

        The watch always resumes at revision + 1, so no event is stale.
        """
        self.revision = max(self.revision, event.revision)
        if not event.key.startswith(keys.ROUTING):
            return False
        if event.kv is None:
            self.kvs.pop(event.key, None)
        else:
            self.kvs[event.key] = event.kv
        if self.changed is not None:
            self.changed.add(event.key)
        return True

    def everything_changed(self) -> None:
        """The next take reports every key as changed (templates changed, an apply failed)."""
        self.changed = None

    def take(self) -> tuple[Snapshot, set[str] | None]:
        """The current snapshot and the keys changed since the last take (None: all)."""
        changed, self.changed = self.changed, set()
        return Snapshot(self.revision, dict(self.kvs)), changed


class Follower:
    """Keeps a Mirror current; calls ``changed`` whenever routing input moved,
    and after every full read while nothing is live yet (``live`` says)."""

    def __init__(
        self,
        store: Store,
        mirror: Mirror,
        *,
        changed: Callable[[], None],
        live: Callable[[], bool],
        resync: float,
    ) -> None:
        self.store = store
        self.mirror = mirror
        self.changed = changed
        self.live = live
        self.resync = resync

    async def run(self) -> None:
        need_snapshot, backoff = True, 0.2
        while True:
            try:
                if need_snapshot:
                    await self._snapshot()
                    need_snapshot = False
                async with asyncio.timeout(self.resync):
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

    async def _snapshot(self) -> None:
        snapshot = await self.store.snapshot()
        if self.mirror.reset(snapshot) or not self.live():
            self.changed()
        log(logger, "snapshot", revision=snapshot.revision, keys=len(snapshot.kvs))
