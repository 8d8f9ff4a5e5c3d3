"""Property-based tests against the real parts: ``nginx -t``, the Lua balancer in a
real nginx, and ``routerd apps set`` against a real etcd.

- Many apps at once (valid forms at their edges, plus noise), loaded, rendered in
  both backend modes and checked by ``nginx -t`` in one run per example: the
  candidate routerd would build from any input passes, so no app's input can
  make the whole candidate fail; nginx's Lua side takes the table file routerd
  writes.
- Push bodies of any kind, sent to the balancer over its socket: each is applied
  whole or refused whole, and what is applied holds only valid forms; bodies
  made by routerd's own code are always applied, exactly.
- ``apps set`` arguments of any kind: refused ones write nothing to etcd and
  exit 2 naming the flag or argument; accepted ones write what the router
  accepts.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fuzz
import pytest
from helpers import free_ports, require_binary, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from routerd import cli
from routerd.keys import APP_NAME
from routerd.router.backends import Backends, body, detect_lua, table_of
from routerd.router.loader import Loader
from routerd.router.master import TEMP_FOLDERS
from routerd.router.model import MAX_WEIGHT, parse_app_config
from routerd.router.render import Layout, Renderer
from routerd.router.settings import PACKAGE_TEMPLATES
from routerd.router.validate import nginx_test
from routerd.store import KeyValue, Snapshot

pytestmark = pytest.mark.integration

FEWER = max(10, settings().max_examples // 2)  # each example runs nginx or etcd


def resolves(host: str, port: int) -> bool:
    return host == "localhost"


@pytest.fixture(scope="module")
def lua_support():
    support = detect_lua(require_binary("nginx"))
    if support is None:
        pytest.fail("nginx has no Lua module (apt-get install libnginx-mod-http-lua)")
    return support


# ------------------------------------------------------------- nginx -t


def build(folder: Path, snapshot: Snapshot, support) -> tuple[Path, str]:
    """What the pipeline stages for ``snapshot``: the files, and the table file nginx's Lua
    loads (``support`` None: no Lua). The staged nginx.conf and its runtime folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lua = None
    table = Loader(prefix="/routerd", pool="shared", resolves=resolves).load(snapshot)
    if support is not None:
        backends = Backends(
            state_dir=folder / "routerd", runtime_dir=folder, templates=PACKAGE_TEMPLATES
        )
        backends.prepare()
        backends.write_file(table.revision, table_of(table))
        lua = backends.layout(support)
    http, https, status = free_ports(3)
    layout = Layout(
        http_listen=f"127.0.0.1:{http}",
        https_listen=f"127.0.0.1:{https}",
        status_listen=f"127.0.0.1:{status}",
        runtime_dir=str(folder),
        pid_file=str(folder / "nginx.pid"),
        lua=lua,
    )
    rendered = Renderer(PACKAGE_TEMPLATES, layout).render(table)
    for sub in TEMP_FOLDERS:
        (folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    for rel, text in rendered.shards.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    conf = folder / "nginx.conf"
    conf.write_text(rendered.main)
    return conf, f"{len(table.apps)} apps"


@settings(max_examples=FEWER)
@given(
    apps=st.lists(fuzz.valid_apps(), min_size=1, max_size=12),
    noise=st.dictionaries(fuzz.keys(set()), fuzz.values(), max_size=8),
    dynamic=st.booleans(),
)
def test_any_input_renders_a_candidate_nginx_accepts(lua_support, apps, noise, dynamic):
    """Up to a dozen apps of valid forms at their edges (long and wildcard domains, IPv6
    addresses and CIDRs, bounds of every option, names that do not resolve) plus noise:
    the candidate passes `nginx -t` as a whole, in either backend mode, and nginx's Lua
    side loads routerd's table file without complaint."""
    kvs: dict[str, KeyValue] = {}
    for number, (rel, value) in enumerate(
        [*noise.items(), *(i for a in apps for i in a.items())], 1
    ):
        kvs[rel] = KeyValue(value, number, number)
    nginx = require_binary("nginx")
    with tempfile.TemporaryDirectory() as folder:
        conf, what = build(Path(folder), Snapshot(10_000, kvs), lua_support if dynamic else None)
        result = subprocess.run(
            [nginx, "-t", "-c", str(conf), "-p", f"{folder}/", "-e", "stderr"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, f"{what}: {result.stderr}"
        assert "routerd: ignoring" not in result.stderr, result.stderr
        nginx_test(nginx, conf, Path(folder))  # and the same through routerd's own call


# Found by fuzzing: nginx refuses `allow 255.255.255.255` (it reads that address as
# its own "none"), so one app allowing it made `nginx -t` refuse every app's change.
def test_an_allow_entry_nginx_cannot_read_is_refused_alone(tmp_path):
    """An app allowing 255.255.255.255 is rejected naming its key, while its neighbours
    (allowing the addresses just below it) render a candidate `nginx -t` accepts."""
    kvs = {
        "apps/bad/config": {
            "domains": ["bad.example.com"],
            "options": {"allow": ["255.255.255.255"]},
        },
        "apps/near/config": {
            "domains": ["near.example.com"],
            "options": {
                "allow": ["255.255.255.254", "255.255.255.255/31", "::ffff:255.255.255.255"]
            },
        },
    }
    snapshot = Snapshot(
        9, {k: KeyValue(json.dumps(v).encode(), n, n) for n, (k, v) in enumerate(kvs.items(), 1)}
    )
    conf, _ = build(tmp_path, snapshot, None)

    table = Loader(prefix="/routerd", pool="shared", resolves=resolves).load(snapshot)
    assert [e.key for e in table.errors] == ["/routerd/apps/bad/config"]
    assert [a.name for a in table.apps] == ["near"]
    nginx_test(require_binary("nginx"), conf, tmp_path)


# ------------------------------------------------------------ the Lua side

BALANCER_CONF = """\
{modules}
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    lua_package_path "{lua}/?.lua;;";
    lua_shared_dict routerd_backends {size};
    init_by_lua_block {{ routerd = require("routerd") }}
    server {{
        listen unix:{folder}/push.sock;
        client_max_body_size 64m;
        client_body_buffer_size 16m;
        location = /backends {{ content_by_lua_block {{ routerd.push() }} }}
        location = /dump {{
            content_by_lua_block {{
                local dict = ngx.shared.routerd_backends
                local keys = dict:get_keys(0)
                table.sort(keys)
                for _, key in ipairs(keys) do ngx.say(key, "=", dict:get(key)) end
            }}
        }}
    }}
}}
"""


class Balancer:
    """A real nginx with routerd's Lua balancer and its push server, as the main
    template declares them, plus a location that dumps the shared dict."""

    def __init__(self, folder: Path, support, *, size: str = "64m") -> None:
        self.folder = folder
        self.socket = folder / "push.sock"
        modules = "".join(f"load_module {m};\n" for m in support.modules)
        conf = folder / "nginx.conf"
        (folder / "body").mkdir()
        conf.write_text(
            BALANCER_CONF.format(
                modules=modules, folder=folder, lua=PACKAGE_TEMPLATES / "lua", size=size
            )
        )
        self.proc = subprocess.Popen(
            [require_binary("nginx"), "-c", str(conf), "-p", f"{folder}/", "-e", "stderr",
             "-g", "daemon off;"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self.socket.exists, timeout=10, message="the balancer's socket")

    def request(self, method: str, path: str, payload: bytes = b"") -> tuple[int, str]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.socket))
            head = f"{method} {path} HTTP/1.0\r\nContent-Length: {len(payload)}\r\n\r\n"
            sock.sendall(head.encode() + payload)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        status, _, text = data.partition(b"\r\n\r\n")
        return int(status.split(b" ", 2)[1]), text.decode("utf-8", "replace")

    def state(self) -> dict[str, str]:
        """The shared dict: ``revision`` and ``app:<name>`` entries."""
        _, text = self.request("GET", "/dump")
        return dict(line.split("=", 1) for line in text.splitlines() if line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def balancer(tmp_path_factory, lua_support) -> Iterator[Balancer]:
    running = Balancer(tmp_path_factory.mktemp("balancer"), lua_support)
    yield running
    running.stop()


def lines_of(payload: bytes) -> list[str]:
    """The body's lines: one "\n" after each (the last one may go without)."""
    text = payload.decode()
    return text.removesuffix("\n").split("\n")


def expected_state(before: dict[str, str], payload: bytes) -> dict[str, str]:
    """The dict after ``payload`` is applied whole: the revision, and each line's app set
    to its value (a full body first drops every app it does not name)."""
    head, *lines = lines_of(payload)
    full = head.endswith(" full")
    state = {k: v for k, v in before.items() if not full or not k.startswith("app:")}
    for line in lines:
        app, _, value = line.partition(" ")
        state[f"app:{app}"] = value
    state["revision"] = head.split()[1]
    return state


def valid_line(line: str) -> bool:
    """A line routerd could have sent: an app name, one space, then "" or instances of
    the forms the model admits (IPv4, [IPv6], a port 1..65535 written plainly), each
    maybe followed by "=" and a weight 1..1,000,000 written plainly."""
    app, sep, value = line.partition(" ")
    if not sep or APP_NAME.fullmatch(app) is None:
        return False
    return value == "" or all(valid_instance(item) for item in value.split(","))


def valid_instance(item: str) -> bool:
    address, equals, weight = item.partition("=")
    if equals:
        if not re.fullmatch(r"[1-9][0-9]{0,6}", weight) or int(weight) > MAX_WEIGHT:
            return False
        item = address
    host, colon, port = item.rpartition(":")
    if not colon or not re.fullmatch(r"[1-9][0-9]{0,4}", port) or int(port) > 65535:
        return False
    try:
        if host.startswith("[") and host.endswith("]") and "%" not in host:
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


@settings(max_examples=settings().max_examples * 3)
@given(payload=fuzz.push_bodies())
def test_a_push_body_is_applied_whole_or_refused_whole(balancer, payload):
    """Any POST body to the balancer's socket is either refused with 400 leaving the table
    exactly as it was, or answered "revision N" with every line applied; and what is
    applied holds only app names and instance addresses of the forms routerd validates."""
    before = balancer.state()
    status, answer = balancer.request("POST", "/backends", payload)
    after = balancer.state()
    if status != 200:
        assert status == 400 and answer.startswith("rejected: "), (status, answer)
        assert after == before
        return
    head, *lines = lines_of(payload)
    assert re.fullmatch(r"revision (0|[1-9][0-9]{0,13})( full)?", head), head
    assert all(valid_line(line) for line in lines), payload
    assert answer.strip() == f"revision {head.split()[1]}"
    assert after == expected_state(before, payload)


@settings(max_examples=FEWER)
@given(apps=st.lists(fuzz.valid_apps(), min_size=1, max_size=10), full=st.booleans())
def test_bodies_routerd_makes_are_applied_exactly(balancer, apps, full):
    """The body routerd's Backends builds from any routing table of validated instances is
    accepted by the Lua side and leaves exactly that table in nginx."""
    kvs = {
        rel: KeyValue(value, number, number)
        for number, (rel, value) in enumerate((i for a in apps for i in a.items()), 1)
    }
    table = Loader(prefix="/routerd", pool="shared", resolves=resolves).load(Snapshot(5, kvs))
    entries = table_of(table)
    before = balancer.state()

    status, answer = balancer.request("POST", "/backends", body(7, entries, full=full).encode())

    assert (status, answer.strip()) == (200, "revision 7")
    expected = {k: v for k, v in before.items() if not full or not k.startswith("app:")}
    expected.update({f"app:{app}": value for app, value in entries.items()})
    expected["revision"] = "7"
    assert balancer.state() == expected


# Found by fuzzing the balancer (the last one), and by probing around what it found:
# each of these was applied although routerd never writes such a line.
MALFORMED_PUSHES = {
    "IPv6 that is no address": "revision 2\nshop [:]:80\n",
    "IPv6 with too few groups": "revision 2\nshop [1:2:3]:80\n",
    "IPv6 of dots": "revision 2\nshop [....]:80\n",
    "IPv4 with a leading zero": "revision 2\nshop 01.2.3.4:80\n",
    "a port with a leading zero": "revision 2\nshop 1.2.3.4:080\n",
    "an empty instance at the end": "revision 2\nshop 1.2.3.4:80,\n",
    "an empty instance between": "revision 2\nshop 1.2.3.4:80,,1.2.3.5:80\n",
    "a revision past 2^53 (read back as 1e+20)": "revision 99999999999999999999\nshop 1.2.3.4:80\n",
    "a revision of 15 digits (read back as 1.2345678901234e+14)": "revision 123456789012345\n",
    "the head line again": "revision 2\nrevision 2\n",
    "a blank line": "revision 2\n\nshop 1.2.3.4:80\n",
    "an app name ending in '-'": "revision 2\nshop- 1.2.3.4:80\n",
    "an app without its space": "revision 2\n0\n",
    "a weight of 0": "revision 2\nshop 1.2.3.4:80=0\n",
    "a weight with a leading zero": "revision 2\nshop 1.2.3.4:80=09\n",
    "a weight past the largest routerd writes": "revision 2\nshop 1.2.3.4:80=1000001\n",
    "an empty weight": "revision 2\nshop 1.2.3.4:80=\n",
    "a weight on its own": "revision 2\nshop =5\n",
    "two weights": "revision 2\nshop 1.2.3.4:80=2=3\n",
}


@pytest.mark.parametrize("payload", list(MALFORMED_PUSHES.values()), ids=list(MALFORMED_PUSHES))
def test_malformed_pushes_are_refused_whole(balancer, payload):
    """A push with one line out of the forms routerd writes is refused with 400 and changes
    nothing in nginx's table."""
    seed = "revision 1 full\nshop 10.0.0.1:80\nblog 10.0.0.2:80\n"
    assert balancer.request("POST", "/backends", seed.encode()) == (200, "revision 1\n")
    before = balancer.state()

    status, answer = balancer.request("POST", "/backends", payload.encode())

    assert status == 400 and answer.startswith("rejected: "), answer
    assert balancer.state() == before


def test_a_push_the_table_has_no_room_for_changes_nothing(tmp_path, lua_support):
    """A whole-table push that runs out of room in the shared dict half way is refused and
    leaves the table exactly as it was, the apps it would have dropped included."""
    small = Balancer(tmp_path, lua_support, size="32k")
    try:
        seed = "revision 1 full\n" + "".join(f"old{n} 10.0.0.{n}:80\n" for n in range(10))
        assert small.request("POST", "/backends", seed.encode())[0] == 200
        before = small.state()
        instances = ",".join(f"10.1.{n // 250}.{n % 250}:8080" for n in range(40))
        big = "revision 2 full\n" + "".join(f"new{n} {instances}\n" for n in range(200))

        status, answer = small.request("POST", "/backends", big.encode())

        assert status == 400 and "shared dict" in answer, answer
        assert small.state() == before
    finally:
        small.stop()


# ------------------------------------------------------------- apps set


def apps_set(etcd, argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["apps", "set", *argv, "--etcd", etcd.endpoint])
    return code, capsys.readouterr().err


@settings(max_examples=FEWER)
@given(
    app=fuzz.app_names(),
    domains=st.lists(fuzz.domains(), max_size=3),
    pool=st.one_of(st.none(), fuzz.app_names()),
    options=st.lists(
        st.builds(
            lambda name, value: f"{name}={value}",
            st.sampled_from([*fuzz.OPTION_VALUES, "gzip", ""]),
            st.one_of(st.text(max_size=12), fuzz.sizes().map(str), fuzz.timeouts().map(json.dumps)),
        ),
        max_size=3,
    ),
)
def test_apps_set_writes_only_what_the_router_accepts(
    etcd_server, capsys, app, domains, pool, options
):
    """`routerd apps set` with any arguments either writes a config the router's own rules
    accept (and nothing else), or exits 2 naming the argument or flag at fault and leaves
    etcd untouched."""
    etcd_server.ensure_running()
    argv = [app, *(f"--domain={d}" for d in domains), *(f"--option={o}" for o in options)]
    if pool is not None:
        argv.append(f"--pool={pool}")
    revision = etcd_server.revision()

    code, err = apps_set(etcd_server, argv, capsys)

    if code != 0:
        assert code == 2, err
        assert re.search(
            r"app|--domain|--option|--pool|Missing|No such|requires|Got unexpected", err
        ), err
        assert etcd_server.revision() == revision, "a refused `apps set` wrote to etcd"
        return
    assert etcd_server.revision() == revision + 1
    key = f"/routerd/apps/{app}/config"
    written = etcd_server.get(key)
    assert written is not None
    config = parse_app_config(key, written.encode())
    assert list(config.domains) == list(dict.fromkeys(domains))
