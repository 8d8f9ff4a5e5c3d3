"""`routerd render --dry-run [--diff]`: prints what would be installed, changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import (
    REPO,
    app_config,
    app_keys,
    config_key,
    instance_key,
    require_binary,
    tree_state,
)

pytestmark = pytest.mark.integration

TEMPLATES = REPO / "templates" / "nginx"


def render(etcd, conf, *extra):
    require_binary("nginx")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "routerd", "render", "--dry-run", "--etcd", etcd.endpoint,
         "--prefix", "/routerd", "--nginx-conf", str(conf), *extra],
        capture_output=True, text=True, timeout=60, env=env, cwd=conf.parent,
    )  # fmt: skip


def listens(router):
    """The flags that shape the rendering, as the router was started with."""
    return (
        "--http-listen", f"127.0.0.1:{router.http_port}",
        "--https-listen", f"127.0.0.1:{router.https_port}",
        "--status-listen", f"127.0.0.1:{router.status_port}",
    )  # fmt: skip


def installed_router(etcd, routerd, backends):
    """A folder holding what a real routerd installed, with that routerd stopped again."""
    (backend,) = backends(1)
    router = routerd()
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))
    router.stop()
    return router, backend


def test_dry_run_prints_the_config_and_changes_nothing(etcd, routerd, backends):
    """`render --dry-run` prints the config for the current etcd state, exits 0 and writes no file.
    `render --dry-run` prints the config for the current etcd state, exits 0 and writes no file."""
    router, backend = installed_router(etcd, routerd, backends)
    etcd.txn(app_keys("blog", ["blog.example.com"], [backend]))
    before = tree_state(router.workdir)

    result = render(etcd, router.conf_path, *listens(router))

    assert result.returncode == 0, result.stderr
    assert "blog.example.com" in result.stdout
    assert "shop.example.com" in result.stdout
    assert "http {" in result.stdout or "http{" in result.stdout
    assert tree_state(router.workdir) == before


def test_dry_run_diff_shows_what_would_change(etcd, routerd, backends):
    """`render --dry-run --diff` prints a unified diff against --nginx-conf; none if unchanged."""
    router, backend = installed_router(etcd, routerd, backends)
    before = tree_state(router.workdir)

    unchanged = render(etcd, router.conf_path, "--diff", *listens(router))
    assert unchanged.returncode == 0, unchanged.stderr
    changes = [
        line
        for line in unchanged.stdout.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changes == [], unchanged.stdout

    etcd.txn(app_keys("blog", ["blog.example.com"], [backend]))
    changed = render(etcd, router.conf_path, "--diff", *listens(router))

    assert changed.returncode == 0, changed.stderr
    lines = changed.stdout.splitlines()
    assert any(line.startswith("---") for line in lines), changed.stdout
    assert any(line.startswith("+++") for line in lines), changed.stdout
    assert any(line.startswith("@@") for line in lines), changed.stdout
    assert any(line.startswith("+") and "blog.example.com" in line for line in lines)
    assert tree_state(router.workdir) == before


def test_dry_run_diff_against_a_foreign_file(etcd, backends, tmp_path):
    """The diff is taken against whatever --nginx-conf holds; that file is left as it was."""
    (backend,) = backends(1)
    etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    conf = tmp_path / "nginx.conf"
    conf.write_text("# a hand-written config\nevents {}\n")
    before = tree_state(tmp_path)

    result = render(etcd, conf, "--diff")

    assert result.returncode == 0, result.stderr
    assert "-# a hand-written config" in result.stdout.splitlines()
    assert tree_state(tmp_path) == before


def test_bad_template_exits_nonzero_naming_the_file(etcd, backends, tmp_path):
    """A template with a syntax error makes `render --dry-run` exit non-zero and name that file."""
    (backend,) = backends(1)
    etcd.txn(app_keys("shop", ["shop.example.com"], [backend]))
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    with (templates / "app.conf.j2").open("a") as handle:
        handle.write("\n{% if %}broken{% endif %}\n")

    out = tmp_path / "out"
    out.mkdir()

    result = render(etcd, out / "nginx.conf", "--templates", str(templates))

    assert result.returncode != 0
    assert "app.conf.j2" in result.stdout + result.stderr
    assert list(out.iterdir()) == []


def test_invalid_candidate_exits_nonzero_with_the_reason(etcd, tmp_path):
    """A config nginx would refuse makes `render --dry-run` exit non-zero with the reason."""
    etcd.put(config_key("shop"), app_config(["shop.example.com"]))
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    with (templates / "app.conf.j2").open("a") as handle:
        handle.write("\nrouterd_test_unknown_directive on;\n")

    result = render(etcd, tmp_path / "nginx.conf", "--templates", str(templates))

    assert result.returncode != 0
    assert "routerd_test_unknown_directive" in result.stdout + result.stderr
    left = [p for p in tmp_path.rglob("*") if p.is_file() and templates not in p.parents]
    assert left == [], "render --dry-run left files behind"


def test_dry_run_shows_the_balancer_table_in_dynamic_mode(etcd, routerd, backends):
    """With dynamic backends the instances live in nginx's balancer table, not in the
    config: the preview prints the table, and --diff shows an instance change."""
    router, backend = installed_router(etcd, routerd, backends)
    (other,) = backends(1)
    dynamic = ("--dynamic-backends", "on", *listens(router))

    shown = render(etcd, router.conf_path, *dynamic)
    assert shown.returncode == 0, shown.stderr
    assert f"shop {backend.address}" in shown.stdout

    unchanged = render(etcd, router.conf_path, "--diff", *dynamic)
    assert unchanged.returncode == 0, unchanged.stderr
    assert [line for line in unchanged.stdout.splitlines() if line[:1] in "+-"] == []

    etcd.put(instance_key("shop", "v1", "i0"), other.address)
    changed = render(etcd, router.conf_path, "--diff", *dynamic)
    lines = changed.stdout.splitlines()
    assert f"-#   shop {backend.address}" in lines, changed.stdout
    assert f"+#   shop {other.address}" in lines, changed.stdout
