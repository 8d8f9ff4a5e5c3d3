"""Docker for the deploy tests and the deploy benchmark: a tiny test image
built locally, and ``routerd deploy`` run as a real subprocess whose progress
lines can be waited for.

The image is a ``docker import`` of a tar holding Debian's static busybox
(no registry is reachable here): ``/start.sh`` writes ``<app> <release>
<MESSAGE>`` to ``/www/index.html`` and execs busybox ``httpd`` on ``$PORT``.
Environment knobs make the failure cases: ``DELAY`` seconds before serving,
``DIE`` exits with that code instead, ``FAIL_PERCENT`` answers ``/`` from a
CGI script that fails about that share of requests with a 500 (the health
path still answers 200, as a release that is healthy but broken would).
``DockerFaults`` stands between routerd and the engine and fails the
requests a test names, as a real engine or a broken connection would.
Does not import routerd.
"""

from __future__ import annotations

import base64
import collections
import http.client
import io
import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import PREFIX, REPO, Background, Etcd, in_ci

IMAGE = "routerd-test-app:3"
BUSYBOX_TOOLS = ("sh", "httpd", "sleep", "echo", "mkdir", "cat", "true")
START = """#!/bin/sh
sleep "${DELAY:-0}"
if [ -n "$DIE" ]; then echo "dying with code $DIE"; exit "$DIE"; fi
mkdir -p /www
if [ -z "$FAIL_PERCENT" ]; then
    echo "${ROUTERD_APP} ${ROUTERD_RELEASE} ${MESSAGE}" > /www/index.html
fi
echo ok > /www/healthz
echo "${ROUTERD_APP} ${ROUTERD_RELEASE} listening on ${PORT}"
exec httpd -f -v -p "$PORT" -h /www
"""
# What busybox httpd runs for "/" when there is no index.html (FAIL_PERCENT set).
FAILING_INDEX = """#!/bin/sh
if [ "$((RANDOM % 100))" -lt "$FAIL_PERCENT" ]; then
    printf 'HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n'
    echo "${ROUTERD_APP} ${ROUTERD_RELEASE} failing"
else
    printf 'Content-Type: text/plain\r\n\r\n'
    echo "${ROUTERD_APP} ${ROUTERD_RELEASE} ${MESSAGE}"
fi
"""


def docker_client() -> Any:
    """A Docker SDK client to a live engine; without one, fail under CI=true, else skip."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001  (no SDK, no socket, engine down: all mean no Docker)
        reason = f"no Docker engine ({exc}); start dockerd (see .ci/run)"
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(f"{reason}; with CI=true this fails instead of skipping")


def _busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and b"statically linked" in _file_type(path):
            return path
    reason = "a static busybox (Debian busybox-static) is needed to build the test image"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)
    raise AssertionError("unreachable")


def _file_type(path: Path) -> bytes:
    if shutil.which("file") is None:  # trust the path when `file` is missing
        return b"statically linked"
    return subprocess.run(["file", "-L", str(path)], capture_output=True).stdout


def image_tar(busybox: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("bin", "www", "www/cgi-bin", "tmp"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(busybox), "bin/busybox")
        for tool in BUSYBOX_TOOLS:
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for path, text in (("start.sh", START), ("www/cgi-bin/index.cgi", FAILING_INDEX)):
            script = text.encode()
            info = tarfile.TarInfo(path)
            info.mode, info.size = 0o755, len(script)
            tar.addfile(info, io.BytesIO(script))
    return buffer.getvalue()


def build_image(client: Any, tag: str = IMAGE) -> str:
    """Import the test image unless ``tag`` is already there (idempotent)."""
    import docker.errors

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    repository, _, version = tag.partition(":")
    client.api.import_image_from_data(
        image_tar(_busybox()),
        repository=repository,
        tag=version or "latest",
        changes=['CMD ["/start.sh"]', "ENV PATH=/bin"],
    )
    client.images.get(tag)
    return tag


def app_containers(client: Any, app: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"routerd.app={app}"})


def remove_app_containers(client: Any, app: str) -> None:
    for container in app_containers(client, app):
        container.remove(force=True)


class Deploy:
    """One ``routerd deploy|rollback|gc|status`` run; its output read line by line."""

    def __init__(self, etcd_endpoint: str, command: str, *args: str, prefix: str = PREFIX) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "routerd", command, *args]
        argv += ["--etcd", etcd_endpoint, "--prefix", prefix]
        self.argv = argv
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        self.lines: list[str] = []
        self.stamps: list[float] = []  # time.monotonic() as each line arrived
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stamps.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, fragment: str, timeout: float = 60) -> str:
        """Block until a line containing ``fragment`` appears (or fail with the output)."""
        deadline = time.monotonic() + timeout
        seen = [line for line in self.lines if fragment in line]
        if seen:
            return seen[0]
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() >= deadline:
                raise AssertionError(f"no line with {fragment!r}; output:\n{self.output}")
            if fragment in line:
                return line

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.elapsed = time.monotonic() - self.started
        return code

    def stamp(self, fragment: str) -> float:
        """When the first line containing ``fragment`` arrived."""
        return next(t for t, line in zip(self.stamps, self.lines, strict=True) if fragment in line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def run(etcd_endpoint: str, command: str, *args: str, timeout: float = 120) -> Deploy:
    """Run to completion; the finished Deploy (``.proc.returncode``, ``.output``)."""
    deploy = Deploy(etcd_endpoint, command, *args)
    deploy.wait(timeout)
    return deploy


def deploy_args(
    app: str,
    *,
    replicas: int = 2,
    env: Mapping[str, str] | None = None,
    release: str | None = None,
    extra: Iterable[str] = (),
    image: str = IMAGE,
) -> list[str]:
    args = [app, "--image", image, "--replicas", str(replicas), "--network", "host"]
    args += ["--health-path", "/healthz", "--health-timeout", "10", "--drain", "0.5"]
    args += ["--router-timeout", "10", "--stop-timeout", "5"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    if release:
        args += ["--release", release]
    return args + list(extra)


def release_of(done: Deploy) -> str:
    """The release a deploy made, from its first progress line."""
    line = next(line for line in done.lines if line.startswith("[1/6] start:"))
    return line.split(" of ", 1)[1].split()[1]


def served(router: Any, app: str, count: int = 8) -> collections.Counter[str]:
    """Which releases answered ``count`` requests for the app (body: app release message)."""
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        answer = router.http(f"{app}.test")
        assert answer.status_code == 200, (answer.status_code, answer.text)
        seen[answer.text.split()[1]] += 1
    return seen


def stop_signal_name(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)


# ------------------------------------------------------------ traffic


class Load(Background):
    """Threads sending requests through nginx, a new connection each, counting failures."""

    def sent_between(self, start: float, end: float) -> int:
        """Requests sent from ``start`` to ``end`` (time.monotonic())."""
        return sum(1 for t in self.sent if start <= t <= end)

    def __init__(self, router: Any, host: str, threads: int = 4) -> None:
        self.url = f"http://127.0.0.1:{router.http_port}/"
        self.host = host
        self.ok: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.sent: list[float] = []  # time.monotonic() as each request was sent
        super().__init__()
        for _ in range(threads):
            self.spawn(self._run)

    def _run(self) -> None:
        for _ in itertools.count():
            if self.stopping.is_set():
                return
            self.sent.append(time.monotonic())
            try:
                answer = requests.get(
                    self.url, headers={"Host": self.host, "Connection": "close"}, timeout=5
                )
                if answer.status_code == 200:
                    self.ok[answer.text.split()[1]] += 1
                else:
                    self.failures.append(f"HTTP {answer.status_code}")
            except requests.RequestException as exc:
                self.failures.append(type(exc).__name__)


# ------------------------------------------------------------ engine faults


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)


class _FaultHandler(BaseHTTPRequestHandler):
    server: _FaultServer
    HOP = ("connection", "keep-alive", "transfer-encoding", "content-length")

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = self.server.faults.fault_for(f"{self.command} {self.path}")
        if fault == "drop":  # no answer at all: the client sees the connection aborted
            self.close_connection = True
            return
        if fault == "500":
            self._answer(500, [("Content-Type", "application/json")], b'{"message": "injected"}')
            return
        upstream = _UnixConnection(self.server.faults.socket_path)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in self.HOP]
        upstream.close()
        self._answer(answer.status, kept, data)

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    def log_message(self, fmt: str, *args: Any) -> None:
        pass


class _FaultServer(ThreadingHTTPServer):
    daemon_threads = True
    faults: DockerFaults


class DockerFaults:
    """An HTTP proxy to the local Docker socket, at ``url`` (for ``--docker-host``),
    that answers the requests matching a rule with a 500 or drops them unanswered."""

    def __init__(self, socket_path: str = "/var/run/docker.sock") -> None:
        self.socket_path = socket_path
        self.rules: list[tuple[re.Pattern[str], str]] = []
        self.hits: list[str] = []
        self.server = _FaultServer(("127.0.0.1", 0), _FaultHandler)
        self.server.faults = self
        self.url = f"tcp://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, request: str, how: str = "500") -> None:
        """Fail every request whose ``METHOD /path`` matches the regex ``request``."""
        assert how in ("500", "drop")
        self.rules.append((re.compile(request), how))

    def fault_for(self, request: str) -> str | None:
        for pattern, how in self.rules:
            if pattern.search(request):
                self.hits.append(request)
                return how
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else "/var/run/docker.sock"


# ------------------------------------------------------------ settled


def settled_problems(etcd: Any, app: str, engines: Mapping[str, Any]) -> list[str]:
    """Why the app is not in a state a finished or rolled back deploy leaves
    (empty when it is): the lock released, one release registered and
    ``active``, no history of a release that never served kept beside it,
    and on every engine (name -> Docker client) exactly that release's
    containers, each running and registered, each instance a container."""
    base = f"{PREFIX}/apps/{app}/"
    found = {k[len(base) :]: v for k, v in etcd.get_prefix(base).items()}
    problems = [f"the deploy lock is held: {found['lock']}"] if "lock" in found else []
    active = found.get("active")
    registered: dict[str, set[str]] = {}
    for key in found:
        if key.startswith("releases/"):
            _, release, instance = key.split("/", 2)
            registered.setdefault(release, set()).add(instance)
    if active not in registered:
        problems.append(f"active is {active!r}, which has no instance registered")
    if beside := sorted(set(registered) - {active}):
        problems.append(f"registered beside the active release: {', '.join(beside)}")
    for key, value in found.items():
        release = key.removeprefix("history/")
        if key.startswith("history/") and release != active and not json_of(value).get("activated"):
            problems.append(f"history of {release} kept, which never served")
    instances = registered.get(active or "", set())
    seen = set()
    for host, client in sorted(engines.items()):
        for container in app_containers(client, app):
            seen.add(container.id[:12])
            what = f"container {container.name} on {host} ({container.status})"
            if container.labels.get("routerd.release") != active:
                problems.append(f"{what} is of another release than active {active}")
            elif container.id[:12] not in instances:
                problems.append(f"{what} is no registered instance")
            elif container.status != "running":
                problems.append(f"{what} is registered but not running")
    if missing := sorted(instances - seen):
        problems.append(f"instance(s) of {active} with no container: {', '.join(missing)}")
    return problems


def json_of(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def gc_finds_nothing(done: Deploy) -> bool:
    """Whether a ``routerd gc --dry-run`` run saw every host and would do nothing."""
    return (
        done.proc.returncode == 0
        and "would remove 0 container(s)" in done.output
        and "deregistering" not in done.output
    )


# ------------------------------------------------------------------ etcd


def revoke_lease_of(etcd: Etcd, key: str) -> None:
    """Revoke the lease ``key`` lives on, as if its holder stopped refreshing it."""
    found = etcd._call("kv/range", {"key": base64.b64encode(key.encode()).decode()})
    (kv,) = found["kvs"]
    etcd._call("lease/revoke", {"ID": kv["lease"]})
