"""pytest-docker fixtures for the end-to-end test of the container pair.

Once per session, before pytest-docker's ``docker_services`` runs
``docker-compose up``:

1. the base image: a debootstrap of Debian bookworm with Python 3.11, nginx
   and etcd (``base_image.sh``, about 40 s), cached by a tag that carries the
   script's hash, so it is made once per machine;
2. wheels of routerd (fresh) and its dependencies (reused) in build/wheels,
   built on the host with ``pip wheel``;
3. both targets of the repository's Dockerfile on that base, installing from
   those wheels with no index (``BASE``, ``NGINX_IMAGE``, ``WHEELS``).

The machine has no registry and no bridge network, so every image is local
and every container uses the host's network on ports picked here. Without a
Docker engine (or root for the first base image) the tests skip, or fail
under CI=true. A failed test's report carries every container's log tail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports

from e2e.stack import (
    COMPOSE_FILE,
    PORTS,
    Stack,
    base_image,
    build_images,
    build_wheels,
    require_docker,
    succeeds,
)

STACK = pytest.StashKey[Stack]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    stack = item.config.stash.get(STACK, None)
    if report.failed and stack is not None:
        report.sections.append(("docker-compose logs", stack.logs()))
    return report


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    """Debian 12 has Compose v1 only; pytest-docker's default is v2's `docker compose`."""
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"routerd-e2e-{os.getpid()}"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d"]  # v1 has no --wait: the stack fixture waits for readiness


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --timeout 10"]


@pytest.fixture(scope="session")
def e2e_images() -> dict[str, str]:
    """Image names by role: base, routerd (the sidecar) and routerd-nginx."""
    require_docker()
    base = base_image()
    build_wheels()
    return build_images(base)


@pytest.fixture(scope="session")
def e2e_ports() -> dict[str, int]:
    return dict(zip(PORTS, free_ports(len(PORTS)), strict=True))


@pytest.fixture(scope="session")
def docker_compose_file(
    e2e_images: dict[str, str], e2e_ports: dict[str, int], docker_compose_project_name: str
) -> Iterator[str]:
    """compose.yaml, with the images and ports it interpolates set in the environment."""
    env = {f"E2E_{name}_PORT": str(port) for name, port in e2e_ports.items()}
    env |= {"E2E_BASE_IMAGE": e2e_images["base"], "E2E_ROUTERD_IMAGE": e2e_images["routerd"]}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield str(COMPOSE_FILE)
    # pytest-docker does not clean up after an `up` that failed half-way.
    command = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", docker_compose_project_name]
    succeeds([*command, "down", "-v", "--timeout", "5"], timeout=120)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def stack(
    request: pytest.FixtureRequest,
    docker_services: Any,
    docker_compose_file: str,
    docker_compose_project_name: str,
    e2e_ports: dict[str, int],
    e2e_images: dict[str, str],
) -> Stack:
    """The running stack, once routerd has confirmed its first config live."""
    running = Stack(Path(docker_compose_file), docker_compose_project_name, e2e_ports, e2e_images)
    request.config.stash[STACK] = running
    running.wait_ready(timeout=90)
    return running


@pytest.fixture(scope="module", autouse=True)
def _down_after_the_module(stack: Stack) -> Iterator[None]:
    """Stop the stack when this module's tests are done, not at the end of the
    whole session (pytest-docker's own `down` then finds nothing to do)."""
    yield
    stack.compose("down", "-v", "--timeout", "10")
