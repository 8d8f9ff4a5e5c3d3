"""One request as nginx logs it for routerd, and the two access-log formats.

nginx writes a tab-separated line per request (``log_format routerd`` in
nginx.conf.j2) with ``escape=default``: a quote, a backslash and every byte
outside printable ASCII, the tab included, arrive as ``\\xHH``, so no field
can hold the separator or a newline. ``split`` cuts a line into its raw
fields (all the counting needs); ``json_line`` and ``heroku_line`` decode
them back into the request's own bytes and quote them again for their own
grammar, so nothing a client sends can break a line: invalid
UTF-8 comes out as ``\\xHH`` text. A line with no backslash in it, nearly
every line, has nothing to decode or quote again: its fields go into the
format as they are (``Format.plain``), which is what keeps the access log
cheap. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import NamedTuple

# The log_format's fields, in order.
FIELDS = (
    "msec", "request_id", "app", "upstream", "status", "bytes", "request_time",
    "connect_time", "response_time", "client", "method", "path", "protocol", "host",
    "user_agent", "scheme",
)  # fmt: skip
COUNT = len(FIELDS)
APP, UPSTREAM, STATUS, REQUEST_TIME, RESPONSE_TIME = 2, 3, 4, 6, 8
ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")
BARE = re.compile(r"[A-Za-z0-9._:@/+=,\[\]-]+")  # a Heroku value that needs no quotes
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def split(line: str) -> list[str] | None:
    """The raw fields of one line, or None when it is not one of ours."""
    fields = line.split("\t")
    return fields if len(fields) == len(FIELDS) else None


def last(value: str) -> str:
    """The last try of a multi-valued upstream field ("a, b : c"): the one that answered."""
    if " " not in value:  # one try: the common case, and the hot path
        return value
    return value.rpartition(", ")[2].rpartition(" : ")[2]


def seconds(value: str) -> float | None:
    """An nginx time field ("0.012", "-", or one value per try): the last try's."""
    text = last(value)
    if text == "-":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def unescape(field: str) -> str:
    r"""A field as the client sent it: nginx's \xHH escapes back to bytes, then
    UTF-8 (invalid sequences stay visible as \xHH text)."""
    if "\\x" not in field:
        return field
    raw = ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), field).encode("latin-1")
    return raw.decode("utf-8", "backslashreplace")


NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
_string = json.encoder.encode_basestring_ascii
_seconds: dict[str, str] = {}  # whole seconds ("1764583200") formatted, the last few


def _second(whole: int) -> str:
    key = str(whole)
    text = _seconds.get(key)
    if text is None:
        if len(_seconds) >= 8:
            _seconds.clear()
        text = _seconds[key] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return text


def iso_time(epoch: float) -> str:
    """UTC with milliseconds: 2026-12-01T10:00:00.123Z."""
    whole = int(epoch)
    millis = min(999, round((epoch - whole) * 1000))
    return f"{_second(whole)}.{millis:03d}Z"


def msec_time(msec: str) -> str:
    """nginx's $msec ("1764583200.123") as iso_time gives it, without arithmetic."""
    whole, _, millis = msec.partition(".")
    text = _seconds.get(whole)
    if text is not None and len(millis) == 3 and millis.isdigit():
        return f"{text}.{millis}Z"
    try:
        return iso_time(float(msec))
    except (ValueError, OverflowError, OSError):
        return ""


def _text(field: str) -> str:
    if "\\x" in field:
        return unescape(field)
    return "" if field == "-" else field


def _number(field: str) -> str:
    """An nginx number field as JSON: the last try's value, or null."""
    text = last(field)
    return text if NUMBER.fullmatch(text) else "null"


def _whole(field: str) -> str:
    return field if field.isdigit() else "0"


def json_line(f: list[str], app: str, release: str, instance: str) -> str:
    """One JSON object; ASCII only, so any byte of the request stays inside its string."""
    return (
        f'{{"time": "{msec_time(f[0])}", "request_id": {_string(_text(f[1]))}, '
        f'"app": {_string(app)}, "release": {_string(release)}, '
        f'"instance": {_string(instance)}, "client": {_string(_text(f[9]))}, '
        f'"method": {_string(_text(f[10]))}, "path": {_string(_text(f[11]))}, '
        f'"protocol": {_string(_text(f[12]))}, "scheme": {_string(_text(f[15]))}, '
        f'"host": {_string(_text(f[13]))}, "status": {_whole(f[STATUS])}, '
        f'"bytes": {_whole(f[5])}, "request_time": {_number(f[REQUEST_TIME])}, '
        f'"upstream": {_string(_text(f[UPSTREAM]))}, '
        f'"upstream_connect_time": {_number(f[7])}, '
        f'"upstream_response_time": {_number(f[RESPONSE_TIME])}, '
        f'"user_agent": {_string(_text(f[14]))}}}'
    )


def quoted(text: str) -> str:
    """A double-quoted value: backslash and quote escaped, control bytes as \\xHH."""
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    if CONTROL.search(body):
        body = CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", body)
    return '"' + body + '"'


def value(text: str) -> str:
    """A Heroku value: bare when it is plain, quoted otherwise."""
    return text if BARE.fullmatch(text) else quoted(text)


def _ms(field: str) -> str:
    try:
        return f"{round(float(last(field)) * 1000)}ms"
    except ValueError:
        return ""


def heroku_line(f: list[str], app: str, release: str, instance: str) -> str:
    """Heroku's router line, with the app, the total time, the upstream and the
    user agent after Heroku's own fields."""
    dyno = value(f"{release}.{instance}") if instance else ""
    upstream = _text(f[UPSTREAM])
    return (
        f"{msec_time(f[0])} at=info app={value(app)} method={value(_text(f[10]))} "
        f"path={quoted(_text(f[11]))} host={value(_text(f[13]))} "
        f"request_id={value(_text(f[1]))} fwd={quoted(_text(f[9]))} dyno={dyno} "
        f"connect={_ms(f[7])} service={_ms(f[RESPONSE_TIME])} status={_whole(f[STATUS])} "
        f"bytes={_whole(f[5])} protocol={value(_text(f[15]))} total={_ms(f[REQUEST_TIME])} "
        f"upstream={value(upstream) if upstream else ''} user_agent={quoted(_text(f[14]))}"
    )


def _plain(field: str) -> str:
    return "" if field == "-" else field


_times: dict[str, str] = {}  # $msec -> its text, as nginx writes thirty lines each millisecond
_numbers: dict[str, str] = {}  # an nginx time field -> its JSON, as times repeat


def _cached_time(msec: str) -> str:
    if len(_times) >= 4096:
        _times.clear()
    text = _times[msec] = msec_time(msec)
    return text


def _cached_number(field: str) -> str:
    if len(_numbers) >= 4096:
        _numbers.clear()
    text = _numbers[field] = _number(field)
    return text


def json_plain(f: list[str], app: str, release: str, instance: str) -> str:
    """json_line of a line with no backslash in it: then no field holds a byte
    nginx escaped, so each goes into its string as it is. App, release and
    instance names are plain by their own rules (keys.py). The hot path of
    the access log: inlined, and what repeats is cached."""
    times, numbers = _times, _numbers
    msec, rt, ct, ut = f[0], f[6], f[7], f[8]
    return (
        f'{{"time": "{times.get(msec) or _cached_time(msec)}", '
        f'"request_id": "{"" if f[1] == "-" else f[1]}", '
        f'"app": "{app}", "release": "{release}", "instance": "{instance}", '
        f'"client": "{"" if f[9] == "-" else f[9]}", '
        f'"method": "{"" if f[10] == "-" else f[10]}", '
        f'"path": "{"" if f[11] == "-" else f[11]}", '
        f'"protocol": "{"" if f[12] == "-" else f[12]}", '
        f'"scheme": "{"" if f[15] == "-" else f[15]}", '
        f'"host": "{"" if f[13] == "-" else f[13]}", '
        f'"status": {f[4] if f[4].isdigit() else "0"}, '
        f'"bytes": {f[5] if f[5].isdigit() else "0"}, '
        f'"request_time": {numbers.get(rt) or _cached_number(rt)}, '
        f'"upstream": "{"" if f[3] == "-" else f[3]}", '
        f'"upstream_connect_time": {numbers.get(ct) or _cached_number(ct)}, '
        f'"upstream_response_time": {numbers.get(ut) or _cached_number(ut)}, '
        f'"user_agent": "{"" if f[14] == "-" else f[14]}"}}'
    )


def heroku_plain(f: list[str], app: str, release: str, instance: str) -> str:
    """heroku_line of a line with no backslash in it: its quoted values need no escapes."""
    dyno = value(f"{release}.{instance}") if instance else ""
    upstream = _plain(f[UPSTREAM])
    return (
        f"{msec_time(f[0])} at=info app={app} method={value(_plain(f[10]))} "
        f'path="{_plain(f[11])}" host={value(_plain(f[13]))} '
        f'request_id={value(_plain(f[1]))} fwd="{_plain(f[9])}" dyno={dyno} '
        f"connect={_ms(f[7])} service={_ms(f[RESPONSE_TIME])} status={_whole(f[STATUS])} "
        f"bytes={_whole(f[5])} protocol={value(_plain(f[15]))} total={_ms(f[REQUEST_TIME])} "
        f'upstream={value(upstream) if upstream else ""} user_agent="{_plain(f[14])}"'
    )


class Format(NamedTuple):
    """An access-log format: ``plain`` for a line with no backslash, ``any`` for every line."""

    plain: Callable[[list[str], str, str, str], str]
    any: Callable[[list[str], str, str, str], str]


FORMATS = {"json": Format(json_plain, json_line), "heroku": Format(heroku_plain, heroku_line)}
