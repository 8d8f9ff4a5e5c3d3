"""What the routers report: wait until every live router of a pool serves a revision.

Each router writes its ``RouterStatus`` on a lease after every snapshot it
processed: the revision, the config hash nginx serves and what it rejected.
A router that dies stops refreshing its lease and drops out of the set, so
"every live router" is re-read on every poll. The controller never touches
nginx itself: this is how it learns that its change is live.
"""

from __future__ import annotations

import asyncio
import time

from routerd import keys
from routerd.errors import DeployError, InvalidValue
from routerd.routerstatus import RouterStatus
from routerd.store import Snapshot, Store
from routerd.traffic import AppTraffic, fetch_traffic


def router_statuses(snapshot: Snapshot) -> tuple[list[RouterStatus], list[str]]:
    """Every router status in ``snapshot``, and the ids whose status is unreadable."""
    found, unreadable = [], []
    for rel, kv in snapshot.kvs.items():
        key = keys.parse(rel)
        if key.kind != "router":
            continue
        try:
            found.append(RouterStatus.from_json(key.name, kv.value))
        except InvalidValue:
            unreadable.append(key.name)
    return sorted(found, key=lambda r: r.router_id), sorted(unreadable)


async def live_routers(store: Store, pool: str) -> list[RouterStatus]:
    """The routers of ``pool`` whose status key is alive now (unreadable ones left out)."""
    found, _ = router_statuses(await store.range(keys.ROUTERS))
    return [r for r in found if r.pool == pool]


async def require_routers(store: Store, pool: str) -> list[RouterStatus]:
    """The live routers of ``pool``; DeployError when there is none."""
    routers = await live_routers(store, pool)
    if not routers:
        raise DeployError(
            f"no live router in pool {pool} (none reports under {keys.ROUTERS}); "
            "start one, or pass --no-wait-routers"
        )
    return routers


async def wait_for_routers(
    store: Store, *, pool: str, revision: int, timeout: float, interval: float = 0.05
) -> list[RouterStatus]:
    """Every live router of ``pool`` at ``revision`` or later; fails on none or on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        routers = await require_routers(store, pool)
        behind = [r for r in routers if r.revision < revision]
        if not behind:
            return routers
        if time.monotonic() >= deadline:
            raise DeployError(
                f"router(s) did not report revision {revision} within {timeout:g} s: "
                + ", ".join(_behind(r) for r in behind)
            )
        await asyncio.sleep(interval)


def _behind(router: RouterStatus) -> str:
    """A router that has not caught up, and the first error it reports (why, maybe)."""
    why = f" ({router.errors[0].error})" if router.errors else ""
    return f"{router.router_id} at {router.revision}{why}"


def check_serving(routers: list[RouterStatus], *, prefix: str, app: str, release: str) -> None:
    """Fail when a router reports an error that concerns ``release`` of ``app``."""
    for router in routers:
        for error in router.errors_about(prefix, app, release):
            raise DeployError(f"router {router.router_id} rejected {error.key}: {error.error}")


async def traffic_of(routers: list[RouterStatus], app: str) -> list[tuple[str, AppTraffic | str]]:
    """Each router's figures for ``app`` from its metrics server, or why there are none."""

    async def one(router: RouterStatus) -> tuple[str, AppTraffic | str]:
        if not router.metrics:
            return router.router_id, "its status names no metrics server (an older routerd)"
        try:
            return router.router_id, await fetch_traffic(router.metrics, app)
        except InvalidValue as exc:
            return router.router_id, str(exc)

    return list(await asyncio.gather(*(one(r) for r in routers)))
