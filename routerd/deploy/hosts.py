"""Docker hosts and pools as etcd describes them, read back as untrusted input.

    hosts/<name>   {"docker": "tcp://10.0.1.5:2376", "address": "10.0.1.5",
                    "tags": {"dataPlane": "true", "high": "true"},
                    "capacity": {"cpus": 8, "memory_mb": 16384},
                    "schedulable": true,
                    "tls": {"ca": PATH, "cert": PATH, "key": PATH}}
    pools/<pool>   {"hosts": {"dataPlane": "true", "high": "true"}}

Only ``docker`` and ``address`` are required: without ``capacity`` the
engine's own figures count (``docker info``), ``schedulable`` is false when
the host is cordoned, and ``tls`` names files on the machine that runs the
controller (a client key stays out of etcd). Every field is checked the
same way whether it comes from a flag or from etcd; each problem starts with
the field's name, so the command line can name its flag and a read-back
value its key.

A host is in pool P when its tags include every pair ``pools/P`` names; with
no ``pools/P``, when its tag ``pool`` is P. Containers without limits count
as ``DEFAULT_RESERVATION``. Knows nothing of Docker or of placement.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from routerd import keys
from routerd.errors import InvalidValue
from routerd.keys import HOST_NAME
from routerd.store import Snapshot

TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")  # tag names and values alike
MAX_TAGS = 64
MAX_CPUS, MAX_MEMORY_MB = 4096, 1 << 24  # above these it is a typo, not a machine
MIN_CPUS, MIN_MEMORY_MB = 0.01, 6  # Docker's own smallest limits
DEFAULT_CPUS, DEFAULT_MEMORY_MB = 0.25, 256  # what a container without limits reserves
PLAIN_TCP, TLS_TCP = 2375, 2376  # Docker's ports for tcp:// without and with TLS
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"{LABEL}(\.{LABEL})*")
HOST_FIELDS = {"docker", "address", "tags", "capacity", "schedulable", "tls"}


@dataclass(frozen=True)
class Tls:
    """Client TLS for a tcp:// engine, as Docker's ``--tlsverify`` does it."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class Capacity:
    cpus: float
    memory_mb: int


@dataclass(frozen=True)
class Host:
    name: str
    docker: str  # unix:///path or tcp://host[:port]
    address: str  # where routers reach its containers: IPv4, [IPv6] or a DNS name
    tags: Mapping[str, str] = field(default_factory=dict)
    capacity: Capacity | None = None  # None: what the engine reports
    schedulable: bool = True
    tls: Tls | None = None

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"docker": self.docker, "address": self.address}
        data.update(tags=dict(self.tags), schedulable=self.schedulable)
        if self.capacity is not None:
            data["capacity"] = {"cpus": self.capacity.cpus, "memory_mb": self.capacity.memory_mb}
        if self.tls is not None:
            data["tls"] = {"ca": self.tls.ca, "cert": self.tls.cert, "key": self.tls.key}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes, *, key: str) -> Host:
        """InvalidValue naming ``key`` and every field at fault, unless all is well."""
        data = json_object(key, raw)
        problems = [f"unknown field {f!r}" for f in sorted(set(data) - HOST_FIELDS)]
        problems += [f"{f} is missing" for f in ("docker", "address") if f not in data]
        if HOST_NAME.fullmatch(name) is None:
            problems.append(f"host name {name!r} must match {HOST_NAME.pattern}")
        if problems:
            raise InvalidValue(key, "; ".join(problems))
        host = cls(
            name,
            docker=data["docker"],
            address=data["address"],
            tags=data.get("tags", {}),
            capacity=_capacity(data.get("capacity")),
            schedulable=data.get("schedulable", True),
            tls=_tls(data.get("tls")),
        )
        if problems := host_problems(host):
            raise InvalidValue(key, "; ".join(problems))
        return host


def json_object(key: str, raw: bytes) -> dict[str, Any]:
    """A value read from etcd that must be a JSON object; InvalidValue naming ``key``."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidValue(key, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidValue(key, "not a JSON object")
    return data


def _capacity(value: Any) -> Any:
    """As read: a Capacity to be checked, or the raw value for host_problems to name."""
    if isinstance(value, dict) and set(value) == {"cpus", "memory_mb"}:
        return Capacity(value["cpus"], value["memory_mb"])
    return value


def _tls(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"ca", "cert", "key"}:
        return Tls(value["ca"], value["cert"], value["key"])
    return value


# ------------------------------------------------------------- the rules


def host_problems(host: Host) -> list[str]:
    """Why ``host`` cannot be used, each starting with its field; empty when fine.

    Checks types too: a record read from etcd may hold anything JSON does."""
    found = []
    tls: object = host.tls
    if tls is not None and not isinstance(tls, Tls):
        found.append("tls must be an object of ca, cert and key (file paths)")
        tls = None
    elif isinstance(tls, Tls):
        found += [f"tls {p!r} must be an absolute path" for p in _paths(tls) if not _is_path(p)]
    found += docker_problems(host.docker, tls is not None)
    if (problem := address_problem(host.address)) is not None:
        found.append(f"address {problem}")
    found += tag_problems("tags", host.tags)
    capacity: object = host.capacity
    if isinstance(capacity, Capacity):
        found += reservation_problems(capacity.cpus, capacity.memory_mb)
    elif capacity is not None:
        found.append("capacity must be an object of cpus and memory_mb")
    schedulable: object = host.schedulable
    if not isinstance(schedulable, bool):
        found.append(f"schedulable {schedulable!r} must be true or false")
    return found


def _paths(tls: Tls) -> list[Any]:
    return [tls.ca, tls.cert, tls.key]


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/") and not set(value) & {"\0", "\n"}


def docker_problems(url: Any, tls: bool) -> list[str]:
    """The engine URL's problems: unix:///path, or tcp://host[:port] (TLS on 2376)."""
    if not isinstance(url, str):
        return [f"docker {url!r} is not a URL"]
    if url.startswith("unix://"):
        ok = _is_path(url[len("unix://") :])
        found = [] if ok else [f"docker {url!r} must be unix:///absolute/path"]
        return found + (["tls is only for tcp:// engines"] if tls else [])
    if not url.startswith("tcp://"):
        return [f"docker {url!r} is not unix:///path or tcp://host:port"]
    parts = urlsplit(url)
    try:
        port = parts.port or (TLS_TCP if tls else PLAIN_TCP)
    except ValueError:
        return [f"docker {url!r} has a bad port"]
    host = parts.netloc.rpartition(":")[0] if parts.port else parts.netloc
    if parts.path or parts.query or address_problem(host) is not None:
        return [f"docker {url!r} is not tcp://host:port"]
    if not tls and port == TLS_TCP:
        return [f"docker {url!r}: port {TLS_TCP} is Docker's TLS port; give its TLS files"]
    if not tls and not _loopback(host):
        plain = "a plain tcp:// engine gives root on its host to whoever reaches it"
        return [f"docker {url!r}: {plain}; give its TLS files (Docker's --tlsverify)"]
    return []


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def address_problem(address: Any) -> str | None:
    """None for an IPv4 address, a bracketed IPv6 address or a DNS name."""
    if not isinstance(address, str):
        return f"{address!r} is not a string"
    try:
        if address.startswith("[") and address.endswith("]") and "%" not in address:
            ipaddress.IPv6Address(address[1:-1])
            return None
        if address.replace(".", "").isdigit():
            ipaddress.IPv4Address(address)
            return None
    except ValueError:
        pass
    else:
        if len(address) <= 253 and DNS_NAME.fullmatch(address):
            return None
    return f"{address!r} is not an IPv4 address, [IPv6 address] or DNS name"


def tag_problems(what: str, tags: Any) -> list[str]:
    if not isinstance(tags, Mapping) or len(tags) > MAX_TAGS:
        return [f"{what} must be an object of at most {MAX_TAGS} names and values"]
    return [
        f"{what}: {name!r}={value!r}: names and values must match {TAG.pattern}"
        for name, value in tags.items()
        if not (isinstance(name, str) and isinstance(value, str))
        or not (TAG.fullmatch(name) and TAG.fullmatch(value))
    ]


def reservation_problems(cpus: Any, memory_mb: Any) -> list[str]:
    """Problems of a CPU and memory figure (a capacity or a container's limits)."""
    found = []
    number = isinstance(cpus, int | float) and not isinstance(cpus, bool)
    if not (number and MIN_CPUS <= cpus <= MAX_CPUS):
        found.append(f"cpus {cpus!r} is not a number {MIN_CPUS:g}..{MAX_CPUS}")
    whole = isinstance(memory_mb, int) and not isinstance(memory_mb, bool)
    if not (whole and MIN_MEMORY_MB <= memory_mb <= MAX_MEMORY_MB):
        found.append(
            f"memory_mb {memory_mb!r} is not a whole number {MIN_MEMORY_MB}..{MAX_MEMORY_MB}"
        )
    return found


# ----------------------------------------------------------- reading etcd


def read_hosts(snapshot: Snapshot) -> tuple[list[Host], list[InvalidValue]]:
    """The valid hosts under ``hosts/``, by name, and an error per invalid one."""
    found, rejected = [], []
    for rel, kv in sorted(snapshot.kvs.items()):
        key = keys.parse(rel)
        if key.kind != "host":
            continue
        try:
            found.append(Host.from_json(key.name, kv.value, key=rel))
        except InvalidValue as exc:
            rejected.append(exc)
    return found, rejected


def pool_tags(raw: bytes, *, key: str) -> dict[str, str]:
    """The host tags ``pools/<pool>`` asks for; InvalidValue naming ``key``."""
    data = json_object(key, raw)
    if set(data) != {"hosts"}:
        raise InvalidValue(key, 'must be {"hosts": {"<tag>": "<value>", ...}} and nothing else')
    if problems := tag_problems("hosts", data["hosts"]):
        raise InvalidValue(key, "; ".join(problems))
    return dict(data["hosts"])


def in_pool(tags: Mapping[str, str], pool: str, required: Mapping[str, str] | None) -> bool:
    """The pool rule: every pair of ``pools/<pool>``, else the tag ``pool`` = ``pool``."""
    if required is None:
        return tags.get("pool") == pool
    return matches(tags, required)


def matches(tags: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(tags.get(name) == value for name, value in wanted.items())
