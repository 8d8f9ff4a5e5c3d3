"""The etcd layout: every key routerd reads or writes, built and parsed here.

Keys are relative to the prefix (``--prefix``, default ``/routerd``); only
``absolute`` puts the prefix in front. No other module spells a key path.

    apps/<app>/config                       the app's settings (JSON)
    apps/<app>/active                       the release that takes traffic
    apps/<app>/weights                      traffic share per release (JSON)
    apps/<app>/env                          config vars (JSON)
    apps/<app>/releases/<release>/<inst>    host:port of one instance
    apps/<app>/history/<release>            how a release was made (controller)
    apps/<app>/version                      the last release's version number (controller)
    apps/<app>/lock                         one deploy at a time (controller)
    apps/<app>/abort                        a request to abort the running canary (controller)
    certs/<domain>                          a TLS pair (JSON)
    routers/<router-id>                     a router's status, on a lease
    hosts/<host>                            a Docker host, for placement
    pools/<pool>                            the host tags of a pool (JSON)

The name rules live here too, since a name is part of a key: apps (and
pools) are DNS labels, releases, instances and hosts a little freer.
``parse_release_name`` and ``parse_weights`` are the one reading of
``active`` and of ``weights``, shared by the routers and the controller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from routerd.errors import InvalidValue

APP_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # also instance names
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a Docker host's name, as in hosts/

APPS, CERTS, ROUTERS, HOSTS, POOLS = "apps/", "certs/", "routers/", "hosts/", "pools/"
ROUTING = (APPS, CERTS)  # what routers render from; the rest never reaches nginx
# Under apps/<app>/: each kind of key and how many segments its path has.
APP_KEY_DEPTH = {
    "config": 3,
    "active": 3,
    "weights": 3,
    "env": 3,
    "lock": 3,
    "abort": 3,
    "version": 3,
    "history": 4,
    "releases": 5,
}


def absolute(prefix: str, rel: str) -> str:
    """The key as stored in etcd: ``/routerd`` + ``apps/x/config``."""
    return prefix.rstrip("/") + "/" + rel


# ------------------------------------------------------------------ build


def app(name: str) -> str:
    """The folder of every key of one app."""
    return f"{APPS}{name}/"


def config(name: str) -> str:
    return f"{APPS}{name}/config"


def active(name: str) -> str:
    return f"{APPS}{name}/active"


def weights(name: str) -> str:
    return f"{APPS}{name}/weights"


def env(name: str) -> str:
    return f"{APPS}{name}/env"


def lock(name: str) -> str:
    return f"{APPS}{name}/lock"


def abort(name: str) -> str:
    return f"{APPS}{name}/abort"


def version(name: str) -> str:
    return f"{APPS}{name}/version"


def releases(name: str) -> str:
    """The folder of every instance of every release of an app."""
    return f"{APPS}{name}/releases/"


def release(name: str, release_name: str) -> str:
    """The folder of one release's instances."""
    return f"{APPS}{name}/releases/{release_name}/"


def instance(name: str, release_name: str, instance_name: str) -> str:
    return f"{APPS}{name}/releases/{release_name}/{instance_name}"


def history(name: str, release_name: str = "") -> str:
    """One release's record, or (no release) the folder of all of them."""
    return f"{APPS}{name}/history/{release_name}"


def cert(domain: str) -> str:
    return f"{CERTS}{domain}"


def router(router_id: str) -> str:
    return f"{ROUTERS}{router_id}"


def host(name: str) -> str:
    return f"{HOSTS}{name}"


def pool(name: str) -> str:
    return f"{POOLS}{name}"


# ------------------------------------------------------------------ parse


@dataclass(frozen=True)
class Key:
    """What a relative key is. ``kind`` is one of the layout's kinds
    ("config", "active", "weights", "env", "lock", "abort", "version", "history",
    "instance", "cert", "router", "host", "pool"), "invalid" for a key under an app
    whose path has the wrong shape for its kind (``name`` then holds that
    kind: "releases" for apps/x/releases/r), or "other" for anything else."""

    kind: str
    app: str | None = None  # set (maybe "") for every key under apps/<app>/
    release: str = ""
    name: str = ""  # the instance, domain, router id, host or pool


TOP_LEVEL = {CERTS: "cert", ROUTERS: "router", HOSTS: "host", POOLS: "pool"}


def parse(rel: str) -> Key:
    parts = rel.split("/")
    if parts[0] + "/" == APPS and len(parts) >= 3:
        return _parse_app_key(parts)
    kind = TOP_LEVEL.get(parts[0] + "/")
    if kind is not None and len(parts) == 2:
        return Key(kind, name=parts[1])
    return Key("other")


def _parse_app_key(parts: list[str]) -> Key:
    kind, depth = parts[2], APP_KEY_DEPTH.get(parts[2])
    if depth is None:
        return Key("other", app=parts[1])
    if len(parts) != depth:
        return Key("invalid", app=parts[1], name=kind)
    if kind == "releases":
        return Key("instance", app=parts[1], release=parts[3], name=parts[4])
    if kind == "history":
        return Key(kind, app=parts[1], release=parts[3])
    return Key(kind, app=parts[1])


def app_names(rels: Iterable[str]) -> list[str]:
    """The apps that have any key of the layout, sorted."""
    found = {key.app for key in map(parse, rels) if key.app}  # "" is no app's name
    return sorted(found)


# ----------------------------------------------------------------- values


def parse_release_name(key: str, raw: bytes) -> str:
    """The value of ``active``: a release name, surrounding blanks ignored."""
    text = raw.decode("utf-8", "replace").strip()
    if RELEASE_NAME.fullmatch(text) is None:
        raise InvalidValue(key, f"active release {text!r} must match {RELEASE_NAME.pattern}")
    return text


MAX_WEIGHTED = 16  # releases one weights value may name


def parse_weights(key: str, raw: bytes) -> dict[str, int]:
    """The value of ``weights``: ``{"<release>": <0..100>, ...}`` summing to 100.

    Only the value is judged here; whether each release has instances is the
    reader's to check against the rest of the snapshot.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidValue(key, f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not 1 <= len(data) <= MAX_WEIGHTED:
        raise InvalidValue(key, f"weights must be an object naming 1 to {MAX_WEIGHTED} releases")
    for name, share in data.items():
        if RELEASE_NAME.fullmatch(name) is None:
            raise InvalidValue(key, f"release name {name!r} must match {RELEASE_NAME.pattern}")
        if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= 100:
            raise InvalidValue(key, f"weight of {name} must be 0..100, got {share!r}")
    if sum(data.values()) != 100:
        raise InvalidValue(key, f"weights must sum to 100, not {sum(data.values())}")
    return dict(data)
