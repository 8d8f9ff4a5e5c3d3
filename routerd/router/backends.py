"""Dynamic backends: instance lists applied inside nginx, without a reload.

When nginx has the Lua module, apps whose instances are IP addresses are
routed through one balancer upstream that reads a shared dict. This module
owns that table on routerd's side: it writes the whole table to a file
beside nginx.conf (which nginx loads at start and reload, so a new
generation never serves without backends), pushes what changed to nginx
over a unix socket in a folder only routerd's user can enter, and reads
back the revision nginx now holds. Does not render or reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from routerd.errors import ConfigError, ReloadError
from routerd.router.install import write_atomic
from routerd.router.model import RoutingTable
from routerd.router.render import Lua

LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
LUA_SOURCE = "lua/routerd.lua"


@dataclass(frozen=True)
class LuaSupport:
    """How this nginx gets the Lua module: load_module lines (none when built in)."""

    modules: tuple[str, ...]


def detect_lua(nginx_bin: str) -> LuaSupport | None:
    """Lua support of ``nginx_bin``: built in, a dynamic module, or none. A module
    file is not proof: it must load into this very binary (`nginx -t`)."""
    try:
        result = subprocess.run([nginx_bin, "-V"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    flags = result.stderr
    if re.search(r"--add-module=\S*lua", flags):
        support = LuaSupport(())
    else:
        match = re.search(r"--modules-path=(\S+)", flags)
        folder = Path(match.group(1) if match else "/usr/lib/nginx/modules")
        paths = [folder / name for name in LUA_MODULES]
        if not paths[1].is_file():
            return None
        support = LuaSupport(tuple(str(p) for p in paths if p.is_file()))
    return support if _loads(nginx_bin, support) else None


def _loads(nginx_bin: str, support: LuaSupport) -> bool:
    """`nginx -t` of a tiny config that loads the modules and runs Lua."""
    with tempfile.TemporaryDirectory(prefix="routerd-lua-") as folder:
        conf = Path(folder) / "nginx.conf"
        modules = "".join(f"load_module {m};\n" for m in support.modules)
        conf.write_text(
            f"{modules}pid {folder}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
            "http { init_by_lua_block { require('ngx.balancer') } }\n"
        )
        try:
            result = subprocess.run(
                [nginx_bin, "-t", "-q", "-c", str(conf), "-p", f"{folder}/", "-e", "stderr"],
                capture_output=True, timeout=30,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0


def table_of(routing: RoutingTable) -> dict[str, str]:
    """app -> "host:port,host:port" for every app routed by the balancer."""
    return {app.name: app.addresses for app in routing.apps if app.ip_only}


def body(revision: int, entries: Mapping[str, str], *, full: bool) -> str:
    """What nginx's balancer reads, pushed or from the file: a head line
    ``revision <n>`` (`` full`` when ``entries`` is the whole table, not
    changes), then ``<app> <host:port>,...`` per app (empty: no instance), an
    instance followed by ``=<weight>`` when the app's weights make it other than 1."""
    head = f"revision {revision}" + (" full" if full else "")
    return "\n".join([head] + [f"{app} {value}" for app, value in entries.items()]) + "\n"


class Backends:
    """What nginx's shared dict holds, and how to change it."""

    def __init__(self, *, state_dir: Path, runtime_dir: Path, templates: Path) -> None:
        self.file = state_dir / "backends.txt"
        self.lua_dir = state_dir / "lua"
        self.socket_dir = runtime_dir / "private"
        self.socket = self.socket_dir / "backends.sock"
        self.source = (templates / LUA_SOURCE).read_bytes()
        self.pushed: dict[str, str] | None = None  # None: push everything next time
        self.revision = 0  # of the last confirmed push
        self.stale = False  # nginx lost what was pushed (a restart): push everything next

    def layout(self, support: LuaSupport) -> Lua:
        """What the templates need to render the balancer (no file is touched)."""
        sha = hashlib.sha256(self.source).hexdigest()
        return Lua(support.modules, str(self.lua_dir), str(self.file), str(self.socket), sha)

    def prepare(self) -> None:
        """The owner-only socket folder, and the balancer's source beside nginx.conf."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        info = os.lstat(self.socket_dir)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise ConfigError("--runtime-dir", f"{self.socket_dir} must be a folder, not a link")
        if info.st_uid != os.geteuid():
            raise ConfigError(
                "--runtime-dir", f"{self.socket_dir} belongs to uid {info.st_uid}, not to routerd"
            )
        os.chmod(self.socket_dir, 0o700)
        self.lua_dir.mkdir(parents=True, exist_ok=True)
        target = self.lua_dir / "routerd.lua"
        if not target.exists() or target.read_bytes() != self.source:
            write_atomic(target, self.source)

    def write_file(self, revision: int, table: dict[str, str] | None = None) -> None:
        """A table (default: as pushed) for nginx to load at its next start or reload.

        Renamed into place but not fsynced: after a crash routerd pushes the
        whole table again anyway, and the fsync would sit on the hot path.
        """
        table = self.pushed or {} if table is None else table
        write_atomic(self.file, body(revision, table, full=True).encode(), sync=False)

    def changes(self, routing: RoutingTable, *, removals: bool = True) -> dict[str, str] | None:
        """What nginx must learn (an empty app: no instance); None: the whole table.
        Without ``removals``, apps missing from ``routing`` keep what nginx holds."""
        if self.stale:
            self.stale, self.pushed = False, None
        if self.pushed is None:
            return None if removals else dict(table_of(routing))
        if routing.dirty is not None:  # only these apps' instances moved
            apps = (a for a in routing.apps if a.name in routing.dirty)
            wanted = {a.name: a.addresses if a.ip_only else "" for a in apps}
            return {a: v for a, v in wanted.items() if self.pushed.get(a, "") != v}
        table = table_of(routing)
        changed = {a: v for a, v in table.items() if self.pushed.get(a) != v}
        if removals:
            changed.update({a: "" for a in self.pushed if a not in table})
        return changed

    async def push(self, routing: RoutingTable, changes: dict[str, str] | None) -> int:
        """Send ``changes`` (the whole table when None); the number of apps sent."""
        entries = table_of(routing) if changes is None else changes
        text = body(routing.revision, entries, full=changes is None)
        try:
            answer = await self._request("POST", text.encode())
        except (OSError, ReloadError):
            self.pushed = None
            raise
        if answer != f"revision {routing.revision}":
            self.pushed = None
            raise ReloadError(f"nginx refused the backend push: {answer}")
        self.revision = routing.revision
        if changes is None or self.pushed is None:
            self.pushed = dict(table_of(routing))
        else:
            for app, value in entries.items():
                if value:
                    self.pushed[app] = value
                else:
                    self.pushed.pop(app, None)
        return len(entries)

    async def restore(self, revision: int) -> None:
        """Push the last pushed table whole again (and its file): after a rollback,
        nginx must not keep the table the refused generation loaded."""
        table = dict(self.pushed or {})
        answer = await self._request("POST", body(revision, table, full=True).encode())
        if answer != f"revision {revision}":
            self.pushed = None
            raise ReloadError(f"nginx refused the backend restore: {answer}")
        self.write_file(revision)

    async def held_revision(self) -> int | None:
        """The revision nginx's table holds, or None when nginx does not answer."""
        try:
            answer = await self._request("GET", b"")
        except (OSError, ReloadError):
            return None
        match = re.fullmatch(r"revision (\d+)", answer)
        return int(match.group(1)) if match else None

    async def _request(self, method: str, payload: bytes) -> str:
        try:
            async with asyncio.timeout(2.0):
                reader, writer = await asyncio.open_unix_connection(str(self.socket))
        except (TimeoutError, OSError) as exc:
            raise ReloadError(f"backend socket {self.socket}: {exc}") from exc
        try:
            writer.write(
                f"{method} /backends HTTP/1.0\r\nHost: routerd\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            async with asyncio.timeout(10.0):
                response = await reader.read()
        except (TimeoutError, OSError) as exc:
            raise ReloadError(f"backend push: {exc}") from exc
        finally:
            writer.close()
        head, _, text = response.partition(b"\r\n\r\n")
        return text.decode("utf-8", "replace").strip() or head.decode(errors="replace")
