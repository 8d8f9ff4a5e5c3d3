"""A broken release under a Locust cluster: canary steps against blue-green.

The same case as bench/canary.py, under the load-test kit's Locust cluster
(bench/loadtest.py: a master and two workers, keep-alive and new-connection
users together, every answer checked). For each backend mode: a real etcd,
``routerd run`` with its nginx and a healthy release of the busybox test
image; then, each under its own Locust run of the same length, a release
that fails ``--fail-percent`` of its requests is deployed after a quiet
baseline, once with ``--canary 10,50`` (rolled back by the routers' figures)
and once blue-green (it takes all traffic until the run ends; then it is
rolled back by hand, outside the load). Prints the failed requests of each
run, by kind.

    python bench/canary_locust.py [--users 20] [--interval 10] [--modes off,on]
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

APP = "canaryapp"
HOST = f"{APP}.example.com"


def routerd(bench: Bench, command: str, *args: str) -> list[str]:
    flags = ["--drain", "1", "--health-timeout", "20", "--router-timeout", "20"]
    etcd = ["--etcd", f"http://127.0.0.1:{bench.etcd_port}"]
    return [sys.executable, "-m", "routerd", command, *args, *flags, *etcd]


def run_under_load(
    args: argparse.Namespace, targets: Path, prefix: Path, command: list[str]
) -> dict[str, Any]:
    """One Locust run of the fixed length; ``command`` runs once after the baseline."""
    duration = int(args.baseline + args.interval + 12)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loadtest.py"), "--targets-file", str(targets),
         "--users", str(args.users), "--duration", str(duration), "--csv", str(prefix),
         "--after", str(args.baseline), "--every", "1", "--runs", "1",
         "--run", shlex.join(command)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"bench/loadtest.py failed:\n{done.stdout}{done.stderr}")
    summary: dict[str, Any] = json.loads(Path(f"{prefix}_summary.json").read_text())
    return summary


def one_mode(mode: str, args: argparse.Namespace, folder: Path) -> dict[str, dict[str, Any]]:
    broken = {"FAIL_PERCENT": str(args.fail_percent), "MESSAGE": "broken"}
    steps = ["--canary", "10,50", "--canary-interval", f"{args.interval:g}"]
    with Bench(backend_ports=1) as bench:
        bench.put_many({f"/routerd/apps/{APP}/config": json.dumps({"domains": [HOST]})})
        bench.start_routerd("--dynamic-backends", mode)
        bench.wait_ready()
        first = subprocess.run(routerd(bench, "deploy", *deploy_args(APP)), capture_output=True)
        if first.returncode != 0:
            raise SystemExit(f"the first deploy failed:\n{first.stdout.decode()}")
        targets = folder / f"targets-{mode}.json"
        router = f"http://127.0.0.1:{bench.http_port}"
        app = {"name": APP, "host": HOST, "expect": APP}
        targets.write_text(json.dumps({"routers": [router], "apps": [app]}))
        canary = routerd(bench, "deploy", *deploy_args(APP, env=broken, extra=steps))
        green = routerd(bench, "deploy", *deploy_args(APP, env=broken))
        found = {
            "canary": run_under_load(args, targets, folder / mode / "canary", canary),
            "blue-green": run_under_load(args, targets, folder / mode / "green", green),
        }
        back = subprocess.run(routerd(bench, "rollback", APP), capture_output=True)
        if back.returncode != 0:
            raise SystemExit(f"rolling back failed:\n{back.stdout.decode()}")
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--interval", type=float, default=10, help="--canary-interval")
    parser.add_argument("--baseline", type=float, default=10, help="quiet seconds first")
    parser.add_argument("--fail-percent", type=int, default=30, help="the broken release's")
    parser.add_argument("--modes", default="off,on")
    args = parser.parse_args()

    import docker

    client = docker.from_env()
    build_image(client)
    folder = Path(tempfile.mkdtemp(prefix="routerd-canary-locust-"))
    print("mode | deploy | requests | failed (kinds) | quiet p50/p99")
    for mode in args.modes.split(","):
        remove_app_containers(client, APP)
        try:
            for name, summary in one_mode(mode, args, folder).items():
                failed = sum(summary["failures"].values())
                quiet = summary["quiet"]
                print(
                    f"{mode} | {name} | {summary['requests']} | {failed} {summary['failures']} | "
                    f"{quiet['p50_ms']:.0f}/{quiet['p99_ms']:.0f} ms",
                    flush=True,
                )
        finally:
            remove_app_containers(client, APP)
    print(f"reports in {folder}")


if __name__ == "__main__":
    main()
