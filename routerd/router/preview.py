"""``routerd render --dry-run [--diff]``: what ``run`` would install, proven valid.

The router's own pipeline runs in a scratch folder (load, render, stage,
crossplane, ``nginx -t``), so the preview is refused for exactly the
reasons a router would refuse it; the text printed is rendered with the
real flags, with every app file inlined where nginx.conf includes it. In
dynamic-backends mode the instances live in nginx's balancer table, not in
the config, so the table is printed after it, as comments, and diffed too.
Changes nothing outside the scratch folder.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from routerd.router.backends import Backends, LuaSupport, table_of
from routerd.router.metrics import Metrics
from routerd.router.model import RoutingTable
from routerd.router.pipeline import Router, layout_of
from routerd.router.render import Renderer
from routerd.router.settings import Settings
from routerd.store import Snapshot

INCLUDE = re.compile(r"^(\s*)include (routerd/apps/[^;]+\.conf);\n", re.MULTILINE)
TABLE_HEAD = "# balancer table (dynamic backends): app instances\n"


@dataclass(frozen=True)
class Preview:
    revision: int
    table: RoutingTable
    generation: str
    text: str  # the config, app files inlined, and the balancer table when there is one


async def preview(settings: Settings, snapshot: Snapshot, support: LuaSupport | None) -> Preview:
    """Validate the rendering of ``snapshot`` in a scratch folder; the text ``run`` would install.

    Raises what the router would refuse the candidate with."""
    scratch = Path(tempfile.mkdtemp(prefix="routerd-render-"))
    try:
        ns = replace(settings.nginx, conf=scratch / "nginx.conf", runtime_dir=scratch)
        scratch_router = Router.create(
            replace(settings, nginx=replace(ns, supervise=True, pid_file=None)), Metrics(), support
        )
        table, _ = await scratch_router.preview(snapshot)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lua = None
    if support is not None:
        live = settings.nginx
        lua = Backends(
            state_dir=live.state_dir, runtime_dir=live.runtime_dir, templates=live.templates
        ).layout(support)
    candidate = Renderer(settings.nginx.templates, layout_of(settings, lua)).render(table)
    text = expand(candidate.main, candidate.shards)
    if support is not None:
        text += table_section(table_of(table))
    return Preview(snapshot.revision, table, candidate.sha256, text)


def expand(main: str, files: dict[str, str]) -> str:
    """The main file with each include line replaced by the file it names."""

    def inline(match: re.Match[str]) -> str:
        body = files.get(match.group(2))
        return match.group(0) if body is None else f"{match.group(1)}# {match.group(2)}\n{body}"

    return INCLUDE.sub(inline, main)


def table_section(entries: dict[str, str]) -> str:
    lines = [f"#   {app} {addresses or '(none)'}\n" for app, addresses in sorted(entries.items())]
    return "\n" + TABLE_HEAD + "".join(lines)


def installed_text(settings: Settings, *, dynamic: bool) -> str:
    """What is installed at --nginx-conf, expanded like a preview, for the diff."""
    conf = settings.nginx.conf
    if not conf.exists():
        return ""
    main = conf.read_text(errors="replace")
    files = {}
    for match in INCLUDE.finditer(main):
        path = conf.parent / match.group(2)
        if path.is_file():
            files[match.group(2)] = path.read_text(errors="replace")
    text = expand(main, files)
    if dynamic:
        text += table_section(_installed_table(settings.nginx.state_dir / "backends.txt"))
    return text


def _installed_table(path: Path) -> dict[str, str]:
    """The table file nginx loads at start: ``revision N full`` then ``app addresses``."""
    try:
        lines = path.read_text(errors="replace").splitlines()[1:]
    except OSError:
        return {}
    return dict(line.partition(" ")[::2] for line in lines if line)
