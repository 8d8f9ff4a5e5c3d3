"""Extra Docker engines for the placement tests: each its own ``dockerd``,
standing for one host of a fleet.

Each engine runs with its own ``-H unix://`` socket, ``--data-root``,
``--exec-root`` and ``--pidfile`` under a temporary folder (plus
``--iptables=false --bridge=none --storage-driver=vfs``), so it never touches
the machine's own engine or another test's. Containers use the host
network; each engine's host gets its own loopback address (127.0.0.2, ...)
for routers to reach them at. Every engine reports the whole machine in
``docker info``, so tests register hosts with an explicit capacity. An
engine that stops leaves a network-namespace mount under its exec root,
unmounted here before the folder goes. The test image is imported into
each engine the way ``deploy_helpers`` builds it. An engine made with
``tls=True`` also listens on ``tcp://<address>:<port>`` with
``--tlsverify``, its CA, server and client certificates made by openssl
for the occasion: the way a remote host's engine is reached. Does not
import routerd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import build_image
from helpers import free_ports, in_ci, require_binary, wait_for

DOCKERD_FLAGS = ("--iptables=false", "--bridge=none", "--storage-driver=vfs")


class Engine:
    """One dockerd for one pretend host: ``name``, ``url`` and ``address``."""

    def __init__(self, name: str, workdir: Path, address: str, *, tls: bool = False) -> None:
        self.name, self.address = name, address
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "docker.sock"
        self.exec_root = workdir / "exec"
        self.pidfile = workdir / "docker.pid"
        self.url = f"unix://{self.socket}"
        self.tls = make_certificates(workdir / "tls", address) if tls else None
        self.tcp_url = f"tcp://{address}:{free_ports(1)[0]}" if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def command(self) -> list[str]:
        args = [
            require_binary("dockerd"), *DOCKERD_FLAGS,
            "-H", self.url, "--data-root", str(self.workdir / "data"),
            "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
        ]  # fmt: skip
        if self.tls is not None and self.tcp_url is not None:
            tls = self.tls
            args += ["-H", self.tcp_url, "--tlsverify", "--tlscacert", str(tls["ca"])]
            args += ["--tlscert", str(tls["server-cert"]), "--tlskey", str(tls["server-key"])]
        return args

    def registration(self) -> dict[str, Any]:
        """How hosts/ describes this engine: by its unix socket, or over TLS."""
        if self.tls is None or self.tcp_url is None:
            return {"docker": self.url, "address": self.address}
        files = {"ca": str(self.tls["ca"]), "cert": str(self.tls["client-cert"])}
        files["key"] = str(self.tls["client-key"])
        return {"docker": self.tcp_url, "address": self.address, "tls": files}

    @property
    def client(self) -> Any:
        import docker

        if self._client is None:
            self._client = docker.DockerClient(base_url=self.url, timeout=30)
        return self._client

    def start(self) -> Engine:
        with (self.workdir / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.workdir / "dockerd.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"dockerd {self.name} exited: {tail}")
            try:
                return bool(self.client.ping())
            except Exception:  # noqa: BLE001  (not listening yet)
                return False

        wait_for(answers, timeout, message=f"dockerd {self.name} on {self.socket}")
        build_image(self.client)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop dockerd (it stops its containers), then unmount what it leaves."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._client = None
        unmount_under(self.exec_root)

    def ensure_running(self) -> None:
        if not self.running:
            self.stop()
            self.start().wait_ready()

    def containers(self, app: str) -> list[Any]:
        return self.client.containers.list(all=True, filters={"label": f"routerd.app={app}"})

    def remove_app(self, app: str) -> None:
        if self.running:
            for container in self.containers(app):
                container.remove(force=True)

    def remove_named(self, name: str) -> None:
        import docker.errors

        if self.running:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(name).remove(force=True)


def make_certificates(folder: Path, address: str) -> dict[str, Path]:
    """A CA, a server certificate for ``address`` and a client certificate."""
    openssl = require_binary("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    run("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=routerd-test-ca")  # fmt: skip
    for who, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        run("req", *key, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        (folder / f"{who}.ext").write_text(
            f"subjectAltName=IP:{address}\nextendedKeyUsage={usage}\n"
        )
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2",
            "-extfile", f"{who}.ext")  # fmt: skip
    names = ("ca", "server-cert", "server-key", "client-cert", "client-key")
    return {name: folder / f"{name}.pem" for name in names}


def unmount_under(folder: Path) -> None:
    """Unmount every mount point below ``folder``, deepest first."""
    inside = str(folder.resolve()) + os.sep
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts if line.split()[4].startswith(inside)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def make_engines(root: Path, names: list[str], *, tls: str = "") -> list[Engine]:
    """One engine per name, at 127.0.0.2, 127.0.0.3, ... (not started); the
    one named ``tls`` also listens on tcp:// with TLS."""
    if os.geteuid() != 0:
        reason = "the placement tests start their own dockerd, which needs root"
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    require_binary("dockerd")
    return [
        Engine(name, root / name, f"127.0.0.{n}", tls=name == tls)
        for n, name in enumerate(names, 2)
    ]


def start_engines(engines: list[Engine]) -> None:
    """Start them all at once, and wait until each answers with the test image."""
    for engine in engines:
        engine.start()
    with ThreadPoolExecutor(len(engines)) as pool:
        list(pool.map(lambda e: e.wait_ready(), engines))


def stop_engines(engines: list[Engine], root: Path) -> None:
    with ThreadPoolExecutor(max(1, len(engines))) as pool:
        list(pool.map(lambda e: e.stop(), engines))
    unmount_under(root)
    for _ in range(3):
        try:
            shutil.rmtree(root)
            return
        except OSError:
            time.sleep(0.5)
