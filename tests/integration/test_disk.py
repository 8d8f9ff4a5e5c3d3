"""The folder of nginx.conf full or read-only: a small tmpfs mounted for the test.

The candidate fails with an error in the router status naming the file and
the cause, nginx keeps serving the last good config, no temporary or partial
file is left, and routerd applies the change by itself once there is room.
nginx's runtime files (pid, logs) live apart, as ``--runtime-dir`` allows, so
only routerd's own files meet the full disk. Mounting needs root: without it
these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import app_keys, in_ci, require_binary, wait_for

pytestmark = pytest.mark.integration

DISK_SIZE = "4m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of DISK_SIZE, unmounted after the test."""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(f"{reason}; with CI=true this fails instead of skipping")
    mount = require_binary("mount")
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(folder)], check=True
    )
    yield folder
    subprocess.run([require_binary("umount"), "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until the disk refuses another byte."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def remount(folder: Path, mode: str) -> None:
    subprocess.run([require_binary("mount"), "-o", f"remount,{mode}", str(folder)], check=True)


def left_behind(conf_dir: Path) -> list[str]:
    """Temporary files, and app or record files whose bytes are not what they were meant to be."""
    found = [str(p) for p in conf_dir.rglob(".*") if p.is_file() and p.name != ".nginx.conf.staged"]
    for app_file in (conf_dir / "routerd" / "apps").glob("*.conf"):
        digest = app_file.stem.split("-", 1)[1]
        if not hashlib.sha256(app_file.read_bytes()).hexdigest().startswith(digest):
            found.append(f"{app_file} (partial)")
    for record in (conf_dir / "routerd" / "generations").glob("*.json"):
        try:
            json.loads(record.read_bytes())
        except ValueError:
            found.append(f"{record} (partial)")
    return found


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_full_disk_fails_the_candidate_and_routerd_recovers(
    etcd, routerd, backends, small_disk, mode
):
    """With the folder of nginx.conf full, a new app's candidate fails with "No space left"
    naming the file in the router status, nginx keeps serving the last good config, nothing
    partial is left; once there is room again the new app goes live without any help."""
    shop, blog = backends(2)
    conf_dir = small_disk / "conf"
    conf_dir.mkdir()
    router = routerd(conf_dir=conf_dir, extra_args=("--dynamic-backends", mode))
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [shop])))

    filler = fill(small_disk)
    status = router.wait_applied(etcd.txn(app_keys("blog", ["blog.example.com"], [blog])))

    (error,) = status["errors"]
    assert error["key"] == str(router.conf_path)
    assert "No space left on device" in error["error"] and str(conf_dir) in error["error"]
    assert router.http("shop.example.com").text.strip() == shop.name
    assert router.http("blog.example.com").status_code == 404
    assert left_behind(conf_dir) == []

    filler.unlink()
    wait_for(lambda: router.http("blog.example.com").ok, timeout=15, message="blog served")
    wait_for(lambda: router.status()["errors"] == [], timeout=10, message="the error cleared")
    assert router.http("shop.example.com").text.strip() == shop.name
    assert left_behind(conf_dir) == []


def test_a_read_only_folder_fails_the_candidate_and_routerd_recovers(
    etcd, routerd, backends, small_disk
):
    """With the folder of nginx.conf read-only, a change fails with "Read-only file system" in
    the router status while nginx keeps serving; made writable again, the change goes live."""
    shop, blog = backends(2)
    conf_dir = small_disk / "conf"
    conf_dir.mkdir()
    router = routerd(conf_dir=conf_dir)
    router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [shop])))

    remount(small_disk, "ro")
    try:
        status = router.wait_applied(etcd.txn(app_keys("blog", ["blog.example.com"], [blog])))
        (error,) = status["errors"]
        assert "Read-only file system" in error["error"] and str(conf_dir) in error["error"]
        assert router.http("shop.example.com").text.strip() == shop.name
        assert router.http("blog.example.com").status_code == 404
    finally:
        remount(small_disk, "rw")

    wait_for(lambda: router.http("blog.example.com").ok, timeout=15, message="blog served")
    wait_for(lambda: router.status()["errors"] == [], timeout=10, message="the error cleared")
    assert left_behind(conf_dir) == []
