"""What the deploy controller keeps in etcd beside the routing keys.

- ``apps/<app>/history/<release>``: how a release was made (image, env,
  replicas, port, network, health path, reservations and constraints), its
  version number (v1, v2, ...), when it was created and when it first took
  traffic, so ``routerd rollback`` and ``routerd scale`` can make its
  containers again. The last ``HISTORY_KEPT`` are kept.
- ``apps/<app>/version``: the version number the last release took, so a
  number is never given twice, even once its record is pruned or a failed
  deploy's record is removed.
- ``apps/<app>/lock``: one deploy per app, held on a lease, so the lock of a
  controller that crashed expires by itself; its value says who holds it,
  and whether ``routerd deploy --abort`` can stop it (``routerd.deploy.abort``).

Routers ignore them (only ``config``, ``active``, ``weights`` and
``releases/`` are routing input), so writing them never changes nginx.conf.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from routerd import keys
from routerd.deploy.hosts import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    json_object,
    reservation_problems,
    tag_problems,
)
from routerd.errors import DeployError, InvalidValue, LockHeld, StoreError
from routerd.keys import RELEASE_NAME, parse_release_name, parse_weights
from routerd.logs import log
from routerd.store import Check, Delete, Put, Snapshot, Store

logger = logging.getLogger("routerd.releases")
HISTORY_KEPT = 20

# What a release may be made of. History records are read back from etcd, so
# anyone who can write there could otherwise aim the health probe elsewhere
# (a health path of "@other.host/" turns the container's address into a user
# name) or start a thousand containers: every record is checked when read.
IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
# Starts with "/" (so it can only ever be the path of the container's URL),
# then RFC 3986 path and query characters, percent escapes, nothing else.
HEALTH_PATH = re.compile(r"/(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2}){0,1023}")
NETWORKS = ("bridge", "host")
MAX_REPLICAS = 100


def now() -> str:
    """UTC, to the microsecond and fixed width, so the strings sort in time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_release_name() -> str:
    return f"r{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


# ------------------------------------------------------------- the app keys


def active_release(snapshot: Snapshot, app: str) -> str | None:
    """The release ``active`` names, read as the routers read it; None when it
    is absent or names no valid release (the routers then route every one)."""
    kv = snapshot.kvs.get(keys.active(app))
    if kv is None:
        return None
    try:
        return parse_release_name(keys.active(app), kv.value)
    except InvalidValue:
        return None


def read_weights(snapshot: Snapshot, app: str) -> dict[str, int] | None:
    """The ``weights`` value, read as the routers read it; None when absent,
    InvalidValue (naming the key) when it is not a valid one."""
    kv = snapshot.kvs.get(keys.weights(app))
    return None if kv is None else parse_weights(keys.weights(app), kv.value)


def describe_weights(shares: Mapping[str, int]) -> str:
    """``v1 90 %, v2 10 %``."""
    return ", ".join(f"{release} {share} %" for release, share in shares.items())


def registered_releases(snapshot: Snapshot, app: str) -> dict[str, dict[str, str]]:
    """release -> {instance: address} of the app's registered instances."""
    base = keys.releases(app)
    found: dict[str, dict[str, str]] = {}
    for key, kv in sorted(snapshot.kvs.items()):
        if key.startswith(base):
            release, _, instance = key[len(base) :].partition("/")
            found.setdefault(release, {})[instance] = kv.value.decode("utf-8", "replace")
    return found


def pool_of(raw: bytes | None) -> str:
    """An app's pool from its config, read leniently: routers judge configs, not the controller."""
    try:
        pool = json.loads(raw or b"{}").get("pool", "shared")
    except (ValueError, AttributeError):
        return "shared"
    return pool if isinstance(pool, str) else "shared"


# ---------------------------------------------------------------- history


@dataclass(frozen=True)
class ReleaseSpec:
    """Everything needed to start a release's containers again."""

    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1
    port: int = 5000
    network: str = "bridge"
    health_path: str = "/"
    cpus: float | None = None  # a Docker limit per container; None: none
    memory_mb: int | None = None
    constraints: Mapping[str, str] = field(default_factory=dict)  # host tags to run on

    @property
    def reservation(self) -> tuple[float, int]:
        """(CPUs, MB) each container reserves for placement: its limits, else the defaults."""
        return (
            DEFAULT_CPUS if self.cpus is None else self.cpus,
            DEFAULT_MEMORY_MB if self.memory_mb is None else self.memory_mb,
        )


def spec_problems(spec: ReleaseSpec) -> list[str]:
    """Why ``spec`` must not be run, each naming its field; empty when it is fine.

    Checks types too: a record read from etcd may hold anything JSON does.
    """
    found = []
    if not (isinstance(spec.image, str) and IMAGE.fullmatch(spec.image)):
        found.append(f"image {spec.image!r} is not an image reference ({IMAGE.pattern})")
    env: object = spec.env  # as read back: its type is not yet known
    if not isinstance(env, Mapping):
        found.append(f"env is a {type(env).__name__}, not an object")
    else:  # values are secrets: never quoted in a message
        for name, value in env.items():
            if not (isinstance(name, str) and ENV_NAME.fullmatch(name)):
                found.append(f"env name {name!r} must match {ENV_NAME.pattern}")
            elif not isinstance(value, str) or "\0" in value:
                found.append(f"env {name} must be a string without NUL")
    if not (_is_int(spec.replicas) and 1 <= spec.replicas <= MAX_REPLICAS):
        found.append(f"replicas {spec.replicas!r} is not a whole number 1..{MAX_REPLICAS}")
    if not (_is_int(spec.port) and 1 <= spec.port <= 65535):
        found.append(f"port {spec.port!r} is not a whole number 1..65535")
    if spec.network not in NETWORKS:
        found.append(f"network {spec.network!r} is not one of {', '.join(NETWORKS)}")
    if not (isinstance(spec.health_path, str) and HEALTH_PATH.fullmatch(spec.health_path)):
        found.append(
            f"health_path {spec.health_path!r} must start with / and hold only URL path "
            "characters (letters, digits, -._~!$&'()*+,;=:@/? and %XX)"
        )
    found += reservation_problems(*spec.reservation)  # the defaults always pass
    found += tag_problems("constraints", spec.constraints)
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Release:
    name: str
    spec: ReleaseSpec
    created: str
    activated: str | None = None  # when it first took traffic
    rollback_of: str | None = None
    version: int | None = None  # v1, v2, ...; None for a release made before versions
    config_vars: tuple[str, ...] = ()  # the names in spec.env that came from apps/<app>/env

    @property
    def label(self) -> str:
        return f"v{self.version}" if self.version else "-"

    def to_json(self) -> bytes:
        data = dict(asdict(self.spec))
        data.update(
            created=self.created,
            activated=self.activated,
            rollback_of=self.rollback_of,
            version=self.version,
            config_vars=list(self.config_vars),
        )
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes, *, key: str = "") -> Release:
        """Read a history record back; InvalidValue (naming ``key`` and the
        field) unless every field is one a deploy may run with."""
        key = key or f"release {name}"
        data = json_object(key, raw)
        if "image" not in data:
            raise InvalidValue(key, "image is missing")
        defaults = asdict(ReleaseSpec(image=""))
        spec = ReleaseSpec(**{attr: data.get(attr, value) for attr, value in defaults.items()})
        problems = spec_problems(spec)
        for attr in ("created", "activated", "rollback_of"):
            value = data.get(attr)
            if not (isinstance(value, str) or (value is None and attr != "created")):
                problems.append(f"{attr} {value!r} is not a string")
        rollback_of = data.get("rollback_of")
        if isinstance(rollback_of, str) and not RELEASE_NAME.fullmatch(rollback_of):
            problems.append(f"rollback_of {rollback_of!r} must match {RELEASE_NAME.pattern}")
        version = data.get("version")
        if version is not None and not (_is_int(version) and version >= 1):
            problems.append(f"version {version!r} is not a whole number from 1")
        config_vars = data.get("config_vars", [])
        env = spec.env if isinstance(spec.env, Mapping) else {}
        if not (isinstance(config_vars, list) and all(n in env for n in config_vars)):
            problems.append("config_vars must list names of env")
        if problems:
            raise InvalidValue(key, "; ".join(problems))
        return cls(
            name,
            spec,
            data["created"],
            data.get("activated"),
            rollback_of,
            version,
            tuple(config_vars),
        )

    def own_env(self) -> dict[str, str]:
        """The env the deploy gave itself (--env), without the config vars."""
        return {k: v for k, v in self.spec.env.items() if k not in self.config_vars}

    def config_env(self) -> dict[str, str]:
        """The config vars this release ran with."""
        return {k: v for k, v in self.spec.env.items() if k in self.config_vars}

    def activated_now(self) -> Release:
        return replace(self, activated=self.activated or now())


def read_history(snapshot: Snapshot, app: str) -> tuple[list[Release], dict[str, InvalidValue]]:
    """The app's valid releases in the order they were created, and why each
    other record was rejected (release name -> error naming its key)."""
    base = keys.history(app)
    found, rejected = [], {}
    for key, kv in snapshot.kvs.items():
        name = key[len(base) :]
        if key.startswith(base) and RELEASE_NAME.fullmatch(name):
            try:
                found.append(Release.from_json(name, kv.value, key=key))
            except InvalidValue as exc:
                rejected[name] = exc
    return sorted(found, key=lambda r: (r.created, r.name)), rejected


def history(snapshot: Snapshot, app: str) -> list[Release]:
    """The app's valid releases in the order they were created (invalid ones left out)."""
    return read_history(snapshot, app)[0]


def previous_release(releases: list[Release], active: str | None) -> Release:
    """The release that took traffic last before ``active``: what rollback goes back to."""
    served = [r for r in releases if r.activated and r.name != active]
    current = next((r for r in releases if r.name == active), None)
    if current is not None and current.activated:
        served = [
            r for r in served if (r.activated, r.created) < (current.activated, current.created)
        ]
    if not served:
        raise DeployError(f"no earlier release than {active or '(none)'} to roll back to")
    return max(served, key=lambda r: (r.activated or "", r.created))


def next_version(snapshot: Snapshot, app: str) -> tuple[int, int]:
    """The version the next release of ``app`` takes, and the mod revision of
    ``apps/<app>/version`` as read (0: absent), for the transaction that
    takes it. Without the key (releases made before versions), one past the
    highest version in the history."""
    kv = snapshot.kvs.get(keys.version(app))
    text = kv.value.decode("ascii", "replace").strip() if kv else ""
    last = int(text) if text.isdigit() else 0
    recorded = max((r.version or 0 for r in history(snapshot, app)), default=0)
    return max(last, recorded) + 1, kv.mod_revision if kv else 0


def by_version(releases: list[Release], label: str) -> Release | None:
    """The release a person names as ``v7`` (or ``7``)."""
    number = label.removeprefix("v")
    return next((r for r in releases if number.isdigit() and r.version == int(number)), None)


def prune_ops(releases: list[Release], keep: set[str], app: str) -> list[Put | Delete]:
    """Deletes that keep the history to its last HISTORY_KEPT entries."""
    old = [r for r in releases if r.name not in keep][: max(0, len(releases) - HISTORY_KEPT)]
    return [Delete(keys.history(app, r.name)) for r in old]


# ------------------------------------------------------------------- lock


def whoami() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


def holder_description(doing: str, **extra: Any) -> bytes:
    """The lock's value; ``extra`` adds fields (a canary deploy: ``abortable``, ``release``)."""
    return json.dumps(
        {"holder": whoami(), "doing": doing, "since": now(), "token": secrets.token_hex(8), **extra}
    ).encode()


def read_holder(raw: bytes) -> dict[str, Any]:
    """The lock's value as an object; empty when it is none (a foreign writer's)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(raw: bytes | None) -> str:
    if raw is None:
        return "just released; try again"
    try:
        data = json.loads(raw)
        return f"held by {data['holder']} ({data['doing']}) since {data['since']}"
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")


class Lock:
    """``apps/<app>/lock`` on a lease kept alive while the deploy runs.

    ``token`` is the exact value written: transactions that must only apply
    while this controller still holds the lock check it.
    """

    def __init__(self, store: Store, app: str, doing: str, *, ttl: int = 10, **extra: Any) -> None:
        self.store = store
        self.key = keys.lock(app)
        self.app = app
        self.ttl = ttl
        self.token = holder_description(doing, **extra)
        self.secret: str = read_holder(self.token)["token"]  # names this lock in an abort
        self.lost = False
        self._lease: Any = None
        self._keeper: asyncio.Task[None] | None = None

    def check(self) -> Check:
        """A transaction condition: the lock key still holds our token. The key
        lives on our lease, so it holding our token also means the lease is alive."""
        return Check(self.key, value=self.token)

    def ensure_held(self) -> None:
        """Fail at once if the keeper saw the lease expire; ``check()`` in the
        transaction itself stays the authority (the keeper polls)."""
        if self.lost:
            raise DeployError(self.lost_reason)

    @property
    def lost_reason(self) -> str:
        return (
            f"the deploy lock of {self.app} is no longer ours: its lease expired "
            f"(etcd unreachable for more than {self.ttl} s?) or someone removed it"
        )

    async def acquire(self) -> None:
        self._lease = await self.store.lease(self.ttl)
        put = Put(self.key, self.token, lease=self._lease.id)
        if await self.store.transaction([Check(self.key)], [put]) is None:
            holder = await self.store.get(self.key)
            await self._revoke()
            raise LockHeld(self.app, describe_holder(holder))
        self._keeper = asyncio.create_task(self._keep_alive(), name=f"lock-{self.app}")

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if await self.store.refresh(self._lease) <= 0:
                    self.lost = True
                    log(logger, "deploy lock expired", logging.ERROR, app=self.app)
                    return
            except StoreError as exc:
                log(logger, "deploy lock refresh failed", logging.WARNING, error=str(exc))

    async def release(self, *, attempts: int = 3) -> bool:
        """Delete the lock (if still ours) and revoke the lease; False if etcd never answered."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        for attempt in range(attempts):
            try:
                await self.store.transaction([self.check()], [Delete(self.key)])
                await self._revoke()
                return True
            except StoreError as exc:
                log(logger, "releasing the deploy lock failed", logging.WARNING, error=str(exc))
                await asyncio.sleep(0.5 * (attempt + 1))
        return False

    async def _revoke(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(StoreError):
                await self.store.revoke(self._lease)
            self._lease = None
