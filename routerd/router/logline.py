"""One request as nginx logs it for routerd, and the two access-log formats.

nginx writes a tab-separated line per request (``log_format routerd`` in
nginx.conf.j2) with ``escape=default``: a quote, a backslash and every byte
outside printable ASCII, the tab included, arrive as ``\\xHH``, so no field
can hold the separator or a newline. ``split`` cuts a line into its raw
fields (all the counting needs); ``json_line`` and ``heroku_line`` decode
them back into the request's own bytes and quote them again for their own
grammar, so nothing a client sends can break a line: invalid
UTF-8 comes out as ``\\xHH`` text. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

# The log_format's fields, in order.
FIELDS = (
    "msec", "request_id", "app", "upstream", "status", "bytes", "request_time",
    "connect_time", "response_time", "client", "method", "path", "protocol", "host",
    "user_agent", "scheme",
)  # fmt: skip
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
_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def iso_time(epoch: float) -> str:
    """UTC with milliseconds: 2026-12-01T10:00:00.123Z."""
    whole = int(epoch)
    if _second[0] != whole:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    millis = min(999, round((epoch - whole) * 1000))
    return f"{_second[1]}.{millis:03d}Z"


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
        f'{{"time": "{iso_time(float(f[0]))}", "request_id": {_string(_text(f[1]))}, '
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
        f"{iso_time(float(f[0]))} at=info app={value(app)} method={value(_text(f[10]))} "
        f"path={quoted(_text(f[11]))} host={value(_text(f[13]))} "
        f"request_id={value(_text(f[1]))} fwd={quoted(_text(f[9]))} dyno={dyno} "
        f"connect={_ms(f[7])} service={_ms(f[RESPONSE_TIME])} status={_whole(f[STATUS])} "
        f"bytes={_whole(f[5])} protocol={value(_text(f[15]))} total={_ms(f[REQUEST_TIME])} "
        f"upstream={value(upstream) if upstream else ''} user_agent={quoted(_text(f[14]))}"
    )


FORMATS = {"json": json_line, "heroku": heroku_line}
