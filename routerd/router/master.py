"""The nginx master process: started by routerd (``--supervise``), taken over
from a routerd that was killed, or found through a neighbour's pid file.

Signals go to the master itself: ``nginx -s reload`` would parse the whole
config once more before sending the same SIGHUP. Process facts come from
``/proc`` (command line, parent, state); no psutil for three fields. Knows
nothing of generations: ``routerd.router.nginx`` decides what to load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from routerd.errors import NginxNotRunning, ReloadError

TEMP_FOLDERS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Master:
    def __init__(
        self, *, binary: str, conf: Path, runtime_dir: Path, supervise: bool, pid_file: Path
    ) -> None:
        self.binary = binary
        self.conf = conf
        self.runtime_dir = runtime_dir
        self.supervise = supervise
        self.pid_file = pid_file
        self.error_log = runtime_dir / "error.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None  # a master a previous routerd started
        self.stale_sockets: list[Path] = []  # unix sockets the config listens on

    def prepare_runtime(self) -> None:
        for sub in TEMP_FOLDERS:
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
        """--supervise with no master running: none started or adopted yet, or the
        one there was died (a SIGKILL or the OOM killer between two checks of the
        watch loop): a new config is then loaded by starting a master on it, as a
        reload could only fail."""
        if not self.supervise:
            return False
        return (self.process is None and self.adopted is None) or self.exited() is not None

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

    def pid(self) -> int:
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

    def reload(self) -> set[int]:
        """SIGHUP to the master; the workers that are to retire."""
        master = self.pid()
        retiring = {pid for pid in _children(master) if is_serving_worker(pid)}
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError as exc:
            raise ReloadError("the nginx master vanished before the reload") from exc
        return retiring

    def reopen_logs(self) -> None:
        """SIGUSR1: the master and its workers reopen their log files."""
        try:
            os.kill(self.pid(), signal.SIGUSR1)
        except ProcessLookupError as exc:
            raise ReloadError("the nginx master vanished before reopening its logs") from exc

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


def _pid_from(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_master_of(pid: int, conf: Path) -> bool:
    """An nginx master started on ``conf`` (as Master.start does)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(b"nginx: master") and str(conf).encode() in title


def _children(parent: int) -> list[int]:
    """Child pids of ``parent``, from /proc."""
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


def is_serving_worker(pid: int) -> bool:
    """A worker that still accepts connections (not gone, not shutting down)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(b"nginx: worker process") and b"shutting down" not in title
