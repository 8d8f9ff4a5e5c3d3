"""Change-to-live on the reload path: from the etcd put of a new instance
address until a request through nginx reaches that instance.

For each size, N apps are loaded (one instance each), routerd starts, and
then one app's instance is moved between two backends CHANGES times; each
change is timed from just before the put until the first request (a new
connection each, polled back to back) that the new backend answers.

    python bench/change_to_live.py [--sizes 10,1000] [--changes 40]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aetcd
from harness import Bench, backend_of, summary, wait_until


def measure(size: int, changes: int, mode: str) -> list[float]:
    with Bench() as bench:
        bench.load_apps(size)
        bench.start_routerd("--dynamic-backends", mode)
        bench.wait_ready(timeout=300)
        host = "app00000.example.com"
        key = b"/routerd/apps/app00000/releases/v1/web0"
        wait_until(lambda: backend_of(bench, host).startswith("backend-"), 30, "first app")
        latencies = []
        loop = asyncio.new_event_loop()
        client = aetcd.Client(host="127.0.0.1", port=bench.etcd_port)
        loop.run_until_complete(client.connect())

        def put(value: str) -> None:  # one connected client: time the put, not a handshake
            loop.run_until_complete(client.put(key, value.encode()))

        for i in range(changes):
            target = bench.backends[(i + 1) % 2]
            expected = f"backend-{target}"
            time.sleep(0.3 if mode == "off" else 0.05)  # let old workers retire
            started = time.perf_counter()
            put(f"127.0.0.1:{target}")
            while backend_of(bench, host) != expected:
                if time.perf_counter() - started > 10:
                    raise TimeoutError(
                        f"change {i} not live after 10 s\n{bench.log_text()[-2000:]}"
                    )
            latencies.append((time.perf_counter() - started) * 1000)
        reloads = bench.metric("routerd_reloads_total")
        label = "reload path" if mode == "off" else "dynamic (Lua)"
        print(f"  {label:13s} {size:6d} apps: {summary(latencies)}; reloads {reloads:.0f}")
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--modes", default="off,on", help="--dynamic-backends values to run")
    args = parser.parse_args()
    print("change-to-live of an instance change, connection-per-request poll")
    print("(reloads counts every reload since start, the first config included):")
    for size in map(int, args.sizes.split(",")):
        for mode in args.modes.split(","):
            measure(size, args.changes, mode)


if __name__ == "__main__":
    main()
