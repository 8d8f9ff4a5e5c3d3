"""TLS: a valid pair in certs/<domain> serves that domain over HTTPS."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat

import pytest
from helpers import (
    REPO,
    app_config,
    app_keys,
    cert_key,
    config_key,
    make_cert,
    pem_to_der,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_domain_with_a_cert_is_served_over_https(etcd, routerd, backends, tmp_path):
    """With a valid cert the domain answers over HTTPS (SNI picks the cert) via the app, and
    the key file routerd writes is readable by the owner only."""
    shop, blog = backends(2)
    shop_cert, shop_key = make_cert(tmp_path, "shop.example.com")
    blog_cert, blog_key = make_cert(tmp_path, "blog.example.com")
    etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
    etcd.txn(app_keys("blog", ["blog.example.com"], [blog]))
    revision = etcd.txn(
        {
            cert_key("shop.example.com"): json.dumps({"cert": shop_cert, "key": shop_key}),
            cert_key("blog.example.com"): json.dumps({"cert": blog_cert, "key": blog_key}),
        }
    )
    router = routerd()
    router.wait_applied(revision)

    assert router.https("shop.example.com").text.strip() == shop.name
    assert router.https("blog.example.com").text.strip() == blog.name
    assert router.peer_certificate("shop.example.com") == pem_to_der(shop_cert)
    assert router.peer_certificate("blog.example.com") == pem_to_der(blog_cert)
    assert router.http("shop.example.com").text.strip() == shop.name

    files = [p for p in (router.workdir / "routerd" / "certs").iterdir() if p.is_file()]
    assert files, "no cert file under routerd/certs/"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert any("PRIVATE KEY" in p.read_text() for p in files)


def test_cert_added_later_goes_live_and_removal_stops_https(etcd, routerd, backends, tmp_path):
    """A cert added to a running router starts HTTPS for its domain; deleting it stops HTTPS only.
    A cert added to a running router starts HTTPS for its domain; deleting it stops HTTPS only."""
    (shop,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [shop])))
    cert, key = make_cert(tmp_path, "shop.example.com")

    pair = json.dumps({"cert": cert, "key": key})
    router.wait_applied(etcd.put(cert_key("shop.example.com"), pair))
    assert router.https("shop.example.com").text.strip() == shop.name

    router.wait_applied(etcd.delete(cert_key("shop.example.com")))
    with pytest.raises(OSError):
        router.https("shop.example.com")
    assert router.http("shop.example.com").text.strip() == shop.name


def test_https_survives_later_reloads_and_restarts(etcd, routerd, backends, tmp_path):
    """After a cert went live, unrelated changes and a routerd restart keep HTTPS working."""
    shop, blog = backends(2)
    cert, key = make_cert(tmp_path, "shop.example.com")
    etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
    pair = json.dumps({"cert": cert, "key": key})
    router = routerd()
    router.wait_applied(etcd.put(cert_key("shop.example.com"), pair))
    assert router.https("shop.example.com").text.strip() == shop.name

    status = router.wait_applied(etcd.txn(app_keys("blog", ["blog.example.com"], [blog])))
    assert router.http("blog.example.com").text.strip() == blog.name
    assert status["config_sha256"] == router.generation()
    assert router.https("shop.example.com").text.strip() == shop.name

    router.restart()
    assert router.https("shop.example.com").text.strip() == shop.name
    assert router.http("blog.example.com").text.strip() == blog.name


def test_https_survives_nginx_dying(etcd, routerd, backends, tmp_path):
    """When the supervised nginx exits, routerd restarts it from the installed files, HTTPS too."""
    (shop,) = backends(1)
    cert, key = make_cert(tmp_path, "shop.example.com")
    etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
    pair = json.dumps({"cert": cert, "key": key})
    router = routerd()
    router.wait_applied(etcd.put(cert_key("shop.example.com"), pair))
    master = router.nginx_master()

    os.kill(master, signal.SIGTERM)

    wait_for(
        lambda: router.nginx_master() != master and router.http("shop.example.com").ok,
        timeout=15,
        message="routerd to start nginx again",
    )
    assert router.https("shop.example.com").text.strip() == shop.name


def test_https_redirect_and_hsts(etcd, routerd, backends, tmp_path):
    """With https_redirect HTTP answers 301 to HTTPS; with hsts HTTPS answers carry the header."""
    (shop,) = backends(1)
    cert, key = make_cert(tmp_path, "shop.example.com")
    etcd.txn(app_keys("shop", ["shop.example.com"], [shop], https_redirect=True, hsts=True))
    pair = json.dumps({"cert": cert, "key": key})
    router = routerd()
    router.wait_applied(etcd.put(cert_key("shop.example.com"), pair))

    answer = router.http("shop.example.com", "/a?b=1")
    assert answer.status_code == 301
    # The HTTPS listener is not on 443 here, so the redirect may name its port.
    assert answer.headers["Location"] in (
        "https://shop.example.com/a?b=1",
        f"https://shop.example.com:{router.https_port}/a?b=1",
    )
    secure = router.https("shop.example.com")
    assert secure.text.strip() == shop.name
    assert "max-age=" in secure.headers.get("Strict-Transport-Security", "")

    config = app_config(["shop.example.com"])
    router.wait_applied(etcd.put(config_key("shop"), config))
    assert router.http("shop.example.com").status_code == 200
    assert "Strict-Transport-Security" not in router.https("shop.example.com").headers


def test_a_template_that_drops_the_uses_comments_keeps_its_certificates(
    etcd, routerd, backends, tmp_path
):
    """What a generation uses is routerd's own record, not comments a template may
    leave out: with a main template that writes no `# uses` lines, the cert file
    survives garbage collection, and a later reload still loads it."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "nginx", templates)
    main = templates / "nginx.conf.j2"
    text = main.read_text()
    stripped = re.sub(
        r"\{% for path in certs %\}\n# uses \{\{ path \}\}\n\{% endfor %\}\n", "", text
    )
    assert stripped != text, "the template no longer has the loop this test removes"
    main.write_text(stripped)
    shop, blog = backends(2)
    cert, key = make_cert(tmp_path, "shop.example.com")
    etcd.txn(app_keys("shop", ["shop.example.com"], [shop]))
    router = routerd(extra_args=("--templates", str(templates)))
    router.wait_applied(
        etcd.put(cert_key("shop.example.com"), json.dumps({"cert": cert, "key": key}))
    )
    certs = router.workdir / "routerd" / "certs"
    assert list(certs.iterdir()), "the cert file was collected as garbage"

    status = router.wait_applied(etcd.txn(app_keys("blog", ["blog.example.com"], [blog])))
    assert status["errors"] == []
    assert router.http("blog.example.com").text.strip() == blog.name
    assert router.peer_certificate("shop.example.com") == pem_to_der(cert)
