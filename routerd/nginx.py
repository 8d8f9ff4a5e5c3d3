"""Files beside nginx.conf, and the nginx master: stage, install, reload, confirm.

The destination is only ever the old file or the new one: every file is
written to a temporary name in its own folder, fsynced and renamed. Shard
and cert files are named by their content, so writing a generation never
touches a file the running one uses; ``nginx.conf`` is swapped last, with
the previous one kept as ``nginx.conf.prev`` for rollback. A reload is a
SIGHUP to the master, confirmed by reading the generation from the status
server (a reload can fail after ``nginx -t`` passed; only this tells).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from routerd.errors import NginxNotRunning, ReloadError
from routerd.render import APPS_DIR, CERTS_DIR, Rendered

GENERATION = re.compile(rb'return 200 "([0-9a-f]{64})";')
APPS_COUNT = re.compile(rb"^# Rendered by routerd.* apps=(\d+)", re.MULTILINE)
REFERENCE = re.compile(rb"(routerd/(?:apps|certs)/[0-9a-f]{2,64}(?:-[0-9a-f]+)?\.(?:conf|pem))")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write beside the destination, fsync, rename: never a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:  # a nearly full disk may take fewer bytes than asked
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Installer:
    """Owns the files of routerd's generations in the folder of nginx.conf."""

    def __init__(self, conf: Path, *, keep_failed: int = 5) -> None:
        self.conf = conf
        self.prev = conf.with_name(conf.name + ".prev")
        self.failed_dir = conf.parent / "routerd" / "failed"
        self.keep_failed = keep_failed
        for sub in (APPS_DIR, CERTS_DIR):
            (conf.parent / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(conf.parent / CERTS_DIR, 0o700)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a routerd killed mid-write; never the live files."""
        for folder in (self.conf.parent, self.conf.parent / APPS_DIR, self.conf.parent / CERTS_DIR):
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)

    def installed(self) -> bytes | None:
        try:
            return self.conf.read_bytes()
        except FileNotFoundError:
            return None

    def installed_generation(self) -> str | None:
        match = GENERATION.search(self.installed() or b"")
        return match.group(1).decode() if match else None

    def installed_apps(self) -> int:
        match = APPS_COUNT.search(self.installed() or b"")
        return int(match.group(1)) if match else 0

    def write_files(self, rendered: Rendered) -> list[Path]:
        """Write the shard and cert files the generation names; return the new shards."""
        new = []
        for rel, text in rendered.shards.items():
            path = self.conf.parent / rel
            if not path.exists():
                write_atomic(path, text.encode())
                new.append(path)
        for rel, pem in rendered.certs.items():
            path = self.conf.parent / rel
            if not path.exists():
                write_atomic(path, pem, mode=0o600)
        if new:
            fsync_dir(self.conf.parent / APPS_DIR)
        if rendered.certs:
            fsync_dir(self.conf.parent / CERTS_DIR)
        return new

    def stage(self, rendered: Rendered) -> Path:
        staged = self.conf.with_name(f".{self.conf.name}.staged")
        write_atomic(staged, rendered.main.encode())
        return staged

    def install(self, staged: Path) -> None:
        """Keep the running file as .prev, then rename the staged one over it."""
        if self.conf.exists():
            tmp = self.prev.with_name(f".{self.prev.name}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(self.conf, tmp)
            os.replace(tmp, self.prev)
        os.replace(staged, self.conf)
        fsync_dir(self.conf.parent)

    def restore_previous(self) -> bool:
        """Put .prev back in place; False when there is none (first install)."""
        if not self.prev.exists():
            return False
        write_atomic(self.conf, self.prev.read_bytes())
        fsync_dir(self.conf.parent)
        return True

    def keep_failed_candidate(self, staged: Path, new_files: list[Path], reason: str) -> Path:
        """Move a refused candidate aside for inspection; keep only the last few."""
        now = time.time_ns()  # names sort by time: the oldest are pruned first
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
        folder = self.failed_dir / f"{stamp}.{now % 10**9:09d}"
        folder.mkdir(parents=True)
        if staged.exists():
            shutil.copy2(staged, folder / self.conf.name)
        for path in new_files:
            if path.exists():
                shutil.copy2(path, folder / path.name)
        (folder / "reason.txt").write_text(reason + "\n")
        for old in sorted(self.failed_dir.iterdir())[: -self.keep_failed or None]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def collect_garbage(self) -> int:
        """Remove shard and cert files that neither nginx.conf nor .prev names."""
        keep: set[str] = set()
        for path in (self.conf, self.prev):
            with contextlib.suppress(FileNotFoundError):
                keep.update(m.decode() for m in REFERENCE.findall(path.read_bytes()))
        removed = 0
        for sub in (APPS_DIR, CERTS_DIR):
            for path in (self.conf.parent / sub).iterdir():
                if f"{sub}/{path.name}" not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


class Nginx:
    """The nginx master: started by routerd (supervise) or found by pid file."""

    def __init__(
        self,
        *,
        binary: str,
        conf: Path,
        runtime_dir: Path,
        status_listen: str,
        supervise: bool,
        pid_file: Path,
    ) -> None:
        self.binary = binary
        self.conf = conf
        self.runtime_dir = runtime_dir
        self.status_host, self.status_port = _connect_address(status_listen)
        self.supervise = supervise
        self.pid_file = pid_file
        self.error_log = runtime_dir / "error.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None  # a master a previous routerd started
        self.stale_sockets: list[Path] = []  # unix sockets the config listens on

    def prepare_runtime(self) -> None:
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.runtime_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """--supervise: run the master in the foreground as routerd's child.

        A master that died (SIGKILL, OOM) leaves its workers holding the
        listen sockets, and nginx leaves unix sockets behind: clear both, or
        the new master fails to bind forever."""
        self.prepare_runtime()
        for dead in (self.adopted, self.process.pid if self.process else None):
            if dead is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(dead, signal.SIGKILL)  # started in its own session: its group
        for path in self.stale_sockets:
            path.unlink(missing_ok=True)
        self.adopted = None
        self.process = subprocess.Popen(
            [
                self.binary,
                "-c",
                str(self.conf),
                "-p",
                f"{self.runtime_dir}/",
                "-e",
                str(self.error_log),
                "-g",
                "daemon off;",
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def needs_start(self) -> bool:
        """--supervise with no master yet (none started, none adopted)."""
        return self.supervise and self.process is None and self.adopted is None

    def adopt_running(self) -> bool:
        """--supervise after a routerd that was killed: its nginx master (in its
        own session) still serves; take it over rather than start a second one."""
        pid = _pid_from(self.pid_file)
        if pid is None or not _is_master_of(pid, self.conf):
            return False
        self.adopted = pid
        return True

    def exited(self) -> int | None:
        """The exit code of a supervised master that died, else None."""
        if self.adopted is not None:
            return None if _is_master_of(self.adopted, self.conf) else -1
        return self.process.poll() if self.process else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.adopted is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.adopted, signal.SIGQUIT)
            return
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful: finish in-flight requests
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def master_pid(self) -> int:
        if self.adopted is not None and _is_master_of(self.adopted, self.conf):
            return self.adopted
        if self.supervise:
            if self.process is None or self.process.poll() is not None:
                raise ReloadError("the supervised nginx master is not running")
            return self.process.pid
        try:
            text = self.pid_file.read_text().strip()
            if not text.isdigit():  # `nginx -t` leaves an empty pid file while nginx is down
                raise NginxNotRunning(f"no nginx master: pid file {self.pid_file} is empty")
            pid = int(text)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError as exc:
            raise NginxNotRunning(f"no nginx master from pid file {self.pid_file}: {exc}") from exc
        if not cmdline.startswith(b"nginx: master"):
            raise NginxNotRunning(f"pid {pid} from {self.pid_file} is not an nginx master")
        return pid

    def error_log_offset(self) -> int:
        try:
            return self.error_log.stat().st_size
        except FileNotFoundError:
            return 0

    def errors_since(self, offset: int) -> list[str]:
        """[emerg] and [alert] lines nginx logged after ``offset``."""
        try:
            with self.error_log.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if "[emerg]" in line or "[alert]" in line]

    def reload(self) -> set[int]:
        """SIGHUP to the master (nginx -s reload would parse the whole config once
        more); the workers that are to retire."""
        master = self.master_pid()
        retiring = {pid for pid in _children(master) if _is_serving_worker(pid)}
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError as exc:
            raise ReloadError("the nginx master vanished before the reload") from exc
        return retiring

    async def serving(self) -> str | None:
        """The generation the status server answers with, or None when it does not answer."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.status_host, self.status_port), 1.0
            )
        except (TimeoutError, OSError):
            return None
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: routerd-status\r\n\r\n")
            response = await asyncio.wait_for(reader.read(4096), 1.0)
        except (TimeoutError, OSError):
            return None
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        return body.strip().decode() if head.startswith(b"HTTP/1.1 200") else None

    async def confirm(
        self,
        generation: str,
        *,
        offset: int,
        timeout: float,
        retiring: frozenset[int] | set[int] = frozenset(),
        fail_fast: bool = True,
    ) -> None:
        """Wait until nginx serves ``generation`` to every new connection: the new
        workers answer with it and the ``retiring`` ones stopped accepting (the
        master keeps them for 100 ms after the new ones start). Fail fast on an
        [emerg] line."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            served = await self.serving() == generation
            if served and not any(_is_serving_worker(pid) for pid in retiring):
                return
            if fail_fast and (errors := self.errors_since(offset)):
                raise ReloadError(errors[-1])
            if (code := self.exited()) is not None:
                raise ReloadError(f"nginx exited with code {code}")
            if time.monotonic() > deadline:
                raise ReloadError(
                    f"nginx did not serve generation {generation[:12]} within {timeout:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


def _pid_from(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_master_of(pid: int, conf: Path) -> bool:
    """An nginx master started on ``conf`` (as Nginx.start does)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(b"nginx: master") and str(conf).encode() in title


def _children(parent: int) -> list[int]:
    """Child pids of ``parent``, from /proc (no psutil needed for one field)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat.rpartition(b")")[2].split()[1]) == parent:
                children.append(int(entry))
    return children


def _is_serving_worker(pid: int) -> bool:
    """A worker that still accepts connections (not gone, not shutting down)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(b"nginx: worker process") and b"shutting down" not in title


def _connect_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)
