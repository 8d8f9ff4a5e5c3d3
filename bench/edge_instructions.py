"""nginx's instructions per request at the edge, counted by callgrind: routerd's
rendered configs against the minimal proxy, figures a busy machine cannot move.

Throughput on a shared 2-core machine moves by a fifth between identical runs;
the instructions nginx executes per request do not. For each config, nginx
runs as one process under ``valgrind --tool=callgrind`` and answers
``--requests`` and then five times as many keep-alive requests from one
client; the difference between the two runs' totals, divided by the
difference in requests, is what one request costs in user space (the
kernel's share, the same socket work for every config, is not counted).

The configs: the minimal proxy of ``edge.py``; the same with the headers
routerd's config adds (what apps receive, and the request id sent back),
as routerd sends them (``edge.MINIMAL_HEADERS_CONF``), with a constant
request id, which prices nginx's ``$request_id`` (16 bytes from OpenSSL's
RAND_bytes), and with a constant X-Request-Start too, which prices turning
``$msec`` into milliseconds; and the config routerd renders, both backend
modes, with the traffic log off and on.

    python bench/edge_instructions.py [--requests 500]
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

import edge  # noqa: E402
from harness import Bench, free_port, http_get, wait_until  # noqa: E402

ROUTERD = {
    "routerd reload path, traffic log off": ("off", "--access-log", "off", "--no-traffic-metrics"),
    "routerd reload path, traffic log on": ("off",),
    "routerd Lua, traffic log off": ("on", "--access-log", "off", "--no-traffic-metrics"),
    "routerd Lua, traffic log on": ("on",),
}


def ask(port: int, count: int) -> None:
    """``count`` GETs on one keep-alive connection."""
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(count):
        client.request("GET", "/", headers={"Host": edge.HOST, "User-Agent": "curl/7.88.1"})
        answer = client.getresponse()
        answer.read()
        if answer.status != 200:
            raise SystemExit(f"port {port}: status {answer.status}")
    client.close()


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nginx under valgrind never listened on {port}")


def instructions(conf: Path, port: int, requests: int) -> int:
    """callgrind's total for nginx started on ``conf``, warmed up, then asked ``requests``."""
    out = conf.with_name(f"callgrind-{requests}.out")
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               "nginx", "-c", str(conf), "-p", f"{conf.parent}/",
               "-g", "master_process off; daemon off;"]  # fmt: skip
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        ask(port, 50)  # the first requests fill caches and open upstream connections
        ask(port, requests)
        time.sleep(1.2)  # a traffic log is flushed each second: count that work too
    finally:
        proc.terminate()
        proc.wait(60)
    found = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit(f"{out}: no callgrind summary")
    return int(found.group(1))


def per_request(conf: Path, port: int, requests: int) -> float:
    few, many = instructions(conf, port, requests), instructions(conf, port, 5 * requests)
    return (many - few) / (4 * requests)


def hand_written(folder: Path, text: str) -> tuple[Path, int]:
    """A config of ours in its own folder, on a port of its own."""
    port = free_port()
    (folder / "tmp").mkdir(parents=True)
    conf = folder / "nginx.conf"
    conf.write_text(text.replace("{port}", str(port)).replace("{dir}", str(folder)))
    return conf, port


def rendered(bench: Bench, name: str, flags: tuple[str, ...]) -> tuple[Path, int]:
    """The config routerd renders for these flags: started, served, then stopped."""
    mode, *extra = flags
    folder = re.sub(r"[^a-z]+", "-", name.lower())
    target = edge.start_routerd(bench, folder, "--dynamic-backends", mode, *extra)
    wait_until(lambda: http_get(target.port, edge.HOST)[0] == 200, 60, name)
    for proc in target.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in target.procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            print(f"{name}: routerd did not stop within 60 s of SIGTERM; killed", file=sys.stderr)
            proc.kill()
            proc.wait()
    return bench.dir / folder / "nginx.conf", target.port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="the smaller run's requests")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    with Bench(backend_ports=0) as bench:
        a, b = edge.start_app(bench)
        minimal = edge.MINIMAL_CONF.format(a=a, b=b, port="{port}", dir="{dir}")
        with_headers = edge.MINIMAL_HEADERS_CONF.format(a=a, b=b, port="{port}", dir="{dir}")
        constant = with_headers.replace("$request_id", "constant-id")
        no_start = constant.replace("X-Request-Start $routerd_request_start", "X-Request-Start t=0")
        configs: list[tuple[str, Callable[[], tuple[Path, int]]]] = [
            ("minimal nginx", partial(hand_written, bench.dir / "minimal", minimal)),
            ("minimal + routerd's headers",
             partial(hand_written, bench.dir / "headers", with_headers)),
            ("minimal + routerd's headers, a constant request id",
             partial(hand_written, bench.dir / "constant", constant)),
            ("minimal + routerd's headers, a constant request id and start",
             partial(hand_written, bench.dir / "no-start", no_start)),
            *[(name, partial(rendered, bench, name, flags)) for name, flags in ROUTERD.items()],
        ]  # fmt: skip
        base = None
        print("| config | instructions per request | against minimal |")
        print("|---|---|---|")
        for name, make in configs:
            conf, port = make()
            cost = per_request(conf, port, args.requests)
            base = base or cost
            print(f"| {name} | {cost:,.0f} | {cost / base:.0%} |", flush=True)


if __name__ == "__main__":
    main()
