"""What a router says about itself in ``routers/<router-id>``: one typed value.

The router writes it after every snapshot it processed (on a lease, so a
dead router's key disappears); the deploy controller and ``routerd status``
read it back through ``RouterStatus.from_json``, the same code for both:

    {"revision": 1234, "config_sha256": "...", "applied_at": "2026-...Z",
     "pool": "shared", "apps": 12, "errors": [{"key": "...", "error": "..."}],
     "metrics": "10.0.1.5:9145"}

``revision`` is the etcd revision of the latest snapshot the router
processed and nginx now serves (it advances even when the rendering did not
change, so a waiting controller is never left hanging; it does not while a
failed push of the instance lists is being tried again); ``errors`` lists
every key it rejected, and whole-candidate failures under the path of
nginx.conf (a refused template, a rolled-back reload) or under the ``apps/``
prefix itself (a held shrink). ``metrics`` is where its metrics server
answers (``/metrics``, and ``/traffic?app=`` read by ``routerd.traffic``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from routerd import keys
from routerd.errors import InvalidValue


@dataclass(frozen=True)
class Rejection:
    """One thing a router refused: an etcd key (or a file path) and why."""

    key: str
    error: str


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class RouterStatus:
    revision: int
    config_sha256: str
    pool: str
    apps: int | None = None  # apps routed; None when an apply failed before counting
    errors: tuple[Rejection, ...] = ()
    applied_at: str = field(default_factory=utc_now)
    router_id: str = ""  # the key's last segment; not part of the JSON
    metrics: str = ""  # host:port of its metrics server; empty from older routers

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "revision": self.revision,
                "config_sha256": self.config_sha256,
                "applied_at": self.applied_at,
                "pool": self.pool,
                "apps": self.apps,
                "errors": [{"key": e.key, "error": e.error} for e in self.errors],
                "metrics": self.metrics,
            }
        ).encode()

    @classmethod
    def from_json(cls, router_id: str, raw: bytes) -> RouterStatus:
        """Read a status back; InvalidValue naming the router when it is not one."""
        where = keys.router(router_id)
        try:
            data = json.loads(raw)
            return cls(
                revision=_whole(data["revision"]),
                config_sha256=str(data.get("config_sha256", "")),
                pool=str(data.get("pool", "shared")),
                apps=None if data.get("apps") is None else _whole(data["apps"]),
                errors=tuple(
                    Rejection(str(e["key"]), str(e["error"])) for e in data.get("errors", [])
                ),
                applied_at=str(data.get("applied_at", "")),
                router_id=router_id,
                metrics=str(data.get("metrics", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidValue(where, f"not a router status: {exc!r}") from exc

    def errors_about(self, prefix: str, app: str, release: str) -> list[Rejection]:
        """Errors that keep ``release`` of ``app`` from being served as written.

        The app's routing keys, the release's instances, and anything that is
        not a routing key at all: a refused candidate (its key is a file
        path) or a held snapshot (the ``apps/`` prefix itself) keeps every
        change from going live.
        """
        own = tuple(
            keys.absolute(prefix, rel)
            for rel in (
                keys.config(app),
                keys.active(app),
                keys.weights(app),
                keys.release(app, release),
            )
        )
        everything = keys.absolute(prefix, keys.APPS)
        routing = tuple(keys.absolute(prefix, rel) for rel in keys.ROUTING)
        return [
            e
            for e in self.errors
            if e.key.startswith(own) or e.key == everything or not e.key.startswith(routing)
        ]


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")
    return value
