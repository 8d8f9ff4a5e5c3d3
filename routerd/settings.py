"""Flags and ROUTERD_* environment, resolved into one frozen dataclass.

Every flag can come from the environment as ROUTERD_<FLAG> (upper case,
dashes as underscores); a flag on the command line wins. Validation of
addresses and paths happens here so a bad flag fails at start, by name.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from routerd.errors import ConfigError

PACKAGE_TEMPLATES = Path(__file__).parent / "templates" / "nginx"
LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[0-9.]+|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


def env_name(flag: str) -> str:
    return "ROUTERD_" + flag.lstrip("-").upper().replace("-", "_")


def env_default(flag: str, default: str | None = None) -> str | None:
    """The default of a flag: its ROUTERD_* variable when set."""
    return os.environ.get(env_name(flag), default)


def env_flag(flag: str) -> bool:
    value = os.environ.get(env_name(flag), "")
    return value.lower() in ("1", "true", "yes", "on")


def parse_listen(flag: str, value: str) -> str:
    match = LISTEN.fullmatch(value)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise ConfigError(flag, f"{value!r} is not host:port (port 1..65535)")
    return value


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_endpoints(flag: str, value: str) -> tuple[Endpoint, ...]:
    endpoints = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(flag, f"{item!r} is not an etcd endpoint like http://127.0.0.1:2379")
        try:
            port = url.port or 2379
        except ValueError as exc:
            raise ConfigError(flag, f"{item!r} has a bad port") from exc
        endpoints.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ConfigError(flag, "needs at least one endpoint")
    return tuple(endpoints)


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 2379, False),)
    prefix: str = "/routerd"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 5.0

    @property
    def tls(self) -> bool:
        return any(e.tls for e in self.endpoints) or self.ca is not None


@dataclass(frozen=True)
class NginxSettings:
    conf: Path
    runtime_dir: Path
    binary: str = "nginx"
    supervise: bool = False
    pid_file: Path | None = None
    http_listen: str = "0.0.0.0:80"
    https_listen: str = "0.0.0.0:443"
    status_listen: str = "127.0.0.1:18081"
    templates: Path = PACKAGE_TEMPLATES
    reload_timeout: float = 15.0
    keep_failed: int = 5

    @property
    def state_dir(self) -> Path:
        """Where routerd keeps its shard files, certs and failed candidates."""
        return self.conf.parent / "routerd"


@dataclass(frozen=True)
class Settings:
    etcd: EtcdSettings
    nginx: NginxSettings
    pool: str = "shared"
    router_id: str = field(default_factory=socket.gethostname)
    dynamic_backends: str = "auto"
    metrics_listen: str = "127.0.0.1:9145"
    allow_shrink: bool = False
    debounce_min: float = 0.005
    debounce_max: float = 1.0
    resync_interval: float = 60.0
    stale_after: float = 30.0
    status_ttl: int = 10
