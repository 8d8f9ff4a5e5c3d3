"""One request as nginx logs it for routerd, and the two access-log formats.

nginx writes a tab-separated line per request (``log_format routerd`` in
nginx.conf.j2) with ``escape=default``: a quote, a backslash and every byte
outside printable ASCII, the tab included, arrive as ``\\xHH``, so no field
can hold the separator or a newline. ``split`` cuts a line into its raw
fields (all the counting needs); ``entry`` decodes them back into the
request's own bytes; ``json_line`` and ``heroku_line`` quote them again for
their own grammar, so nothing a client sends can break a line: invalid
UTF-8 comes out as ``\\xHH`` text. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

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
    return value.rpartition(", ")[2].rpartition(" : ")[2]


def seconds(value: str) -> float | None:
    """An nginx time field ("0.012", "-", or one value per try): the last try's."""
    text = last(value)
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


@dataclass(frozen=True)
class Entry:
    """One request, decoded; ``release`` and ``instance`` from routerd's table."""

    time: float
    request_id: str
    app: str
    release: str
    instance: str
    upstream: str
    status: int
    bytes: int
    request_time: float | None
    connect_time: float | None
    response_time: float | None
    client: str
    method: str
    path: str
    protocol: str
    host: str
    user_agent: str
    scheme: str


def _text(field: str) -> str:
    return "" if field == "-" else unescape(field)


def _whole(field: str) -> int:
    return int(field) if field.isdigit() else 0


def entry(fields: list[str], *, app: str, release: str, instance: str) -> Entry:
    """The decoded request of one split line."""
    return Entry(
        time=seconds(fields[0]) or 0.0,
        request_id=_text(fields[1]),
        app=app,
        release=release,
        instance=instance,
        upstream=_text(fields[UPSTREAM]),
        status=_whole(fields[STATUS]),
        bytes=_whole(fields[5]),
        request_time=seconds(fields[REQUEST_TIME]),
        connect_time=seconds(fields[7]),
        response_time=seconds(fields[RESPONSE_TIME]),
        client=_text(fields[9]),
        method=_text(fields[10]),
        path=_text(fields[11]),
        protocol=_text(fields[12]),
        host=_text(fields[13]),
        user_agent=_text(fields[14]),
        scheme=_text(fields[15]),
    )


def iso_time(epoch: float) -> str:
    """UTC with milliseconds: 2026-12-01T10:00:00.123Z."""
    whole = int(epoch)
    millis = min(999, round((epoch - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def json_line(e: Entry) -> str:
    """One JSON object; ASCII only, so any byte of the request stays inside its string."""
    return json.dumps(
        {
            "time": iso_time(e.time),
            "request_id": e.request_id,
            "app": e.app,
            "release": e.release,
            "instance": e.instance,
            "client": e.client,
            "method": e.method,
            "path": e.path,
            "protocol": e.protocol,
            "scheme": e.scheme,
            "host": e.host,
            "status": e.status,
            "bytes": e.bytes,
            "request_time": e.request_time,
            "upstream": e.upstream,
            "upstream_connect_time": e.connect_time,
            "upstream_response_time": e.response_time,
            "user_agent": e.user_agent,
        }
    )


def quoted(text: str) -> str:
    """A double-quoted value: backslash and quote escaped, control bytes as \\xHH."""
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", body) + '"'


def value(text: str) -> str:
    """A Heroku value: bare when it is plain, quoted otherwise."""
    return text if BARE.fullmatch(text) else quoted(text)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{round(seconds * 1000)}ms"


def heroku_line(e: Entry) -> str:
    """Heroku's router line, with the app, the total time, the upstream and the
    user agent after Heroku's own fields."""
    dyno = f"{e.release}.{e.instance}" if e.instance else ""
    return (
        f"{iso_time(e.time)} at=info app={value(e.app)} method={value(e.method)} "
        f"path={quoted(e.path)} host={value(e.host)} request_id={value(e.request_id)} "
        f"fwd={quoted(e.client)} dyno={value(dyno) if dyno else ''} "
        f"connect={_ms(e.connect_time)} service={_ms(e.response_time)} status={e.status} "
        f"bytes={e.bytes} protocol={value(e.scheme)} total={_ms(e.request_time)} "
        f"upstream={value(e.upstream) if e.upstream else ''} user_agent={quoted(e.user_agent)}"
    )


FORMATS = {"json": json_line, "heroku": heroku_line}
