"""A Locust cluster on this machine against running routers, with deploys meanwhile.

Starts ``locust --master --headless`` and ``--workers`` worker processes on
deploy/loadtest/locustfile.py, optionally runs a command (``routerd deploy``,
``routerd config set``, ...) every ``--every`` seconds while the load runs,
and writes Locust's CSV and HTML reports plus a summary: requests, failures
by kind, requests per second, p50/p95/p99, and for each command run the
failures and latencies of the requests that started in the seconds around
it, beside the quiet seconds'.

    python bench/loadtest.py --targets-file targets.json --duration 60 \\
        --every 15 --run 'routerd deploy shop --image shop:2'
    python bench/loadtest.py --routers http://127.0.0.1:80 --app shop=shop.example.com

Everything after the known flags is passed to Locust (e.g. ``--think-time``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "deploy" / "loadtest" / "locustfile.py"
sys.path.insert(0, str(LOCUSTFILE.parent))
from report import summarize  # noqa: E402


def locust(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


def start_cluster(args: argparse.Namespace, passed: list[str]) -> list[subprocess.Popen[bytes]]:
    prefix = Path(args.csv)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{prefix}_locust.log", "wb")  # noqa: SIM115  (open while the processes run)
    master = subprocess.Popen(
        locust(
            "--master", "--headless", "--master-bind-host", "127.0.0.1",
            "--master-bind-port", str(args.master_port), "--expect-workers", str(args.workers),
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
            "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html",
            "--timeline", f"{prefix}_timeline.json", "--only-summary", *passed,
        ),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            locust(
                "--worker", "--master-host", "127.0.0.1", "--master-port", str(args.master_port)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(args.workers)
    ]
    return [master, *workers]


def run_every(
    args: argparse.Namespace, stop: threading.Event, events: list[tuple[str, float, float]]
) -> None:
    """Run ``--run`` every ``--every`` seconds, start to start (the first after
    ``--after``; at once when a run took longer), at most ``--runs`` times, until
    ``stop``."""
    number = 0
    wait = args.after if args.after is not None else args.every
    while not stop.wait(wait) and (args.runs is None or number < args.runs):
        number += 1
        started = time.time()
        done = subprocess.run(shlex.split(args.run), capture_output=True, text=True, check=False)
        wait = max(0.0, started + args.every - time.time())
        outcome = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        events.append(
            (f"run {number} ({outcome}, {time.time() - started:.1f} s)", started, time.time())
        )
        if done.returncode != 0:
            print(f"run {number} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="Locust worker processes")
    parser.add_argument("--users", type=int, default=20, help="simulated users in all")
    parser.add_argument("--spawn-rate", type=float, default=20, help="users started per second")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load")
    parser.add_argument("--csv", default="build/loadtest/run", help="prefix of every report file")
    parser.add_argument("--master-port", type=int, default=5557)
    parser.add_argument("--every", type=float, default=0, help="seconds between --run commands")
    parser.add_argument("--run", default="", help="a command to run every --every seconds")
    parser.add_argument("--after", type=float, help="quiet seconds before the first run")
    parser.add_argument("--runs", type=int, help="run the command at most this many times")
    args, passed = parser.parse_known_args()
    if bool(args.every) != bool(args.run):
        parser.error("--every and --run go together")
    processes = start_cluster(args, passed)
    events: list[tuple[str, float, float]] = []
    stop = threading.Event()
    runner = threading.Thread(target=run_every, args=(args, stop, events), daemon=True)
    if args.run:
        runner.start()
    try:
        code = processes[0].wait(args.duration + 120)
    finally:
        stop.set()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    if args.run:
        runner.join()
    if code not in (0, 1):  # Locust exits 1 when any request failed
        print(f"locust master exited {code}; see {args.csv}_locust.log", file=sys.stderr)
        return 2
    summary = summarize(args.csv, f"{args.csv}_timeline.json", events)
    Path(f"{args.csv}_summary.json").write_text(summary.to_json())
    print("\n".join(summary.lines()))
    print(f"reports: {args.csv}_stats.csv, {args.csv}.html, {args.csv}_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
