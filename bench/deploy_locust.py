"""Deploys judged under a Locust cluster: what users saw while routerd deployed.

For each backend mode, a real etcd, ``routerd run`` with its nginx and a
containerized app (Docker, the busybox test image); then bench/loadtest.py
runs a Locust master with two workers, keep-alive and new-connection users
together, and ``routerd deploy`` of a new release every few seconds, ten
times, after a quiet baseline. Prints, per mode, the failures by kind and the
p50/p99 during deploys against the quiet seconds.

    python bench/deploy_locust.py [--deploys 10] [--users 20] [--modes off,on]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from deploy_helpers import build_image, deploy_args, remove_app_containers  # noqa: E402
from harness import Bench  # noqa: E402

APP = "locustapp"
HOST = f"{APP}.example.com"


def deploy_command(bench: Bench, replicas: int) -> list[str]:
    extra = ["--drain", "1", "--health-timeout", "20", "--router-timeout", "20"]
    return [
        sys.executable, "-m", "routerd", "deploy",
        *deploy_args(APP, replicas=replicas, extra=extra),
        "--etcd", f"http://127.0.0.1:{bench.etcd_port}",
    ]  # fmt: skip


def one_mode(mode: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    with Bench(backend_ports=1) as bench:
        bench.put_many({f"/routerd/apps/{APP}/config": json.dumps({"domains": [HOST]})})
        bench.start_routerd("--dynamic-backends", mode)
        bench.wait_ready()
        first = subprocess.run(deploy_command(bench, args.replicas), capture_output=True, text=True)
        if first.returncode != 0:
            raise SystemExit(f"the first deploy failed:\n{first.stdout}{first.stderr}")
        targets = folder / f"targets-{mode}.json"
        router = f"http://127.0.0.1:{bench.http_port}"
        targets.write_text(
            json.dumps({"routers": [router], "apps": [{"name": APP, "host": HOST, "expect": APP}]})
        )
        duration = int(args.baseline + args.deploys * args.every + 10)
        prefix = folder / mode / "run"
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "loadtest.py"), "--targets-file", str(targets),
             "--users", str(args.users), "--duration", str(duration), "--csv", str(prefix),
             "--after", str(args.baseline), "--every", str(args.every), "--runs", str(args.deploys),
             "--run", shlex.join(deploy_command(bench, args.replicas))],
            capture_output=True, text=True,
        )  # fmt: skip
        print(f"--dynamic-backends {mode}:\n{done.stdout}{done.stderr}", flush=True)
        return json.loads(Path(f"{prefix}_summary.json").read_text())


def row(mode: str, summary: dict[str, Any]) -> str:
    """One line of the table: the whole run, the quiet seconds, the deploy windows."""
    windows = summary["events"]
    failed_during = sum(sum(w["failures"].values()) for w in windows)
    worst_p99 = max((w["p99_ms"] for w in windows), default=0.0)
    quiet = summary["quiet"]
    label = "reload path" if mode == "off" else "dynamic backends (Lua)"
    return (
        f"{label} | {summary['requests']} | {sum(summary['failures'].values())} "
        f"{summary['failures'] or ''} | {quiet['p50_ms']:.0f}/{quiet['p99_ms']:.0f} ms | "
        f"{failed_during} in {len(windows)} deploys, p99 {worst_p99:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploys", type=int, default=10)
    parser.add_argument("--every", type=float, default=7.0, help="seconds between deploys")
    parser.add_argument("--baseline", type=float, default=15.0, help="quiet seconds first")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--modes", default="off,on")
    args = parser.parse_args()

    import docker

    client = docker.from_env()
    build_image(client)
    folder = Path(tempfile.mkdtemp(prefix="routerd-locust-"))
    results = {}
    for mode in args.modes.split(","):
        remove_app_containers(client, APP)
        try:
            results[mode] = one_mode(mode, args, folder)
        finally:
            remove_app_containers(client, APP)
    print("mode | requests | failed (kinds) | quiet p50/p99 | during deploys: failed, worst p99")
    for mode, summary in results.items():
        print(row(mode, summary))
    print(f"reports in {folder}")


if __name__ == "__main__":
    main()
