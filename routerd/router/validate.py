"""Proof that a candidate is valid: crossplane parse, then ``nginx -t``.

crossplane parses what changed (the shard files not seen before, plus the
small main file) and checks their structure, which ``nginx -t`` does not:
an app file may hold only ``upstream`` and ``server`` blocks and no
directive that loads code or other files. ``nginx -t`` then checks the
staged main file with everything it includes. Both raise ValidationError
with the file and line at fault. Does not install or reload anything.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import crossplane

from routerd.errors import ValidationError

APP_TOP_LEVEL = {"upstream", "server"}
FORBIDDEN = {"include", "load_module", "perl", "perl_modules", "js_import", "js_include"}
FORBIDDEN_SUFFIXES = ("_by_lua", "_by_lua_block", "_by_lua_file")
# The one Lua an app file may hold: the call into routerd's balancer.
ALLOWED_LUA = {("access_by_lua_block", (" routerd.route() ",))}


def parse(path: Path) -> list[dict[str, Any]]:
    """crossplane parse of one file (includes not followed); its directives."""
    payload = crossplane.parse(
        str(path), single=True, check_ctx=False, check_args=False, comments=False, combine=False
    )
    for error in payload["errors"]:
        raise ValidationError(error["error"], file=error["file"], line=error["line"])
    return list(payload["config"][0]["parsed"])


def check_app_file(path: Path) -> None:
    """An app shard declares upstreams and servers, and loads nothing."""
    for directive in parse(path):
        if directive["directive"] not in APP_TOP_LEVEL:
            raise ValidationError(
                f'"{directive["directive"]}" is not allowed at the top of an app file',
                file=str(path),
                line=directive["line"],
            )
        _check_forbidden(path, directive)


def _check_forbidden(path: Path, directive: dict[str, Any]) -> None:
    name = directive["directive"]
    if (name, tuple(directive["args"])) in ALLOWED_LUA:
        return
    if name in FORBIDDEN or name.endswith(FORBIDDEN_SUFFIXES):
        raise ValidationError(
            f'"{name}" is not allowed in an app file', file=str(path), line=directive["line"]
        )
    for child in directive.get("block", ()):
        _check_forbidden(path, child)


def check_main_file(path: Path, includes: list[str]) -> None:
    """The main file parses and includes exactly the shard files of its generation."""
    directives = parse(path)
    http = next((d for d in directives if d["directive"] == "http"), None)
    if http is None:
        raise ValidationError("no http block", file=str(path))
    found = [d["args"][0] for d in http.get("block", ()) if d["directive"] == "include"]
    if sorted(found) != sorted(includes):
        raise ValidationError(
            "the template must include exactly the app files it is given "
            "(`{% for path in includes %}include {{ path }};{% endfor %}` inside http)",
            file=str(path),
        )


def nginx_test(nginx_bin: str, conf: Path, prefix: Path) -> None:
    """`nginx -t` on the staged file; raises with nginx's own message."""
    try:
        result = subprocess.run(
            [nginx_bin, "-t", "-q", "-c", str(conf), "-p", f"{prefix}/", "-e", "stderr"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValidationError(f"could not run {nginx_bin} -t: {exc}", file=str(conf)) from exc
    if result.returncode != 0:
        raise ValidationError(_first_error(result.stderr) or "nginx -t failed", file=str(conf))


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "[emerg]" in line or "[alert]" in line]
    return (errors or lines or [""])[0].removeprefix("nginx: ")
