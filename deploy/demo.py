"""routerd demo: a local etcd and nginx, two apps, a release switch under traffic.

Everything runs on loopback ports picked at start, in a temporary folder
removed at the end. Printed as it goes:

  1. start etcd, four tiny backends (shop v1 x2, shop v2 x2, blog v1)
  2. register the apps with `routerd apps set` and their instances in etcd
  3. start `routerd run --supervise` (it starts nginx) and route requests
  4. put bad values in etcd and show they are rejected alone
  5. with traffic flowing, switch shop's active release from v1 to v2 and
     show the traffic move, with no failed request
  6. deploy a containerized app with `routerd deploy` (Docker), then deploy
     its next release under traffic: the six steps, the traffic moving, and
     not one failed request
  7. deploy a third release as a canary (`--canary 50`): half the requests
     go to it while the routers' figures judge it, then all of them

    python deploy/demo.py
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

BACKEND = r"""
import http.server, sys
name, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, host: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


def wait_for(check, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


class Demo:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="routerd-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etcd = f"http://127.0.0.1:{free_port()}"
        self.http = free_port()
        self.metrics = free_port()
        self.cleanup: list[str] = []  # apps whose containers go at the end

    def spawn(self, *argv: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def etcdctl(self, *argv: str) -> str:
        return subprocess.run(
            ["etcdctl", "--endpoints", self.etcd, *argv],
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def routerd(self, *argv: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "routerd", *argv, "--etcd", self.etcd],
            capture_output=True,
            text=True,
        )
        return (result.stdout + result.stderr).strip()

    def close(self) -> None:
        for app in self.cleanup:  # the deployed containers, before etcd goes
            self.routerd("apps", "rm", app)
            self.routerd("gc", app, "--force")  # its config is gone: gc must be told
        for proc in reversed(self.procs):
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def traffic(port: int, host: str) -> Iterator[list[tuple[float, int, str]]]:
    """Requests back to back, a new connection each, until the block ends."""
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                status, body = get(port, host)
            except OSError as error:
                status, body = 0, type(error).__name__
            results.append((time.monotonic(), status, body))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join()


def report_traffic(
    results: list[tuple[float, int, str]], switched: float, old: str, new: str, since: str
) -> None:
    """Answers per half second, then failures and when the traffic moved."""
    start = results[0][0]
    for window in range(int((results[-1][0] - start) // 0.5) + 1):
        begin = start + window * 0.5
        seen = Counter(body for t, _, body in results if begin <= t < begin + 0.5)
        print(
            f"   t+{window * 0.5:3.1f}s  " + "  ".join(f"{b} x{n}" for b, n in sorted(seen.items()))
        )
    failed = [r for r in results if r[1] != 200]
    first_new = min((t for t, _, body in results if new in body), default=switched)
    last_old = max((t for t, _, body in results if old in body), default=switched)
    print(
        f"   {len(results)} requests, {len(failed)} failed; first {new} answer "
        f"{(first_new - switched) * 1000:.0f} ms after {since}, last {old} answer "
        f"{(last_old - switched) * 1000:.0f} ms after it"
    )


DEPLOY = ["deploy", "web", "--image", "routerd-demo-app:1", "--network", "host",
          "--replicas", "2", "--drain", "1"]  # fmt: skip


def deploy_step(demo: Demo) -> bool:
    """Step 6; False when there is no Docker engine to deploy with."""
    say("6. routerd deploy: a containerized app, then its next release under traffic")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        print("   skipped: no Docker engine answers (deploy/demo.sh starts one)")
        return False
    subprocess.run(["bash", str(Path(__file__).with_name("demo-image.sh"))], check=True)
    print("   " + demo.routerd("apps", "set", "web", "--domain", "web.example.com"))
    demo.cleanup.append("web")
    run_deploy(demo, [*DEPLOY, "--release", "v1", "--env", "MESSAGE=hello"])
    with traffic(demo.http, "web.example.com") as results:
        time.sleep(1.0)
        started = time.monotonic()
        run_deploy(demo, [*DEPLOY, "--release", "v2", "--env", "MESSAGE=hello-again"])
        time.sleep(0.5)
    report_traffic(results, started, "web v1", "web v2", "the deploy started")
    print("   " + demo.routerd("status", "web").replace("\n", "\n   "))
    return True


def canary_step(demo: Demo) -> None:
    say("7. a canary deploy: v3 takes half the requests, judged by the router, then all")
    canary = ["--canary", "50", "--canary-interval", "3", "--min-requests", "20"]
    with traffic(demo.http, "web.example.com") as results:
        time.sleep(1.0)
        run_deploy(demo, [*DEPLOY, "--release", "v3", "--env", "MESSAGE=third", *canary])
        time.sleep(0.5)
    seen = Counter(
        body.split(" ")[1] if status == 200 else str(status) for _, status, body in results
    )
    failed = sum(1 for _, code, _ in results if code != 200)
    print(
        f"   {len(results)} requests, {failed} failed; answered by "
        + ", ".join(f"{release} x{count}" for release, count in sorted(seen.items()))
    )


def run_deploy(demo: Demo, argv: list[str]) -> None:
    """`routerd deploy`, its progress lines shown as they come."""
    print(f"   $ routerd {' '.join(argv)}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "routerd", *argv, "--etcd", demo.etcd],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        print("     " + line.rstrip())
    if proc.wait() != 0:
        raise SystemExit(f"demo: routerd deploy exited with {proc.returncode}")


def main() -> None:
    demo = Demo()
    try:
        run(demo)
    finally:
        demo.close()


def run(demo: Demo) -> None:
    say(f"1. etcd on {demo.etcd} and five backends (working folder {demo.dir})")
    peer = f"http://127.0.0.1:{free_port()}"
    demo.spawn(
        "etcd",
        "--name",
        "demo",
        "--data-dir",
        str(demo.dir / "etcd"),
        "--listen-client-urls",
        demo.etcd,
        "--advertise-client-urls",
        demo.etcd,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"demo={peer}",
        log="etcd.log",
    )
    wait_for(lambda: demo.etcdctl("endpoint", "health") is not None, "etcd")
    backends = {
        "shop-v1-a": free_port(),
        "shop-v1-b": free_port(),
        "shop-v2-a": free_port(),
        "shop-v2-b": free_port(),
        "blog-v1-a": free_port(),
    }
    for name, port in backends.items():
        demo.spawn(sys.executable, "-c", BACKEND, name, str(port), log=f"{name}.log")

    say("2. register two apps and their instances")
    for line in (
        demo.routerd("apps", "set", "shop", "--domain", "shop.example.com"),
        demo.routerd(
            "apps",
            "set",
            "blog",
            "--domain",
            "blog.example.com",
            "--option",
            "client_max_body_size=1m",
        ),
    ):
        print("   " + line)
    for name, port in backends.items():
        app, release, instance = name.split("-")
        demo.etcdctl(
            "put", f"/routerd/apps/{app}/releases/{release}/{instance}", f"127.0.0.1:{port}"
        )
    demo.etcdctl("put", "/routerd/apps/shop/active", "v1")
    demo.etcdctl("put", "/routerd/apps/blog/active", "v1")
    print(
        "   "
        + demo.etcdctl("get", "--prefix", "/routerd/apps", "--keys-only")
        .replace("\n\n", "\n   ")
        .strip()
    )

    say(f"3. routerd run --supervise (nginx on 127.0.0.1:{demo.http})")
    demo.spawn(
        sys.executable,
        "-m",
        "routerd",
        "run",
        "--etcd",
        demo.etcd,
        "--nginx-conf",
        str(demo.dir / "conf" / "nginx.conf"),
        "--supervise",
        "--http-listen",
        f"127.0.0.1:{demo.http}",
        "--https-listen",
        f"127.0.0.1:{free_port()}",
        "--status-listen",
        f"127.0.0.1:{free_port()}",
        "--metrics-listen",
        f"127.0.0.1:{demo.metrics}",
        "--router-id",
        "demo",
        log="routerd.log",
    )
    (demo.dir / "conf").mkdir(exist_ok=True)
    wait_for(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{demo.metrics}/readyz").status == 200,
        "routerd to be ready",
    )
    for host in ("shop.example.com", "blog.example.com", "unknown.example.com"):
        seen = Counter(get(demo.http, host) for _ in range(6))
        print(f"   {host:22s} -> " + ", ".join(f"{s} {b!r} x{n}" for (s, b), n in seen.items()))

    say("4. bad values are rejected alone; shop and blog keep serving")
    demo.etcdctl("put", "/routerd/apps/evil/config", '{"domains": ["evil.example.com;} server {"]}')
    demo.etcdctl("put", "/routerd/apps/blog/releases/v1/b", "127.0.0.1:99999")
    time.sleep(0.5)
    status = json.loads(demo.etcdctl("get", "--print-value-only", "/routerd/routers/demo"))
    for error in status["errors"]:
        print(f"   rejected {error['key']}: {error['error']}")
    shop, blog = get(demo.http, "shop.example.com"), get(demo.http, "blog.example.com")
    print(f"   shop -> {shop}, blog -> {blog}")

    say("5. switch shop from v1 to v2 under traffic (a new connection per request)")
    with traffic(demo.http, "shop.example.com") as results:
        time.sleep(1.0)
        switched = time.monotonic()
        demo.etcdctl("put", "/routerd/apps/shop/active", "v2")
        print("   put /routerd/apps/shop/active = v2")
        time.sleep(1.5)
    report_traffic(results, switched, "shop-v1", "shop-v2", "the put")
    if deploy_step(demo):
        canary_step(demo)
    say("done; routerd's log follows (see `routerd --help` for more)")
    print((demo.dir / "routerd.log").read_text())


if __name__ == "__main__":
    main()
