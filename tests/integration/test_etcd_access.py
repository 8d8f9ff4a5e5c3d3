"""Ways of reaching etcd: TLS with client certificates, user and password,
and several endpoints of which the first is dead. Each test starts its own
etcd, configured that way, and routes an app read through it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import Etcd, ProcessDied, Routerd, app_keys, free_ports, require_binary

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
                 "-out", f"{name}.crt", cwd=folder)  # fmt: skip
    return folder


class TlsEtcd(Etcd):
    """etcd that serves clients over TLS only and requires a client certificate."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.endpoint = f"https://127.0.0.1:{self.client_port}"
        self._http.trust_env = False  # or REQUESTS_CA_BUNDLE overrides verify below
        self._http.verify = str(pki / "ca.crt")
        self._http.cert = (str(pki / "client.crt"), str(pki / "client.key"))

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cert-file", str(self.pki / "server.crt"), "--key-file", str(self.pki / "server.key"),
            "--trusted-ca-file", str(self.pki / "ca.crt"), "--client-cert-auth",
        ]  # fmt: skip

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessDied(f"etcd exited {self.proc.returncode}")
        answer = self._http.get(f"{self.endpoint}/health", timeout=1)
        return answer.ok and answer.json().get("health") == "true"


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[list[Etcd]]:
    started: list[Etcd] = []
    yield started
    for server in started:
        server.stop()


def route_one_app(etcd: Etcd, workdir: Path, backends, *extra: str) -> Routerd:  # type: ignore[no-untyped-def]
    (backend,) = backends(1)
    router = Routerd(etcd=etcd, workdir=workdir, extra_args=extra).start()
    try:
        router.wait_applied(etcd.txn(app_keys("shop", ["shop.example.com"], [backend])))
        assert router.http("shop.example.com").text.strip() == backend.name
    except BaseException:
        router.stop()
        raise
    return router


def test_etcd_over_tls_with_client_certificates(own_etcd, tmp_path, backends):
    """routerd reads etcd over TLS, verifying it with --etcd-ca and presenting a client cert."""
    pki = make_pki(tmp_path / "pki")
    etcd = TlsEtcd(tmp_path / "etcd", pki)
    own_etcd.append(etcd)
    etcd.start()
    router = route_one_app(
        etcd, tmp_path / "router", backends,
        "--etcd-ca", str(pki / "ca.crt"),
        "--etcd-cert", str(pki / "client.crt"), "--etcd-key", str(pki / "client.key"),
    )  # fmt: skip
    router.stop()


def test_etcd_with_user_and_password(own_etcd, tmp_path, backends):
    """routerd authenticates with --etcd-user and --etcd-password when etcd requires it."""
    etcd = Etcd(tmp_path / "etcd")
    own_etcd.append(etcd)
    etcd.start()
    etcd._call("auth/role/add", {"name": "root"})
    etcd._call("auth/user/add", {"name": "root", "password": "s3cret"})
    etcd._call("auth/user/grant", {"user": "root", "role": "root"})
    etcd._call("auth/enable", {})
    token = etcd._call("auth/authenticate", {"name": "root", "password": "s3cret"})["token"]
    etcd._http.headers["Authorization"] = token
    anonymous = requests.post(f"{etcd.endpoint}/v3/kv/range", json={"key": "Lw=="}, timeout=5)
    assert not anonymous.ok, "etcd must refuse anonymous reads for this test to mean anything"
    router = route_one_app(
        etcd, tmp_path / "router", backends, "--etcd-user", "root", "--etcd-password", "s3cret"
    )
    router.stop()


def test_several_endpoints_fail_over_to_a_live_one(etcd, tmp_path, backends):
    """With the first of two --etcd endpoints dead, routerd uses the second."""
    (dead,) = free_ports(1)
    router = route_one_app(
        etcd, tmp_path / "router", backends, "--etcd", f"http://127.0.0.1:{dead},{etcd.endpoint}"
    )
    router.stop()
