"""Real parts for the edge tests: haproxy as the load balancer in front of the
router, a backend that echoes what it was sent, and clients that connect
from a chosen loopback address (127.0.0.2, 127.0.0.3 ... stand for other
machines) and speak raw HTTP, so a test can send bytes no library would.

haproxy is Debian's, run in the foreground as a child (``haproxy -db -f``)
on ports the test picks. Does not import routerd.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from helpers import free_ports, make_cert, require_binary, stop_process, tail, wait_for

# ---------------------------------------------------------------- haproxy


class Haproxy:
    """One haproxy in front of a router: ``tcp`` (PROXY protocol v1 or v2 to
    the router's HTTP or HTTPS port) or ``https`` (terminates TLS with a
    self-signed pair, sets X-Forwarded-For and X-Forwarded-Proto)."""

    def __init__(self, workdir: Path, *, mode: str, target: int, proxy: str = "") -> None:
        self.binary = require_binary("haproxy")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        self.mode, self.target, self.proxy = mode, target, proxy
        self.config = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _text(self) -> str:
        head = (
            "global\n    maxconn 512\n"
            "defaults\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        )
        if self.mode == "tcp":
            send = {"v1": " send-proxy", "v2": " send-proxy-v2"}[self.proxy]
            return head + (
                f"frontend edge\n    mode tcp\n    bind 127.0.0.1:{self.port}\n"
                "    default_backend router\n"
                f"backend router\n    mode tcp\n    server r 127.0.0.1:{self.target}{send}\n"
            )
        pem = self.workdir / "balancer.pem"
        if not pem.exists():
            pem.write_text("".join(make_cert(self.workdir, "balancer.example.com")))
        return head + (
            f"frontend edge\n    mode http\n    bind 127.0.0.1:{self.port} ssl crt {pem}\n"
            "    option forwardfor\n"
            "    http-request set-header X-Forwarded-Proto https\n"
            "    http-request set-header X-Forwarded-Port 443\n"
            "    default_backend router\n"
            f"backend router\n    mode http\n    server r 127.0.0.1:{self.target}\n"
        )

    def start(self) -> Haproxy:
        self.config.write_text(self._text())
        check = subprocess.run(
            [self.binary, "-c", "-f", str(self.config)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_for(self._listening, 10, message=f"haproxy on :{self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited {self.proc.returncode}: {tail(self.log_path)}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)


# ---------------------------------------------------------------- backend


@dataclass
class Seen:
    """One request an EchoBackend received."""

    method: str
    path: str
    headers: dict[str, str]


class _EchoHandler(BaseHTTPRequestHandler):
    server: _EchoServer
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        backend = self.server.backend
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        backend.record(Seen(self.command, self.path, dict(self.headers.items())))
        if backend.behaviour == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if backend.behaviour == "slow":
            time.sleep(backend.delay)
        body = json.dumps(
            {"backend": backend.name, "path": self.path, "headers": dict(self.headers.items())},
            indent=1,
        ).encode()
        self.send_response(int(backend.status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, fmt: str, *args: Any) -> None:
        pass


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    backend: EchoBackend


class EchoBackend:
    """Answers each request with a JSON echo of its headers (``echo``), after
    ``delay`` seconds (``slow``), or by closing the connection unanswered
    (``reset``); records every request it received."""

    def __init__(self, behaviour: str = "echo", *, delay: float = 0.0, status: int = 200) -> None:
        self.behaviour, self.delay, self.status = behaviour, delay, status
        self.server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
        self.server.backend = self
        self.port: int = self.server.server_address[1]
        self.name = f"echo-{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    @property
    def hits(self) -> int:
        return len(self.seen)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- clients


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    request: bytes,
    *,
    source: str = "127.0.0.1",
    tls_host: str | None = None,
    timeout: float = 5.0,
) -> Answer:
    """Send ``request`` as it is from ``source`` on a new connection (TLS with
    SNI ``tls_host`` when given) and read the answer to the end."""
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )
    if tls_host is not None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname=tls_host)
    with sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_answer(data)


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return Answer(int(lines[0].split(" ")[1]), headers, body)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        length = int(size.split(b";")[0], 16)
        if length == 0:
            break
        out, body = out + body[:length], body[length + 2 :]
    return out


def get(
    port: int,
    host: str,
    path: str = "/",
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes = b"",
    **kwargs: Any,
) -> Answer:
    """One HTTP/1.1 request with ``Connection: close``."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return raw_request(port, request, **kwargs)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        return []


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    for line in read_lines(path):
        yield json.loads(line)
