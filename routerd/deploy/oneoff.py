"""A one-off console: Heroku's ``run bash``, on the Docker API.

``run_console`` starts one container from a release's image with its env,
attached to this process's stdin, stdout and stderr: with a TTY when
stdin is a terminal (raw mode, the terminal's size, Ctrl-C reaching the
container's shell), with plain pipes otherwise (stdout and stderr kept
apart, stdin's end closing the container's). It returns the container's
exit code. The container is made with ``auto_remove`` (the engine removes
it when it exits, even if routerd is killed: its stdin closes, and a shell
then exits), and removed by force when routerd is interrupted first. It
carries the label ``routerd.console`` and no ``routerd.app``, so no deploy,
``gc`` or router ever takes it for an instance.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import docker.errors
import docker.utils.socket as frames

from routerd.deploy.runtime import DockerRuntime, engine_call
from routerd.errors import ContainerError

LABEL_CONSOLE = "routerd.console"
DEFAULT_COMMAND = ("/bin/sh",)


def console_name(app: str) -> str:
    return f"routerd-{app}-console-{secrets.token_hex(3)}"


def run_console(
    runtime: DockerRuntime,
    *,
    app: str,
    image: str,
    env: Mapping[str, str],
    command: tuple[str, ...],
    tty: bool,
    cpus: float | None = None,
    memory_mb: int | None = None,
) -> int:
    """Run ``command`` attached, with the release's limits; the container's exit code."""
    api = runtime.client.api
    limits: dict[str, Any] = {}
    if cpus is not None:
        limits["nano_cpus"] = round(cpus * 1e9)
    if memory_mb is not None:
        limits["mem_limit"] = memory_mb * 2**20
    name = console_name(app)
    try:  # by name: an interruption may come before the engine told the id
        with engine_call(f"cannot start a console of {app} on the {runtime.name}"):
            api.create_container(
                image,
                command=list(command or DEFAULT_COMMAND),
                environment=dict(env),
                tty=tty,
                stdin_open=True,
                labels={LABEL_CONSOLE: app},
                name=name,
                host_config=api.create_host_config(
                    network_mode="host", init=True, auto_remove=True, **limits
                ),
            )
        return _attached(api, name, tty)
    finally:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            api.remove_container(name, force=True)  # gone already, unless interrupted


def _attached(api: Any, container: str, tty: bool) -> int:
    params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
    with engine_call("cannot attach to the console"):
        sock = api.attach_socket(container, params=params)
    exit_code: list[int] = []
    waiter = threading.Thread(target=lambda: exit_code.append(_wait(api, container)), daemon=True)
    waiter.start()  # before the start: an auto-removed container may be gone at once
    with engine_call("cannot start the console"):
        api.start(container)
    if tty:
        with contextlib.suppress(docker.errors.APIError):
            size = shutil.get_terminal_size()
            api.resize(container, height=size.lines, width=size.columns)
    raw = getattr(sock, "_sock", sock)
    feeder = threading.Thread(target=_feed_stdin, args=(raw,), daemon=True)
    with _raw_terminal(tty):
        feeder.start()
        for stream, data in frames.frames_iter(sock, tty):
            out = sys.stderr if stream == frames.STDERR else sys.stdout
            out.buffer.write(data)
            out.buffer.flush()
    waiter.join(30)
    if not exit_code:
        raise ContainerError("the console ended but its exit code never came")
    return exit_code[0]


def _wait(api: Any, container: str) -> int:
    result = api.wait(container, condition="next-exit")
    return int(result.get("StatusCode", 1))


def _feed_stdin(sock: Any) -> None:
    """This process's stdin into the container's, then its end."""
    fd = sys.stdin.fileno()
    try:
        while chunk := os.read(fd, 4096):
            sock.sendall(chunk)
    except OSError:
        return  # the container is gone: nothing to feed
    with contextlib.suppress(OSError):
        sock.shutdown(1)  # SHUT_WR: the container's stdin ends, its output goes on


@contextlib.contextmanager
def _raw_terminal(tty: bool) -> Iterator[None]:
    """With a TTY, keys go to the container as typed (Ctrl-C too); restored after."""
    if not tty:
        yield
        return
    import termios
    import tty as terminal

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    terminal.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
