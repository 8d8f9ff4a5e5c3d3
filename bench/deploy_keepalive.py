"""Blue-green deploys under keep-alive load, both backend modes side by side.

The harness of bench/deploy_load.py (a real etcd, ``routerd run`` with its
nginx, busybox httpd containers, ``routerd deploy`` as a subprocess), but the
load is ``wrk`` with its defaults: every connection is kept alive and reused
as fast as it answers. A reload makes the old workers close their idle
keep-alive connections (nginx before 1.27.4), which wrk counts as socket errors; with
``--dynamic-backends on`` a deploy changes instance lists inside nginx and
should cost no reload and no error. For each mode: one unmeasured first
release, then wrk runs while ``--deploys`` consecutive deploys go through,
and its totals are printed (requests, non-2xx/3xx, socket errors by kind)
with the reloads routerd counted meanwhile.

    python bench/deploy_keepalive.py [--deploys 20] [--threads 2] [--connections 16]
                                     [--modes on,off] [--drain 2] [--timeout 2s] [--keep-logs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from deploy_helpers import Deploy, build_image, deploy_args, remove_app_containers  # noqa: E402
from deploy_load import listen_overflows  # noqa: E402
from harness import Bench, http_get, wait_until  # noqa: E402

APP = "kabench"
HOST = f"{APP}.example.com"
RELOADS = 'routerd_reloads_total{result="ok"}'
PUSHES = "routerd_backend_pushes_total"
# wrk calls done() at the end of its run, also when stopped with SIGINT.
REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK-JSON {"requests": %d, "seconds": %.3f, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "non2xx3xx": %d, "p50_ms": %.2f, "p99_ms": %.2f, ' ..
    '"max_ms": %.2f}\\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.timeout,
    e.status, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""
ERRORS = ("connect", "read", "write", "timeout")


def deploy(bench: Bench, args: argparse.Namespace, number: int) -> None:
    extra = ["--drain", f"{args.drain:g}", "--health-timeout", "20", "--router-timeout", "20"]
    env = {"MESSAGE": f"n{number}"}
    run = Deploy(
        f"http://127.0.0.1:{bench.etcd_port}",
        "deploy",
        *deploy_args(APP, replicas=args.replicas, env=env, extra=extra),
    )
    if run.wait(120) != 0:
        raise SystemExit(f"deploy {number} failed:\n{run.output}")


def wrk(bench: Bench, args: argparse.Namespace, script: Path) -> subprocess.Popen[str]:
    argv = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", "-d3600s",
        "-s", str(script), "-H", f"Host: {HOST}", f"http://127.0.0.1:{bench.http_port}/",
    ]  # fmt: skip
    if args.timeout:
        argv[1:1] = ["--timeout", args.timeout]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_wrk(proc: subprocess.Popen[str]) -> dict[str, float]:
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    line = next((x for x in output.splitlines() if x.startswith("WRK-JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no totals:\n{output}")
    figures: dict[str, float] = json.loads(line.split(" ", 1)[1])
    return figures


def one_mode(mode: str, args: argparse.Namespace, script: Path) -> dict[str, float]:
    import docker

    client = docker.from_env()
    build_image(client)
    remove_app_containers(client, APP)
    with Bench(backend_ports=1) as bench:
        bench.put_many({f"/routerd/apps/{APP}/config": json.dumps({"domains": [HOST]})})
        bench.start_routerd("--dynamic-backends", mode)
        try:
            bench.wait_ready()
            deploy(bench, args, 0)  # the first release, not measured
            wait_until(lambda: http_get(bench.http_port, HOST)[0] == 200, 20, "the first release")
            reloads, pushes = bench.metric(RELOADS), bench.metric(PUSHES)
            overflows = listen_overflows()
            load = wrk(bench, args, script)
            time.sleep(args.warmup)
            started = time.monotonic()
            for number in range(1, args.deploys + 1):
                deploy(bench, args, number)
                print(f"  [{mode}] deploy {number}/{args.deploys} done", file=sys.stderr)
            deploys_seconds = time.monotonic() - started
            figures = stop_wrk(load)
            figures["deploys_seconds"] = deploys_seconds
            figures["reloads"] = bench.metric(RELOADS) - reloads
            figures["pushes"] = bench.metric(PUSHES) - pushes
            figures["listen_overflows"] = listen_overflows() - overflows
            log = bench.log_text()
        finally:
            remove_app_containers(client, APP)
        if args.keep_logs:
            kept = Path(tempfile.mkdtemp(prefix=f"deploy-keepalive-{mode}-"))
            (kept / "routerd.log").write_text(log)
            for nginx_log in bench.conf.parent.glob("*.log"):  # error.log, and any other
                shutil.copy(nginx_log, kept / nginx_log.name)
            print(f"  [{mode}] logs kept in {kept}", file=sys.stderr)
    return figures


ROWS = [
    ("requests", "requests", "{:.0f}"),
    ("non-2xx/3xx responses", "non2xx3xx", "{:.0f}"),
    ("socket errors: connect", "connect", "{:.0f}"),
    ("socket errors: read", "read", "{:.0f}"),
    ("socket errors: write", "write", "{:.0f}"),
    ("socket errors: timeout", "timeout", "{:.0f}"),
    ("errors of any kind", "errors", "{:.0f}"),
    ("nginx reloads (routerd)", "reloads", "{:.0f}"),
    ("backend pushes (routerd)", "pushes", "{:.0f}"),
    ("wrk seconds", "seconds", "{:.1f}"),
    ("requests per second", "rate", "{:.0f}"),
    ("latency p50 ms", "p50_ms", "{:.2f}"),
    ("latency p99 ms", "p99_ms", "{:.2f}"),
    ("latency max ms", "max_ms", "{:.1f}"),
    ("SYNs dropped on full listen queues", "listen_overflows", "{:.0f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploys", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--drain", type=float, default=2.0, help="as routerd deploy")
    parser.add_argument("--warmup", type=float, default=2.0, help="wrk seconds before deploy 1")
    parser.add_argument(
        "--timeout", help="wrk --timeout (default wrk's 2s: slower answers count as timeouts)"
    )
    parser.add_argument("--modes", default="on,off", help="--dynamic-backends values, in order")
    parser.add_argument("--keep-logs", action="store_true", help="keep routerd and nginx logs")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "report.lua"
        script.write_text(REPORT)
        for mode in modes:
            figures = one_mode(mode, args, script)
            figures["errors"] = figures["non2xx3xx"] + sum(figures[k] for k in ERRORS)
            figures["rate"] = figures["requests"] / figures["seconds"]
            results[mode] = figures

    timeout = f" --timeout {args.timeout}" if args.timeout else ""
    print(
        f"wrk -t{args.threads} -c{args.connections}{timeout} (keep-alive) through "
        f"{args.deploys} deploys of {args.replicas} replicas, drain {args.drain:g} s"
    )
    header = f"{'':36}" + "".join(f"{'dynamic ' + m:>16}" for m in modes)
    print(header)
    for label, key, fmt in ROWS:
        print(f"{label:36}" + "".join(f"{fmt.format(results[m][key]):>16}" for m in modes))


if __name__ == "__main__":
    main()
