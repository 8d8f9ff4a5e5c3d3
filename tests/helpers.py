"""Real processes for the integration tests: etcd, routerd with the nginx it
supervises, and tiny HTTP backends, plus the small tools tests share.

Everything listens on 127.0.0.1 on ports picked by binding port 0, and keeps
its data in the test's tmp folder. etcd is driven through its v3 JSON gateway
(``/v3/kv/...``) with ``requests``: the same API etcdctl speaks, without a
process per call, and a transaction makes "many changes at once" one revision.
Does not import routerd: the daemon is only ever a subprocess here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

REPO = Path(__file__).resolve().parents[1]
PREFIX = "/routerd"
ROUTER_ID = "test-router"
# A reported revision is already served to every new connection:
# routerd confirms a reload only once the old workers stopped accepting, so
# tests do not wait any longer than the status (test_status.py proves it).
SETTLE = 0.0
T = TypeVar("T")
B = TypeVar("B", bound="Background")


# ------------------------------------------------------------------ basics


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_binary(name: str) -> str:
    """The path of a real dependency; without it the test fails under CI=true, else skips."""
    path = shutil.which(name)
    if path is None:
        # Also search sbin folders, which a non-root PATH often lacks.
        path = shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is not None:
        return path
    reason = f"{name!r} is not installed (apt-get install it, or run .ci/run)"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"{reason}; with CI=true this fails instead of skipping")
    raise AssertionError("unreachable")  # pytest.skip raises


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Background:
    """Threads that run while a ``with`` block does and are told to end with it:
    a subclass ``spawn``s them in ``__init__``, and each loops until ``stopping``."""

    join_timeout = 10.0  # seconds a thread may take to finish its last round

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def spawn(self, target: Callable[..., object], *args: object) -> None:
        self._threads.append(threading.Thread(target=target, args=args, daemon=True))

    def __enter__(self: B) -> B:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(self.join_timeout)


class ProcessDied(AssertionError):
    """A process a test needs has exited: waiting longer cannot help."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    Exceptions count as "not yet", except ProcessDied; on timeout fail with
    ``message`` and the last result."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except ProcessDied:
            raise
        except Exception as exc:  # noqa: BLE001  (an exception counts as "not yet")
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {message}; last: {last!r}"
            )
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM (after SIGCONT, in case it is frozen), then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# -------------------------------------------------------------------- etcd


def _b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def _range_end(prefix: str | bytes) -> str:
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    raw[-1] += 1
    return _b64(bytes(raw))


class EtcdApi:
    """The v3 JSON gateway calls the tests make; ``_call`` says where they go
    (one member, or any live member of a cluster); ``endpoint`` is what a
    client is given: one URL, or a comma list."""

    endpoint: str

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def put(self, key: str, value: str | bytes) -> int:
        """Put one key; returns the revision of the write."""
        data = self._call("kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(data["header"]["revision"])

    def put_json(self, key: str, value: Any) -> int:
        return self.put(key, json.dumps(value))

    def get(self, key: str) -> str | None:
        data = self._call("kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        data = self._call("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in data.get("kvs") or []
        }

    def delete(self, key: str) -> int:
        data = self._call("kv/deleterange", {"key": _b64(key)})
        return int(data["header"]["revision"])

    def delete_prefix(self, prefix: str) -> int:
        body = {"key": _b64(prefix), "range_end": _range_end(prefix)}
        return int(self._call("kv/deleterange", body)["header"]["revision"])

    def wipe(self) -> None:
        """Delete every key (key and range_end "\\0" mean the whole keyspace)."""
        self._call("kv/deleterange", {"key": _b64(b"\0"), "range_end": _b64(b"\0")})

    def txn(self, puts: Mapping[str, str | bytes] = {}, deletes: Iterable[str] = ()) -> int:
        """Many puts and deletes in one transaction: one revision, seen together."""
        ops: list[dict[str, Any]] = [
            {"requestPut": {"key": _b64(k), "value": _b64(v)}} for k, v in puts.items()
        ]
        ops += [{"requestDeleteRange": {"key": _b64(k)}} for k in deletes]
        data = self._call("kv/txn", {"success": ops})
        assert data.get("succeeded", False), data
        return int(data["header"]["revision"])

    def revision(self) -> int:
        data = self._call("kv/range", {"key": _b64(b"\0"), "count_only": True})
        return int(data["header"]["revision"])

    def compact(self) -> int:
        """Compact the history at the current revision (physically, before returning)."""
        revision = self.revision()
        self._call("kv/compaction", {"revision": revision, "physical": True})
        return revision


class Etcd(EtcdApi):
    """One etcd member on free ports with its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("etcd")
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "etcd.log"
        self.client_port, self.peer_port = free_ports(2)
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self._http = requests.Session()

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary, "--name", "t", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t={peer}",
        ]  # fmt: skip

    # -- process control

    def start(self, timeout: float = 20.0) -> None:
        self.launch()
        self.wait_healthy(timeout)

    def launch(self) -> None:
        """Start the process without waiting (a cluster's members must start together)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.frozen = False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        wait_for(self._healthy, timeout, message=f"etcd healthy at {self.endpoint}")

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessDied(f"etcd exited {self.proc.returncode}:\n{tail(self.log_path)}")
        answer = requests.get(f"{self.endpoint}/health", timeout=1)
        return answer.ok and answer.json().get("health") == "true"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL: no chance to tell its peers or flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.frozen = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def ensure_running(self) -> None:
        if self.frozen:
            self.thaw()
        if not self.running:
            self.start()

    # -- the KV API, through this member

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        answer = self._http.post(f"{self.endpoint}/v3/{path}", json=body, timeout=5)
        if not answer.ok:
            raise RuntimeError(f"etcd {path} {body}: HTTP {answer.status_code} {answer.text}")
        data: dict[str, Any] = answer.json()
        return data


# ----------------------------------------------------------------- routerd


class SNIAdapter(HTTPAdapter):
    """Connects wherever the URL says but sends ``server_hostname`` as SNI."""

    def __init__(self, server_hostname: str) -> None:
        self.server_hostname = server_hostname
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self.server_hostname
        super().init_poolmanager(*args, **kwargs)


def nginx_masters(conf: Path) -> list[int]:
    """Pids of nginx masters running with this config file (found in /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith("nginx: master process") and str(conf) in cmdline:
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def reap_nginx(conf: Path) -> None:
    """Stop an nginx that a dead routerd left behind: SIGTERM, then SIGKILL it and its workers."""
    for master in nginx_masters(conf):
        workers = children_of(master)
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGTERM)
        try:
            wait_for(lambda m=master: not pid_alive(m), 5, message=f"nginx master {master} to exit")
        except AssertionError:
            for pid in [master, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Routerd:
    """One ``routerd run --supervise`` process and the nginx it runs, on its own ports.

    ``etcd_endpoint`` (default: the etcd's own) is what ``--etcd`` says, for a
    router that reaches etcd through a proxy; ``conf_dir`` (default: the
    workdir) holds nginx.conf and routerd's files, with nginx's runtime files
    kept apart in the workdir, for a test that fills that folder."""

    etcd: EtcdApi
    workdir: Path
    allow_shrink: bool = False
    pool: str = "shared"
    router_id: str = ROUTER_ID
    prefix: str = PREFIX
    resync_interval: float = 5
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    etcd_endpoint: str | None = None
    conf_dir: Path | None = None
    # 0: a free port is picked.
    http_port: int = 0
    https_port: int = 0
    status_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.nginx_bin = require_binary("nginx")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = (self.conf_dir or self.workdir) / "nginx.conf"
        self.log_path = self.workdir / "routerd.log"
        ports = iter(free_ports(4))
        for name in ("http_port", "https_port", "status_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, next(ports))

    def command(self) -> list[str]:
        args = [
            sys.executable, "-m", "routerd", "run",
            "--etcd", self.etcd_endpoint or self.etcd.endpoint, "--prefix", self.prefix,
            "--nginx-conf", str(self.conf_path), "--supervise", "--nginx-bin", self.nginx_bin,
            "--http-listen", f"127.0.0.1:{self.http_port}",
            "--https-listen", f"127.0.0.1:{self.https_port}",
            "--status-listen", f"127.0.0.1:{self.status_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--router-id", self.router_id, "--pool", self.pool,
            "--debounce-min", "0.02", "--debounce-max", "0.5",
            "--resync-interval", f"{self.resync_interval:g}",
        ]  # fmt: skip
        if self.allow_shrink:
            args.append("--allow-shrink")
        if self.conf_dir is not None:
            args += ["--runtime-dir", str(self.workdir / "runtime")]
        return args + list(self.extra_args)

    # -- process control

    def start(
        self, *, wait_ready: bool = True, timeout: float = 30.0, reap: bool = True
    ) -> Routerd:
        """Start routerd; ``reap`` first stops an nginx a dead routerd left behind."""
        if reap:
            reap_nginx(self.conf_path)
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            log.write(f"\n=== test harness: starting {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
            )  # fmt: skip
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            self.check_alive()
            return self._get(f"http://127.0.0.1:{self.metrics_port}/readyz").status_code == 200

        wait_for(ready, timeout, message=f"routerd /readyz on :{self.metrics_port}")

    def check_alive(self) -> None:
        if self.proc is None:
            raise AssertionError("routerd was not started")
        if self.proc.poll() is not None:
            raise ProcessDied(
                f"routerd exited with {self.proc.returncode}; log tail:\n{self.log_tail()}"
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after 10 s; then make sure no nginx of ours is left."""
        code = None
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            code = self.proc.returncode
        reap_nginx(self.conf_path)
        return code

    def kill(self, *, reap: bool = True) -> None:
        """SIGKILL routerd (no chance to clean up), then stop the nginx it left
        behind, unless ``reap`` is False: then that nginx keeps serving, for the
        next ``start(reap=False)`` to take over, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if reap:
            reap_nginx(self.conf_path)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def nginx_master(self) -> int:
        (master,) = nginx_masters(self.conf_path)
        return master

    def restart(self, **kwargs: Any) -> Routerd:
        self.stop()
        return self.start(**kwargs)

    # -- what it serves

    @staticmethod
    def _get(url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 5)
        return requests.get(url, **kwargs)

    def http(self, host: str, path: str = "/", **kwargs: Any) -> requests.Response:
        """GET through nginx's HTTP listener with this Host, on a new connection."""
        headers = {"Host": host, "Connection": "close", **kwargs.pop("headers", {})}
        kwargs.setdefault("allow_redirects", False)
        return self._get(f"http://127.0.0.1:{self.http_port}{path}", headers=headers, **kwargs)

    def https(self, host: str, path: str = "/", **kwargs: Any) -> requests.Response:
        """GET through nginx's HTTPS listener with SNI and Host set to ``host``."""
        headers = {"Host": host, "Connection": "close", **kwargs.pop("headers", {})}
        with requests.Session() as session, warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            session.mount("https://", SNIAdapter(host))
            return session.get(
                f"https://127.0.0.1:{self.https_port}{path}",
                headers=headers, verify=False, timeout=5, allow_redirects=False, **kwargs,
            )  # fmt: skip

    def peer_certificate(self, host: str) -> bytes:
        """The DER certificate nginx presents for SNI ``host``."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        address = ("127.0.0.1", self.https_port)
        with (
            socket.create_connection(address, timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def generation(self) -> str:
        """What the nginx status server says it serves (the config sha256)."""
        return self._get(f"http://127.0.0.1:{self.status_port}/").text.strip()

    def metrics(self) -> str:
        return self._get(f"http://127.0.0.1:{self.metrics_port}/metrics").text

    def endpoint(self, path: str) -> requests.Response:
        return self._get(f"http://127.0.0.1:{self.metrics_port}{path}")

    @property
    def status_key(self) -> str:
        return f"{self.prefix}/routers/{self.router_id}"

    def status(self) -> dict[str, Any] | None:
        raw = self.etcd.get(self.status_key)
        return None if raw is None else json.loads(raw)

    def wait_applied(
        self, revision: int, timeout: float = 10.0, *, settle: float = SETTLE
    ) -> dict[str, Any]:
        """Wait until the router reports a revision >= ``revision``, then ``settle``
        seconds (see SETTLE); returns its status."""

        seen: list[Any] = [None]

        def applied() -> dict[str, Any] | None:
            self.check_alive()
            seen[0] = status = self.status()
            return status if status and int(status["revision"]) >= revision else None

        try:
            status = wait_for(applied, timeout, message=f"router status revision >= {revision}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last router status: {seen[0]!r}") from None
        time.sleep(settle)
        return status

    def error_keys(self) -> set[str]:
        status = self.status() or {}
        return {e.get("key", "") for e in status.get("errors", [])}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def failure_report(self) -> str:
        """The routerd log tail and nginx error log tail, for a failed test's report."""
        parts = [f"--- routerd log ({self.log_path}):\n{self.log_tail()}"]
        for error_log in sorted(self.workdir.rglob("error.log")):
            parts.append(f"--- nginx {error_log}:\n{tail(error_log, 20)}")
        return "\n".join(parts)


# ----------------------------------------------------------------- metrics


SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})?\s+(?P<value>\S+)")


def metric_samples(text: str) -> list[tuple[str, str, float]]:
    """(name, labels, value) of every sample in Prometheus text format."""
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                samples.append((match["name"], match["labels"] or "", float(match["value"])))
    return samples


def metric_sum(text: str, name_pattern: str, labels_pattern: str = "") -> float:
    """Sum of the samples whose name matches ``name_pattern`` (regex search),
    leaving out ``_created`` timestamps and histogram internals."""
    total = 0.0
    for name, labels, value in metric_samples(text):
        if name.endswith(("_created", "_bucket", "_sum")):
            continue
        if re.search(name_pattern, name) and re.search(labels_pattern, labels):
            total += value
    return total


# ---------------------------------------------------------------- backends


class _Handler(BaseHTTPRequestHandler):
    server: _BackendServer

    def do_GET(self) -> None:
        self.server.backend.hit()
        body = f"{self.server.backend.name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, fmt: str, *args: Any) -> None:
        pass


class _BackendServer(ThreadingHTTPServer):
    daemon_threads = True
    backend: Backend


class Backend:
    """A tiny HTTP server in a thread answering 200 with its name
    (``backend-<port>`` unless given)."""

    def __init__(self, name: str | None = None) -> None:
        self.server = _BackendServer(("127.0.0.1", 0), _Handler)
        self.server.backend = self
        self.port: int = self.server.server_address[1]
        self.name = name or f"backend-{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.hits = 0
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hit(self) -> None:
        with self._lock:  # handlers run in threads: count every request exactly
            self.hits += 1

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------ etcd layout


def config_key(app: str) -> str:
    return f"{PREFIX}/apps/{app}/config"


def active_key(app: str) -> str:
    return f"{PREFIX}/apps/{app}/active"


def instance_key(app: str, release: str, instance: str) -> str:
    return f"{PREFIX}/apps/{app}/releases/{release}/{instance}"


def cert_key(domain: str) -> str:
    return f"{PREFIX}/certs/{domain}"


def app_config(domains: Iterable[str], *, pool: str | None = None, **options: Any) -> str:
    config: dict[str, Any] = {"domains": list(domains)}
    if pool is not None:
        config["pool"] = pool
    if options:
        config["options"] = options
    return json.dumps(config)


def app_keys(
    app: str,
    domains: Iterable[str],
    backends: Iterable[Backend] = (),
    *,
    release: str = "v1",
    **options: Any,
) -> dict[str, str]:
    """The keys of one app with one release whose instances are ``backends``."""
    keys = {config_key(app): app_config(domains, **options)}
    for number, backend in enumerate(backends):
        keys[instance_key(app, release, f"i{number}")] = backend.address
    return keys


def make_cert(workdir: Path, domain: str) -> tuple[str, str]:
    """A self-signed (cert PEM, key PEM) for ``domain``, made by openssl."""
    openssl = require_binary("openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / f"{domain}.crt", workdir / f"{domain}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", f"/CN={domain}", "-addext", f"subjectAltName=DNS:{domain}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_text(), key.read_text()


def pem_to_der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


# ------------------------------------------------------------------ nginx


INCLUDE = re.compile(r"^\s*include\s+([^;\s]+)\s*;", re.MULTILINE)


def included_files(conf: Path) -> list[Path]:
    """Files named by ``include`` in ``conf`` and, recursively, in them (no globs expected)."""
    found: list[Path] = []
    pending = [conf]
    while pending:
        text = pending.pop().read_text()
        for name in INCLUDE.findall(text):
            path = Path(name) if os.path.isabs(name) else conf.parent / name
            found.append(path)
            if path.is_file():
                pending.append(path)
    return found


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t -c conf``, logging to stderr instead of a system folder."""
    nginx = require_binary("nginx")
    return subprocess.run(
        [nginx, "-t", "-q", "-e", "stderr", "-c", str(conf)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def tree_state(folder: Path) -> dict[str, tuple[float, bytes]]:
    """(mtime, content) of every file under ``folder``, to prove nothing changed."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
