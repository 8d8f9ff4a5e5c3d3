"""The Heroku-like lifecycle against real Docker, etcd, routerd and nginx:
config vars that make releases, versioned releases, rollback to a version,
a one-off console, logs across containers, ps.

The test app answers ``<app> <release> <MESSAGE>``, so a config var named
MESSAGE shows in every answer.
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from deploy_helpers import (
    Load,
    app_containers,
    deploy_args,
    release_of,
    remove_app_containers,
    run,
    served,
)
from helpers import PREFIX, REPO, app_config, config_key, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.docker]
SECRET = "s3cr3t-" + secrets.token_hex(4)


@pytest.fixture
def app(docker: Any, etcd: Any) -> Any:
    name = f"life-{secrets.token_hex(3)}"
    etcd.put(config_key(name), app_config([f"{name}.test"]))
    yield name
    remove_app_containers(docker, name)
    for container in docker.containers.list(all=True, filters={"label": f"routerd.console={name}"}):
        container.remove(force=True)


@pytest.fixture
def live(etcd: Any, routerd: Any, app: str) -> tuple[Any, str]:
    """A router serving the app's first release (v1)."""
    router = routerd()
    done = run(etcd.endpoint, "deploy", *deploy_args(app, env={"MESSAGE": "one"}))
    assert done.proc.returncode == 0, done.output
    return router, release_of(done)


def routerd_cmd(etcd: Any, *args: str) -> list[str]:
    return [sys.executable, "-m", "routerd", *args, "--etcd", etcd.endpoint]


def rollout(app: str) -> tuple[str, ...]:
    """The deploy flags a config change rolls out with (the tests' fast timings)."""
    return (
        "--health-timeout",
        "10",
        "--drain",
        "0.5",
        "--router-timeout",
        "10",
        "--stop-timeout",
        "5",
    )


def history(etcd: Any, app: str) -> dict[str, dict[str, Any]]:
    base = f"{PREFIX}/apps/{app}/history/"
    return {k[len(base) :]: json.loads(v) for k, v in etcd.get_prefix(base).items()}


def env_of(etcd: Any, app: str) -> dict[str, str]:
    raw = etcd.get(f"{PREFIX}/apps/{app}/env")
    return json.loads(raw) if raw else {}


def test_config_set_rolls_out_a_release_that_sees_the_value(etcd, docker, app, live):
    """`config set` writes apps/<app>/env and rolls out a new release whose containers
    see the value, with no failed request meanwhile; `config unset` rolls it out again
    without it. The value never appears in any output without --show."""
    router, first = live
    outputs = []
    with Load(router, f"{app}.test") as load:
        done = run(etcd.endpoint, "config", "set", app, f"MESSAGE={SECRET}", "A_B=1", *rollout(app))
        assert done.proc.returncode == 0, done.output
        outputs.append(done.output)
        second = release_of(done)
        time.sleep(0.3)
    assert load.failures == [] and set(load.ok) >= {second}, (load.failures, load.ok)
    assert env_of(etcd, app) == {"MESSAGE": SECRET, "A_B": "1"}
    answer = router.http(f"{app}.test").text.split()
    assert answer[1:] == [second, SECRET]

    listed = run(etcd.endpoint, "config", app)
    outputs.append(listed.output)
    assert "MESSAGE" in listed.output and "A_B" in listed.output
    shown = run(etcd.endpoint, "config", app, "--show")
    assert f"MESSAGE={SECRET}" in shown.output

    done = run(etcd.endpoint, "config", "unset", app, "MESSAGE", *rollout(app))
    assert done.proc.returncode == 0, done.output
    outputs.append(done.output)
    assert env_of(etcd, app) == {"A_B": "1"}
    assert router.http(f"{app}.test").text.split()[1] == release_of(done)
    assert router.http(f"{app}.test").text.split()[2:] == []

    for command in (("releases", app), ("status", app)):
        outputs.append(run(etcd.endpoint, *command).output)
    outputs.append(router.log_text())
    assert not [out for out in outputs if SECRET in out]
    assert first != second


def test_a_bad_name_or_value_is_refused_before_anything_changes(etcd, docker, app, live):
    """On the command line a lowercase name, PORT, an oversize value or a missing `=`
    exits 2 naming the variable, with etcd untouched and the value never echoed; a
    bad apps/<app>/env written by someone else stops a deploy before it starts."""
    router, first = live
    before = etcd.get_prefix(f"{PREFIX}/apps/{app}/")
    for bad, named in (
        (f"lower={SECRET}", "lower"),
        (f"PORT={SECRET}", "PORT"),
        (f"BIG={SECRET}{'x' * 40000}", "BIG"),
        ("NOSIGN", "NOSIGN"),
    ):
        done = run(etcd.endpoint, "config", "set", app, bad)
        assert done.proc.returncode == 2, done.output
        assert named in done.output and SECRET not in done.output
    assert etcd.get_prefix(f"{PREFIX}/apps/{app}/") == before

    etcd.put(f"{PREFIX}/apps/{app}/env", json.dumps({"GOOD": SECRET, "NUL": "a\u0000b"}))
    done = run(etcd.endpoint, "deploy", *deploy_args(app))
    assert done.proc.returncode == 1, done.output
    assert f"{PREFIX}/apps/{app}/env" in done.output and "NUL" in done.output
    assert SECRET not in done.output and "[1/6]" not in done.output
    assert served(router, app) == {first: 8}


def test_releases_are_versioned_listed_with_changes_and_rolled_back_to(etcd, docker, app, live):
    """Each release gets the next version; `releases` lists image, config and replica
    changes and the active one; `rollback APP v1` brings back v1's config vars."""
    router, first = live
    done = run(etcd.endpoint, "config", "set", app, "MESSAGE=two", *rollout(app))
    assert done.proc.returncode == 0, done.output
    done = run(etcd.endpoint, "deploy", *deploy_args(app, replicas=1))
    assert done.proc.returncode == 0, done.output
    versions = {r["version"] for r in history(etcd, app).values()}
    assert versions == {1, 2, 3}, history(etcd, app)

    listed = run(etcd.endpoint, "releases", app).output.splitlines()
    assert listed[0].startswith("* v3") and "replicas 2 -> 1" in listed[0], listed
    assert listed[1].startswith("  v2") and "config +MESSAGE" in listed[1], listed
    assert listed[2].startswith("  v1") and "first release" in listed[2], listed

    back = run(etcd.endpoint, "rollback", app, "v1", "--drain", "0.5", "--stop-timeout", "5")
    assert back.proc.returncode == 0, back.output
    assert router.http(f"{app}.test").text.split()[2] == "one"
    assert env_of(etcd, app) == {}  # v1 had no config vars: the rollback put that back
    newest = run(etcd.endpoint, "releases", app).output.splitlines()[0]
    assert newest.startswith("* v4") and f"rollback to {first}" in newest


def test_console_passes_its_exit_code_and_leaves_no_container(etcd, docker, app, live):
    """Without a TTY: the command runs in the active release's image with that
    release's env (not vars saved since with --no-restart), stdin reaches it, its
    output and exit code come back, and no container is left."""
    etcd.put(f"{PREFIX}/apps/{app}/env", json.dumps({"MESSAGE": "saved-later"}))
    script = 'echo "[$MESSAGE]"; read x; echo "<$x>"; exit 3'
    done = subprocess.run(
        [*routerd_cmd(etcd, "console", app), "--", "sh", "-c", script],
        input="typed\n", capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "[one]" in done.stdout and "<typed>" in done.stdout  # the active release's env
    wait_for(lambda: not consoles(docker, app), 10, message="the console container removed")
    assert not [c for c in app_containers(docker, app) if "console" in c.name]


def test_console_with_a_terminal(etcd, docker, app, live):
    """With a TTY the shell prompts, reads what is typed once it has, and its exit
    code comes back."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        routerd_cmd(etcd, "console", app),
        stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    os.close(slave)
    seen = read_until(master, proc, b"# ")  # a person types after the prompt
    os.write(master, b"echo tty-$MESSAGE-ok; exit 4\n")
    seen += read_until(master, proc, None)
    assert proc.wait(10) == 4, seen
    assert b"tty-one-ok" in seen
    wait_for(lambda: not consoles(docker, app), 10, message="the console container removed")


def read_until(fd: int, proc: Any, marker: bytes | None, timeout: float = 30) -> bytes:
    """What the terminal shows until ``marker`` (None: until the process ends)."""
    seen, deadline = b"", time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if marker is not None and marker in seen:
            return seen
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def consoles(docker: Any, app: str) -> list[Any]:
    return docker.containers.list(all=True, filters={"label": f"routerd.console={app}"})


def test_logs_interleave_the_containers_by_time_and_ps_lists_them(etcd, docker, app, live):
    """`logs` merges both containers' lines in time order, each prefixed with its release
    and container; `ps` shows each container's release, health and instance."""
    router, first = live
    for _ in range(6):
        router.http(f"{app}.test")
    done = run(etcd.endpoint, "logs", app, "--tail", "50")
    assert done.proc.returncode == 0, done.output
    lines = [line for line in done.lines if " listening on " in line or "url:" in line]
    sources = {line.split()[1] for line in lines}
    names = {c.name for c in app_containers(docker, app)}
    assert sources == {f"{first}/{name}" for name in names}, lines
    stamps = [line.split()[0] for line in done.lines if line[:4].isdigit()]
    assert stamps == sorted(stamps)

    listed = run(etcd.endpoint, "ps", app)
    assert listed.proc.returncode == 0, listed.output
    rows = [line for line in listed.lines if line.startswith("routerd-")]
    assert len(rows) == 2 and all(f"release={first}" in r and "healthy" in r for r in rows)
    assert all("instance=" in r and "instance=-" not in r for r in rows), rows


def test_deploy_merges_the_config_vars_under_its_own_env(etcd, docker, app, live):
    """A deploy runs with the app's config vars, and its own --env wins over them."""
    router, _ = live
    etcd.put(f"{PREFIX}/apps/{app}/env", json.dumps({"MESSAGE": "from-config", "X": "1"}))
    done = run(etcd.endpoint, "deploy", *deploy_args(app))
    assert router.http(f"{app}.test").text.split()[1:] == [release_of(done), "from-config"]
    done = run(etcd.endpoint, "deploy", *deploy_args(app, env={"MESSAGE": "from-flag"}))
    assert router.http(f"{app}.test").text.split()[2] == "from-flag"
    record = history(etcd, app)[release_of(done)]
    assert record["config_vars"] == ["MESSAGE", "X"] and record["env"]["X"] == "1"


def test_an_interrupted_console_removes_its_container(etcd, docker, app, live):
    """SIGTERM to routerd while the console's command runs: routerd exits 130 and the
    container is gone."""
    proc = subprocess.Popen(
        [*routerd_cmd(etcd, "console", app), "--", "sleep", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    wait_for(
        lambda: [c for c in consoles(docker, app) if c.status == "running"],
        20,
        message="the console container running",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 130, proc.stdout.read() if proc.stdout else ""
    wait_for(lambda: not consoles(docker, app), 10, message="the console container removed")
