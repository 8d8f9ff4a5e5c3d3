"""A broken release under load: what users see with canary steps and with blue-green.

A real etcd, ``routerd run`` with its nginx, Docker containers of the tests'
busybox image, and an open-loop generator sending requests through nginx at
a fixed rate, each on a new connection (``deploy_load.Load``). The broken
release answers its health path but fails ``--fail-percent`` of real
requests with a 500 (the image's ``FAIL_PERCENT``). Each round deploys it
twice from a healthy release:

- canary: ``routerd deploy --canary 10,50 --canary-interval S``, which the
  routers' figures roll back at its first step;
- blue-green: a plain ``routerd deploy`` of the same release, which
  succeeds (the health path is fine); it is rolled back by hand
  (``routerd rollback``) once the canary's duration has passed, as if a
  person noticed as fast as the canary did.

Figures: the requests users saw fail from each deploy's start until the
canary's duration had passed (the same window for both), and blue-green's
failure rate once it took all traffic, which lasts until someone acts.

    python bench/canary.py [--rounds 3] [--rate 200] [--interval 10] [--fail-percent 30]
                           [--dynamic-backends auto|on|off]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from deploy_helpers import Deploy, deploy_args  # noqa: E402
from deploy_load import APP, Load, Sample, app_bench  # noqa: E402
from harness import Bench  # noqa: E402


@dataclass
class Round:
    canary_failed: int
    canary_sent: int
    canary_seconds: float
    green_failed: int
    green_sent: int
    green_rate: float  # percent of requests failing once the broken release took all traffic


def failed(samples: list[Sample]) -> int:
    return sum(1 for s in samples if s.status is None or not 200 <= s.status < 300)


def deploy(bench: Bench, *extra: str, env: dict[str, str], command: str = "deploy") -> Deploy:
    flags = ["--health-timeout", "20", "--router-timeout", "20", "--drain", "1", *extra]
    endpoint = f"http://127.0.0.1:{bench.etcd_port}"
    if command == "rollback":
        return Deploy(endpoint, "rollback", APP, *flags)
    return Deploy(endpoint, "deploy", *deploy_args(APP, env=env, extra=flags))


def one_round(bench: Bench, load: Load, args: argparse.Namespace) -> Round:
    broken = {"FAIL_PERCENT": str(args.fail_percent), "MESSAGE": "broken"}
    steps = ("--canary", "10,50", "--canary-interval", f"{args.interval:g}")
    canary = deploy(bench, *steps, env=broken)
    if canary.wait(300) != 1 or "failed at step 5 (canary)" not in canary.output:
        raise SystemExit(f"the canary was not rolled back at its steps:\n{canary.output}")
    window = canary.elapsed + 1.0  # the last second of requests, logged after the rollback
    time.sleep(max(0.0, canary.started + window - time.monotonic()))
    seen = load.window(canary.started, canary.started + window)

    green = deploy(bench, env=broken)
    if green.wait(300) != 0:
        raise SystemExit(f"the blue-green deploy failed:\n{green.output}")
    switched = time.monotonic()
    time.sleep(max(1.0, green.started + window - time.monotonic()))
    during = load.window(green.started, green.started + window)
    after = load.window(switched, time.monotonic())
    back = deploy(bench, env={}, command="rollback")
    if back.wait(300) != 0:
        raise SystemExit(f"rolling the broken release back failed:\n{back.output}")
    time.sleep(2)  # the rollback's own drain and the routers settle
    return Round(
        canary_failed=failed(seen),
        canary_sent=len(seen),
        canary_seconds=canary.elapsed,
        green_failed=failed(during),
        green_sent=len(during),
        green_rate=100 * failed(after) / max(1, len(after)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--interval", type=float, default=10, help="--canary-interval")
    parser.add_argument("--fail-percent", type=int, default=30, help="the broken release's")
    parser.add_argument("--dynamic-backends", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args()
    with app_bench(args.dynamic_backends) as bench:
        first = deploy(bench, env={"MESSAGE": "healthy"})
        if first.wait(120) != 0:
            raise SystemExit(f"the first deploy failed:\n{first.output}")
        load = Load(bench.http_port, args.rate, keepalive=0)
        load.start()
        try:
            time.sleep(2)
            rounds = [one_round(bench, load, args) for _ in range(args.rounds)]
        finally:
            load.stop()
    report(rounds, args)


def report(rounds: list[Round], args: argparse.Namespace) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(
        f"{args.rate:g} requests/s on new connections; broken release fails "
        f"{args.fail_percent} % of requests; router --dynamic-backends {args.dynamic_backends}; "
        f"{len(rounds)} rounds (medians, then every round)"
    )
    canary = med([r.canary_failed for r in rounds])
    green = med([r.green_failed for r in rounds])
    print(
        f"canary 10,50 ({args.interval:g} s steps): rolled back after "
        f"{med([r.canary_seconds for r in rounds]):.1f} s; users saw {canary:g} failed of "
        f"{med([r.canary_sent for r in rounds]):g} requests "
        f"({[r.canary_failed for r in rounds]})"
    )
    print(
        f"blue-green, same window: users saw {green:g} failed of "
        f"{med([r.green_sent for r in rounds]):g} requests ({[r.green_failed for r in rounds]}); "
        f"then {med([r.green_rate for r in rounds]):.1f} % of every request failed "
        "until rolled back by hand"
    )
    print(f"ratio blue-green / canary: {green / max(canary, 1):.1f}x")


if __name__ == "__main__":
    main()
