"""What routerd does when a process it depends on died or stopped answering
between two of its calls: each found by a deploy under faults (the real
processes are in tests/integration/test_deploy_faults.py and bench/chaos.py),
here with fakes for the one decision each fix made."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from routerd.deploy.engines import Engines, remove_release
from routerd.deploy.runtime import Container
from routerd.errors import ContainerError
from routerd.router.master import Master
from routerd.router.metrics import Metrics
from routerd.router.model import RoutingTable
from routerd.router.pipeline import Outcome, Result
from routerd.router.status import Reporter
from routerd.routerstatus import Rejection, RouterStatus

# ---------------------------------------------------------------- nginx


def master(tmp_path: Path) -> Master:
    conf = tmp_path / "nginx.conf"
    return Master(
        binary="nginx-never-run",
        conf=conf,
        runtime_dir=tmp_path,
        supervise=True,
        pid_file=tmp_path / "nginx.pid",
    )


def test_a_supervised_master_that_died_needs_a_start_not_a_reload(tmp_path: Path) -> None:
    """A config loaded after the supervised master died starts a new one: a reload could
    only fail; one that runs is reloaded, and a sidecar's nginx is never started."""
    supervised = master(tmp_path)
    assert supervised.needs_start()  # none started yet
    supervised.process = subprocess.Popen(["sleep", "30"])
    try:
        assert not supervised.needs_start()
    finally:
        supervised.process.kill()
        supervised.process.wait()
    assert supervised.needs_start()
    sidecar = master(tmp_path)
    sidecar.supervise = False
    assert not sidecar.needs_start()


# ---------------------------------------------------------------- router status


class Writer:
    def __init__(self) -> None:
        self.status: RouterStatus | None = None

    def update(self, status: RouterStatus) -> None:
        self.status = status


def report(reporter: Reporter, writer: Writer, revision: int, outcome: Outcome) -> int:
    error = Rejection("/etc/nginx/nginx.conf", "backend push failed (retrying in 1 s): gone")
    failed = outcome is Outcome.PUSH_FAILED
    reporter.applied(
        revision, Result(outcome, RoutingTable(revision, ()), error if failed else None), "a" * 64
    )
    assert writer.status is not None
    return writer.status.revision


def test_a_failed_push_keeps_the_last_revision_nginx_served() -> None:
    """While a push is tried again the status names the revision nginx last served in
    full, with the push's error, so a deploy waits; once it passes the revision moves."""
    writer = Writer()
    reporter = Reporter(
        Metrics(), writer, pool="shared", conf="/etc/nginx/nginx.conf", advertise=""
    )  # type: ignore[arg-type]
    assert report(reporter, writer, 10, Outcome.PUSHED) == 10
    assert report(reporter, writer, 12, Outcome.PUSH_FAILED) == 10
    assert writer.status is not None and "retrying" in writer.status.errors[0].error
    assert report(reporter, writer, 12, Outcome.PUSHED) == 12
    assert report(reporter, writer, 13, Outcome.REJECTED) == 13  # a refusal is final: reported


# ---------------------------------------------------------------- engines


class Restarting:
    """An engine that fails ``down`` calls (listing or removing), then answers."""

    name = "engine of b"

    def __init__(self, down: int, *, containers: int = 1) -> None:
        self.down, self.calls = down, 0
        self.left = [
            Container(
                f"{n}" * 64, f"routerd-shop-r2-{n}", "shop", "r2", "127.0.0.3", 5000 + n, engine="b"
            )
            for n in range(containers)
        ]

    def _call(self) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise ContainerError("cannot list containers on the engine of b: Connection aborted")

    def list(self, app: str | None = None, release: str | None = None) -> list[Container]:
        self._call()
        return list(self.left)

    def remove(self, container: Container, *, timeout: float) -> None:
        self._call()
        self.left.remove(container)


def remove(runtime: Any, retry_for: float) -> tuple[int, dict[str, str]]:
    engines = Engines({"b": runtime}, unreachable={"c": "down since the start"})
    return asyncio.run(remove_release(engines, "shop", ["r2"], 1, retry_for=retry_for))


def test_an_engine_that_restarts_is_asked_again_until_it_answers() -> None:
    """Removing a release asks an engine that failed again each second, within
    retry_for: its containers go; an engine unreachable from the start is named, not asked."""
    engine = Restarting(down=2, containers=2)
    removed, unlisted = remove(engine, retry_for=5)
    assert (removed, engine.left) == (2, [])
    assert unlisted == {"c": "down since the start"}


def test_an_engine_still_down_after_retry_for_is_named() -> None:
    """Without retries (or past them) the failing engine is returned with why."""
    engine = Restarting(down=10)
    removed, unlisted = remove(engine, retry_for=0)
    assert removed == 0 and len(engine.left) == 1
    assert unlisted["b"].startswith("cannot list containers on the engine of b")
