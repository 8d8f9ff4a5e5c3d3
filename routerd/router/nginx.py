"""What nginx serves, and whether it is ready: the one owner of both.

A generation is live once the status server (``--status-listen``) answers
with its hash on every new connection: the new workers answer with it and
the old ones stopped accepting (the master keeps them 100 ms after the new
ones start). A reload can fail after ``nginx -t`` passed (a listen port
held by another process), and only this check tells. ``Nginx`` starts or
reloads the master to load a generation, confirms it, takes over at start
what an earlier routerd left running, restarts a supervised master that
died, and adopts a generation a sidecar's nginx loaded by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

from routerd.errors import NginxNotRunning, ReloadError, ValidationError
from routerd.logs import log
from routerd.router import validate
from routerd.router.master import Master, is_serving_worker

logger = logging.getLogger("routerd.nginx")


class Nginx:
    def __init__(self, master: Master, *, status_listen: str, reload_timeout: float) -> None:
        self.master = master
        self.status_host, self.status_port = _connect_address(status_listen)
        self.reload_timeout = reload_timeout
        self.served: str | None = None  # the generation nginx serves, as far as routerd knows
        self.waiting: str | None = None  # installed while no master ran (sidecar mode)
        self.ready = False  # nginx answers with ``served``
        self.lock = asyncio.Lock()  # held while a generation is installed and loaded

    # -- at start

    async def take_over(self, installed: str | None) -> None:
        """Serve the last good config at once, before etcd is even reached.

        Sidecar mode: trust the installed file only if nginx serves it (a
        routerd killed between rename and SIGHUP left one it never loaded).
        Supervised: take over the master a killed routerd left, or start one
        on the installed file if it still passes ``nginx -t``."""
        self.served = installed
        master = self.master
        if not master.supervise:
            live = await self.serving()
            if live is not None and live != installed:
                log(logger, "nginx serves another config than the installed one; will reload")
                self.served = live
            return
        if installed is None:
            return
        if master.adopt_running():
            log(logger, "adopted the running nginx master", pid=master.pid())
            self.served = await self.serving()
            return
        try:
            await asyncio.to_thread(
                validate.nginx_test, master.binary, master.conf, master.runtime_dir
            )
        except ValidationError as exc:
            log(logger, "installed config not usable", logging.WARNING, error=str(exc))
            self.served = None
            return
        master.start()
        log(logger, "serving installed config", sha256=installed[:12])

    # -- loading a generation

    async def load(self, generation: str) -> None:
        """Start or reload the master on the installed file and confirm ``generation``.

        NginxNotRunning (sidecar, no master yet): the file waits for nginx to
        start; ReloadError: nginx did not serve it, with nginx's own reason."""
        offset = self.master.error_log_offset()
        try:
            retiring = self._start_or_reload()
        except NginxNotRunning:
            self.waiting = generation
            raise
        await self._confirm(generation, offset=offset, retiring=retiring, fail_fast=True)
        self.served, self.waiting, self.ready = generation, None, True

    async def load_again(self) -> None:
        """Reload after the previous file was put back, and confirm the generation
        served before. The failed reload may still be logging its [emerg]: wait
        for the generation rather than fail on the first error line."""
        if self.served is None:
            return
        offset = self.master.error_log_offset()
        retiring = self._start_or_reload()
        await self._confirm(self.served, offset=offset, retiring=retiring, fail_fast=False)

    def _start_or_reload(self) -> set[int]:
        """Start a master on the installed file when none runs, else reload it:
        the workers that are to retire."""
        if self.master.needs_start():
            self.master.start()
            return set()
        return self.master.reload()

    # -- watching

    async def check(self, installed: str | None) -> bool:
        """Restart a supervised master that died, adopt the installed generation
        when nginx serves it (a sidecar's nginx that started after routerd, or
        restarted), and note whether nginx is ready. True when it adopted."""
        code = self.master.exited()
        if code is not None and installed is not None:
            log(logger, "nginx exited; restarting", logging.ERROR, code=code)
            self.master.start()
        live = await self.serving()
        # While an apply installs, it decides what is served.
        adopted = live is not None and live == installed and not self.lock.locked()
        if adopted and live != self.served:
            log(logger, "nginx serves the installed config", sha256=(live or "")[:12])
            self.served, self.waiting = live, None
        else:
            adopted = False
        self.ready = live is not None and live == self.served
        return adopted

    def exited(self) -> int | None:
        return self.master.exited()

    def stop(self) -> None:
        self.master.stop()

    async def serving(self) -> str | None:
        """The generation the status server answers with, or None when it does not answer."""
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection(self.status_host, self.status_port)
        except (TimeoutError, OSError):
            return None
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: routerd-status\r\n\r\n")
            async with asyncio.timeout(1.0):
                response = await reader.read(4096)
        except (TimeoutError, OSError):
            return None
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        return body.strip().decode() if head.startswith(b"HTTP/1.1 200") else None

    async def _confirm(
        self, generation: str, *, offset: int, retiring: set[int], fail_fast: bool
    ) -> None:
        """Wait until every new connection gets ``generation``: the new workers
        answer with it and the ``retiring`` ones stopped accepting."""
        deadline = time.monotonic() + self.reload_timeout
        delay = 0.005
        while True:
            served = await self.serving() == generation
            if served and not any(is_serving_worker(pid) for pid in retiring):
                return
            if fail_fast and (errors := self.master.errors_since(offset)):
                raise ReloadError(errors[-1])
            if (code := self.master.exited()) is not None:
                raise ReloadError(f"nginx exited with code {code}")
            if time.monotonic() > deadline:
                raise ReloadError(
                    f"nginx did not serve generation {generation[:12]} "
                    f"within {self.reload_timeout:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


def _connect_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)
