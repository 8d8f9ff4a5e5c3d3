"""Per-request traffic: nginx's log lines in, per-app metrics and the access log out.

nginx writes one line per request to a file in the runtime folder (buffered,
flushed every second), in both backend modes. ``TrafficLog`` tails it in a
thread: each line is counted into ``TrafficCounts`` (requests by app,
release and status class; histograms of total time per app and of upstream
time per release) and, unless the app says ``"access_log": false``, written
to the access log in the chosen format. The release comes from routerd's own
table: the address nginx names is looked up among every registered instance
of the app, routed or not. Exact: every line is one request, counted once.

The file never grows without bound: past ``ROTATE_BYTES`` it is renamed,
nginx is told to reopen its logs (SIGUSR1 to the master), and the renamed
file is read to its end and deleted once no nginx process holds it open
(a worker that cannot reopen, for lack of rights on the folder, keeps
writing it: then both are read, and a warning says why). Labels
stay bounded by the routing table: never host, path or client, and the
label sets of apps and releases that leave the table are dropped with it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from routerd.logs import log
from routerd.router import logline
from routerd.router.model import IPV4, RoutingTable
from routerd.traffic import AppTraffic, ReleaseTraffic

logger = logging.getLogger("routerd.traffic")
NONE = "-"  # the app or release label of a request that had none
NOBODY = (NONE, "")  # (release, instance) of a request no known instance answered
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROTATE_BYTES = 64 * 2**20  # nginx's file, renamed and deleted past this size
ACCESS_LOG_BYTES = 256 * 2**20  # routerd's access log: renamed to <path>.1 past this size
ROTATE_GRACE_S = 3.0  # nginx flushes each second and on reopen: then the old file is done
POLL_S = 0.1
K = TypeVar("K")
Seen = tuple[str, str, str, str, str]  # app, release, status, total and upstream time


# ---------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """What one app's log lines need from the routing table."""

    instances: dict[str, tuple[str, str]]  # "host:port" as nginx names it -> (release, instance)
    releases: frozenset[str]
    access_log: bool = True


def routes_of(table: RoutingTable, resolve: Callable[[str], list[str]]) -> dict[str, Route]:
    """app -> Route; routed instances win an address two releases share."""
    routes = {}
    for app in table.apps:
        instances: dict[str, tuple[str, str]] = {}
        for inst in [*app.instances, *app.registered]:
            hosts = [inst.host] if _is_ip(inst.host) else resolve(inst.host)
            for host in hosts:
                instances.setdefault(f"{host}:{inst.port}", (inst.release, inst.name))
        releases = frozenset(i.release for i in app.registered) | {NONE}
        routes[app.name] = Route(instances, releases, app.options.access_log)
    return routes


def _is_ip(host: str) -> bool:
    return host.startswith("[") or IPV4.fullmatch(host) is not None


def resolve(host: str) -> list[str]:
    """The addresses nginx may have resolved a DNS-named instance to."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return sorted({f"[{i[4][0]}]" if i[0] == socket.AF_INET6 else str(i[4][0]) for i in infos})


# ---------------------------------------------------------------- counts


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float, times: int) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += times
        self.total += value * times

    def cumulative(self) -> list[tuple[float, int]]:
        running, out = 0, []
        for bound, count in zip((*BUCKETS, math.inf), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class TrafficCounts:
    """The per-app figures, exposed to Prometheus as a collector. Updated by
    the tail thread a batch at a time, read by scrapes: one lock for both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.duration: dict[str, Histogram] = {}
        self.upstream: dict[tuple[str, str], Histogram] = {}
        self.malformed = 0

    def add(self, seen: dict[Seen, int], malformed: int = 0) -> None:
        """One batch: how many requests had each (app, release, status, total
        time, upstream time), as nginx wrote them. Times repeat (nginx writes
        milliseconds), so each distinct one is parsed once per batch."""
        with self._lock:
            self.malformed += malformed
            for (app, release, status, total, took), times in seen.items():
                key = (app, release, status[:1] + "xx")
                self.requests[key] = self.requests.get(key, 0) + times
                if (seconds := logline.seconds(total)) is not None:
                    self._histogram(self.duration, app).observe(seconds, times)
                if release != NONE and (seconds := logline.seconds(took)) is not None:
                    self._histogram(self.upstream, (app, release)).observe(seconds, times)

    @staticmethod
    def _histogram(table: dict[K, Histogram], key: K) -> Histogram:
        found = table.get(key)
        if found is None:
            found = table[key] = Histogram()
        return found

    def keep(self, routes: dict[str, Route]) -> None:
        """Drop the label sets of apps and releases no longer in the table."""

        def known(app: str, release: str = NONE) -> bool:
            route = routes.get(app)
            return app == NONE or (route is not None and release in route.releases)

        with self._lock:
            self.requests = {k: v for k, v in self.requests.items() if known(k[0], k[1])}
            self.duration = {k: v for k, v in self.duration.items() if known(k)}
            self.upstream = {k: v for k, v in self.upstream.items() if known(*k)}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "routerd_http_requests",
            "Requests served, by app, release and status class",
            labels=["app", "release", "code"],
        )
        duration = HistogramMetricFamily(
            "routerd_http_request_duration_seconds",
            "Time from the first byte read from the client to the last byte sent, by app",
            labels=["app"],
        )
        upstream = HistogramMetricFamily(
            "routerd_upstream_response_seconds",
            "Time the app's instances took to answer, by app and release",
            labels=["app", "release"],
        )
        with self._lock:
            for (app, release, code), count in sorted(self.requests.items()):
                requests.add_metric([app, release, code], count)
            for app, hist in sorted(self.duration.items()):
                duration.add_metric([app], _buckets(hist), hist.total)
            for (app, release), hist in sorted(self.upstream.items()):
                upstream.add_metric([app, release], _buckets(hist), hist.total)
            malformed = CounterMetricFamily(
                "routerd_traffic_lines_malformed",
                "Lines of nginx's traffic log that routerd could not read",
                value=self.malformed,
            )
        yield from (requests, duration, upstream, malformed)

    def report(self, app: str) -> AppTraffic:
        """One app's figures per release, for GET /traffic?app=<app>."""
        with self._lock:
            codes: dict[str, dict[str, int]] = {}
            for (name, release, code), count in self.requests.items():
                if name == app:
                    codes.setdefault(release, {})[code] = count
            releases = {}
            for release, by_code in codes.items():
                hist = self.upstream.get((app, release), Histogram())
                releases[release] = ReleaseTraffic(
                    requests=sum(by_code.values()),
                    codes=by_code,
                    buckets=tuple(hist.cumulative()),
                    seconds_sum=hist.total,
                    seconds_count=sum(hist.counts),
                )
        return AppTraffic(app, releases)


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if math.isinf(b) else repr(b), float(n)) for b, n in hist.cumulative()]


# ------------------------------------------------------------ access log


class AccessLog:
    """routerd's access log: a file (renamed to ``<path>.1`` past its size,
    reopened when something else moved it) or standard output."""

    def __init__(self, target: str, fmt: str) -> None:
        self.target = target
        self.format = logline.FORMATS[fmt]
        self._file: BinaryIO | None = None
        self._checked = 0.0

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("ascii", "backslashreplace")
        if self.target == "stdout":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        handle = self._open()
        handle.write(data)
        handle.flush()

    def _open(self) -> BinaryIO:
        now = time.monotonic()
        if self._file is not None and now - self._checked >= 1.0:
            self._checked = now
            self._rotate_or_reopen()
        if self._file is None:
            self._file = open(self.target, "ab")  # noqa: SIM115 - kept open across batches
        return self._file

    def _rotate_or_reopen(self) -> None:
        assert self._file is not None
        try:
            moved = os.stat(self.target).st_ino != os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            moved = True
        if not moved and self._file.tell() >= ACCESS_LOG_BYTES:
            os.replace(self.target, self.target + ".1")
            moved = True
        if moved:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------ tail


@dataclass
class _Reader:
    fd: int
    rest: bytes = b""
    retire_at: float | None = None  # renamed away: done once no nginx process holds it
    remove: Path | None = None  # the renamed file, deleted once done
    warned: bool = False


def held_by_nginx(fd: int) -> bool:
    """Whether an nginx process still has the file behind ``fd`` open (from /proc).
    A worker that could not reopen its logs keeps writing the renamed file."""
    info = os.fstat(fd)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if not Path(entry.path, "cmdline").read_bytes().startswith(b"nginx:"):
                continue
            for handle in os.scandir(Path(entry.path, "fd")):
                found = os.stat(handle.path)
                if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
                    return True
        except OSError:  # gone, or not ours to look at
            continue
    return False


class TrafficLog:
    """Tails nginx's traffic file in a thread; counts and writes each line."""

    def __init__(
        self,
        path: Path,
        *,
        counts: TrafficCounts | None,
        access_log: AccessLog | None,
        reopen: Callable[[], None],
        rotate_bytes: int = ROTATE_BYTES,
        rotate_grace: float = ROTATE_GRACE_S,
        still_written: Callable[[int], bool] = held_by_nginx,
    ) -> None:
        self.path = path
        self.rotated = path.with_name(path.name + ".1")
        self.counts = counts
        self.access_log = access_log
        self.reopen = reopen
        self.rotate_bytes = rotate_bytes
        self.rotate_grace = rotate_grace
        self.still_written = still_written
        self.routes: dict[str, Route] = {}
        self._current: _Reader | None = None
        self._retired: list[_Reader] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic-log", daemon=True)

    def update(self, table: RoutingTable) -> None:
        """A new routing table: releases to name, apps to log, label sets to keep.
        May look up DNS names: call it off the event loop."""
        self.routes = routes = routes_of(table, resolve)
        if self.counts is not None:
            self.counts.keep(routes)

    def start(self) -> None:
        """Skip what an earlier run left: those requests were counted then."""
        self.rotated.unlink(missing_ok=True)
        self._current = self._open(at_end=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.drain()
        for reader in [self._current, *self._retired]:
            if reader is not None:
                os.close(reader.fd)
        if self.access_log is not None:
            self.access_log.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.drain()
                self._maybe_rotate()
            except Exception as exc:  # noqa: BLE001  (a full disk, a bug: keep counting)
                log(logger, "traffic log failed", logging.ERROR, error=repr(exc))
                busy = False
            if not busy:
                self._stop.wait(POLL_S)

    def drain(self) -> bool:
        """Read everything nginx wrote so far; True when there was something."""
        if self._current is None:
            self._current = self._open(at_end=False)
        busy = False
        for reader in [*self._retired, self._current]:
            if reader is not None:
                busy |= self._read(reader)
        now = time.monotonic()
        for reader in [r for r in self._retired if r.retire_at is not None and r.retire_at <= now]:
            if self.still_written(reader.fd):
                self._warn_once(reader)
                reader.retire_at = now + 1.0  # keep reading it; look again in a second
                continue
            self._read(reader)
            os.close(reader.fd)
            self._retired.remove(reader)
            if reader.remove is not None:
                reader.remove.unlink(missing_ok=True)
        return busy

    def _warn_once(self, reader: _Reader) -> None:
        if not reader.warned:
            reader.warned = True
            log(
                logger,
                "nginx still writes the rotated traffic log; reading both",
                logging.WARNING,
                path=str(self.rotated),
                hint="its workers could not reopen the log: can nginx's user enter the folder?",
            )

    def _open(self, *, at_end: bool) -> _Reader | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # nginx has not started yet, or is reopening
        if at_end:
            os.lseek(fd, 0, os.SEEK_END)
        return _Reader(fd)

    def _read(self, reader: _Reader) -> bool:
        got = False
        while chunk := os.read(reader.fd, 1 << 20):
            got = True
            data = reader.rest + chunk
            end = data.rfind(b"\n")
            if end < 0:
                reader.rest = data
                continue
            reader.rest = data[end + 1 :]
            self.handle(data[:end].decode("latin-1").split("\n"))
        return got

    def _maybe_rotate(self) -> None:
        """Past its size: rename, have nginx reopen, finish the old file later.
        A file replaced behind routerd's back (deleted, then made anew by a
        restarted nginx) is finished the same way and followed to the new one."""
        reader = self._current
        if reader is None:
            return
        mine = os.fstat(reader.fd)
        try:
            on_disk = os.stat(self.path)
            replaced = (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            replaced = False  # gone; nginx makes it anew when it starts or reopens
        if replaced:
            self._retire(reader, remove=None)
            return
        if self._retired or mine.st_size < self.rotate_bytes:
            return
        os.replace(self.path, self.rotated)
        with contextlib.suppress(Exception):  # nginx not running: its next start opens anew
            self.reopen()
        self._retire(reader, remove=self.rotated)

    def _retire(self, reader: _Reader, *, remove: Path | None) -> None:
        reader.retire_at = time.monotonic() + self.rotate_grace
        reader.remove = remove
        self._retired.append(reader)
        self._current = self._open(at_end=False)

    def handle(self, lines: list[str]) -> None:
        """Count and log one batch of complete lines (the hot path: kept flat,
        with what it calls per line bound to local names)."""
        routes, access_log, last = self.routes, self.access_log, logline.last
        fmt = access_log.format if access_log is not None else None
        plain, general = fmt or logline.FORMATS["json"]
        seen: dict[Seen, int] = {}
        count = seen.get
        out: list[str] = []
        write = out.append
        malformed = 0
        for line in lines:
            f = line.split("\t")
            if len(f) != 16:  # logline.COUNT, spelled out on the hot path
                malformed += 1
                continue
            route = routes.get(f[2])  # the app
            if route is None:
                app, release, instance = NONE, NONE, ""
            else:
                app, upstream = f[2], f[3]
                if " " in upstream:  # tries: the last one answered
                    upstream = last(upstream)
                release, instance = route.instances.get(upstream, NOBODY)
            key = (app, release, f[4], f[6], f[8])  # status, total time, upstream time
            seen[key] = count(key, 0) + 1
            if fmt is not None and (route is None or route.access_log):
                write((plain if "\\" not in line else general)(f, app, release, instance))
        if self.counts is not None:
            self.counts.add(seen, malformed)
        if access_log is not None:
            access_log.write(out)
