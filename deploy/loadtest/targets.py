"""Where the load goes: the routers, and the apps behind them by Host header.

Three sources, one shape (``Targets``): a JSON file, etcd read through
routerd's own loader (the apps a router of that pool would route, each at its
first plain domain), or flags. Every entry is checked here, so a typo in a
targets file stops the test at once with the entry named, instead of
counting as failed requests.

    {"routers": ["http://10.0.0.5:80", "http://10.0.0.6:80"],
     "apps": [{"name": "shop", "host": "shop.example.com", "weight": 3,
               "expect": "shop", "path": "/"}]}

``expect`` is text every answer of that app must contain (the apps of
routerd's test image answer with their app name); an answer without it is a
misroute, counted as a failure. Empty: any 2xx or 3xx answer counts.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOST = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
MAX_WEIGHT = 1000


class TargetsError(ValueError):
    """A targets file, flag or etcd read that cannot drive a load test."""


@dataclass(frozen=True)
class App:
    name: str
    host: str
    weight: int = 1
    expect: str = ""
    path: str = "/"


@dataclass(frozen=True)
class Targets:
    routers: tuple[str, ...]
    apps: tuple[App, ...]

    def to_json(self) -> str:
        return json.dumps({"routers": list(self.routers), "apps": [asdict(a) for a in self.apps]})


def parse(data: Any, where: str) -> Targets:
    """Targets from decoded JSON; TargetsError naming ``where`` and the entry."""
    if not isinstance(data, dict) or set(data) - {"routers", "apps"}:
        raise TargetsError(f"{where}: must be an object with 'routers' and 'apps'")
    routers = tuple(_router(where, r) for r in data.get("routers") or [])
    apps = tuple(_app(where, i, a) for i, a in enumerate(data.get("apps") or []))
    if not routers:
        raise TargetsError(f"{where}: no router to send load to")
    if not apps:
        raise TargetsError(f"{where}: no app to send load to")
    return Targets(routers, apps)


def _router(where: str, value: Any) -> str:
    url = urlsplit(value) if isinstance(value, str) else None
    if (
        url is None
        or url.scheme not in ("http", "https")
        or not url.hostname
        or url.path.strip("/")
    ):
        raise TargetsError(f"{where}: router {value!r} is not a base URL like http://10.0.0.5:80")
    return str(value).rstrip("/")


def _app(where: str, index: int, value: Any) -> App:
    label = f"{where}: apps[{index}]"
    if not isinstance(value, dict) or not {"name", "host"} <= set(value):
        raise TargetsError(f"{label} needs at least 'name' and 'host'")
    unknown = set(value) - {"name", "host", "weight", "expect", "path"}
    if unknown:
        raise TargetsError(f"{label} has unknown field(s) {sorted(unknown)}")
    app = App(**value)
    if not isinstance(app.host, str) or HOST.fullmatch(app.host) is None:
        raise TargetsError(f"{label}: host {app.host!r} is not a lowercase host name")
    weight_ok = isinstance(app.weight, int) and not isinstance(app.weight, bool)
    if not weight_ok or not 0 < app.weight <= MAX_WEIGHT:
        raise TargetsError(f"{label}: weight {app.weight!r} is not a whole number 1..{MAX_WEIGHT}")
    if not isinstance(app.path, str) or not app.path.startswith("/") or " " in app.path:
        raise TargetsError(f"{label}: path {app.path!r} must start with / and hold no space")
    if not isinstance(app.expect, str) or not isinstance(app.name, str):
        raise TargetsError(f"{label}: name and expect must be text")
    return app


def from_file(path: str) -> Targets:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TargetsError(f"{path}: {exc}") from exc
    return parse(data, path)


def from_flags(routers: str, apps: list[str]) -> Targets:
    """``--routers URL,URL`` and ``--app NAME=HOST[:WEIGHT]`` (repeatable); each
    app is expected to answer with its name."""
    entries = []
    for item in apps:
        name, sep, rest = item.partition("=")
        host, _, weight = rest.partition(":")
        if not sep or (weight and not weight.isdigit()):
            raise TargetsError(f"--app {item!r} must be NAME=HOST or NAME=HOST:WEIGHT")
        entries.append({"name": name, "host": host, "weight": int(weight or 1), "expect": name})
    return parse({"routers": [r for r in routers.split(",") if r], "apps": entries}, "flags")


def from_etcd(routers: str, endpoints: str, prefix: str, pool: str, check: bool) -> Targets:
    """The apps a router of ``pool`` routes, as routerd itself reads etcd."""
    from routerd.router.loader import Loader
    from routerd.settings import EtcdSettings, parse_endpoints
    from routerd.store import Store

    async def read() -> Any:
        settings = EtcdSettings(endpoints=parse_endpoints("--etcd", endpoints), prefix=prefix)
        async with Store(settings) as store:
            return await store.snapshot()

    table = Loader(prefix=prefix, pool=pool).load(asyncio.run(read()))
    apps = []
    for app in table.apps:
        host = next((d for d in app.domains if not d.startswith("*.")), None)
        if host is not None and app.instances:
            apps.append({"name": app.name, "host": host, "expect": app.name if check else ""})
    return parse({"routers": [r for r in routers.split(",") if r], "apps": apps}, "etcd")
