"""The files beside nginx.conf: write a generation, stage, install, restore, collect.

The destination is only ever the old file or the new one: every file is
written to a temporary name in its own folder, fsynced and renamed; a write
that fails (a full disk, a read-only folder) removes its temporary file and
raises InstallError naming the file. App and
cert files are named by their content, so writing a generation never
touches a file the running one uses; ``nginx.conf`` is swapped last, with
the previous one kept as ``nginx.conf.prev`` for rollback.

Each staged nginx.conf gets a record in ``routerd/generations/``, named by
the hash of its bytes: the apps it routes and every file it uses. Garbage
collection keeps exactly the files the records of nginx.conf and .prev
name, and the shrink guard reads the served apps from the record after a
restart, so neither depends on what a template chose to write. Does not
run nginx.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from routerd.errors import InstallError
from routerd.router.render import APPS_DIR, CERTS_DIR, Rendered

GENERATION = re.compile(rb'return 200 "([0-9a-f]{64})";')
RECORDS_DIR = "routerd/generations"


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> None:
    """Write beside the destination, fsync (unless not ``sync``), rename: never a
    partial file, and no temporary one left when it fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except OSError as exc:
        raise _failed("write", path, exc) from exc
    try:
        try:
            view = memoryview(data)
            while view:  # a nearly full disk may take fewer bytes than asked
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk must not keep what did fit
        if isinstance(exc, OSError):
            raise _failed("write", path, exc) from exc
        raise


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _failed("sync", path, exc) from exc


def _failed(what: str, path: Path, exc: OSError) -> InstallError:
    return InstallError(f"cannot {what} {path}: {exc.strerror or exc}")


@dataclass(frozen=True)
class Record:
    """What one installed nginx.conf routes and uses."""

    apps: frozenset[str]
    files: frozenset[str]  # relative to the folder of nginx.conf


class Installer:
    """Owns the files of routerd's generations in the folder of nginx.conf."""

    def __init__(self, conf: Path, *, keep_failed: int = 5) -> None:
        self.conf = conf
        self.prev = conf.with_name(conf.name + ".prev")
        self.folder = conf.parent
        self.failed_dir = self.folder / "routerd" / "failed"
        self.records_dir = self.folder / RECORDS_DIR
        self.keep_failed = keep_failed

    def prepare(self) -> None:
        """Create routerd's folders and clear what a routerd killed mid-write left."""
        for sub in (APPS_DIR, CERTS_DIR, RECORDS_DIR):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder / CERTS_DIR, 0o700)
        for sub in ("", APPS_DIR, CERTS_DIR, RECORDS_DIR):
            for path in (self.folder / sub).glob(".*.tmp"):
                path.unlink(missing_ok=True)

    # -- what is installed

    def installed(self) -> bytes | None:
        try:
            return self.conf.read_bytes()
        except FileNotFoundError:
            return None

    def installed_generation(self) -> str | None:
        """The generation nginx.conf's status server answers with."""
        match = GENERATION.search(self.installed() or b"")
        return match.group(1).decode() if match else None

    def installed_apps(self) -> frozenset[str] | None:
        """The apps the installed nginx.conf routes; None when unknown."""
        record = self._record_of(self.conf)
        return None if record is None else record.apps

    # -- writing a generation

    def write_files(self, rendered: Rendered) -> list[Path]:
        """Write the app and cert files the generation names; return the new app files."""
        new = []
        for rel, text in rendered.shards.items():
            path = self.folder / rel
            if not path.exists():
                write_atomic(path, text.encode())
                new.append(path)
        for rel, pem in rendered.certs.items():
            path = self.folder / rel
            if not path.exists():
                write_atomic(path, pem, mode=0o600)
        if new:
            fsync_dir(self.folder / APPS_DIR)
        if rendered.certs:
            fsync_dir(self.folder / CERTS_DIR)
        return new

    def stage(self, rendered: Rendered) -> Path:
        """The candidate nginx.conf beside the live one, and its record."""
        main = rendered.main.encode()
        record = {"apps": sorted(rendered.app_names), "files": sorted(rendered.files)}
        write_atomic(self._record_path(main), json.dumps(record).encode())
        staged = self.conf.with_name(f".{self.conf.name}.staged")
        write_atomic(staged, main)
        return staged

    def install(self, staged: Path) -> None:
        """Keep the running file as .prev, then rename the staged one over it."""
        try:
            if self.conf.exists():
                tmp = self.prev.with_name(f".{self.prev.name}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.link(self.conf, tmp)
                os.replace(tmp, self.prev)
            os.replace(staged, self.conf)
        except OSError as exc:
            raise _failed("install", self.conf, exc) from exc
        fsync_dir(self.folder)

    def restore_previous(self) -> bool:
        """Put .prev back in place; False when there is none (first install)."""
        if not self.prev.exists():
            return False
        write_atomic(self.conf, self.prev.read_bytes())
        fsync_dir(self.folder)
        return True

    # -- refused candidates and garbage

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
        """Remove app and cert files that neither nginx.conf's nor .prev's record
        names. Without a record for one of them (installed by an older routerd),
        remove nothing: a file it uses might go."""
        keep: set[str] = set()
        records: set[str] = set()
        for path in (self.conf, self.prev):
            if not path.exists():
                continue
            record = self._record_of(path)
            if record is None:
                return 0
            keep |= record.files
            records.add(self._record_path(path.read_bytes()).name)
        removed = 0
        for sub in (APPS_DIR, CERTS_DIR):
            for path in (self.folder / sub).iterdir():
                if f"{sub}/{path.name}" not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
        for path in self.records_dir.glob("*.json"):
            if path.name not in records:
                path.unlink(missing_ok=True)
        return removed

    def _record_path(self, main: bytes) -> Path:
        return self.records_dir / f"{hashlib.sha256(main).hexdigest()}.json"

    def _record_of(self, conf: Path) -> Record | None:
        try:
            data = json.loads(self._record_path(conf.read_bytes()).read_bytes())
            return Record(frozenset(data["apps"]), frozenset(data["files"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
