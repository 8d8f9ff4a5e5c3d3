"""Hypothesis strategies for what routerd reads from outside: etcd keys and
values, app configs and options, balancer push bodies, ``apps set`` arguments.

Each strategy mixes valid forms, forms one step off (a bound passed, an
upper-case letter, a trailing dot), nginx syntax smuggled in (``;``, braces,
quotes, ``$``, newlines, control characters, look-alike Unicode) and plain
noise, so the properties meet both what must pass and what must not.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

# Characters nginx's tokenizer gives a meaning, and some that only look harmless:
# U+017F and U+212A fold to ASCII letters under case-insensitive matching.
SMUGGLED = [";", "{", "}", '"', "'", "\n", "\r", "$", "\0", "\t", " ", "#", "\\", "\u017f",
            "\u212a", "\uff0e", "\u0430", "\x7f", "/", "*", "%", ":", "[", "]", ","]  # fmt: skip
LABELS = st.sampled_from(["a", "shop", "x1", "my-app", "0", "b" * 63, "xn--80ak6aa92e"])


def _spoiled(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``base`` with a smuggled or stray character somewhere in it."""

    def insert(pair: tuple[str, str], where: int) -> str:
        text, extra = pair
        at = where % (len(text) + 1)
        return text[:at] + extra + text[at:]

    return st.builds(insert, st.tuples(base, st.sampled_from(SMUGGLED)), st.integers(0, 300))


def _dns() -> st.SearchStrategy[str]:
    return st.lists(LABELS, min_size=1, max_size=4).map(".".join)


def domains() -> st.SearchStrategy[str]:
    valid = st.one_of(_dns(), _dns().map("*.".__add__))
    near = st.one_of(
        valid.map(str.upper),
        valid.map(lambda d: d + "."),
        valid.map(lambda d: "-" + d),
        valid.map(lambda d: d.replace(".", "..", 1)),
        st.just("*"),
        st.just("*.*.a"),
        st.just(".".join(["a" * 63] * 4)),  # 255 characters
        st.just(".".join(["a" * 62] * 4)),  # 251: long but valid
        st.just("a" * 64),
    )
    return st.one_of(valid, near, _spoiled(valid), st.text(max_size=20))


def app_names() -> st.SearchStrategy[str]:
    return st.one_of(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True),
        st.sampled_from(["A", "-a", "a-", "a" * 63, "a" * 64, "", "a_b", "a.b", "\u017fhop"]),
        _spoiled(st.just("shop")),
        st.text(max_size=12),
    )


def release_names() -> st.SearchStrategy[str]:
    return st.one_of(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
        st.sampled_from(["", "-v1", "v" * 63, "v" * 64, ".", "v1 ", " v1"]),
        _spoiled(st.just("v1")),
        st.text(max_size=10),
    )


def ipv4() -> st.SearchStrategy[str]:
    octet = st.one_of(st.integers(0, 255).map(str), st.sampled_from(["256", "999", "01", "00"]))
    return st.lists(octet, min_size=3, max_size=5).map(".".join)


def ipv6() -> st.SearchStrategy[str]:
    return st.one_of(
        st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
        st.sampled_from(
            [
                "[::1]",
                "[::]",
                "[:]",
                "[:::]",
                "[1:2:3]",
                "[fe80::1%eth0]",
                "[g::1]",
                "[::ffff:1.2.3.4]",
                "[1::2::3]",
                "::1",
                "[::1",
            ]
        ),
    )


def hosts() -> st.SearchStrategy[str]:
    return st.one_of(
        ipv4(), ipv6(), _dns(), st.just("localhost"), _spoiled(ipv4()), st.text(max_size=12)
    )


def ports() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(1, 65535).map(str),
        st.sampled_from(["0", "65536", "99999", "080", "", "-1", "1e3", " 80", "80 "]),
        st.text(alphabet=string.digits, max_size=7),
    )


def instances() -> st.SearchStrategy[str]:
    return st.one_of(st.builds(lambda h, p: f"{h}:{p}", hosts(), ports()), st.text(max_size=30))


def sizes() -> st.SearchStrategy[Any]:
    valid = st.from_regex(r"[0-9]{1,9}[kKmMgG]?", fullmatch=True)
    return st.one_of(valid, st.sampled_from(["", "10mb", "1.5m", "-1", "9999999999", "10m;"]),
                     st.integers(), st.text(max_size=8))  # fmt: skip


def timeouts() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(-5, 4000), st.sampled_from([0, 1, 3600, 3601, 5.0, True, "5", None])
    )


def cidrs() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.ip_addresses().map(str),
        st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=4), st.integers(0, 33)),
        st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.integers(0, 129)),
        st.sampled_from(["10.0.0.0/8", "fe80::1%eth0", "1.2.3.4/255.255.0.0", "all", "", "0/0"]),
        _spoiled(st.just("10.0.0.0/8")),
        st.integers(),
    )


OPTION_VALUES = {
    "client_max_body_size": sizes(),
    "proxy_connect_timeout": timeouts(),
    "proxy_read_timeout": timeouts(),
    "proxy_send_timeout": timeouts(),
    "websockets": st.one_of(st.booleans(), st.sampled_from([0, 1, "true", None])),
    "allow": st.one_of(st.lists(cidrs(), max_size=4), cidrs()),
    "https_redirect": st.booleans(),
    "hsts": st.booleans(),
    "maintenance": st.one_of(st.booleans(), st.just("yes")),
}


def json_values() -> st.SearchStrategy[Any]:
    """JSON of every shape: scalars (huge numbers too), lists and objects, nested."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def options() -> st.SearchStrategy[Any]:
    """An options object: known names with values near their rules, now and then an
    unknown name, or not an object at all."""
    known = st.fixed_dictionaries({}, optional=OPTION_VALUES)
    odd = st.dictionaries(
        st.sampled_from([*OPTION_VALUES, "gzip", "Allow", ""]), json_values(), max_size=3
    )
    return st.one_of(known, known, known, odd, json_values())


def app_configs() -> st.SearchStrategy[Any]:
    """An app config object shaped like the real one, one field at a time off its rules."""
    fields = {
        "domains": st.one_of(
            st.lists(domains(), min_size=1, max_size=4),
            st.lists(domains(), max_size=0),
            st.just(["a.example.com"] * 101),
            domains(),
            json_values(),
        ),
        "pool": st.one_of(st.just("shared"), st.just("other"), app_names(), json_values()),
        "options": options(),
    }
    extra = st.dictionaries(st.sampled_from(["gzip", "Domains", "name"]), json_values(), max_size=1)
    return st.builds(
        lambda base, more: {**base, **more},
        st.fixed_dictionaries(
            {"domains": fields["domains"]},
            optional={"pool": fields["pool"], "options": fields["options"]},
        ),
        st.one_of(st.just({}), st.just({}), extra),
    )


def encoded(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON text of ``values``, ASCII-escaped or raw UTF-8."""
    return st.builds(
        lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(),
        values,
        st.booleans(),
    )


OVERSIZE = [
    b"x" * 200_000,
    json.dumps({"domains": ["a" * 70_000 + ".example.com"]}).encode(),
    json.dumps(
        {"domains": ["a.example.com"], "options": {"allow": ["10.0.0.0/8"] * 1001}}
    ).encode(),
    b"[" * 100_000 + b"]" * 100_000,
]


def values() -> st.SearchStrategy[bytes]:
    """An etcd value: bytes of any kind, JSON of any shape, a config or address one step off."""
    return st.one_of(
        encoded(app_configs()),
        encoded(app_configs()),
        instances().map(str.encode),
        release_names().map(str.encode),
        encoded(json_values()),
        encoded(st.dictionaries(release_names(), st.integers(-1, 101), max_size=3)),
        st.binary(max_size=40),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from(OVERSIZE),
    )


def keys(taken: set[str]) -> st.SearchStrategy[str]:
    """A key relative to the prefix: the layout's shapes with fuzzed names, odd
    shapes, and noise; none under the apps named in ``taken``."""
    app = app_names().filter(lambda name: name not in taken)
    shaped = st.one_of(
        app.map(lambda a: f"apps/{a}/config"),
        app.map(lambda a: f"apps/{a}/active"),
        app.map(lambda a: f"apps/{a}/weights"),
        st.builds(
            lambda a, r, i: f"apps/{a}/releases/{r}/{i}", app, release_names(), release_names()
        ),
        domains().map(lambda d: f"certs/{d}"),
    )
    odd = st.one_of(
        app.map(lambda a: f"apps/{a}"),
        app.map(lambda a: f"apps/{a}/releases/v1"),
        app.map(lambda a: f"apps/{a}/releases/v1/i0/extra"),
        app.map(lambda a: f"apps/{a}/weights/extra"),
        app.map(lambda a: f"apps/{a}/nonsense"),
        st.sampled_from(["apps//config", "apps/", "certs/", "routers/x", "hosts/h", "pools/p", ""]),
        st.text(max_size=30),
    )
    return st.one_of(shaped, shaped, shaped, odd).filter(
        lambda key: not any(key.startswith(f"apps/{name}/") for name in taken)
    )


def weights() -> st.SearchStrategy[str]:
    """What may follow an instance in a push: nothing, or "=" and a weight near or off the form."""
    return st.one_of(
        st.just(""),
        st.integers(1, 1_000_000).map(lambda w: f"={w}"),
        st.sampled_from(["=0", "=01", "=1000001", "=", "==2", "=-1", "=1e3", "= 2", "=99999999"]),
    )


def push_lines() -> st.SearchStrategy[str]:
    """One line of a balancer push: an app and its instances, near or off the format."""
    address = st.builds(lambda h, p: f"{h}:{p}", st.one_of(ipv4(), ipv6()), ports())
    addresses = st.lists(
        st.one_of(st.builds(str.__add__, address, weights()), instances()), max_size=3
    )
    return st.one_of(
        st.builds(lambda a, xs: f"{a} {','.join(xs)}", app_names(), addresses),
        st.builds(lambda a, xs: f"{a}  {','.join(xs)}", app_names(), addresses),
        app_names(),
        st.text(max_size=20),
    )


def push_bodies() -> st.SearchStrategy[bytes]:
    """A push body: a head line (right or wrong), lines, joined by LF or CRLF, or noise."""
    heads = st.one_of(
        st.builds(
            lambda n, full: f"revision {n}{' full' if full else ''}",
            st.integers(0, 10**15),
            st.booleans(),
        ),
        st.sampled_from(
            [
                "revision",
                "revision -1",
                "revision 1 partial",
                "revision 1  full",
                "revision 99999999999999999999",
                "REVISION 1",
                "",
            ]
        ),
        st.text(max_size=12),
    )
    texts = st.builds(
        lambda head, lines, sep, end: sep.join([head, *lines]) + end,
        heads,
        st.lists(push_lines(), max_size=5),
        st.sampled_from(["\n", "\n", "\r\n", "\n\n"]),
        st.sampled_from(["\n", "", "\n\n"]),
    )
    return st.one_of(
        texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=60)
    )


# ------------------------------------------------- valid forms, at their edges


def valid_domains() -> st.SearchStrategy[str]:
    """Host names the model admits, long and wildcard ones included."""
    long_label = st.integers(1, 63).map(lambda n: "d" * n)
    names = st.lists(st.one_of(LABELS, long_label), min_size=1, max_size=4).map(".".join)
    plain = names.filter(lambda d: len(d) <= 253)
    return st.one_of(plain, plain.map("*.".__add__).filter(lambda d: len(d) <= 253))


def valid_options() -> st.SearchStrategy[dict[str, Any]]:
    """Options the model admits, with values at their bounds."""
    timeout = st.sampled_from([1, 2, 59, 60, 61, 3599, 3600])
    cidr = st.one_of(
        st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=4), st.integers(0, 32)),
        st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.integers(0, 128)),
        st.ip_addresses().map(str),
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "client_max_body_size": st.from_regex(r"(0|[1-9][0-9]{0,8})[kKmMgG]?", fullmatch=True),
            "proxy_connect_timeout": timeout,
            "proxy_read_timeout": timeout,
            "proxy_send_timeout": timeout,
            "websockets": st.booleans(),
            "allow": st.lists(cidr, max_size=5),
            "https_redirect": st.booleans(),
            "hsts": st.booleans(),
            "maintenance": st.booleans(),
        },
    )


def valid_instances() -> st.SearchStrategy[str]:
    port = st.sampled_from([1, 80, 8080, 65535]).map(str)
    host = st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
        st.sampled_from(["localhost", "unresolvable.invalid"]),
    )
    return st.builds(lambda h, p: f"{h}:{p}", host, port)


def valid_apps() -> st.SearchStrategy[dict[str, bytes]]:
    """The keys of one app whose every value is of a valid form: its config, an
    active release (or none), weights between v1 and v2 (or none) and a few instances."""

    def keys_of(
        name: str,
        config: dict[str, Any],
        active: str | None,
        share: int | None,
        found: list[tuple[str, str, str]],
    ) -> dict[str, bytes]:
        out = {f"apps/{name}/config": json.dumps(config).encode()}
        if active is not None:
            out[f"apps/{name}/active"] = active.encode()
        if share is not None:
            out[f"apps/{name}/weights"] = json.dumps({"v1": 100 - share, "v2": share}).encode()
        for release, instance, address in found:
            out[f"apps/{name}/releases/{release}/{instance}"] = address.encode()
        return out

    return st.builds(
        keys_of,
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
        st.fixed_dictionaries(
            {"domains": st.lists(valid_domains(), min_size=1, max_size=8)},
            optional={"options": valid_options()},
        ),
        st.one_of(st.none(), st.sampled_from(["v1", "v2"])),
        st.one_of(st.none(), st.integers(0, 100)),
        st.lists(
            st.tuples(
                st.sampled_from(["v1", "v2"]), st.sampled_from(["a", "b", "c"]), valid_instances()
            ),
            max_size=4,
        ),
    )
