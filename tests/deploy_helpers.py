"""Docker for the deploy tests and the deploy benchmark: a tiny test image
built locally, and ``routerd deploy`` run as a real subprocess whose progress
lines can be waited for.

The image is a ``docker import`` of a tar holding Debian's static busybox
(no registry is reachable here): ``/start.sh`` writes ``<app> <release>
<MESSAGE>`` to ``/www/index.html`` and execs busybox ``httpd`` on ``$PORT``.
Environment knobs make the failure cases: ``DELAY`` seconds before serving,
``DIE`` exits with that code instead. Does not import routerd.
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import PREFIX, REPO, in_ci

IMAGE = "routerd-test-app:1"
BUSYBOX_TOOLS = ("sh", "httpd", "sleep", "echo", "mkdir", "cat", "true")
START = """#!/bin/sh
sleep "${DELAY:-0}"
if [ -n "$DIE" ]; then echo "dying with code $DIE"; exit "$DIE"; fi
mkdir -p /www
echo "${ROUTERD_APP} ${ROUTERD_RELEASE} ${MESSAGE}" > /www/index.html
echo ok > /www/healthz
exec httpd -f -p "$PORT" -h /www
"""


def docker_client() -> Any:
    """A Docker SDK client to a live engine; without one, fail under CI=true, else skip."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # no SDK, no socket, engine down: all mean "no Docker"
        reason = f"no Docker engine ({exc}); start dockerd (see .ci/run)"
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(f"{reason}; with CI=true this fails instead of skipping")


def _busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and b"statically linked" in _file_type(path):
            return path
    reason = "a static busybox (Debian busybox-static) is needed to build the test image"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)
    raise AssertionError("unreachable")


def _file_type(path: Path) -> bytes:
    if shutil.which("file") is None:  # trust the path when `file` is missing
        return b"statically linked"
    return subprocess.run(["file", "-L", str(path)], capture_output=True).stdout


def image_tar(busybox: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("bin", "www", "tmp"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(busybox), "bin/busybox")
        for tool in BUSYBOX_TOOLS:
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        script = START.encode()
        info = tarfile.TarInfo("start.sh")
        info.mode, info.size = 0o755, len(script)
        tar.addfile(info, io.BytesIO(script))
    return buffer.getvalue()


def build_image(client: Any, tag: str = IMAGE) -> str:
    """Import the test image unless ``tag`` is already there (idempotent)."""
    import docker.errors

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    repository, _, version = tag.partition(":")
    client.api.import_image_from_data(
        image_tar(_busybox()),
        repository=repository,
        tag=version or "latest",
        changes=['CMD ["/start.sh"]', "ENV PATH=/bin"],
    )
    client.images.get(tag)
    return tag


def app_containers(client: Any, app: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"routerd.app={app}"})


def remove_app_containers(client: Any, app: str) -> None:
    for container in app_containers(client, app):
        container.remove(force=True)


class Deploy:
    """One ``routerd deploy|rollback|gc|status`` run; its output read line by line."""

    def __init__(self, etcd_endpoint: str, command: str, *args: str, prefix: str = PREFIX) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "routerd", command, *args]
        argv += ["--etcd", etcd_endpoint, "--prefix", prefix]
        self.argv = argv
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, fragment: str, timeout: float = 60) -> str:
        """Block until a line containing ``fragment`` appears (or fail with the output)."""
        deadline = time.monotonic() + timeout
        seen = [line for line in self.lines if fragment in line]
        if seen:
            return seen[0]
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() >= deadline:
                raise AssertionError(f"no line with {fragment!r}; output:\n{self.output}")
            if fragment in line:
                return line

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.elapsed = time.monotonic() - self.started
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def run(etcd_endpoint: str, command: str, *args: str, timeout: float = 120) -> Deploy:
    """Run to completion; the finished Deploy (``.proc.returncode``, ``.output``)."""
    deploy = Deploy(etcd_endpoint, command, *args)
    deploy.wait(timeout)
    return deploy


def deploy_args(
    app: str,
    *,
    replicas: int = 2,
    env: Mapping[str, str] | None = None,
    release: str | None = None,
    extra: Iterable[str] = (),
    image: str = IMAGE,
) -> list[str]:
    args = [app, "--image", image, "--replicas", str(replicas), "--network", "host"]
    args += ["--health-path", "/healthz", "--health-timeout", "10", "--drain", "0.5"]
    args += ["--router-timeout", "10", "--stop-timeout", "5"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    if release:
        args += ["--release", release]
    return args + list(extra)


def stop_signal_name(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)
