"""Throughput at the edge: what access logs and per-app metrics cost, and
routerd's config against a minimal hand-written nginx proxy.

One etcd, one backend nginx (two ports answering a short body, the cheapest
backend there is, so the router is what is measured) and, side by side on
their own ports: a plain nginx with a minimal proxy config to the same two
backends (upstream keepalive, no log), the same with the headers routerd
sends added by hand (what the edge's features cost apart from how
routerd's config is built), and six ``routerd run --supervise``
routers for the same app, with and without the Lua balancer: access log
(JSON, to a file) and traffic metrics on, metrics only (``--access-log
off``), or both off (``--access-log off --no-traffic-metrics``). Only the
one under load is busy. ``wrk`` runs ``--seconds`` against each in turn, in
a shuffled order each round, with keep-alive and with a new connection per
request (``Connection: close``). The tables give the median requests/s over
``--rounds``, the CPU each router's processes (nginx and routerd) spent per
request, which holds up better than throughput when other work shares the
machine, and the ratios that matter (each the median of the rounds' own
ratios, as the runs of one round are close in time). After the runs each counting router's
request counter is compared with the requests wrk completed against it (the
few more it counts were in flight when wrk stopped).

    python bench/edge.py [--rounds 5] [--seconds 5] [--threads 2] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

from harness import Bench, free_port, http_get, wait_until  # noqa: E402

HOST = "edge.example.com"
BACKEND_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{a};
        listen 127.0.0.1:{b};
        location / {{ return 200 "hello from the backend\\n"; }}
    }}
}}
"""
# The least a proxy in front of these backends needs: what anyone would write by hand.
MINIMAL_CONF = """
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    upstream app {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
# The headers routerd sends with no proxy trusted, written by hand into the
# minimal config: what apps receive and the request id sent back. The price of
# the edge's features themselves, apart from how routerd's config is built.
START_MAP = r"""
    map $msec $routerd_request_start {
        "~^([0-9]+)\.([0-9]+)$" "t=$1$2";
        default "t=$msec";
    }
"""
EDGE_HEADERS = r"""
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Port $server_port;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Request-Start $routerd_request_start;
            proxy_set_header Forwarded "";
            add_header X-Request-Id $request_id always;
"""


def with_edge_headers(template: str) -> str:
    """A config template with routerd's headers added (and PCRE's JIT, as routerd's)."""
    last = '            proxy_set_header Connection "";'
    for anchor in ("events {{", "    upstream app", last):
        if anchor not in template:  # the headers would be left out without a word
            raise ValueError(f"no {anchor.strip()!r} in the config to add routerd's headers to")
    text = template.replace("events {{", "pcre_jit on;\nevents {{", 1)
    start_map = START_MAP.replace("{", "{{").replace("}", "}}")
    text = text.replace("    upstream app", start_map + "    upstream app", 1)
    return text.replace(last, last + EDGE_HEADERS, 1)


MINIMAL_HEADERS_CONF = with_edge_headers(MINIMAL_CONF)

WRK_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format('\\nWRK-JSON {"requests": %d, "seconds": %.3f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout + summary.errors.status))
end
"""


@dataclass
class Target:
    name: str
    port: int
    metrics_port: int | None = None  # routerd only
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # CPU per request, its tree
    own_us: dict[str, list[float]] = field(default_factory=dict)  # of which routerd itself
    sent: int = 0  # requests wrk completed against it, all runs
    errors: int = 0


def start_nginx(folder: Path, text: str) -> subprocess.Popen[bytes]:
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(text.replace("{dir}", str(folder)))
    return subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", f"{folder}/", "-e", str(folder / "error.log"),
         "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def start_routerd(bench: Bench, name: str, *extra: str) -> Target:
    folder = bench.dir / name
    folder.mkdir()
    target = Target(name, free_port(), free_port())
    log = (folder / "routerd.log").open("wb")
    target.procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routerd",
                "run",
                "--etcd",
                f"http://127.0.0.1:{bench.etcd_port}",
                "--nginx-conf",
                str(folder / "nginx.conf"),
                "--supervise",
                "--http-listen",
                f"127.0.0.1:{target.port}",
                "--https-listen",
                f"127.0.0.1:{free_port()}",
                "--status-listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                f"127.0.0.1:{target.metrics_port}",
                "--router-id",
                name,
                *extra,
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
    )
    return target


TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (routerd, its nginx master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        found.append(current := pending.pop())
        pending += children.get(current, [])
    return found


def cpu_seconds(target: Target) -> tuple[float, float]:
    """User and system CPU so far of the target's processes, and of routerd alone."""
    total = own = 0
    for proc in target.procs:
        for pid in tree(proc.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            ticks = int(fields[11]) + int(fields[12])
            total += ticks
            own += ticks if pid == proc.pid and target.metrics_port is not None else 0
    return total / TICK, own / TICK


def requests_counted(target: Target) -> float:
    assert target.metrics_port is not None
    url = f"http://127.0.0.1:{target.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    pattern = r'^routerd_http_requests_total\{app="edge",[^}]*\} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.MULTILINE))


def wrk(target: Target, args: argparse.Namespace, script: Path, close: bool) -> float:
    command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.seconds:g}s",
               "-s", str(script), "-H", f"Host: {HOST}"]  # fmt: skip
    if close:
        command += ["-H", "Connection: close"]
    before, own_before = cpu_seconds(target)
    output = subprocess.run(
        [*command, f"http://127.0.0.1:{target.port}/"], capture_output=True, text=True, check=True
    ).stdout
    if target.metrics_port is not None:
        time.sleep(1.5)  # routerd reads the last second's lines: its CPU for them counts too
    after, own_after = cpu_seconds(target)
    figures = json.loads(output.split("WRK-JSON ", 1)[1])
    target.sent += figures["requests"]
    target.errors += figures["errors"]
    load = "new connection" if close else "keep-alive"
    done = max(1, figures["requests"])
    target.cpu_us.setdefault(load, []).append((after - before) / done * 1e6)
    target.own_us.setdefault(load, []).append((own_after - own_before) / done * 1e6)
    return float(figures["requests"] / figures["seconds"])


def median(target: Target, load: str) -> float:
    return statistics.median(target.rps[load])


def paired(a: Target, b: Target, load: str) -> float:
    """The median over rounds of a's rate against b's in the same round: runs
    of one round are close in time, so a slow spell of the machine weighs on
    both sides of each ratio."""
    return statistics.median(x / y for x, y in zip(a.rps[load], b.rps[load], strict=True))


def report(targets: dict[str, Target], args: argparse.Namespace) -> None:
    loads = ("keep-alive", "new connection")
    print(
        f"\nrequests/s, median of {args.rounds} runs of {args.seconds:g} s, "
        f"wrk -t{args.threads} -c{args.connections}"
    )
    print(f"| config | {' | '.join(loads)} |")
    print("|---|---|---|")
    for name, target in targets.items():
        runs = " | ".join(f"{median(target, load):,.0f}" for load in loads)
        print(f"| {name} | {runs} |")
    print("\nCPU per request, us: the router's processes (nginx and routerd) / routerd alone")
    print(f"| config | {' | '.join(loads)} |")
    print("|---|---|---|")
    for name, target in targets.items():
        cpu = " | ".join(
            f"{statistics.median(target.cpu_us[load]):.1f} / "
            f"{statistics.median(target.own_us[load]):.1f}"
            for load in loads
        )
        print(f"| {name} | {cpu} |")
    minimal, headers = targets["minimal nginx"], targets["minimal nginx + routerd's headers"]
    print("\nratios: the median of each round's own ratio")
    print("| ratio | keep-alive | new connection |")
    print("|---|---|---|")
    for mode in ("reload path", "Lua"):
        on, off = targets[f"routerd {mode}, logs+metrics on"], targets[f"routerd {mode}, off"]
        only = targets[f"routerd {mode}, metrics only"]
        for label, a, b in (
            (f"{mode}: on / off", on, off),
            (f"{mode}: metrics only / off", only, off),
            (f"{mode}: on / minimal nginx", on, minimal),
            (f"{mode}: off / minimal nginx", off, minimal),
            (f"{mode}: off / minimal nginx + routerd's headers", off, headers),
        ):
            ratios = " | ".join(f"{paired(a, b, load):.1%}" for load in loads)
            print(f"| {label} | {ratios} |")
    ratios = " | ".join(f"{paired(headers, minimal, load):.1%}" for load in loads)
    print(f"| routerd's headers alone: minimal + headers / minimal | {ratios} |")


def start_app(bench: Bench) -> tuple[int, int]:
    """The backend nginx on two ports, and the app ``edge`` routed to both."""
    # Run as root, nginx's workers are nobody: they must reach their log files
    # to reopen them when routerd rotates the traffic log.
    bench.dir.chmod(0o755)
    a, b = free_port(), free_port()
    backend = start_nginx(bench.dir / "backend", BACKEND_CONF.format(a=a, b=b, dir="{dir}"))
    bench.procs.append(backend)
    bench.put_many(
        {
            "/routerd/apps/edge/config": json.dumps({"domains": [HOST]}),
            "/routerd/apps/edge/releases/v1/web1": f"127.0.0.1:{a}",
            "/routerd/apps/edge/releases/v1/web2": f"127.0.0.1:{b}",
        }
    )
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk -d, per run")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    with Bench(backend_ports=0) as bench:
        a, b = start_app(bench)
        targets: dict[str, Target] = {}
        for name, template in (
            ("minimal nginx", MINIMAL_CONF),
            ("minimal nginx + routerd's headers", MINIMAL_HEADERS_CONF),
        ):
            target = targets[name] = Target(name, free_port())
            text = template.format(a=a, b=b, port=target.port, dir="{dir}")
            nginx_dir = bench.dir / re.sub(r"[^a-z]+", "-", name.lower()).strip("-")
            target.procs.append(start_nginx(nginx_dir, text))
        variants = (
            ("logs+metrics on", ()),
            ("metrics only", ("--access-log", "off")),
            ("off", ("--access-log", "off", "--no-traffic-metrics")),
        )
        for mode, flag in (("reload path", "off"), ("Lua", "on")):
            for logs, extra in variants:
                name = f"routerd {mode}, {logs}"
                folder = re.sub(r"[^a-z]+", "-", name.lower())
                targets[name] = start_routerd(bench, folder, "--dynamic-backends", flag, *extra)
                targets[name].name = name
        try:
            for target in targets.values():
                wait_until(lambda t=target: http_get(t.port, HOST)[0] == 200, 60, target.name)
            script = bench.dir / "report.lua"
            script.write_text(WRK_SCRIPT)
            for target in targets.values():  # warm up: workers, upstream keepalive
                wrk(target, argparse.Namespace(**{**vars(args), "seconds": 1}), script, False)
                target.sent = target.errors = 0
            time.sleep(2.5)  # the warm-up's lines are flushed and counted
            counting = ("on", "only")
            baseline = {n: requests_counted(t) for n, t in targets.items() if n.endswith(counting)}
            for number in range(args.rounds):
                order = list(targets.values())
                random.shuffle(order)
                for target in order:
                    for load, close in (("keep-alive", False), ("new connection", True)):
                        target.rps.setdefault(load, []).append(wrk(target, args, script, close))
                print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
            time.sleep(2.5)  # nginx flushes its log buffers each second
            report(targets, args)
            print()
            for name, before in baseline.items():
                target = targets[name]
                counted = requests_counted(target) - before
                print(
                    f"{name}: counted {counted:,.0f} requests, wrk completed {target.sent:,} "
                    f"(the difference: requests in flight when wrk stopped); "
                    f"wrk errors {target.errors}"
                )
        finally:
            for target in targets.values():
                for proc in target.procs:
                    proc.terminate()
                for proc in target.procs:
                    proc.wait(20)


if __name__ == "__main__":
    main()
