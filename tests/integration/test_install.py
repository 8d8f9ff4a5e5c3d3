"""Installing: only valid candidates, rollback of a failed reload, atomic files."""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    app_config,
    app_keys,
    cert_key,
    config_key,
    included_files,
    instance_key,
    make_cert,
    metric_sum,
    nginx_test,
    wait_for,
)

pytestmark = pytest.mark.integration

TEMPLATES = REPO / "templates" / "nginx"


def test_reload_failing_after_nginx_t_is_rolled_back(etcd, routerd, backends, tmp_path):
    """A reload that fails after `nginx -t` passed (HTTPS port taken) restores the old file, keeps
    routing, and is reported with nginx's [emerg] bind line; a later valid change still applies."""
    shop, blog = backends(2)
    occupier = socket.socket()
    occupier.bind(("127.0.0.1", 0))
    occupier.listen()
    taken = occupier.getsockname()[1]
    try:
        router = routerd(https_port=taken, extra_args=("--reload-timeout", "5"))
        router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [shop])))
        before, generation = router.conf_path.read_bytes(), router.generation()

        cert, key = make_cert(tmp_path, "shop.example.com")
        etcd.put(cert_key("shop.example.com"), json.dumps({"cert": cert, "key": key}))

        wait_for(
            lambda: metric_sum(router.metrics(), r"rollback") > 0,
            timeout=20,
            message="a rollback to be counted in /metrics",
        )
        status = wait_for(
            lambda: "bind()" in json.dumps(router.status()),
            timeout=10,
            message="the router status to report the bind() failure",
        )
        assert status
        assert router.conf_path.read_bytes() == before
        assert router.generation() == generation
        assert router.http("shop.example.com").text.strip() == shop.name
        log = router.log_text()
        assert "[emerg]" in log and "bind()" in log, "the log does not carry nginx's [emerg] line"
    finally:
        occupier.close()

    # With the port free again, the next change installs the HTTPS server too.
    revision = etcd.txn(app_keys("blog", ["blog.example.com"], [blog]))
    router.wait_applied(revision, timeout=20)
    assert router.http("blog.example.com").text.strip() == blog.name
    assert router.https("shop.example.com").text.strip() == shop.name


def assert_complete(conf: Path) -> None:
    text = conf.read_text()
    assert text.rstrip().endswith("}"), f"{conf} is truncated:\n{text[-300:]}"
    missing = [str(p) for p in included_files(conf) if not p.is_file()]
    assert missing == [], f"{conf} includes files that do not exist"
    checked = nginx_test(conf)
    assert checked.returncode == 0, f"nginx -t refuses {conf}:\n{checked.stderr}"


@pytest.mark.parametrize("with_certs", [False, True], ids=["plain", "certs"])
def test_sigkill_mid_install_leaves_a_complete_config(
    etcd, routerd, backends, tmp_path, with_certs
):
    """Killed with SIGKILL at random moments of applying changes, routerd always leaves an
    nginx.conf that nginx accepts, and a restarted routerd serves the latest state."""
    first, second = backends(2)
    cert, key = make_cert(tmp_path, "tls.example.com")
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [first])))
    rng = random.Random(20261126)
    revision = 0

    for round_ in range(20):
        keys = app_keys(f"app{round_}", [f"app{round_}.example.com"], [first, second])
        keys[instance_key("shop", "v1", "i0")] = (first, second)[round_ % 2].address
        if with_certs and round_ % 5 == 0:
            keys[config_key("tls")] = app_config(["tls.example.com"])
            keys[cert_key("tls.example.com")] = json.dumps({"cert": cert, "key": key})
        revision = etcd.txn(keys)
        if with_certs and round_ % 5 == 2:
            revision = etcd.delete(cert_key("tls.example.com"))

        # Let it get somewhere into the apply before pulling the plug.
        time.sleep(rng.uniform(0, 0.05))
        router.kill()

        assert_complete(router.conf_path)
        router.start()

    router.wait_applied(revision, timeout=20)
    assert router.http("shop.example.com").text.strip() == second.name
    assert router.http("app19.example.com").status_code == 200
    assert_complete(router.conf_path)


def flapping_templates(folder: Path) -> Path:
    """The real templates plus a directive nginx refuses, for apps whose first domain starts 'bad'.
    The real templates plus a directive nginx refuses, for apps whose first domain starts 'bad'."""
    shutil.copytree(TEMPLATES, folder)
    for template in folder.glob("*.j2"):
        with template.open("a") as handle:
            handle.write(
                "\n{% if app is defined and app.domains[0].startswith('bad') %}"
                "routerd_test_unknown_directive on;{% endif %}\n"
            )
    return folder


def test_candidate_refused_by_nginx_is_not_installed(etcd, routerd, backends, tmp_path):
    """A candidate `nginx -t` refuses is not installed: the old config keeps serving, the failure is
    reported, and kept failed candidates stay bounded however often the input flaps."""
    shop, flap = backends(2)
    templates = flapping_templates(tmp_path / "templates")
    router = routerd(extra_args=("--templates", str(templates), "--keep-failed", "3"))
    etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
    router.wait_applied(etcd.txn(app_keys("flap", ["good.example.com"], [flap])))
    before, generation = router.conf_path.read_bytes(), router.generation()

    def flap_bad(times, start):
        for number in range(start, start + times):
            bad = app_config([f"bad{number}.example.com"])
            status = router.wait_applied(etcd.put(config_key("flap"), bad), settle=0)
            assert status["errors"], "a refused candidate is not reported in the status"
            assert router.conf_path.read_bytes() == before
        return sum(1 for p in router.workdir.rglob("*") if p.is_file())

    after_few = flap_bad(4, 0)
    after_many = flap_bad(8, 4)

    assert after_many <= after_few, "failed candidates pile up on disk"
    assert router.generation() == generation
    assert router.http("good.example.com").text.strip() == flap.name
    assert router.http("shop.example.com").text.strip() == shop.name
    assert router.http("bad0.example.com").status_code == 404
    log = router.log_text()
    assert "routerd_test_unknown_directive" in log
    # Where the log points at the kept candidate, the newest one must still be there.
    named = re.findall(r"candidate kept in (/\S+?)\)", log)
    if named:
        assert Path(named[-1]).exists(), f"the newest failed candidate {named[-1]} was deleted"

    fixed = app_config(["fixed.example.com"])
    router.wait_applied(etcd.put(config_key("flap"), fixed))
    assert router.http("fixed.example.com").text.strip() == flap.name
