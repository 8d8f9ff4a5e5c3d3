"""The compose stack as the e2e tests see it: images, containers, and the
router through the nginx container's listener.

Building the images (base, wheels, routerd) lives here too, so conftest.py
is only fixtures. Nothing here imports routerd: the daemon is only ever the
image under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import Background, Etcd, in_ci, wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMPOSE_FILE = HERE / "compose.yaml"
WHEELS = REPO / "build" / "wheels"
# The step images the last build made, so the next one can remove those it
# replaced; outside the checkout, as CI builds in a fresh clone each time.
BUILT = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "routerd-e2e" / "images"
BASE_REPOSITORY = "routerd-e2e-base"
ROUTER_ID = "e2e-router"
PREFIX = "/routerd"
PORTS = ("ETCD", "ETCD_PEER", "HTTP", "HTTPS", "STATUS", "METRICS", "APP_V1", "APP_V2")
IMAGES = {"routerd": "routerd-e2e:sidecar", "routerd-nginx": "routerd-e2e:nginx"}
STEP = re.compile(r"^ ---> ([0-9a-f]{12})$", re.MULTILINE)  # the legacy builder's step images


def unavailable(reason: str) -> None:
    """Skip the e2e tests, or fail them under CI=true."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"{reason}; with CI=true this fails instead of skipping")


def run(args: list[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a command; its output, or an AssertionError that carries the output's tail."""
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} took longer than {timeout:g} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{tail}")
    return done.stdout


def succeeds(args: list[str], timeout: float = 30) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ------------------------------------------------------------------ images


def require_docker() -> None:
    if shutil.which("docker") is None:
        unavailable("the docker client is not installed (apt-get install docker.io)")
    if not succeeds(["docker", "info"]):
        unavailable("no Docker engine answers (`docker info` failed)")
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (apt-get install docker-compose)")


def base_image() -> str:
    """The debootstrap base, made once per machine: its tag names the script's hash."""
    script = HERE / "base_image.sh"
    tag = f"{BASE_REPOSITORY}:bookworm-{hashlib.sha256(script.read_bytes()).hexdigest()[:12]}"
    if succeeds(["docker", "image", "inspect", tag]):
        return tag
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        unavailable(f"{tag} is not built and making it needs root and debootstrap")
    run(["bash", str(script), tag], timeout=900)
    return tag


def build_wheels() -> None:
    """routerd's wheel, fresh, and its dependencies', reused when all are there."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("routerd-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(WHEELS)]
    run([*pip, "--no-deps", str(REPO)])
    (wheel,) = WHEELS.glob("routerd-*.whl")
    if not succeeds([*pip, "--no-index", "--find-links", str(WHEELS), str(wheel)], timeout=120):
        run([*pip, "--find-links", str(WHEELS), str(wheel)])


def build_images(base: str) -> dict[str, str]:
    """Both targets of the Dockerfile, on ``base``, from the wheels, with no index.

    The legacy builder keeps every step's image; the ones the previous build
    made and this one no longer uses are removed (vfs stores each in full)."""
    args = [
        "docker", "build", "--force-rm",
        "--build-arg", f"BASE={base}", "--build-arg", f"NGINX_IMAGE={base}",
        "--build-arg", f"WHEELS={WHEELS.relative_to(REPO)}",
    ]  # fmt: skip
    made: list[str] = []
    for target, tag in IMAGES.items():
        output = run([*args, "--target", target, "--tag", tag, str(REPO)],
                     env={"DOCKER_BUILDKIT": "0"})  # fmt: skip
        made += STEP.findall(output)
    previous = BUILT.read_text().split() if BUILT.exists() else []
    if stale := [step for step in reversed(previous) if step not in made]:
        # Children first; refused while in use: fine. vfs deletes slowly.
        succeeds(["docker", "rmi", *stale], timeout=600)
    BUILT.parent.mkdir(parents=True, exist_ok=True)
    BUILT.write_text("\n".join(dict.fromkeys(made)) + "\n")
    # Base images of an older base_image.sh: nothing built on them is left.
    tags = run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY])
    for old in set(tags.split()) - {base}:
        succeeds(["docker", "rmi", old], timeout=300)
    return {"base": base, **IMAGES}


# ------------------------------------------------------------------- etcd


class RemoteEtcd(Etcd):
    """The stack's etcd, through the helpers' v3 JSON gateway calls; the
    container is compose's to start and stop, so no process is managed here."""

    def __init__(self, endpoint: str) -> None:  # deliberately not Etcd.__init__
        self.endpoint = endpoint
        self._http = requests.Session()


def key(*parts: str) -> str:
    return "/".join((PREFIX, *parts))


# ------------------------------------------------------------------ stack


@dataclass
class Stack:
    """The running compose project: its containers, and the router as a client sees it."""

    compose_file: Path
    project: str
    ports: dict[str, int]
    images: dict[str, str]
    etcd: RemoteEtcd = field(init=False)

    def __post_init__(self) -> None:
        self.etcd = RemoteEtcd(f"http://127.0.0.1:{self.ports['ETCD']}")

    # -- containers

    def compose(self, *args: str, timeout: float = 120) -> str:
        command = ["docker-compose", "-f", str(self.compose_file), "-p", self.project]
        return run([*command, *args], timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def inspect(self, service: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(run(["docker", "inspect", self.container(service)]))
        return data[0]

    def nginx_master(self) -> int:
        """The host pid of the nginx master: the nginx container's main process."""
        pid = int(self.inspect("nginx")["State"]["Pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert cmdline.startswith(b"nginx: master"), cmdline
        return pid

    def logs(self, tail: int = 60) -> str:
        """The log tails of routerd, nginx and etcd (the demo apps log every request)."""
        try:
            return self.compose(
                "logs", "--no-color", f"--tail={tail}", "routerd", "nginx", "etcd", timeout=30
            )
        except AssertionError as exc:
            return str(exc)

    # -- the router, through nginx

    def http(self, host: str, path: str = "/") -> requests.Response:
        """GET through the nginx container's listener, on a new connection."""
        return requests.get(
            f"http://127.0.0.1:{self.ports['HTTP']}{path}",
            headers={"Host": host, "Connection": "close"},
            timeout=5,
            allow_redirects=False,
        )

    def body(self, host: str) -> str:
        answer = self.http(host)
        return f"{answer.status_code} {answer.text.strip()}"

    def wait_body(self, host: str, expected: str, timeout: float = 30) -> None:
        wait_for(lambda: self.body(host) == expected, timeout, message=f"{host} -> {expected!r}")

    def generation(self) -> str:
        """What nginx's status server says it serves."""
        url = f"http://127.0.0.1:{self.ports['STATUS']}/"
        return requests.get(url, timeout=5).text.strip()

    # -- routerd

    def routerd(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.ports['METRICS']}{path}", timeout=5)

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.routerd("/readyz").status_code == 200, timeout,
                 message="routerd /readyz")  # fmt: skip

    def status(self) -> dict[str, Any] | None:
        raw = self.etcd.get(key("routers", ROUTER_ID))
        return None if raw is None else json.loads(raw)

    def wait_applied(self, revision: int, timeout: float = 30) -> dict[str, Any]:
        def applied() -> dict[str, Any] | None:
            status = self.status()
            return status if status and int(status["revision"]) >= revision else None

        status = wait_for(applied, timeout, message=f"router status revision >= {revision}")
        assert status is not None  # wait_for returns only a truthy result
        return status


class Load(Background):
    """Requests to one host from a few threads, each on a new connection,
    until the block ends; counts what answered and what did not."""

    def __init__(self, stack: Stack, host: str, threads: int = 4) -> None:
        self.stack, self.host = stack, host
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        super().__init__()
        for _ in range(threads):
            self.spawn(self._loop)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                answer = self.stack.http(self.host)
                if answer.status_code == 200:
                    self.answers[answer.text.strip()] += 1
                else:
                    self.failures.append(f"{answer.status_code} {answer.text.strip()[:80]}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            time.sleep(0.005)
