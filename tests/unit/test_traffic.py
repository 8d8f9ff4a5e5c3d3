"""Traffic from nginx's log lines: decoding, both access-log formats, the
per-app counts and their label sets, and the tail across a rotation.

nginx is played by the test: it writes lines the way ``log_format routerd``
with ``escape=default`` does, and reopens its file when told to.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routerd.router import logline
from routerd.router.model import App, Instance, Options, RoutingTable
from routerd.router.traffic import NONE, AccessLog, TrafficCounts, TrafficLog, routes_of
from routerd.traffic import AppTraffic


def nginx_escape(raw: bytes) -> str:
    """What escape=default makes of a field: quote, backslash, control and non-ASCII as \\xHH."""
    out = []
    for byte in raw:
        if byte < 0x20 or byte >= 0x7F or byte in (0x22, 0x5C):
            out.append(f"\\x{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def line(
    *,
    app: str = "shop",
    upstream: str = "10.0.0.1:5000",
    status: str = "200",
    path: bytes = b"/",
    agent: bytes = b"curl/8",
    response: str = "0.004",
) -> str:
    return "\t".join(
        [
            "1764583200.123", "0123456789abcdef0123456789abcdef", app, upstream, status, "512",
            "0.005", "0.001", response, "203.0.113.7", "GET", nginx_escape(path), "HTTP/1.1",
            "shop.example.com", nginx_escape(agent), "https",
        ]
    )  # fmt: skip


def table(*apps: App) -> RoutingTable:
    return RoutingTable(1, apps)


def shop(active: str = "v2", **options: bool) -> App:
    v1 = Instance("v1", "web.1", "10.0.0.1", 5000)
    v2 = Instance("v2", "web.1", "10.0.0.2", 5000)
    routed = tuple(i for i in (v1, v2) if i.release == active)
    return App("shop", ("shop.example.com",), Options(**options), routed, (), (v1, v2))


def formatted(fmt: str, text: str, release: str = "v1", instance: str = "web.1") -> str:
    """The line as TrafficLog.handle writes it: the plain path when it can."""
    fields = logline.split(text)
    assert fields is not None
    write = logline.FORMATS[fmt]
    return (write.plain if "\\" not in text else write.any)(fields, "shop", release, instance)


# ------------------------------------------------------------- the line


HOSTILE = [
    b'/"quoted"',
    b"/back\\slash",
    b"/line\nbreak",
    b"/\xff\xfe\xc3\x28",
    "/é".encode(),
    b"/\t",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_a_field_decodes_to_the_clients_bytes(raw: bytes) -> None:
    """\\xHH escapes decode back to the request's bytes; invalid UTF-8 stays visible as \\xHH."""
    decoded = logline.unescape(nginx_escape(raw))
    assert decoded == raw.decode("utf-8", "backslashreplace")


def test_a_line_that_is_not_ours_is_refused() -> None:
    """A line with another number of fields is not read as a request."""
    assert logline.split("a\tb\tc") is None
    assert logline.split(line()) is not None


def test_multi_valued_upstream_fields_take_the_last_try() -> None:
    """Retries and internal redirects ("a, b : c") count the try that answered; "-" is none."""
    assert logline.last("10.0.0.1:5000, 10.0.0.2:5000 : 10.0.0.3:5000") == "10.0.0.3:5000"
    assert logline.seconds("0.000, 0.004") == 0.004
    assert logline.seconds("-") is None


@pytest.mark.parametrize("raw", HOSTILE)
def test_json_lines_parse_whatever_the_request_held(raw: bytes) -> None:
    """A JSON line is ASCII, one line, and parses back to the decoded path and agent."""
    text = formatted("json", line(path=raw, agent=raw))
    assert "\n" not in text and text.isascii()
    data = json.loads(text)
    assert data["path"] == data["user_agent"] == raw.decode("utf-8", "backslashreplace")
    assert (data["app"], data["release"], data["instance"]) == ("shop", "v1", "web.1")
    assert data["time"] == "2025-12-01T10:00:00.123Z"
    assert data["request_time"] == 0.005 and data["upstream_connect_time"] == 0.001
    assert (data["status"], data["bytes"], data["upstream_response_time"]) == (200, 512, 0.004)


@pytest.mark.parametrize("raw", HOSTILE)
def test_heroku_lines_keep_their_quoting(raw: bytes) -> None:
    """A Heroku line is one line whose quoted values close where they should."""
    text = formatted("heroku", line(path=raw, agent=raw))
    assert "\n" not in text and "\t" not in text
    quoted = r'"(?:[^"\\]|\\.)*"'
    pattern = (
        rf"\S+Z at=info app=shop method=GET path={quoted} host=shop\.example\.com "
        rf"request_id=[0-9a-f]{{32}} fwd=\"203\.0\.113\.7\" dyno=v1\.web\.1 connect=1ms "
        rf"service=4ms status=200 bytes=512 protocol=https total=5ms "
        rf"upstream=10\.0\.0\.1:5000 user_agent={quoted}"
    )
    assert re.fullmatch(pattern, text), text


def test_json_line_without_an_upstream() -> None:
    """No instance answered: null times, an empty upstream and instance."""
    data = json.loads(formatted("json", line(upstream="-", response="-"), NONE, ""))
    assert (data["upstream"], data["upstream_response_time"], data["instance"]) == ("", None, "")


def test_heroku_line_without_an_instance() -> None:
    """A request no instance answered has an empty dyno, connect and service."""
    text = formatted("heroku", line(upstream="-", status="503", response="-"), NONE, "")
    assert " dyno= connect=1ms service= status=503 " in text
    assert " upstream= " in text


def nginx_line(fields: list[bytes]) -> str:
    return "\t".join(nginx_escape(raw) for raw in fields)


PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')
FIELD = st.text(PRINTABLE, max_size=12).map(str.encode) | st.sampled_from(
    [b"-", b"", b"0.004", b"1.5, 0.25 : 3", b"05", b"5.", b"1e5"]
)
NAME = st.from_regex(r"-|[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True)


@given(st.lists(FIELD, min_size=len(logline.FIELDS), max_size=len(logline.FIELDS)), NAME, NAME)
def test_the_plain_path_writes_what_the_general_one_does(
    fields: list[bytes], release: str, instance: str
) -> None:
    """For a line with no backslash, both formats' plain path gives the general one's line."""
    fields[0] = b"1764583200.123"
    text = nginx_line(fields)
    split = logline.split(text)
    assert split is not None
    for fmt in logline.FORMATS.values():
        assert fmt.plain(split, "shop", release, instance) == fmt.any(
            split, "shop", release, instance
        )


def test_nginx_time_is_written_as_iso_time_would() -> None:
    """$msec gives the same text as the arithmetic would, from the cache and past it."""
    for msec in ("1764583200.123", "1764583201.000", "1764583200.999", "1764583200.5", "x"):
        expected = logline.iso_time(float(msec)) if msec != "x" else ""
        assert logline.msec_time(msec) == logline.msec_time(msec) == expected


# ------------------------------------------------------------ the counts


def test_routes_name_releases_of_every_registered_instance() -> None:
    """An address of a release that is no longer routed still names that release."""
    routes = routes_of(table(shop(active="v2")), lambda host: [])
    assert routes["shop"].instances == {
        "10.0.0.2:5000": ("v2", "web.1"),
        "10.0.0.1:5000": ("v1", "web.1"),
    }
    assert routes["shop"].releases == {"v1", "v2", NONE}


def counted(text_lines: list[str], routes_table: RoutingTable) -> TrafficCounts:
    counts = TrafficCounts()
    tail = TrafficLog(Path("/nonexistent"), counts=counts, access_log=None, reopen=lambda: None)
    tail.routes = routes_of(routes_table, lambda host: [])
    tail.handle(text_lines)
    return counts


def test_every_line_is_counted_once_by_app_release_and_class() -> None:
    """N lines give N requests; unknown apps and garbage are kept apart."""
    lines = [line(upstream="10.0.0.1:5000")] * 3 + [line(upstream="10.0.0.2:5000", status="502")]
    lines += [line(app="", upstream="-", status="404"), line(app="gone"), "garbage"]
    counts = counted(lines, table(shop()))
    assert counts.requests == {
        ("shop", "v1", "2xx"): 3,
        ("shop", "v2", "5xx"): 1,
        (NONE, NONE, "4xx"): 1,
        (NONE, NONE, "2xx"): 1,
    }
    assert counts.malformed == 1
    assert sum(counts.duration["shop"].counts) == 4
    assert sum(counts.upstream[("shop", "v1")].counts) == 3


def test_label_sets_leave_with_their_app_or_release() -> None:
    """keep() drops the figures of releases and apps no longer in the table."""
    counts = counted(
        [line(upstream="10.0.0.1:5000"), line(upstream="10.0.0.2:5000")], table(shop())
    )
    only_v2 = App("shop", ("shop.example.com",), Options(), (), (), shop().instances)
    counts.keep(routes_of(table(only_v2), lambda host: []))
    assert set(counts.requests) == {("shop", "v2", "2xx")}
    assert set(counts.upstream) == {("shop", "v2")}
    counts.keep({})
    assert counts.requests == {} and counts.duration == {} and counts.upstream == {}


def test_report_round_trips_through_json() -> None:
    """/traffic's JSON reads back to the same figures, +Inf bucket included."""
    counts = counted([line(), line(status="500", response="0.2")], table(shop()))
    report = counts.report("shop")
    again = AppTraffic.from_json("test", report.to_json())
    assert again == report
    v1 = again.releases["v1"]
    assert (v1.requests, v1.errors, v1.seconds_count) == (2, 1, 2)
    assert v1.buckets[-1] == (float("inf"), 2)
    assert dict(v1.buckets)[0.005] == 1


# ------------------------------------------------------------ the tail


class FakeNginx:
    """Appends lines to the traffic file as nginx does, and reopens on request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = path.open("a")

    def write(self, lines: list[str]) -> None:
        self.handle.write("".join(f"{x}\n" for x in lines))
        self.handle.flush()

    def reopen(self) -> None:
        self.handle.close()
        self.handle = self.path.open("a")


def test_rotation_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Across renames, lines written to the old file before nginx reopens are
    still counted, each once, and the old file is deleted when done."""
    path = tmp_path / "traffic.log"
    nginx = FakeNginx(path)
    nginx.write([line()] * 5)  # before routerd started: not counted again
    counts = TrafficCounts()
    tail = TrafficLog(
        path, counts=counts, access_log=None, reopen=lambda: None, rotate_bytes=2000,
        rotate_grace=0.0, still_written=lambda fd: False,
    )  # fmt: skip
    tail.routes = routes_of(table(shop()), lambda host: [])
    tail.start()
    tail._stop.set()  # drive it by hand, not from its thread
    tail._thread.join()
    total = 0
    for _ in range(12):
        nginx.write([line()] * 7)
        total += 7
        tail.drain()
        tail._maybe_rotate()
        nginx.write([line()] * 2)  # the old file, between rename and reopen
        total += 2
        nginx.reopen()
    tail.drain()
    tail.drain()
    assert counts.requests == {("shop", "v1", "2xx"): total}
    assert not tail.rotated.exists()
    assert os.path.getsize(path) < 4000


def test_a_rotated_file_still_written_is_kept_and_read(tmp_path: Path) -> None:
    """While an nginx worker still writes the renamed file (it could not reopen),
    routerd keeps reading it and does not delete it; once it is let go, it is."""
    path = tmp_path / "traffic.log"
    nginx = FakeNginx(path)
    held = [True]
    counts = TrafficCounts()
    tail = TrafficLog(
        path, counts=counts, access_log=None, reopen=lambda: None, rotate_bytes=100,
        rotate_grace=0.0, still_written=lambda fd: held[0],
    )  # fmt: skip
    tail.routes = routes_of(table(shop()), lambda host: [])
    tail._current = tail._open(at_end=False)
    nginx.write([line()])
    tail.drain()
    tail._maybe_rotate()  # renamed; this "worker" never reopens
    for _ in range(3):
        nginx.write([line()] * 2)
        tail.drain()
    assert tail.rotated.exists()
    assert counts.requests == {("shop", "v1", "2xx"): 7}
    held[0] = False
    nginx.write([line()])
    for reader in tail._retired:
        reader.retire_at = 0.0
    tail.drain()
    assert not tail.rotated.exists()
    assert counts.requests == {("shop", "v1", "2xx"): 8}


def test_a_file_replaced_behind_its_back_is_followed(tmp_path: Path) -> None:
    """Deleted and made anew (a restarted nginx): the old file is finished, the new one read."""
    path = tmp_path / "traffic.log"
    nginx = FakeNginx(path)
    counts = TrafficCounts()
    tail = TrafficLog(
        path, counts=counts, access_log=None, reopen=lambda: None, rotate_grace=0.0,
        still_written=lambda fd: False,
    )  # fmt: skip
    tail.routes = routes_of(table(shop()), lambda host: [])
    tail._current = tail._open(at_end=False)
    nginx.write([line()] * 2)
    path.unlink()
    nginx.write([line()])  # the old worker's last line, into the deleted file
    nginx.reopen()  # the new master creates the file again
    nginx.write([line()] * 4)
    for _ in range(3):
        tail.drain()
        tail._maybe_rotate()
    assert counts.requests == {("shop", "v1", "2xx"): 7}
    assert tail._retired == []


def test_access_log_follows_the_app_option(tmp_path: Path) -> None:
    """Lines of an app with access_log false are counted but not written."""
    out = tmp_path / "access.log"
    quiet = App("quiet", ("q.example.com",), Options(access_log=False), (), (), ())
    tail = TrafficLog(
        tmp_path / "t", counts=TrafficCounts(), access_log=AccessLog(str(out), "json"),
        reopen=lambda: None,
    )  # fmt: skip
    tail.routes = routes_of(table(shop(), quiet), lambda host: [])
    tail.handle([line(), line(app="quiet", upstream="-")])
    tail.access_log.close()  # type: ignore[union-attr]
    assert [json.loads(x)["app"] for x in out.read_text().splitlines()] == ["shop"]
    assert tail.counts.requests[("quiet", NONE, "2xx")] == 1  # type: ignore[union-attr]


def test_access_log_reopens_a_file_moved_away(tmp_path: Path, monkeypatch) -> None:
    """After logrotate renames the access log, routerd writes a new file at the path."""
    out = tmp_path / "access.log"
    access = AccessLog(str(out), "heroku")
    access.write(["one"])
    out.rename(tmp_path / "access.log.old")
    access._checked = -10.0  # as if a second passed
    access.write(["two"])
    access.close()
    assert out.read_text() == "two\n"
    assert (tmp_path / "access.log.old").read_text() == "one\n"
