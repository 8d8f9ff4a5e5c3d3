"""Dynamic backends (README "Dynamic backends"): the Lua balancer's table is
never missing, failover stays inside the balancer, instance changes cost no
reload, and the push channel is owner-only and validated.

Every router here runs with ``--dynamic-backends on`` unless a test is
parametrized over both modes. Requests go through ``Routerd.http``, a new
connection each.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from helpers import (
    Background,
    active_key,
    app_keys,
    cert_key,
    children_of,
    config_key,
    free_ports,
    in_ci,
    instance_key,
    make_cert,
    metric_sum,
    nginx_masters,
    wait_for,
)

pytestmark = pytest.mark.integration

ON = ("--dynamic-backends", "on")
RELOADS = ("routerd_reloads", 'result="ok"')


def reloads(router) -> float:
    return metric_sum(router.metrics(), *RELOADS)


def workers(router) -> list[int]:
    """The master's workers that still accept connections (not shutting down)."""
    found = []
    for pid in children_of(router.nginx_master()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"nginx: worker") and b"shutting down" not in title:
            found.append(pid)
    return sorted(found)


class Poller(Background):
    """Requests for each host in turn, in a thread, a new connection each; every
    outcome is kept in order as (host, status or exception name, body)."""

    def __init__(self, router, *hosts):
        self.router, self.hosts = router, hosts
        self.seen: list[tuple[str, int | str, str]] = []
        super().__init__()
        self.spawn(self.run)

    def run(self):
        while not self.stopping.is_set():
            for host in self.hosts:
                try:
                    answer = self.router.http(host, timeout=2)
                    self.seen.append((host, answer.status_code, answer.text.strip()))
                except requests.RequestException as exc:
                    self.seen.append((host, type(exc).__name__, ""))

    def of(self, host):
        return [(status, body) for h, status, body in self.seen if h == host]


def unix_request(path, method, body=b""):
    """(status, body text) of one HTTP/1.0 request over the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(
            f"{method} /backends HTTP/1.0\r\nHost: routerd\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, text = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), text.decode(errors="replace").strip()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class _V6Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"backend-v6\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


@pytest.fixture
def ipv6_backend():
    """An HTTP server on [::1] answering ``backend-v6``; its port (without IPv6: skips,
    or fails under CI=true like any missing dependency)."""
    try:
        server = _V6Server(("::1", 0), _V6Handler)
    except OSError as exc:
        if in_ci():
            pytest.fail(f"CI=true and no IPv6 loopback: {exc}", pytrace=False)
        pytest.skip(f"no IPv6 loopback: {exc}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# ------------------------------------------------------- no window without backends


def test_a_reload_leaves_no_window_without_backends(etcd, routerd, backends):
    """Across reloads caused by new apps, every request to an existing app answers 200 from its
    instance, and a new app's server never answers 503: its table comes with the generation."""
    a_instance, *others = backends(4)
    router = routerd(extra_args=ON)
    router.wait_applied(etcd.txn(app_keys("a", ["a.example.com"], [a_instance])))
    before = reloads(router)

    new_hosts = [f"b{n}.example.com" for n in range(len(others))]
    with Poller(router, "a.example.com", *new_hosts) as poller:
        wait_for(lambda: len(poller.seen) >= 20, message="traffic before the reloads")
        for number, (host, instance) in enumerate(zip(new_hosts, others, strict=True)):
            old_workers = workers(router)
            router.wait_applied(etcd.txn(app_keys(f"b{number}", [host], [instance])))
            # The status comes after the push: no faster than this could a client see it.
            answer = router.http(host)
            assert (answer.status_code, answer.text.strip()) == (200, instance.name)
            assert not set(workers(router)) & set(old_workers), "no new nginx generation"
        count = len(poller.seen)
        wait_for(lambda: len(poller.seen) >= count + 20, message="traffic after the reloads")

    assert reloads(router) >= before + len(others)
    to_a = collections.Counter(poller.of("a.example.com"))
    assert set(to_a) == {(200, a_instance.name)}, to_a
    assert sum(to_a.values()) >= 40
    for host, instance in zip(new_hosts, others, strict=True):
        # 404 from a generation that does not know the app yet, then only its instance.
        outcomes = collections.Counter(poller.of(host))
        allowed = {(200, instance.name), (404, "No app is configured for this host.")}
        assert set(outcomes) <= allowed, (host, outcomes)


def test_a_rolled_back_reload_keeps_the_served_table(etcd, routerd, backends, tmp_path):
    """When a reload fails after `nginx -t` passed and is rolled back, the restored config keeps
    its balancer table: an app the refused candidate would have removed still answers 200."""
    shop, gone = backends(2)
    occupier = socket.socket()
    occupier.bind(("127.0.0.1", 0))
    occupier.listen()
    try:
        router = routerd(
            https_port=occupier.getsockname()[1], extra_args=(*ON, "--reload-timeout", "5")
        )
        etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
        router.wait_applied(etcd.txn(app_keys("gone", ["gone.example.com"], [gone])))
        cert, key = make_cert(tmp_path, "shop.example.com")
        # One change: a certificate (whose HTTPS server cannot bind) and an app removed.
        etcd.txn(
            {cert_key("shop.example.com"): json.dumps({"cert": cert, "key": key})},
            deletes=[config_key("gone"), instance_key("gone", "v1", "i0")],
        )
        wait_for(lambda: metric_sum(router.metrics(), "routerd_rollbacks") > 0, timeout=20)

        answer = router.http("gone.example.com")
        assert (answer.status_code, answer.text.strip()) == (200, gone.name)
        assert router.http("shop.example.com").text.strip() == shop.name
    finally:
        occupier.close()


# A master killed with SIGKILL leaves its workers running (they hold the
# listening sockets) and leaves the balancer's unix socket file behind; either
# makes every restart fail with "bind() ... (98: Address already in use)".


def kill_master(router, how, request):
    """Stop the nginx master the way ``how`` says; its pid. Workers it orphans
    are killed when the test ends (the harness only reaps masters)."""
    master, workers = router.nginx_master(), children_of(router.nginx_master())
    request.addfinalizer(lambda: reap_orphans(workers))
    if how == "SIGTERM":
        os.kill(master, signal.SIGTERM)
    elif how == "SIGKILL master":
        os.kill(master, signal.SIGKILL)
    else:  # the whole nginx at once, as an OOM kill of its container would
        for pid in [master, *workers]:
            os.kill(pid, signal.SIGKILL)
    return master


def reap_orphans(workers):
    for pid in workers:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: worker"):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize(
    "how",
    [
        "SIGTERM",
        "SIGKILL master",
        "SIGKILL master and workers",
    ],
)
def test_nginx_restart_serves_the_table_from_its_first_request(
    etcd, routerd, backends, how, request
):
    """An nginx master restarted by routerd --supervise answers its very first request from the
    app's instance, never 503 (it loaded routerd/backends.txt at init), and takes changes again."""
    first, second = backends(2)
    router = routerd(extra_args=ON)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))
    assert router.http("shop.example.com").text.strip() == first.name

    old = kill_master(router, how, request)
    seen = []

    def restarted():
        try:
            answer = router.http("shop.example.com", timeout=1)
            seen.append((answer.status_code, answer.text.strip()))
        except requests.RequestException as exc:
            seen.append((type(exc).__name__, ""))
        masters = nginx_masters(router.conf_path)
        return masters and old not in masters and seen[-1] == (200, first.name)

    wait_for(restarted, timeout=6, interval=0.005, message=f"nginx restarted after {how}")
    answered = [outcome for outcome in seen if isinstance(outcome[0], int)]
    assert set(answered) == {(200, first.name)}, collections.Counter(seen)

    router.wait_applied(etcd.put(instance_key("shop", "v1", "i1"), second.address))
    served = collections.Counter(router.http("shop.example.com").text.strip() for _ in range(8))
    assert set(served) == {first.name, second.name}, served


# ---------------------------------------------------------------------- failover


@pytest.mark.parametrize("dynamic", ["on", "off"])
def test_a_refused_instance_costs_no_failed_request(etcd, routerd, backends, dynamic):
    """With one of two instances refusing connections, 50 requests all answer 200 from the live
    one: the balancer (or the upstream block) moves a refused request on to the other."""
    (live,) = backends(1)
    (dead_port,) = free_ports(1)
    router = routerd(extra_args=("--dynamic-backends", dynamic))
    keys = app_keys("shop", ["shop.example.com"], [live])
    keys[instance_key("shop", "v1", "dead")] = f"127.0.0.1:{dead_port}"
    router.wait_applied(etcd.txn(keys))

    outcomes = collections.Counter()
    for _ in range(50):
        answer = router.http("shop.example.com")
        outcomes[(answer.status_code, answer.text.strip())] += 1

    assert outcomes == {(200, live.name): 50}
    error_log = (router.workdir / "error.log").read_text()
    refused = re.findall(rf"Connection refused.*127\.0\.0\.1:{dead_port}", error_log)
    assert refused, "the dead instance was never tried: failover was not exercised"


@pytest.mark.parametrize("dynamic", ["on", "off"])
def test_failover_tries_are_bounded(etcd, routerd, dynamic):
    """A request to an app whose five instances all refuse tries three of them, then answers 502."""
    dead_ports = free_ports(5)
    router = routerd(extra_args=("--dynamic-backends", dynamic))
    keys = app_keys("shop", ["shop.example.com"])
    for number, port in enumerate(dead_ports):
        keys[instance_key("shop", "v1", f"d{number}")] = f"127.0.0.1:{port}"
    router.wait_applied(etcd.txn(keys))
    error_log = router.workdir / "error.log"
    offset = error_log.stat().st_size

    assert router.http("shop.example.com").status_code == 502

    with error_log.open("rb") as handle:
        handle.seek(offset)
        logged = handle.read().decode(errors="replace")
    tried = re.findall(r"\(111: Connection refused\)", logged)
    assert len(tried) == 3, logged


@pytest.mark.parametrize("dynamic", ["on", "off"])
def test_an_ipv6_instance_is_reached(etcd, routerd, ipv6_backend, dynamic):
    """An instance given as [IPv6]:port answers through the balancer as through an upstream."""
    router = routerd(extra_args=("--dynamic-backends", dynamic))
    keys = app_keys("shop", ["shop.example.com"])
    keys[instance_key("shop", "v1", "a")] = f"[::1]:{ipv6_backend}"
    router.wait_applied(etcd.txn(keys))

    answers = collections.Counter(
        (a.status_code, a.text.strip()) for a in (router.http("shop.example.com") for _ in range(4))
    )
    assert answers == {(200, "backend-v6"): 4}


# -------------------------------------------------------------------- no reload


def test_instance_changes_and_a_release_switch_cause_no_reload(etcd, routerd, backends):
    """Adding and removing instances, a new release and switching `active` to it all go live with
    the same nginx master and workers and no reload counted by routerd."""
    blue, blue2, green = backends(3)
    router = routerd(extra_args=ON)
    keys = app_keys("shop", ["shop.example.com"], [blue], release="blue")
    status = router.wait_applied(etcd.txn({**keys, active_key("shop"): "blue"}))
    master, before_workers, before_reloads = router.nginx_master(), workers(router), reloads(router)
    pushes = metric_sum(router.metrics(), "routerd_backend_pushes")

    def served():
        return {router.http("shop.example.com").text.strip() for _ in range(8)}

    router.wait_applied(etcd.put(instance_key("shop", "blue", "i1"), blue2.address))
    assert served() == {blue.name, blue2.name}
    router.wait_applied(etcd.delete(instance_key("shop", "blue", "i0")))
    assert served() == {blue2.name}
    router.wait_applied(etcd.put(instance_key("shop", "green", "i0"), green.address))
    assert served() == {blue2.name}  # green is not active yet
    router.wait_applied(etcd.put(active_key("shop"), "green"))
    assert served() == {green.name}
    after = router.wait_applied(etcd.delete(instance_key("shop", "blue", "i1")))
    assert served() == {green.name}

    assert router.nginx_master() == master
    assert workers(router) == before_workers, "nginx workers changed: a reload happened"
    assert reloads(router) == before_reloads
    assert after["config_sha256"] == status["config_sha256"] == router.generation()
    # Three changes altered what is served (a new, a removed, a switched-to instance).
    assert metric_sum(router.metrics(), "routerd_backend_pushes") >= pushes + 3


# ------------------------------------------------------------------ push channel


def test_the_push_channel_is_owner_only_and_refuses_malformed_pushes(etcd, routerd, backends):
    """The balancer's socket sits in a folder only routerd's user can enter, and a malformed push
    sent to it is refused with 400 as a whole, leaving routing as it was."""
    (shop,) = backends(1)
    router = routerd(extra_args=ON)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [shop])))
    folder = router.workdir / "private"
    path = folder / "backends.sock"

    info = folder.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
    assert info.st_uid == os.getuid()
    assert stat.S_ISSOCK(path.stat().st_mode)
    status, held = unix_request(path, "GET")
    assert status == 200 and re.fullmatch(r"revision \d+", held), (status, held)

    for body in (
        "revision 999\nshop 1.2.3.4:99999\n",
        "revision 999\nbad;app 1.2.3.4:80\n",
        "revision 999\nshop 127.0.0.1:1\nbad;app 1.2.3.4:80\n",  # one bad line spoils it all
        "revision 999\nshop 1.2.3.4:80;\n",
        "revision 999\nshop example.com:80\n",
        "shop 127.0.0.1:1\n",  # no revision line
        "revision 999 partial\nshop 127.0.0.1:1\n",
    ):
        answer = unix_request(path, "POST", body.encode())
        assert answer[0] == 400 and answer[1].startswith("rejected: "), (body, answer)

    assert unix_request(path, "GET") == (200, held)
    assert {router.http("shop.example.com").text.strip() for _ in range(6)} == {shop.name}


def test_a_push_with_an_impossible_address_is_refused(etcd, routerd, backends):
    """A push naming an IPv4 address with an octet above 255 is refused with 400."""
    (shop,) = backends(1)
    router = routerd(extra_args=ON)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [shop])))
    path = router.workdir / "private" / "backends.sock"
    held = unix_request(path, "GET")

    answer = unix_request(path, "POST", b"revision 999\nshop 999.1.1.1:80\n")

    assert answer[0] == 400, answer
    assert unix_request(path, "GET") == held
    assert router.http("shop.example.com").text.strip() == shop.name


def applies(router, outcome: str) -> float:
    return metric_sum(router.metrics(), "routerd_applies", f'outcome="{outcome}"')


def test_a_failed_push_has_its_own_outcome_and_backs_off(etcd, routerd, backends):
    """With the push channel gone, an instance change is `push_failed` (not rejected),
    retried with growing waits rather than at once; a config change meanwhile is still
    `reloaded` and logged as such. Once the channel is back the instances go live."""
    one, two = backends(2)
    router = routerd(extra_args=ON)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [one])))
    channel = router.workdir / "private" / "backends.sock"
    moved = channel.with_name("moved.sock")
    channel.rename(moved)  # nginx keeps listening on it; routerd cannot reach it
    try:
        etcd.put(instance_key("shop", "v1", "i1"), two.address)
        wait_for(lambda: applies(router, "push_failed") >= 1, timeout=10, message="push_failed")
        assert applies(router, "rejected") == 0
        first = applies(router, "push_failed")
        logged = router.log_text().count(" reloaded revision=")
        etcd.txn(app_keys("blog", ["blog.example.com"], [one]))
        wait_for(
            lambda: router.log_text().count(" reloaded revision=") > logged,
            timeout=10,
            message="the config change logged as reloaded",
        )
        wait_for(lambda: router.http("blog.example.com").ok, timeout=10, message="blog served")
        # Waits of 1, 2, 4 ... s: a few more attempts in 5 s, not one per socket timeout.
        retried = applies(router, "push_failed") - first
        assert 1 <= retried <= 5, retried
        assert "retrying in" in json.dumps(router.status())
    finally:
        moved.rename(channel)
    wait_for(
        lambda: two.name in {router.http("shop.example.com").text.strip() for _ in range(4)},
        timeout=40,
        message="the new instance served once the push channel is back",
    )
    assert applies(router, "rejected") == 0
