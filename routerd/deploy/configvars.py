"""Config vars: an app's environment in ``apps/<app>/env``, as on Heroku.

    {"DATABASE_URL": "postgres://...", "WEB_CONCURRENCY": "4"}

Names are ``[A-Z_][A-Z0-9_]*``; values any UTF-8 text without NUL, at most
``MAX_VALUE`` bytes each and ``MAX_TOTAL`` in all. ``PORT`` is routerd's
(every container reads its port from it), as are the names routerd sets
itself. Values are secrets: no error, log line or progress line here or
anywhere else ever holds one; errors name the variable, never its value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from routerd.errors import InvalidValue

NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,254}")
RESERVED = frozenset({"PORT", "ROUTERD_APP", "ROUTERD_RELEASE"})
MAX_VALUE = 32 * 1024
MAX_TOTAL = 256 * 1024
MASK = "(set)"


def check(where: str, env: Mapping[str, object]) -> dict[str, str]:
    """The config vars, or InvalidValue naming ``where`` and the variable at fault."""
    found: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or NAME.fullmatch(name) is None:
            raise InvalidValue(where, f"config var name {name!r} must match {NAME.pattern}")
        if name in RESERVED:
            raise InvalidValue(where, f"{name} is set by routerd and cannot be a config var")
        if not isinstance(value, str):
            raise InvalidValue(where, f"the value of {name} must be text")
        if "\0" in value:
            raise InvalidValue(where, f"the value of {name} holds a NUL character")
        if len(value.encode()) > MAX_VALUE:
            raise InvalidValue(where, f"the value of {name} is over {MAX_VALUE} bytes")
        found[name] = value
    if sum(len(k) + len(v.encode()) for k, v in found.items()) > MAX_TOTAL:
        raise InvalidValue(where, f"the config vars are over {MAX_TOTAL} bytes in all")
    return found


def parse(where: str, raw: bytes | None) -> dict[str, str]:
    """``apps/<app>/env`` as read back from etcd (absent: no config vars)."""
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        # The message of a JSON error quotes no value, only a position.
        raise InvalidValue(where, f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidValue(where, "must be a JSON object of names to values")
    return check(where, data)


def to_json(env: Mapping[str, str]) -> bytes:
    return json.dumps(dict(sorted(env.items()))).encode()


def assignments(where: str, items: Iterable[str]) -> dict[str, str]:
    """``K=V`` arguments; errors name the argument by its name alone."""
    found: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            shown = name if NAME.fullmatch(name) else "an argument"
            raise InvalidValue(where, f"{shown} must be NAME=VALUE")
        found[name] = value
    return check(where, found)


def names(where: str, items: Iterable[str]) -> list[str]:
    """Names to unset, each checked like a name to set."""
    listed = list(items)
    for name in listed:
        if NAME.fullmatch(name) is None:
            raise InvalidValue(where, f"config var name {name!r} must match {NAME.pattern}")
    return listed


@dataclass(frozen=True)
class Changes:
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def describe(self) -> str:
        """Names only, as a person reads them: "+A ~B -C"."""
        parts = [f"+{n}" for n in self.added] + [f"~{n}" for n in self.changed]
        return " ".join(parts + [f"-{n}" for n in self.removed])


def changes(before: Mapping[str, str], after: Mapping[str, str]) -> Changes:
    return Changes(
        added=tuple(sorted(set(after) - set(before))),
        changed=tuple(sorted(n for n in set(after) & set(before) if after[n] != before[n])),
        removed=tuple(sorted(set(before) - set(after))),
    )
