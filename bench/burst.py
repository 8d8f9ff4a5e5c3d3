"""Reload coalescing under a burst: 1,000 puts as fast as one client can,
then the number of reloads they caused and the time from the last put
until nginx serves it.

Each put moves one app's instance to the other backend; the last put moves
app 0, and a request loop (a new connection each) waits for it.

    python bench/burst.py [--apps 1000] [--puts 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aetcd
from harness import Bench, backend_of, wait_until


def burst(bench: Bench, apps: int, puts: int, round_no: int) -> tuple[float, float, float]:
    target = bench.backends[(round_no + 1) % 2]
    value = f"127.0.0.1:{target}".encode()
    keys = [f"/routerd/apps/app{(i + 1) % apps:05d}/releases/v1/web0".encode() for i in range(puts)]

    async def run() -> float:
        async with aetcd.Client(host="127.0.0.1", port=bench.etcd_port, timeout=30) as client:
            started = time.perf_counter()
            for key in keys:  # one put at a time, as fast as they are acknowledged
                await client.put(key, value)
            return started

    reloads_before = bench.metric("routerd_reloads_total")
    pushes_before = bench.metric("routerd_backend_pushes_total")
    started = asyncio.run(run())
    last_put = time.perf_counter()
    expected = f"backend-{target}"
    while backend_of(bench, "app00000.example.com") != expected:
        if time.perf_counter() - last_put > 30:
            raise TimeoutError("the last put never went live")
    live = time.perf_counter()
    time.sleep(1.5)  # count reloads that were still queued
    reloads = bench.metric("routerd_reloads_total") - reloads_before
    pushes = bench.metric("routerd_backend_pushes_total") - pushes_before
    return last_put - started, live - last_put, reloads, pushes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--puts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="off,on", help="--dynamic-backends values to run")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        run_mode(args, mode)


def run_mode(args: argparse.Namespace, mode: str) -> None:
    with Bench() as bench:
        bench.load_apps(args.apps)
        bench.start_routerd("--dynamic-backends", mode)
        bench.wait_ready()
        wait_until(
            lambda: backend_of(bench, "app00000.example.com").startswith("backend-"),
            30,
            "first app",
        )
        label = "reload path" if mode == "off" else "dynamic backends (Lua)"
        print(f"{label}: burst of {args.puts} puts over {args.apps} apps:")
        results = []
        for round_no in range(args.rounds):
            duration, to_live, reloads, pushes = burst(bench, args.apps, args.puts, round_no)
            results.append((duration, to_live, reloads, pushes))
            print(
                f"  round {round_no + 1}: puts took {duration:.2f} s, {reloads:.0f} reloads, "
                f"{pushes:.0f} pushes, last put to live {to_live * 1000:.0f} ms"
            )
        print(
            f"  median: {statistics.median(r[2] for r in results):.0f} reloads, "
            f"{statistics.median(r[3] for r in results):.0f} pushes, last put to live "
            f"{statistics.median(r[1] for r in results) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
