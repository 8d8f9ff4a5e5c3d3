"""The router at the edge, behind a real load balancer (Debian's haproxy):
the real client address from the PROXY protocol or a trusted X-Forwarded-For,
the effective scheme, request ids, access logs, per-app metrics, upstream
failures, HTTP/2 and gzip, in both backend modes where the balancer path
differs.

Clients connect from 127.0.0.2 or 127.0.0.3 (two "machines"); haproxy
reaches the router from 127.0.0.1, the only trusted proxy.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from deploy_helpers import run
from edge_helpers import EchoBackend, Haproxy, get, json_lines, raw_request, read_lines
from helpers import (
    active_key,
    app_keys,
    cert_key,
    config_key,
    instance_key,
    make_cert,
    metric_samples,
    require_binary,
    wait_for,
)

pytestmark = pytest.mark.integration
TRUST = ("--trusted-proxies", "127.0.0.1/32")
MODES = ["off", "on"]
FORGED = {"X-Forwarded-For": "10.6.6.6", "X-Forwarded-Proto": "https", "X-Request-Id": "forged-1"}


@pytest.fixture
def echo() -> Iterator[Callable[..., list[EchoBackend]]]:
    """Factory: ``echo(n, behaviour="echo", delay=0)`` starts n EchoBackends."""
    started: list[EchoBackend] = []

    def start(count: int, behaviour: str = "echo", **kwargs: float) -> list[EchoBackend]:
        new = [EchoBackend(behaviour, **kwargs) for _ in range(count)]  # type: ignore[arg-type]
        started.extend(new)
        return new

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., Haproxy]]:
    """Factory: ``haproxy(mode=..., target=port, proxy="v1"|"v2")``, started."""
    started: list[Haproxy] = []

    def start(**kwargs: object) -> Haproxy:
        balancer = Haproxy(tmp_path / f"haproxy{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(balancer)
        return balancer.start()

    yield start
    for balancer in started:
        balancer.stop()


def requests_counted(router, app: str) -> dict[tuple[str, str], float]:
    """(release, code) -> routerd_http_requests_total for ``app``."""
    found = {}
    for name, labels, value in metric_samples(router.metrics()):
        if name == "routerd_http_requests_total" and f'app="{app}"' in labels:
            release = re.search(r'release="([^"]*)"', labels)[1]
            code = re.search(r'code="([^"]*)"', labels)[1]
            found[(release, code)] = value
    return found


def wait_counted(router, app: str, expected: dict[tuple[str, str], float]) -> None:
    wait_for(lambda: requests_counted(router, app) == expected, 10, message=f"{app} {expected}")


# ------------------------------------------------------------ PROXY protocol


@pytest.mark.parametrize(("version", "mode"), [("v1", "off"), ("v2", "on")])
def test_proxy_protocol_gives_the_real_client(etcd, routerd, echo, haproxy, version, mode):
    """Behind haproxy in TCP mode (send-proxy / send-proxy-v2), the allow list
    admits and refuses by the client's own address, apps receive it in
    X-Real-IP and X-Forwarded-For, and the client's own X-Forwarded-*/X-Request-Id
    (relayed unchanged by a TCP balancer) are not believed."""
    (backend,) = echo(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend], allow=["127.0.0.2"]))
    router = routerd(extra_args=("--proxy-protocol", *TRUST, "--dynamic-backends", mode))
    router.wait_applied(revision)
    balancer = haproxy(mode="tcp", target=router.http_port, proxy=version)

    answer = get(balancer.port, "shop.example.com", headers=FORGED, source="127.0.0.2")
    assert answer.status == 200
    seen = answer.json()["headers"]
    assert seen["X-Real-IP"] == seen["X-Forwarded-For"] == "127.0.0.2"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Request-Id"] != "forged-1"
    assert answer.headers["x-request-id"] == seen["X-Request-Id"]
    assert get(balancer.port, "shop.example.com", source="127.0.0.3").status == 403


def test_a_proxy_header_from_an_untrusted_peer_is_not_believed(etcd, routerd, echo):
    """A client that connects straight to the router and sends its own PROXY
    header claiming an allowed address is judged by its real address: 403."""
    (backend,) = echo(1)
    revision = etcd.txn(app_keys("shop", ["shop.example.com"], [backend], allow=["127.0.0.2"]))
    router = routerd(extra_args=("--proxy-protocol", *TRUST, "--dynamic-backends", "off"))
    router.wait_applied(revision)
    request = (
        b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 80\r\n"
        b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n"
    )
    assert raw_request(router.http_port, request, source="127.0.0.3").status == 403
    assert raw_request(router.http_port, request, source="127.0.0.2").status == 200


def test_http2_through_a_tcp_balancer_to_the_https_listener(etcd, routerd, echo, haproxy, tmp_path):
    """curl --http2 through haproxy (TCP, PROXY v2) to the HTTPS listener speaks
    HTTP/2, is allowed by the client's own address, and app option gzip
    compresses the text answer."""
    curl = require_binary("curl")
    (backend,) = echo(1)
    cert, key = make_cert(tmp_path, "shop.example.com")
    keys = app_keys("shop", ["shop.example.com"], [backend], allow=["127.0.0.2"], gzip=True)
    keys[cert_key("shop.example.com")] = json.dumps({"cert": cert, "key": key})
    revision = etcd.txn(keys)
    router = routerd(extra_args=("--proxy-protocol", *TRUST))
    router.wait_applied(revision)
    balancer = haproxy(mode="tcp", target=router.https_port, proxy="v2")

    def fetch(source: str) -> str:
        return subprocess.run(
            [curl, "-sk", "--http2", "--interface", source, "-D", "-", "-o", "/dev/null",
             "-H", "Accept-Encoding: gzip",
             "--resolve", f"shop.example.com:{balancer.port}:127.0.0.1",
             f"https://shop.example.com:{balancer.port}/"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.lower()  # fmt: skip

    allowed = fetch("127.0.0.2")
    assert allowed.startswith("http/2 200"), allowed
    assert "content-encoding: gzip" in allowed
    assert fetch("127.0.0.3").startswith("http/2 403")


# --------------------------------------------------- TLS-terminating balancer


def test_behind_a_tls_balancer(etcd, routerd, echo, haproxy):
    """Behind haproxy terminating TLS: no redirect loop for https_redirect (the
    app has no certificate in etcd), HSTS is sent, apps see the client's
    address, https and port 443, the allow list judges the client, and a
    client's own X-Forwarded-For is not taken over the balancer's word."""
    (backend,) = echo(1)
    keys = app_keys(
        "shop", ["shop.example.com"], [backend], allow=["127.0.0.2"], https_redirect=True, hsts=True
    )
    revision = etcd.txn(keys)
    router = routerd(extra_args=TRUST)
    router.wait_applied(revision)
    balancer = haproxy(mode="https", target=router.http_port)

    def through(source: str, **headers: str):
        return get(balancer.port, "shop.example.com", headers=headers, source=source, tls_host="x")

    answer = through("127.0.0.2", **{"X-Forwarded-For": "127.0.0.3"})
    assert answer.status == 200
    assert answer.headers["strict-transport-security"] == "max-age=31536000"
    seen = answer.json()["headers"]
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Port"] == "443"
    assert seen["X-Real-IP"] == seen["X-Forwarded-For"] == "127.0.0.2"
    assert through("127.0.0.3").status == 403
    assert through("127.0.0.3", **{"X-Forwarded-For": "127.0.0.2"}).status == 403

    direct = get(router.http_port, "shop.example.com", headers=FORGED, source="127.0.0.2")
    assert direct.status == 301, "a client's own X-Forwarded-Proto is not believed"
    assert direct.headers["location"] == f"https://shop.example.com:{router.https_port}/"
    assert "strict-transport-security" not in direct.headers


def test_a_client_is_not_believed_about_itself(etcd, routerd, echo):
    """A client talking straight to the router with its own X-Forwarded-For,
    -Proto and X-Request-Id: apps get its real address, http and a new id."""
    (backend,) = echo(1)
    revision = etcd.txn(app_keys("open", ["open.example.com"], [backend]))
    router = routerd(extra_args=TRUST)
    router.wait_applied(revision)
    answer = get(router.http_port, "open.example.com", headers=FORGED, source="127.0.0.3")
    seen = answer.json()["headers"]
    assert seen["X-Real-IP"] == seen["X-Forwarded-For"] == "127.0.0.3"
    assert seen["X-Forwarded-Proto"] == "http"
    assert re.fullmatch(r"[0-9a-f]{32}", seen["X-Request-Id"])


def test_request_id_round_trip(etcd, routerd, echo, haproxy):
    """A trusted balancer's X-Request-Id reaches the app, comes back to the client
    and is in the access log; without one the router makes one; a malformed
    one is replaced; apps get X-Request-Start in milliseconds."""
    (backend,) = echo(1)
    revision = etcd.txn(app_keys("open", ["open.example.com"], [backend]))
    router = routerd(extra_args=TRUST)
    router.wait_applied(revision)
    balancer = haproxy(mode="https", target=router.http_port)

    def through(**headers: str):
        return get(balancer.port, "open.example.com", headers=headers, tls_host="x")

    kept = through(**{"X-Request-Id": "lb-7f3a.2"})
    assert kept.headers["x-request-id"] == kept.json()["headers"]["X-Request-Id"] == "lb-7f3a.2"
    made = through()
    made_id = made.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_id)
    assert made.json()["headers"]["X-Request-Id"] == made_id
    assert through(**{"X-Request-Id": "bad id;"}).headers["x-request-id"] != "bad id;"
    start = made.json()["headers"]["X-Request-Start"]
    assert re.fullmatch(r"t=\d{13}", start)
    assert abs(int(start[2:]) / 1000 - time.time()) < 30

    log = router.workdir / "access.log"

    def logged() -> bool:
        ids = {e["request_id"] for e in json_lines(log)}
        return {"lb-7f3a.2", made_id} <= ids

    wait_for(logged, 10, message="both ids in the access log")


# ------------------------------------------------------------ access log


HOSTILE_PATHS = [
    b'/q"uote',
    b"/back\\slash",
    b"/new%0Aline",
    b"/tab%09and\\x41",
    b"/\xff\xfe",
    "/é".encode(),
]


@pytest.mark.parametrize("fmt", ["json", "heroku"])
def test_access_log_lines_survive_hostile_requests(etcd, routerd, echo, fmt):
    """Paths and headers with quotes, backslashes, encoded newlines and raw
    invalid UTF-8 give one valid line each, with the app and release; an app
    with access_log false is counted but not logged."""
    (backend,) = echo(1)
    keys = app_keys("shop", ["shop.example.com"], [backend])
    keys.update(app_keys("quiet", ["quiet.example.com"], [backend], access_log=False))
    revision = etcd.txn(keys)
    router = routerd(extra_args=("--access-log-format", fmt))
    router.wait_applied(revision)
    for path in HOSTILE_PATHS:
        agent = b'ua "x" \\ \xc3\x28\tend'
        request = b"GET " + path + b" HTTP/1.1\r\nHost: shop.example.com\r\nUser-Agent: " + agent
        answer = raw_request(router.http_port, request + b"\r\nConnection: close\r\n\r\n")
        assert answer.status == 200, path
    assert get(router.http_port, "quiet.example.com").status == 200
    wait_counted(router, "quiet", {("v1", "2xx"): 1})

    log = router.workdir / "access.log"
    lines = wait_for(lambda: len(read_lines(log)) >= len(HOSTILE_PATHS) and read_lines(log), 10)
    assert len(lines) == len(HOSTILE_PATHS), "one line per request, none for the quiet app"
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        assert {(e["app"], e["release"], e["instance"]) for e in entries} == {("shop", "v1", "i0")}
        # Each worker flushes its own buffer: lines come in order per worker only.
        assert sorted(e["path"] for e in entries) == sorted(
            ['/q"uote', "/back\\slash", "/new%0Aline", "/tab%09and\\x41", "/\\xff\\xfe", "/é"]
        )
        assert entries[0]["user_agent"] == 'ua "x" \\ \\xc3(\tend'
        assert entries[0]["status"] == 200 and entries[0]["upstream"] == backend.address
        assert entries[0]["client"] == "127.0.0.1" and entries[0]["method"] == "GET"
    else:
        for line in lines:
            assert re.match(
                r"\S+Z at=info app=shop method=GET path=\".*\" host=shop\.example\.com ", line
            )
            assert " dyno=v1.i0 " in line and " status=200 " in line
            assert re.search(r" connect=\d+ms service=\d+ms ", line)
        assert any('path="/q\\"uote"' in line for line in lines)
        assert 'user_agent="ua \\"x\\" \\\\ \\\\xc3(\\x09end"' in lines[0]


# --------------------------------------------------------------- metrics


@pytest.mark.parametrize("mode", MODES)
def test_metrics_count_every_request_exactly(etcd, routerd, echo, mode):
    """N requests give N counted, by app, release and status class, in both
    backend modes; /traffic and `routerd status <app>` answer the same per
    release; the default server's 404s carry no app; a removed release and a
    removed app leave /metrics; the router status says where its metrics are."""
    v1, v2, other = echo(3)
    keys = app_keys("shop", ["shop.example.com"], [v1])
    keys.update(app_keys("other", ["other.example.com"], [other]))  # no shrink to zero apps
    revision = etcd.txn(keys)
    router = routerd(extra_args=("--dynamic-backends", mode))
    router.wait_applied(revision)
    for _ in range(25):
        assert get(router.http_port, "shop.example.com").status == 200
    for _ in range(3):
        assert get(router.http_port, "nobody.example.com").status == 404
    wait_counted(router, "shop", {("v1", "2xx"): 25})
    wait_counted(router, "-", {("-", "4xx"): 3})

    etcd.put(instance_key("shop", "v2", "i0"), v2.address)
    router.wait_applied(etcd.put(active_key("shop"), "v2"))
    for _ in range(7):
        assert get(router.http_port, "shop.example.com").status == 200
    wait_counted(router, "shop", {("v1", "2xx"): 25, ("v2", "2xx"): 7})
    assert v1.hits == 25 and v2.hits == 7

    metrics = router.metrics()
    assert re.search(
        r'routerd_upstream_response_seconds_count\{app="shop",release="v2"\} 7\.0', metrics
    )
    assert re.search(r'routerd_http_request_duration_seconds_count\{app="shop"\} 32\.0', metrics)
    status = router.status()
    assert status["metrics"] == f"127.0.0.1:{router.metrics_port}"
    traffic = router.endpoint("/traffic?app=shop").json()
    assert traffic["releases"]["v2"]["requests"] == 7
    assert traffic["releases"]["v2"]["codes"] == {"2xx": 7}
    assert traffic["releases"]["v2"]["upstream_seconds"]["count"] == 7
    shown = run(etcd.endpoint, "status", "shop", timeout=30).output
    assert "test-router v2: requests=7 5xx=0 (2xx=7)" in shown, shown

    router.wait_applied(etcd.delete_prefix("/routerd/apps/shop/releases/v1/"))
    wait_counted(router, "shop", {("v2", "2xx"): 7})
    router.wait_applied(etcd.delete_prefix("/routerd/apps/shop/"))
    wait_counted(router, "shop", {})
    assert 'app="shop"' not in router.metrics()


@pytest.mark.parametrize("mode", MODES)
def test_upstream_failures(etcd, routerd, echo, mode):
    """A GET whose instances all reset the connection is tried on each (up to
    3) and answered 502 with a short body; a POST is never replayed; a GET
    that timed out reading is not replayed (one instance hit, then 504); all
    are counted for the app."""
    resets = echo(3, "reset")
    slow = echo(3, "slow", delay=3.0)
    keys = app_keys("flaky", ["flaky.example.com"], resets)
    keys.update(app_keys("slow", ["slow.example.com"], slow, proxy_read_timeout=1))
    router = routerd(extra_args=("--dynamic-backends", mode))
    router.wait_applied(etcd.txn(keys))

    failed = get(router.http_port, "flaky.example.com")
    assert failed.status == 502 and len(failed.body) < 512
    assert sum(b.hits for b in resets) == 3
    posted = get(router.http_port, "flaky.example.com", method="POST", body=b"pay=1")
    assert posted.status == 502
    assert sum(b.hits for b in resets) == 4, "a sent POST is not replayed"

    started = time.monotonic()
    timed_out = get(router.http_port, "slow.example.com", timeout=10)
    assert timed_out.status == 504 and len(timed_out.body) < 512
    assert time.monotonic() - started < 2.5
    assert sum(b.hits for b in slow) == 1, "a GET that timed out is not replayed"
    wait_counted(router, "flaky", {("v1", "5xx"): 2})
    wait_counted(router, "slow", {("v1", "5xx"): 1})


# ------------------------------------------------------------ gzip


def test_gzip_only_for_clients_that_accept_it(etcd, routerd, echo):
    """App option gzip compresses a text answer for a client that accepts gzip, not otherwise."""
    (backend,) = echo(1)
    etcd.put(config_key("g"), json.dumps({"domains": ["g.example.com"], "options": {"gzip": True}}))
    router = routerd()
    router.wait_applied(etcd.put(instance_key("g", "v1", "i0"), backend.address))
    answer = get(router.http_port, "g.example.com", headers={"Accept-Encoding": "gzip"})
    assert answer.headers.get("content-encoding") == "gzip"
    plain = get(router.http_port, "g.example.com")
    assert "content-encoding" not in plain.headers
