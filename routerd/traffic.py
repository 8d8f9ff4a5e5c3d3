"""One app's traffic as one router counted it: the typed value, its JSON form,
and how another program fetches it.

Every router counts each request it serves by app and release (the same
figures as ``routerd_http_requests_total`` and
``routerd_upstream_response_seconds`` on its ``/metrics``) and answers
``GET /traffic?app=<app>`` on its metrics server, whose address it writes in
its status (``metrics``). The deploy controller and ``routerd status <app>``
read a release's requests, 5xx and upstream latency from there:

    {"app": "shop", "releases": {"v2": {"requests": 120,
      "codes": {"2xx": 117, "5xx": 3},
      "upstream_seconds": {"buckets": [[0.005, 90], ..., ["+Inf", 118]],
                           "sum": 1.92, "count": 118}}}}

Counts start when the router starts; compare two readings for a rate.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from routerd.errors import InvalidValue


@dataclass(frozen=True)
class ReleaseTraffic:
    """Requests of one release on one router, and how long its instances took."""

    requests: int = 0
    codes: Mapping[str, int] = field(default_factory=dict)  # "2xx" .. "5xx"
    buckets: tuple[tuple[float, int], ...] = ()  # (upper bound, cumulative count), inf last
    seconds_sum: float = 0.0
    seconds_count: int = 0

    @property
    def errors(self) -> int:
        """Requests answered with a 5xx."""
        return self.codes.get("5xx", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "codes": dict(self.codes),
            "upstream_seconds": {
                "buckets": [["+Inf" if math.isinf(le) else le, n] for le, n in self.buckets],
                "sum": self.seconds_sum,
                "count": self.seconds_count,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleaseTraffic:
        upstream = data.get("upstream_seconds", {})
        return cls(
            requests=int(data["requests"]),
            codes={str(k): int(v) for k, v in data.get("codes", {}).items()},
            buckets=tuple((float(le), int(n)) for le, n in upstream.get("buckets", [])),
            seconds_sum=float(upstream.get("sum", 0.0)),
            seconds_count=int(upstream.get("count", 0)),
        )


@dataclass(frozen=True)
class AppTraffic:
    app: str
    releases: Mapping[str, ReleaseTraffic] = field(default_factory=dict)

    def to_json(self) -> bytes:
        releases = {name: r.to_dict() for name, r in sorted(self.releases.items())}
        return json.dumps({"app": self.app, "releases": releases}).encode()

    @classmethod
    def from_json(cls, where: str, raw: bytes) -> AppTraffic:
        """Read a router's answer; InvalidValue naming ``where`` when it is not one."""
        try:
            data = json.loads(raw)
            releases = {str(k): ReleaseTraffic.from_dict(v) for k, v in data["releases"].items()}
            return cls(str(data["app"]), releases)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidValue(where, f"not an app's traffic: {exc!r}") from exc


async def fetch_traffic(address: str, app: str, *, timeout: float = 2.0) -> AppTraffic:
    """``app``'s traffic from the router whose metrics server is at ``address``
    (host:port); InvalidValue naming the address when it does not answer one."""
    host, _, port = address.rpartition(":")
    where = f"http://{address}/traffic"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        try:
            writer.write(f"GET /traffic?app={quote(app)} HTTP/1.0\r\n\r\n".encode())
            async with asyncio.timeout(timeout):
                response = await reader.read()
        finally:
            writer.close()
    except (OSError, TimeoutError, ValueError) as exc:
        raise InvalidValue(where, f"no answer: {exc!r}") from exc
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise InvalidValue(where, head.split(b"\r\n", 1)[0].decode("ascii", "replace"))
    return AppTraffic.from_json(where, body)
