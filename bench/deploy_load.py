"""Blue-green deploys under load: failed requests, latency and deploy overhead.

A real etcd, ``routerd run`` with its nginx, Docker containers of a busybox
httpd image and ``routerd deploy`` as a subprocess, 20 times in a row, while
an open-loop generator sends requests through nginx at a fixed rate, each on a
new connection. A few keep-alive clients run beside it; their resets (old
nginx workers closing idle keep-alive connections at a reload) are
counted apart. Figures:

- failed requests during deploys (non-2xx, connection errors), target 0;
- p50/p99 latency during deploys against a quiet baseline;
- deploy overhead: the deploy's own total (from its last line) minus the
  containers' start-and-health time (step 1) and the drain, target < 2 s;
  also the wall time per deploy, which adds the Python start of the CLI.

    python bench/deploy_load.py [--rate 400] [--deploys 20] [--drain 2] [--dynamic-backends off]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from deploy_helpers import Deploy, build_image, deploy_args, remove_app_containers  # noqa: E402
from harness import Bench, percentile  # noqa: E402

APP = "benchapp"
HOST = f"{APP}.example.com"
DONE = re.compile(r"^\[(\d)/6\] (\w+): done in ([0-9.]+) s")
TOTAL = re.compile(r"^deployed \S+ \S+ in ([0-9.]+) s")


@dataclass
class Sample:
    started: float
    latency_ms: float
    status: int | None
    error: str | None
    body: str = ""


@dataclass
class Load:
    """Open-loop requests at ``rate`` per second (new connection each), plus
    ``keepalive`` clients each reusing one connection, in a thread of its own."""

    port: int
    rate: float
    keepalive: int = 4
    samples: list[Sample] = field(default_factory=list)
    keepalive_requests: int = 0
    keepalive_resets: int = 0
    keepalive_non2xx: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        clients = [asyncio.create_task(self._keepalive_client()) for _ in range(self.keepalive)]
        interval, due = 1.0 / self.rate, time.monotonic()
        while not self._stop.is_set():
            task = asyncio.create_task(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    async def _one(self) -> None:
        started = time.monotonic()
        request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(request)
            async with asyncio.timeout(10):
                data = await reader.read(-1)
            writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            sample = Sample(started, _ms(started), status, None, body.decode(errors="replace"))
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            sample = Sample(started, _ms(started), None, type(exc).__name__)
        self.samples.append(sample)

    async def _keepalive_client(self) -> None:
        request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                while True:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
                    await reader.readexactly(length)
                    self.keepalive_requests += 1
                    if not head.startswith(b"HTTP/1.1 2"):
                        self.keepalive_non2xx += 1
                    await asyncio.sleep(0.05)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self.keepalive_resets += 1
                await asyncio.sleep(0.01)

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.started < end]


def listen_overflows() -> int:
    """The kernel's count of SYNs dropped on full listen queues (system-wide).

    The test app is busybox httpd, whose listen backlog is 9: when it is
    starved of CPU for a moment, SYNs overflow and the client's kernel (here
    nginx's, connecting upstream) retries after 1 s. No request fails, but
    such a request takes a second; this counter tells them apart.
    """
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        fields = dict(zip(names.split(), values.split(), strict=False))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return 0


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


@dataclass
class DeployFigures:
    total: float
    wall: float
    start: float
    drain: float

    @property
    def overhead(self) -> float:
        return self.total - self.start - self.drain


def run_deploy(bench: Bench, args: argparse.Namespace, number: int) -> DeployFigures:
    extra = ["--drain", f"{args.drain:g}", "--health-timeout", "20", "--router-timeout", "20"]
    deploy = Deploy(
        f"http://127.0.0.1:{bench.etcd_port}",
        "deploy",
        *deploy_args(APP, replicas=args.replicas, env={"MESSAGE": f"n{number}"}, extra=extra),
    )
    if deploy.wait(120) != 0:
        raise SystemExit(f"deploy {number} failed:\n{deploy.output}")
    steps = {m[2]: float(m[3]) for line in deploy.lines if (m := DONE.match(line))}
    total = next(float(m[1]) for line in deploy.lines if (m := TOTAL.match(line)))
    return DeployFigures(total, deploy.elapsed, steps["start"], args.drain)


def describe(name: str, samples: list[Sample], seconds: float) -> str:
    ok = [s.latency_ms for s in samples if s.status is not None and 200 <= s.status < 300]
    non2xx = collections.Counter(
        s.status for s in samples if s.status is not None and not 200 <= s.status < 300
    )
    errors = collections.Counter(s.error for s in samples if s.error)
    return (
        f"{name}: {len(samples)} requests in {seconds:.1f} s ({len(samples) / seconds:.0f} req/s), "
        f"non-2xx {sum(non2xx.values())} {dict(non2xx) or ''}, "
        f"errors {sum(errors.values())} {dict(errors) or ''}\n"
        f"    latency p50 {statistics.median(ok):.1f} ms, p99 {percentile(ok, 99):.1f} ms, "
        f"max {max(ok):.1f} ms; over 100 ms: {sum(1 for v in ok if v > 100)}, "
        f"over 1 s: {sum(1 for v in ok if v > 1000)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=400, help="requests per second")
    parser.add_argument("--deploys", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--drain", type=float, default=2.0, help="as routerd deploy")
    parser.add_argument("--baseline", type=float, default=10.0, help="quiet seconds measured")
    parser.add_argument(
        "--dynamic-backends",
        default="auto",
        choices=["auto", "on", "off"],
        help="the router's mode: off makes every switch a reload",
    )
    args = parser.parse_args()
    with app_bench(args.dynamic_backends) as bench:
        run_deploy(bench, args, 0)  # the first release, not measured
        measure(bench, args)


@contextlib.contextmanager
def app_bench(dynamic_backends: str) -> Iterator[Bench]:
    """etcd and routerd (in that backend mode) with APP's config and the test image
    built; APP's containers are removed before and after."""
    import docker

    client = docker.from_env()
    build_image(client)
    remove_app_containers(client, APP)
    with Bench(backend_ports=1) as bench:
        bench.put_many({f"/routerd/apps/{APP}/config": json.dumps({"domains": [HOST]})})
        bench.start_routerd("--dynamic-backends", dynamic_backends)
        bench.wait_ready()
        try:
            yield bench
        finally:
            remove_app_containers(client, APP)


def measure(bench: Bench, args: argparse.Namespace) -> None:
    load = Load(bench.http_port, args.rate)
    load.start()
    time.sleep(1.0)  # warm up
    quiet_start = time.monotonic()
    time.sleep(args.baseline)
    quiet_end = time.monotonic()
    reloads_before = bench.metric('routerd_reloads_total{result="ok"}')
    overflows_before = listen_overflows()
    figures = [run_deploy(bench, args, n) for n in range(1, args.deploys + 1)]
    deploys_end = time.monotonic()
    reloads = bench.metric('routerd_reloads_total{result="ok"}') - reloads_before
    overflows = listen_overflows() - overflows_before
    resets_during = load.keepalive_resets
    load.stop()

    during = load.window(quiet_end, deploys_end)
    releases = {s.body.split()[1] for s in during if s.status == 200 and s.body.split()[1:]}
    print(
        f"connection-per-request load at {args.rate:g} req/s; {args.replicas} replicas; "
        f"router --dynamic-backends {args.dynamic_backends}"
    )
    print(describe("quiet baseline", load.window(quiet_start, quiet_end), args.baseline))
    print(describe(f"during {args.deploys} deploys", during, deploys_end - quiet_end))
    print(f"    releases that answered: {len(releases)}; nginx reloads: {reloads:g}")
    print(f"    SYNs dropped on full listen queues (system-wide): {overflows}")
    print(
        f"keep-alive clients ({load.keepalive}, counted apart): {load.keepalive_requests} "
        f"requests, {resets_during} connection resets, {load.keepalive_non2xx} non-2xx"
    )
    for name, values in (
        ("deploy total (controller)", [f.total for f in figures]),
        ("  of which start+health", [f.start for f in figures]),
        ("  overhead (total - start - drain)", [f.overhead for f in figures]),
        ("deploy wall time (with CLI start)", [f.wall for f in figures]),
        ("  wall overhead", [f.wall - f.start - f.drain for f in figures]),
    ):
        print(
            f"{name}: p50 {statistics.median(values):.2f} s, max {max(values):.2f} s, "
            f"min {min(values):.2f} s"
        )
    print(f"drain: {args.drain:g} s per deploy")


if __name__ == "__main__":
    main()
