"""Real processes for the benchmarks: etcd, backends, routerd with its nginx.

Everything runs on loopback ports picked at start, with data in a temporary
folder that is removed at the end. Not a test fixture: the benchmarks print
figures, they do not assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aetcd

ROOT = Path(__file__).resolve().parent.parent
BACKEND = r"""
import asyncio, sys
async def serve(port):
    body = f"backend-{port}".encode()
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (
        len(body), body)
    async def handle(reader, writer):
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(reply)
                await writer.drain()
        except Exception:
            pass
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()
async def main():
    await asyncio.gather(*(serve(int(p)) for p in sys.argv[1:]))
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values_ms: list[float]) -> str:
    return (
        f"p50 {statistics.median(values_ms):.0f} ms, p99 {percentile(values_ms, 99):.0f} ms, "
        f"min {min(values_ms):.0f} ms, max {max(values_ms):.0f} ms (n={len(values_ms)})"
    )


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def http_get(port: int, host: str, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    """One request on a new connection; (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Bench:
    """One etcd, one backend process and (once started) one routerd."""

    def __init__(self, backend_ports: int = 2) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="routerd-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etcd_port = free_port()
        self.backends = [free_port() for _ in range(backend_ports)]
        self.http_port = free_port()
        self.status_port = free_port()
        self.metrics_port = free_port()
        self.routerd: subprocess.Popen[bytes] | None = None
        self.conf = self.dir / "conf" / "nginx.conf"
        self.conf.parent.mkdir()

    def __enter__(self) -> Bench:
        self._start_etcd()
        self.procs.append(
            subprocess.Popen([sys.executable, "-c", BACKEND, *map(str, self.backends)])
        )
        return self

    def __exit__(self, *_: object) -> None:
        for proc in [self.routerd, *self.procs]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _start_etcd(self) -> None:
        peer = free_port()
        url = f"http://127.0.0.1:{self.etcd_port}"
        self.procs.append(
            subprocess.Popen(
                [
                    "etcd",
                    "--name",
                    "bench",
                    "--data-dir",
                    str(self.dir / "etcd"),
                    "--listen-client-urls",
                    url,
                    "--advertise-client-urls",
                    url,
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{peer}",
                    "--initial-cluster",
                    f"bench=http://127.0.0.1:{peer}",
                    "--quota-backend-bytes",
                    str(4 * 2**30),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until(lambda: asyncio.run(self._revision()) > 0, 20, "etcd")

    # -- etcd

    async def _client(self) -> aetcd.Client:
        client = aetcd.Client(host="127.0.0.1", port=self.etcd_port, timeout=30)
        await client.connect()
        return client

    async def _revision(self) -> int:
        async with aetcd.Client(host="127.0.0.1", port=self.etcd_port, timeout=5) as client:
            return int((await client.get_prefix(b"/routerd/none")).header.revision)

    def put_many(self, items: dict[str, str], batch: int = 128) -> int:
        """Write keys in transactions of ``batch``; the last revision."""

        async def run() -> int:
            async with await self._client() as client:
                keys = list(items.items())
                revision = 0
                for i in range(0, len(keys), batch):
                    ops = [
                        client.transactions.put(k.encode(), v.encode())
                        for k, v in keys[i : i + batch]
                    ]
                    await client.transaction(compare=[], success=ops, failure=[])
                return revision or await self._revision()

        return asyncio.run(run())

    def revision(self) -> int:
        return asyncio.run(self._revision())

    def load_apps(self, count: int, instances: int = 1) -> int:
        items: dict[str, str] = {}
        for i in range(count):
            items[f"/routerd/apps/app{i:05d}/config"] = json.dumps(
                {"domains": [f"app{i:05d}.example.com"]}
            )
            for j in range(instances):
                port = self.backends[j % len(self.backends)]
                items[f"/routerd/apps/app{i:05d}/releases/v1/web{j}"] = f"127.0.0.1:{port}"
        return self.put_many(items)

    # -- routerd

    def start_routerd(self, *extra: str) -> None:
        log = open(self.dir / "routerd.log", "wb")  # noqa: SIM115 - lives as long as routerd
        self.routerd = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routerd",
                "run",
                "--etcd",
                f"http://127.0.0.1:{self.etcd_port}",
                "--nginx-conf",
                str(self.conf),
                "--supervise",
                "--http-listen",
                f"127.0.0.1:{self.http_port}",
                "--https-listen",
                f"127.0.0.1:{free_port()}",
                "--status-listen",
                f"127.0.0.1:{self.status_port}",
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--router-id",
                "bench",
                *extra,
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        wait_until(ready, timeout, "routerd /readyz", interval=0.05)

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if re.match(rf"{re.escape(name)}(\{{|\s)", line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def routerd_rss_peak_mb(self) -> float:
        assert self.routerd is not None
        status = Path(f"/proc/{self.routerd.pid}/status").read_text()
        kb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return kb / 1024

    def log_text(self) -> str:
        return (self.dir / "routerd.log").read_text(errors="replace")


def backend_of(bench: Bench, host: str) -> str:
    status, body = http_get(bench.http_port, host)
    return body.decode() if status == 200 else f"status-{status}"


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    box: list[float] = []
    started = time.perf_counter()
    yield box
    box.append(time.perf_counter() - started)


def nproc() -> int:
    return os.cpu_count() or 1


def test_fixtures() -> None:
    """Put the tests' real-process helpers on the path, for benches that need an
    etcd cluster, proxies, several routers or steady traffic: ``tests/cluster.py``
    (Cluster, TcpProxy, Traffic) and ``tests/helpers.py`` (Routerd, Backend)."""
    folder = str(ROOT / "tests")
    if folder not in sys.path:
        sys.path.insert(0, folder)
