"""What ``routerd run`` (and ``render``) is told: frozen dataclasses, no behaviour.

Built by ``routerd.router.commands`` from the flags, after every check, so
the daemon never sees a value the command line would have refused.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from routerd.settings import EtcdSettings

PACKAGE_TEMPLATES = Path(__file__).parent.parent / "templates" / "nginx"
TRAFFIC_LOG = "traffic.log"  # nginx's per-request lines, in the runtime folder


@dataclass(frozen=True)
class Edge:
    """How the listeners meet the balancer in front of them, and whether nginx
    writes the per-request lines routerd counts and logs."""

    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()  # validated CIDRs
    http2: bool = True
    keepalive_timeout: int = 75
    traffic_log: bool = True

    @property
    def believes_headers(self) -> bool:
        """Whether a peer's X-Forwarded-* and X-Request-Id can be believed: a
        trusted proxy in HTTP mode (in TCP mode it relays the client's own)."""
        return bool(self.trusted_proxies) and not self.proxy_protocol


@dataclass(frozen=True)
class NginxSettings:
    conf: Path
    runtime_dir: Path
    binary: str = "nginx"
    supervise: bool = False
    pid_file: Path | None = None  # sidecar mode: the neighbour's pid file
    http_listen: str = "0.0.0.0:80"
    https_listen: str = "0.0.0.0:443"
    status_listen: str = "127.0.0.1:18081"
    templates: Path = PACKAGE_TEMPLATES
    reload_timeout: float = 15.0
    keep_failed: int = 5
    edge: Edge = Edge()

    @property
    def state_dir(self) -> Path:
        """Where routerd keeps its app files, certs and failed candidates."""
        return self.conf.parent / "routerd"

    @property
    def pid_path(self) -> Path:
        """Where the master writes its pid: the sidecar's file, else the runtime folder."""
        return self.pid_file if self.pid_file is not None else self.runtime_dir / "nginx.pid"

    @property
    def traffic_log(self) -> Path | None:
        """Where nginx writes one line per request for routerd, or None when off."""
        return self.runtime_dir / TRAFFIC_LOG if self.edge.traffic_log else None


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
    metrics_advertise: str = "127.0.0.1:9145"  # where other programs reach metrics_listen
    access_log: str = "off"  # "off", "stdout" or an absolute file path
    access_log_format: str = "json"
    traffic_metrics: bool = True
