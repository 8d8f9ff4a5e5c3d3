"""What the routers report: wait until every live router of a pool serves a revision.

Each router writes ``routers/<id>`` on a lease after every snapshot it
processed (SPEC 2): the revision, the config hash nginx serves and what it
rejected. A router that dies stops refreshing its lease and drops out of the
set, so "every live router" is re-read on every poll. The controller never
touches nginx itself: this is how it learns that its change is live.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from routerd.errors import DeployError
from routerd.store import Store


@dataclass(frozen=True)
class RouterReport:
    router_id: str
    pool: str
    revision: int
    config_sha256: str
    errors: tuple[tuple[str, str], ...]  # (key, error)

    def errors_about(self, prefix: str, app: str, release: str) -> list[tuple[str, str]]:
        """Errors that keep ``release`` of ``app`` from being served as written.

        The app's config and active keys, the release's instances, and
        anything that is not a key at all: a refused candidate (its key is a
        file path) or a held snapshot (the ``apps/`` prefix itself) keeps
        every change from going live.
        """
        root = prefix.rstrip("/") + "/"
        base = f"{root}apps/{app}/"
        own = (f"{base}config", f"{base}active", f"{base}releases/{release}/")
        keys = (f"{root}apps/", f"{root}certs/")
        return [
            (key, error)
            for key, error in self.errors
            if key.startswith(own) or key == keys[0] or not key.startswith(keys)
        ]


def parse_report(router_id: str, raw: bytes) -> RouterReport | None:
    try:
        data = json.loads(raw)
        errors = tuple((str(e["key"]), str(e["error"])) for e in data.get("errors", []))
        return RouterReport(
            router_id,
            str(data.get("pool", "shared")),
            int(data["revision"]),
            str(data.get("config_sha256", "")),
            errors,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def live_routers(store: Store, pool: str) -> list[RouterReport]:
    """The routers of ``pool`` whose status key is alive now (unreadable ones left out)."""
    snapshot = await store.range("routers/")
    reports = (parse_report(key.split("/", 1)[1], kv.value) for key, kv in snapshot.kvs.items())
    return sorted((r for r in reports if r and r.pool == pool), key=lambda r: r.router_id)


async def require_routers(store: Store, pool: str) -> list[RouterReport]:
    """The live routers of ``pool``; DeployError when there is none."""
    routers = await live_routers(store, pool)
    if not routers:
        raise DeployError(
            f"no live router in pool {pool} (none reports under routers/); "
            "start one, or pass --no-wait-routers"
        )
    return routers


async def wait_for_routers(
    store: Store, *, pool: str, revision: int, timeout: float, interval: float = 0.05
) -> list[RouterReport]:
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
                + ", ".join(f"{r.router_id} at {r.revision}" for r in behind)
            )
        await asyncio.sleep(interval)


def check_serving(routers: list[RouterReport], *, prefix: str, app: str, release: str) -> None:
    """Fail when a router reports an error that concerns ``release`` of ``app``."""
    for router in routers:
        for key, error in router.errors_about(prefix, app, release):
            raise DeployError(f"router {router.router_id} rejected {key}: {error}")
