"""Bad input: every bad value is rejected alone, reported, and never reaches nginx."""

from __future__ import annotations

import json

import pytest
from helpers import (
    active_key,
    app_config,
    app_keys,
    cert_key,
    config_key,
    instance_key,
    make_cert,
    metric_sum,
)

pytestmark = pytest.mark.integration

MARK = "pwned"  # in every smuggled value, so its absence from the config files proves rejection


def files_text(router):
    """Everything routerd wrote for nginx: nginx.conf and the files under routerd/ (failed
    candidates aside)."""
    files = [router.conf_path, *(router.workdir / "routerd").rglob("*")]
    return "".join(
        p.read_text(errors="replace")
        for p in files
        if p.is_file() and "failed" not in p.relative_to(router.workdir).parts
    )


def bad_json(tmp_path, backend):
    return {config_key("bad"): '{"domains": ["bad.example.com"'}, config_key("bad")


def smuggled_domain(tmp_path, backend):
    keys = app_keys("bad", [f"bad.example.com;{MARK}"], [backend])
    return keys, config_key("bad")


def bad_instance(tmp_path, backend):
    keys = {
        config_key("bad"): app_config(["bad.example.com"]),
        instance_key("bad", "v1", "a"): f"127.0.0.1:80;{MARK}",
    }
    return keys, instance_key("bad", "v1", "a")


def bad_cert(tmp_path, backend):
    cert, _ = make_cert(tmp_path / "certs", "good.example.com")
    _, other_key = make_cert(tmp_path / "other", "good.example.com")
    return {cert_key("good.example.com"): json.dumps({"cert": cert, "key": other_key})}, cert_key(
        "good.example.com"
    )


@pytest.mark.parametrize("make_bad", [bad_json, smuggled_domain, bad_instance, bad_cert])
def test_bad_value_is_rejected_alone(etcd, routerd, backends, tmp_path, make_bad):
    """One bad value (JSON, smuggled ';', instance address, mismatched cert) is rejected, listed,
    counted and logged, while the other app keeps serving."""
    good, spare = backends(2)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("good", ["good.example.com"], [good])))
    rejections = metric_sum(router.metrics(), r"reject")

    keys, bad_key = make_bad(tmp_path, spare)
    status = router.wait_applied(etcd.txn(keys))

    assert router.http("good.example.com").text.strip() == good.name
    assert bad_key in {e["key"] for e in status["errors"]}, status["errors"]
    assert metric_sum(router.metrics(), r"reject") > rejections
    assert bad_key in router.log_text()
    assert MARK not in files_text(router)
    if bad_key != cert_key("good.example.com"):
        assert router.http("bad.example.com").status_code in (404, 503)
    else:
        with pytest.raises(OSError):
            router.https("good.example.com")


SMUGGLED = {
    "semicolon": f"a.example.com;{MARK}",
    "open brace": f"a.example.com{{{MARK}",
    "close brace": f"a.example.com}}{MARK}",
    "double quote": f'a.example.com"{MARK}',
    "single quote": f"a.example.com'{MARK}",
    "newline": f"a.example.com\n{MARK}",
    "dollar": f"a.example.com${MARK}",
    "control": f"a.example.com\x00{MARK}",
    "space": f"a.example.com {MARK}",
    "hash": f"a.example.com#{MARK}",
    "backslash": f"a.example.com\\{MARK}",
}


def test_nginx_syntax_is_refused_everywhere(etcd, routerd, backends):
    """A ';', brace, quote, newline, '$' or control character in any field rejects that key
    and nothing of it reaches the files nginx reads."""
    (good,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("good", ["good.example.com"], [good])))
    keys: dict[str, str] = {}
    for number, value in enumerate(SMUGGLED.values()):
        tail = value.removeprefix("a.example.com")
        keys[config_key(f"d{number}")] = json.dumps({"domains": [value]})
        keys[config_key(f"s{number}")] = app_config(
            [f"s{number}.example.com"], client_max_body_size=f"1m{tail}"
        )
        keys[config_key(f"l{number}")] = app_config([f"l{number}.example.com"], allow=[value])
        keys[instance_key("good", "v1", f"x{number}")] = f"{value}:80"
        keys[instance_key("good", "v1", f"p{number}")] = f"127.0.0.1:80{tail}"
        keys[config_key(f"r{number}")] = app_config([f"r{number}.example.com"])
        keys[active_key(f"r{number}")] = f"v1{tail}"
    keys[instance_key("good", "v1", "port0")] = "127.0.0.1:0"
    keys[instance_key("good", "v1", "bigport")] = "127.0.0.1:65536"
    keys[config_key("unknown")] = json.dumps({"domains": ["u.example.com"], MARK: True})
    keys[config_key("opt")] = json.dumps({"domains": ["v.example.com"], "options": {MARK: 1}})
    keys[config_key("timeout")] = app_config(["t.example.com"], proxy_read_timeout=3601)
    keys[config_key("upper")] = app_config(["Upper.example.com"])
    keys[config_key("nodomain")] = app_config([])
    keys[f"/routerd/apps/{MARK.upper()}/config"] = app_config(["caps.example.com"])
    valid = {config_key(f"r{number}") for number in range(len(SMUGGLED))}

    status = router.wait_applied(etcd.txn(keys))

    listed = {e["key"] for e in status["errors"]}
    missing = sorted(set(keys) - valid - listed)
    assert missing == [], f"not reported: {missing}"
    assert MARK not in files_text(router).lower()
    assert router.http("good.example.com").text.strip() == good.name
    for number in range(len(SMUGGLED)):
        assert router.http(f"s{number}.example.com").status_code == 404
        assert router.http(f"l{number}.example.com").status_code == 404


def test_valid_app_keeps_its_last_valid_config(etcd, routerd, backends):
    """A served app whose config turns bad keeps serving its old domains until it is fixed."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))

    bad = json.dumps({"domains": ["new.example.com"], "options": {"proxy_read_timeout": "x"}})
    status = router.wait_applied(etcd.put(config_key("shop"), bad))

    assert config_key("shop") in {e["key"] for e in status["errors"]}
    assert router.http("shop.example.com").text.strip() == backend.name
    assert router.http("new.example.com").status_code == 404

    router.wait_applied(etcd.put(config_key("shop"), "{not json"))
    assert router.http("shop.example.com").text.strip() == backend.name

    fixed = app_config(["new.example.com"])
    status = router.wait_applied(etcd.put(config_key("shop"), fixed))
    assert status["errors"] == []
    assert router.http("new.example.com").text.strip() == backend.name
    assert router.http("shop.example.com").status_code == 404


def test_bad_instance_keeps_its_last_valid_address(etcd, routerd, backends):
    """An instance whose address turns bad keeps its last valid address; the others are unaffected.
    An instance whose address turns bad keeps its last valid address; the others are unaffected."""
    first, second = backends(2)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first, second])))

    key = instance_key("shop", "v1", "i1")
    status = router.wait_applied(etcd.put(key, "127.0.0.1:notaport"))

    assert key in {e["key"] for e in status["errors"]}
    seen = {router.http("shop.example.com").text.strip() for _ in range(12)}
    assert seen == {first.name, second.name}


def test_never_valid_app_is_not_served(etcd, routerd, backends):
    """An app whose config was never valid is not served, even with valid instances."""
    (backend,) = backends(1)
    keys = app_keys("shop", ["shop.example.com"], [backend])
    keys[config_key("shop")] = json.dumps({"domains": "shop.example.com"})
    router = routerd()

    status = router.wait_applied(etcd.txn(keys))

    assert config_key("shop") in {e["key"] for e in status["errors"]}
    assert router.http("shop.example.com").status_code == 404
    assert backend.hits == 0


@pytest.mark.parametrize("mode", ["off", "on"])
def test_unresolvable_instance_host_is_rejected_alone(etcd, routerd, backends, mode):
    """An instance named by a host that does not resolve (which would make
    nginx -t refuse the whole config) is rejected alone: other changes go live."""
    first, second = backends(2)
    router = routerd(extra_args=("--dynamic-backends", mode))
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))

    bad = instance_key("shop", "v1", "ghost")
    etcd.put(bad, "no-such-host.invalid:5000")
    status = router.wait_applied(etcd.txn(app_keys("blog", ["blog.example.com"], [second])))

    assert router.http("blog.example.com").text.strip() == second.name
    assert router.http("shop.example.com").text.strip() == first.name
    assert [e["key"] for e in status["errors"]] == [bad]
    assert "does not resolve" in status["errors"][0]["error"]
