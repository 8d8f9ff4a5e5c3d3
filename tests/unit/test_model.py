"""The Loader: the etcd layout and bad input, one key at a time."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from routerd.router.loader import Loader
from routerd.router.model import App, Instance, Options, RoutingTable
from routerd.store import KeyValue, Snapshot

PREFIX = "/routerd"
POOL = "shared"


def any_host(host: str, port: int) -> bool:
    """Unit tests need no DNS: every made-up host name resolves."""
    return True


@dataclass(frozen=True)
class Pki:
    """Two independent self-signed pairs (PEM text)."""

    cert_a: str
    key_a: str
    cert_b: str
    key_b: str


def _openssl_pair(directory: Any) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=x",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert.read_text(), key.read_text()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Real certificate/key pairs made by openssl once per session."""
    cert_a, key_a = _openssl_pair(tmp_path_factory.mktemp("pair-a"))
    cert_b, key_b = _openssl_pair(tmp_path_factory.mktemp("pair-b"))
    return Pki(cert_a, key_a, cert_b, key_b)


# ---------------------------------------------------------------- helpers

Value = bytes | str | Callable[[Pki], bytes | str]


def cfg(**fields: Any) -> str:
    return json.dumps(fields)


def cert_json(cert: str, key: str) -> str:
    return json.dumps({"cert": cert, "key": key})


def _raw(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def snapshot(values: Mapping[str, bytes | str | KeyValue], revision: int = 1000) -> Snapshot:
    """Keys get create=mod=their position (1-based) unless given as a KeyValue."""
    kvs = {}
    for position, (rel, value) in enumerate(values.items(), start=1):
        known = isinstance(value, KeyValue)
        kvs[rel] = value if known else KeyValue(_raw(value), position, position)
    return Snapshot(revision, kvs)


def load(values: Mapping[str, bytes | str | KeyValue], revision: int = 1000) -> RoutingTable:
    return Loader(prefix=PREFIX, pool=POOL, resolves=any_host).load(snapshot(values, revision))


def names(table: RoutingTable) -> list[str]:
    return [app.name for app in table.apps]


def base_values(pki: Pki) -> dict[str, bytes | str]:
    """A healthy snapshot: two apps, two releases for shop, a cert for other."""
    return {
        "apps/other/config": cfg(domains=["other.example.com"]),
        "apps/other/releases/v1/web.1": "10.0.0.9:5000",
        "certs/other.example.com": cert_json(pki.cert_a, pki.key_a),
        "apps/shop/config": cfg(domains=["shop.example.com", "www.shop.example.com"]),
        "apps/shop/releases/v1/web.1": "10.0.0.1:5000",
        "apps/shop/releases/v2/web.1": "10.0.0.2:5000",
    }


# ------------------------------------------------------ the table of bad values

CONFIG = "apps/shop/config"
INSTANCE = "apps/shop/releases/v1/web.2"
ACTIVE = "apps/shop/active"
CERT = "certs/shop.example.com"
NOT_HOST = "is not a lowercase host name"
NOT_ADDRESS = "is not an IPv4 address, [IPv6] or DNS name"


def _row(rel_key: str, value: Value, fragment: str, name: str, **kw: Any) -> Any:
    return pytest.param(rel_key, value, fragment, id=name, **kw)


def _domain_rows() -> list[Any]:
    bad = {
        "uppercase": "Shop.example.com",
        "semicolon": "shop.example.com;",
        "open-brace": "shop{.example.com",
        "close-brace": "shop}.example.com",
        "double-quote": 'shop".example.com',
        "single-quote": "shop'.example.com",
        "dollar": "$host.example.com",
        "newline": "shop.example.com\nlisten",
        "space": "shop.example.com other.com",
        "control-char": "shop\x01.example.com",
        "del-char": "shop\x7f.example.com",
        "backslash": "shop\\.example.com",
        "empty": "",
        "label-64": "a" * 64 + ".example.com",
        "name-255": ".".join(["a" * 63] * 4),
        "leading-dash": "-shop.example.com",
        "trailing-dash": "shop-.example.com",
        "underscore": "sh_op.example.com",
        "empty-label": "shop..example.com",
        "leading-dot": ".shop.example.com",
        "trailing-dot": "shop.example.com.",
        "star-alone": "*",
        "star-middle": "shop.*.example.com",
        "star-end": "shop.example.*",
        "star-no-dot": "*shop.example.com",
        "star-twice": "*.*.example.com",
        "star-inside-label": "sh*p.example.com",
        "non-ascii": "shöp.example.com",
    }
    rows = [
        _row(CONFIG, cfg(domains=["ok.example.com", d]), NOT_HOST, f"domain-{name}")
        for name, d in bad.items()
    ]
    rows.append(_row(CONFIG, cfg(domains=[5]), "is not a string", "domain-not-string"))
    rows.append(_row(CONFIG, cfg(domains=[None]), "is not a string", "domain-null"))
    return rows


def _config_rows() -> list[Any]:
    domains = ["shop.example.com"]
    many = "must be a list of 1 to 100 host names"
    rows = [
        _row(CONFIG, b"{domains", "not valid JSON", "not-json"),
        _row(CONFIG, b"\xff\xfe\x00", "not valid JSON", "not-utf8"),
        _row(CONFIG, b"", "not valid JSON", "empty-value"),
        _row(CONFIG, b"[" * 100_000, "not valid JSON", "json-nested-too-deep"),
        _row(CONFIG, json.dumps(["shop.example.com"]), "must be a JSON object", "json-list"),
        _row(CONFIG, json.dumps("shop.example.com"), "must be a JSON object", "json-string"),
        _row(CONFIG, "null", "must be a JSON object", "json-null"),
        _row(CONFIG, cfg(domains=domains, tls=True), "unknown field(s): 'tls'", "unknown-field"),
        _row(
            CONFIG,
            cfg(domains=domains, options={"brotli": True}),
            "unknown option(s): 'brotli'",
            "unknown-option",
        ),
        _row(CONFIG, cfg(domains=domains, options=[]), "options must be an object", "options-list"),
        _row(
            CONFIG, cfg(domains=domains, options=None), "options must be an object", "options-null"
        ),
        _row(CONFIG, cfg(pool="shared"), many, "domains-missing"),
        _row(CONFIG, cfg(domains=[]), many, "domains-empty"),
        _row(CONFIG, cfg(domains="shop.example.com"), many, "domains-string"),
        _row(CONFIG, cfg(domains={"shop.example.com": 1}), many, "domains-object"),
        _row(CONFIG, cfg(domains=None), many, "domains-null"),
        _row(CONFIG, cfg(domains=[f"d{i}.example.com" for i in range(101)]), many, "domains-101"),
    ]
    for name, pool in {
        "upper": "Shared",
        "empty": "",
        "int": 5,
        "null": None,
        "semicolon": "shared;",
        "space": "sha red",
    }.items():
        rows.append(_row(CONFIG, cfg(domains=domains, pool=pool), "pool", f"pool-{name}"))
    return rows


def _option_rows() -> list[Any]:
    def opt(**options: Any) -> str:
        return cfg(domains=["shop.example.com"], options=options)

    rows = []
    timeouts = ("proxy_connect_timeout", "proxy_read_timeout", "proxy_send_timeout")
    for name in timeouts:
        for bad in (0, 3601, 1.5, "5", True, -1, None, 10**20):
            rows.append(
                _row(
                    CONFIG,
                    opt(**{name: bad}),
                    f"options.{name} must be whole seconds",
                    f"{name}-{bad!r}",
                )
            )
    for name in ("websockets", "https_redirect", "hsts", "maintenance"):
        for bad in ("true", "false", 1, 0, None):
            rows.append(
                _row(
                    CONFIG,
                    opt(**{name: bad}),
                    f"options.{name} must be true or false",
                    f"{name}-{bad!r}",
                )
            )
    for bad in ("10mb", "", "-1", 10, "1 m", "10m;", "1234567890", "1.5m", "10M ", "$size", None):
        rows.append(
            _row(
                CONFIG,
                opt(client_max_body_size=bad),
                "options.client_max_body_size must be a size",
                f"client_max_body_size-{bad!r}",
            )
        )
    for name, bad in {
        "string": "10.0.0.0/8",
        "object": {"10.0.0.0/8": 1},
        "null": None,
        "1001-entries": ["10.0.0.1"] * 1001,
    }.items():
        rows.append(_row(CONFIG, opt(allow=bad), "options.allow must be a list", f"allow-{name}"))
    for bad in (
        "10.0.0.0/33",
        "300.0.0.0/8",
        "10.0.0.0/8;",
        "any",
        "",
        "10.0.0.0/8 ",
        "10.0.0.0/8\n",
        "all",
        "::g/64",
    ):
        rows.append(
            _row(
                CONFIG,
                opt(allow=["192.168.0.0/16", bad]),
                "is not an address or CIDR",
                f"allow-cidr-{bad!r}",
            )
        )
    rows.append(_row(CONFIG, opt(allow=[10]), "is not a string", "allow-cidr-int"))
    for bad in ("fe80::%eth0/64", "fe80::1%a;b/128"):
        rows.append(
            _row(CONFIG, opt(allow=[bad]), "must not carry a scope id", f"allow-cidr-scope-{bad!r}")
        )
    return rows


def _instance_rows() -> list[Any]:
    rows = []
    for bad, fragment in {
        "10.0.0.2": "is not host:port",
        ":80": "is not host:port",
        "": "is not host:port",
        "10.0.0.2:": "port '' is not 1..65535",
        "10.0.0.2:0": "port '0' is not 1..65535",
        "10.0.0.2:65536": "port '65536' is not 1..65535",
        "10.0.0.2:99999": "port '99999' is not 1..65535",
        "10.0.0.2:000080": "is not 1..65535",
        "10.0.0.2:abc": "port 'abc' is not 1..65535",
        "10.0.0.2:-1": "is not 1..65535",
        "10.0.0.2:+80": "is not 1..65535",
        "10.0.0.2:0x50": "is not 1..65535",
        "10.0.0.2: 80": "is not 1..65535",
        "10.0.0.2:80 ": "is not 1..65535",
        "10.0.0.2:80\n": "is not 1..65535",
        "10.0.0.2:80;": "is not 1..65535",
        "a;b:80": NOT_ADDRESS,
        "a$b:80": NOT_ADDRESS,
        "$host:80": NOT_ADDRESS,
        "a b:80": NOT_ADDRESS,
        "a\nb:80": NOT_ADDRESS,
        "a{b:80": NOT_ADDRESS,
        "a}b:80": NOT_ADDRESS,
        'a"b:80': NOT_ADDRESS,
        "a'b:80": NOT_ADDRESS,
        "a\\b:80": NOT_ADDRESS,
        "a\x01b:80": NOT_ADDRESS,
        "a\tb:80": NOT_ADDRESS,
        "a_b:80": NOT_ADDRESS,
        "-web:80": NOT_ADDRESS,
        "12345:80": NOT_ADDRESS,
        "a" * 64 + ".internal:80": NOT_ADDRESS,
        "::1:80": NOT_ADDRESS,
        "[::1:80": NOT_ADDRESS,
        "[::1]:80:90": NOT_ADDRESS,
        "[::g]:80": "is not an IPv6 address",
        "[1.2.3.4]:80": "is not an IPv6 address",
        "[]:80": "is not an IPv6 address",
        "[::1;]:80": "is not an IPv6 address",
        "[1:2:3:4:5:6:7:8:9]:80": "is not an IPv6 address",
    }.items():
        rows.append(_row(INSTANCE, bad, fragment, f"instance-{bad!r}"))
    for bad in ("[fe80::1%eth0]:80", "[fe80::1%a;b{]:80"):
        rows.append(_row(INSTANCE, bad, "must not carry a scope id", f"instance-scope-{bad!r}"))
    for name, bad in {
        "latin1": "wéb.internal:80".encode(),
        "fullwidth-port": "10.0.0.2:\uff18\uff10".encode(),
        "invalid-utf8": b"\xff\xfe:80",
    }.items():
        rows.append(_row(INSTANCE, bad, "is not ASCII", f"instance-non-ascii-{name}"))
    return rows


def _name_rows() -> list[Any]:
    good_instance = "10.0.0.3:5000"
    rows = []
    for name in ("-v1", ".v1", "_v1", "v 1", "v;1", "v$1", "v{1}", "v'1", "v\n1", "vé", "v" * 64):
        rows.append(
            _row(
                f"apps/shop/releases/{name}/web.1",
                good_instance,
                f"release name {name!r}",
                f"release-{name!r}",
            )
        )
    for name in (
        "-web",
        ".web",
        "_web",
        "",
        "web 1",
        "web;1",
        "web$1",
        "web{1}",
        'web"1',
        "web\n1",
        "wéb",
        "w" * 64,
    ):
        rows.append(
            _row(
                f"apps/shop/releases/v1/{name}",
                good_instance,
                f"instance name {name!r}",
                f"instance-name-{name!r}",
            )
        )
    own = cfg(domains=["bad-name.example.com"])
    for name in ("Shop", "-shop", "shop-", "sh_op", "sh.op", "sh op", "shöp", "a" * 64, ""):
        rows.append(_row(f"apps/{name}/config", own, f"app name {name!r}", f"app-name-{name!r}"))
    rows.append(
        _row(
            "apps/Shop/releases/v1/web.1",
            good_instance,
            "app name 'Shop'",
            "app-name-on-instance-key",
        )
    )
    rows.append(
        _row(
            "apps/shop/releases/v1/web.1/extra",
            good_instance,
            "not a key of the routerd layout",
            "layout-too-deep",
        )
    )
    rows.append(
        _row(
            "apps/shop/config/extra", own, "not a key of the routerd layout", "layout-under-config"
        )
    )
    rows.append(
        _row(
            "apps/shop/releases/v1",
            good_instance,
            "not a key of the routerd layout",
            "layout-release-without-instance",
        )
    )
    return rows


def _active_rows() -> list[Any]:
    rows = []
    for bad in (b"-v1", b"v 1", b"", b"v1;", b"v1\nv2", b"$v1", b"\xff\xfe", b"v" * 64, b'"v1"'):
        rows.append(_row(ACTIVE, bad, "active release", f"active-{bad!r}"))
    return rows


def _cert_rows() -> list[Any]:
    garbage_cert = "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"
    garbage_key = "-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n"
    exactly = 'exactly "cert" and "key"'
    pair = "do not load as a pair"
    return [
        _row(CERT, b"not json", "not valid JSON", "cert-not-json"),
        _row(CERT, b"[" * 100_000, "not valid JSON", "cert-json-nested-too-deep"),
        _row(CERT, lambda p: json.dumps([p.cert_a, p.key_a]), exactly, "cert-json-list"),
        _row(CERT, lambda p: json.dumps({"cert": p.cert_a}), exactly, "cert-missing-key"),
        _row(CERT, lambda p: json.dumps({"key": p.key_a}), exactly, "cert-missing-cert"),
        _row(
            CERT,
            lambda p: json.dumps({"cert": p.cert_a, "key": p.key_a, "chain": ""}),
            exactly,
            "cert-extra-field",
        ),
        _row(
            CERT,
            lambda p: json.dumps({"cert": 5, "key": p.key_a}),
            "must be PEM strings",
            "cert-not-string",
        ),
        _row(
            CERT, lambda p: cert_json("hello", p.key_a), "holds no PEM certificate", "cert-no-pem"
        ),
        _row(
            CERT, lambda p: cert_json(p.cert_a, "hello"), "holds no PEM private key", "key-no-pem"
        ),
        _row(CERT, lambda p: cert_json(garbage_cert, p.key_a), pair, "cert-garbage-pem"),
        _row(CERT, lambda p: cert_json(p.cert_a, garbage_key), pair, "key-garbage-pem"),
        _row(CERT, lambda p: cert_json(p.cert_a[:-200], p.key_a), pair, "cert-truncated"),
        _row(CERT, lambda p: cert_json(p.cert_a, p.key_b), pair, "cert-key-mismatch"),
        _row(
            CERT,
            lambda p: cert_json(p.key_a, p.cert_a) + " ",
            "holds no PEM certificate",
            "cert-and-key-swapped",
        ),
        _row(
            "certs/Shop.example.com",
            lambda p: cert_json(p.cert_b, p.key_b),
            NOT_HOST,
            "cert-domain-uppercase",
        ),
        _row(
            "certs/shop.example.com;",
            lambda p: cert_json(p.cert_b, p.key_b),
            NOT_HOST,
            "cert-domain-semicolon",
        ),
    ]


BAD_VALUES = [
    *_config_rows(),
    *_domain_rows(),
    *_option_rows(),
    *_instance_rows(),
    *_name_rows(),
    *_active_rows(),
    *_cert_rows(),
]


@pytest.mark.parametrize(("rel_key", "value", "fragment"), BAD_VALUES)
def test_bad_value_rejects_only_its_key(
    pki: Pki, rel_key: str, value: Value, fragment: str
) -> None:
    """A bad value is rejected under its full etcd key, with a message naming the problem,
    and every other app in the snapshot is routed exactly as without that key."""
    good = base_values(pki)
    baseline = load(good)
    assert baseline.errors == ()
    raw = value(pki) if callable(value) else value

    table = load({**good, rel_key: raw})

    assert [r.key for r in table.errors] == [f"{PREFIX}/{rel_key}"]
    assert fragment in table.errors[0].error
    if rel_key == CONFIG:  # shop's only config is bad and was never valid: not served
        expected = tuple(app for app in baseline.apps if app.name != "shop")
    else:
        expected = baseline.apps
    assert table.apps == expected


def test_bad_values_are_reported_again_on_every_load(pki: Pki) -> None:
    """A cached rejection is still listed on the next load of an unchanged snapshot."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)
    bad_instance = "apps/other/releases/v1/web.2"
    snap = snapshot({**base_values(pki), bad_instance: "a;b:80", CONFIG: b"{"})
    first, second = loader.load(snap), loader.load(snap)
    assert first.errors == second.errors
    assert {r.key for r in second.errors} == {f"{PREFIX}/{bad_instance}", f"{PREFIX}/{CONFIG}"}


# ------------------------------------------------------------- good paths


def test_defaults_are_filled_in() -> None:
    """A config with only domains gets every default option and the shared pool."""
    table = load({"apps/shop/config": cfg(domains=["shop.example.com"])})
    shop = table.app("shop")
    assert shop is not None
    assert shop.options == Options()
    assert shop.options == Options(
        client_max_body_size="10m",
        proxy_connect_timeout=5,
        proxy_read_timeout=60,
        proxy_send_timeout=60,
        websockets=False,
        allow=(),
        https_redirect=False,
        hsts=False,
        maintenance=False,
    )
    assert shop.domains == ("shop.example.com",)
    assert shop.tls == ()
    assert table.errors == ()


def test_every_option_is_read() -> None:
    """Non-default options are parsed, allow entries normalised to networks."""
    options = {
        "client_max_body_size": "1g",
        "proxy_connect_timeout": 1,
        "proxy_read_timeout": 3600,
        "proxy_send_timeout": 30,
        "websockets": True,
        "allow": ["10.1.2.3/8", "192.168.1.7", "2001:DB8::/32"],
        "https_redirect": True,
        "hsts": True,
        "maintenance": True,
    }
    table = load({"apps/shop/config": cfg(domains=["shop.example.com"], options=options)})
    shop = table.app("shop")
    assert shop is not None
    assert shop.options == Options(
        client_max_body_size="1g",
        proxy_connect_timeout=1,
        proxy_read_timeout=3600,
        proxy_send_timeout=30,
        websockets=True,
        allow=("10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"),
        https_redirect=True,
        hsts=True,
        maintenance=True,
    )


def test_wildcard_domain_and_duplicate_domains_in_one_app() -> None:
    """A leading '*.' is allowed and a domain listed twice by one app is kept once."""
    domains = ["*.shop.example.org", "shop.example.com", "*.shop.example.org"]
    shop = load({"apps/shop/config": cfg(domains=domains)}).app("shop")
    assert shop is not None
    assert shop.domains == ("*.shop.example.org", "shop.example.com")


def test_names_at_their_length_limits_are_accepted() -> None:
    """App names of 63 chars and release/instance names of 63 chars are valid."""
    app, release, instance = "a" * 63, "R" * 63, "i" * 63
    table = load(
        {
            f"apps/{app}/config": cfg(domains=["long.example.com"]),
            f"apps/{app}/releases/{release}/{instance}": "10.0.0.1:1",
            f"apps/{app}/active": release,
        }
    )
    assert table.errors == ()
    assert table.apps[0].instances == (Instance(release, instance, "10.0.0.1", 1),)


def test_ipv6_instance_is_normalised() -> None:
    """A bracketed IPv6 host is rewritten in its compressed lowercase form."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/shop/releases/v1/web.1": "[2001:DB8:0:0:0:0:0:1]:65535",
        }
    )
    shop = table.app("shop")
    assert shop is not None
    assert shop.instances == (Instance("v1", "web.1", "[2001:db8::1]", 65535),)
    assert shop.instances[0].address == "[2001:db8::1]:65535"


def test_dns_host_is_lowercased() -> None:
    """A DNS instance host is lowercased; an IPv4 host is kept as given."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/shop/releases/v1/web.1": "Web-1.Internal.Example:8080",
            "apps/shop/releases/v1/web.2": "10.0.0.2:1",
        }
    )
    shop = table.app("shop")
    assert shop is not None
    assert [i.address for i in shop.instances] == ["web-1.internal.example:8080", "10.0.0.2:1"]


def test_active_release_routes_only_its_instances() -> None:
    """With `active` set, only the instances of that release are routed."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/shop/releases/v1/web.1": "10.0.0.1:5000",
            "apps/shop/releases/v1/web.2": "10.0.0.2:5000",
            "apps/shop/releases/v2/web.1": "10.0.0.3:5000",
            "apps/shop/releases/v2/web.2": "10.0.0.4:5000",
            "apps/shop/active": "v2",
        }
    )
    shop = table.app("shop")
    assert shop is not None
    assert shop.instances == (
        Instance("v2", "web.1", "10.0.0.3", 5000),
        Instance("v2", "web.2", "10.0.0.4", 5000),
    )


def test_active_release_without_instances_routes_nothing() -> None:
    """An `active` release that has no instance leaves the app with none (a 503)."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/shop/releases/v1/web.1": "10.0.0.1:5000",
            "apps/shop/active": "v2",
        }
    )
    shop = table.app("shop")
    assert shop is not None
    assert shop.instances == ()


def test_no_active_routes_every_release() -> None:
    """Without `active`, every instance of every release is routed, sorted by release, name."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/shop/releases/v2/web.1": "10.0.0.3:5000",
            "apps/shop/releases/v1/web.2": "10.0.0.2:5000",
            "apps/shop/releases/v1/web.1": "10.0.0.1:5000",
        }
    )
    shop = table.app("shop")
    assert shop is not None
    assert [(i.release, i.name) for i in shop.instances] == [
        ("v1", "web.1"),
        ("v1", "web.2"),
        ("v2", "web.1"),
    ]


def test_app_without_instances_has_empty_instances() -> None:
    """An app with a config but no instance key is in the table with no instances."""
    table = load({"apps/shop/config": cfg(domains=["shop.example.com"])})
    assert table.apps == (App("shop", ("shop.example.com",), Options(), ()),)


def test_instances_without_config_are_not_routed() -> None:
    """Instances of an app that has no config key produce no app and no error."""
    table = load({"apps/shop/releases/v1/web.1": "10.0.0.1:5000"})
    assert table.apps == ()
    assert table.errors == ()


def test_other_keys_are_ignored() -> None:
    """routers/, hosts/ and unknown keys under an app are not routing input and not errors."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/shop/deploys/42": "whatever;{}",
            "routers/r1": "{}",
            "hosts/h1": "not json",
            "unrelated": "x",
        }
    )
    assert names(table) == ["shop"]
    assert table.errors == ()


def test_pool_filtering() -> None:
    """Apps of another pool are absent; apps without a pool are in the shared pool."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com"]),
            "apps/blog/config": cfg(domains=["blog.example.com"], pool="shared"),
            "apps/big/config": cfg(domains=["big.example.com"], pool="dedicated-1"),
            "apps/big/releases/v1/web.1": "10.0.0.1:5000",
        }
    )
    assert names(table) == ["blog", "shop"]
    assert table.errors == ()
    dedicated = Loader(prefix=PREFIX, pool="dedicated-1", resolves=any_host).load(
        snapshot(
            {
                "apps/shop/config": cfg(domains=["shop.example.com"]),
                "apps/big/config": cfg(domains=["big.example.com"], pool="dedicated-1"),
            }
        )
    )
    assert names(dedicated) == ["big"]


def test_duplicate_domain_goes_to_first_created_config() -> None:
    """A contested domain goes to the config with the lowest create_revision, not the
    first name, and the other app's claim is reported on its config key."""
    table = load(
        {
            "apps/aaa/config": KeyValue(
                cfg(domains=["x.example.com", "a.example.com"]).encode(), 20, 20
            ),
            "apps/zzz/config": KeyValue(cfg(domains=["x.example.com"]).encode(), 10, 30),
            "apps/solo/config": KeyValue(cfg(domains=["a.example.com"]).encode(), 15, 15),
        }
    )
    assert names(table) == ["solo", "zzz"]  # aaa lost every domain: not served
    assert table.app("zzz").domains == ("x.example.com",)  # type: ignore[union-attr]
    assert sorted((r.key, r.error) for r in table.errors) == [
        ("/routerd/apps/aaa/config", "domain a.example.com is already claimed by app solo"),
        ("/routerd/apps/aaa/config", "domain x.example.com is already claimed by app zzz"),
    ]


def test_duplicate_domain_partial_loss_keeps_other_domains() -> None:
    """An app that loses one contested domain keeps serving its other domains."""
    table = load(
        {
            "apps/first/config": KeyValue(cfg(domains=["x.example.com"]).encode(), 1, 1),
            "apps/second/config": KeyValue(
                cfg(domains=["x.example.com", "y.example.com"]).encode(), 2, 2
            ),
        }
    )
    assert names(table) == ["first", "second"]
    assert table.app("first").domains == ("x.example.com",)  # type: ignore[union-attr]
    assert table.app("second").domains == ("y.example.com",)  # type: ignore[union-attr]
    assert [r.key for r in table.errors] == ["/routerd/apps/second/config"]
    assert "x.example.com" in table.errors[0].error


def test_last_valid_value_is_kept_when_a_key_turns_bad() -> None:
    """A config and an instance that turn bad are still served as they last were."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)
    good_config = cfg(domains=["shop.example.com"], options={"proxy_read_timeout": 90})
    first = loader.load(
        Snapshot(
            10,
            {
                "apps/shop/config": KeyValue(good_config.encode(), 5, 5),
                "apps/shop/releases/v1/web.1": KeyValue(b"10.0.0.1:5000", 6, 6),
            },
        )
    )
    assert first.errors == ()
    second = loader.load(
        Snapshot(
            20,
            {
                "apps/shop/config": KeyValue(cfg(domains=["Bad;"]).encode(), 5, 19),
                "apps/shop/releases/v1/web.1": KeyValue(b"10.0.0.1;:5000", 6, 20),
            },
        )
    )
    assert second.revision == 20
    assert second.apps == first.apps
    assert {r.key for r in second.errors} == {
        "/routerd/apps/shop/config",
        "/routerd/apps/shop/releases/v1/web.1",
    }


def test_last_valid_value_is_the_latest_valid_one() -> None:
    """Between good writes, the fallback is the most recent good value, not the first."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)

    def at(mod: int, value: str) -> Snapshot:
        return Snapshot(mod, {"apps/shop/config": KeyValue(value.encode(), 1, mod)})

    loader.load(at(2, cfg(domains=["one.example.com"])))
    loader.load(at(3, cfg(domains=["two.example.com"])))
    table = loader.load(at(4, "{"))
    assert table.apps[0].domains == ("two.example.com",)
    assert [r.key for r in table.errors] == ["/routerd/apps/shop/config"]


def test_active_turning_bad_keeps_last_active() -> None:
    """An `active` key that turns bad keeps routing the last valid release."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)
    values = {
        "apps/shop/config": KeyValue(cfg(domains=["shop.example.com"]).encode(), 1, 1),
        "apps/shop/releases/v1/web.1": KeyValue(b"10.0.0.1:5000", 2, 2),
        "apps/shop/releases/v2/web.1": KeyValue(b"10.0.0.2:5000", 3, 3),
    }
    first = loader.load(Snapshot(4, {**values, "apps/shop/active": KeyValue(b"v2", 4, 4)}))
    second = loader.load(Snapshot(5, {**values, "apps/shop/active": KeyValue(b"v;2", 4, 5)}))
    assert second.apps == first.apps
    assert [i.release for i in second.apps[0].instances] == ["v2"]


def test_key_deleted_then_readded_bad_is_not_served() -> None:
    """Deleting a key forgets its last valid value, so a bad re-add is not served."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)
    config = {"apps/shop/config": KeyValue(cfg(domains=["shop.example.com"]).encode(), 1, 1)}
    good = {**config, "apps/other/config": KeyValue(cfg(domains=["o.example.com"]).encode(), 2, 2)}
    assert names(loader.load(Snapshot(2, good))) == ["other", "shop"]
    deleted = {k: v for k, v in good.items() if k != "apps/shop/config"}
    assert names(loader.load(Snapshot(3, deleted))) == ["other"]
    readded = {**deleted, "apps/shop/config": KeyValue(b"{bad", 4, 4)}
    table = loader.load(Snapshot(4, readded))
    assert names(table) == ["other"]
    assert [r.key for r in table.errors] == ["/routerd/apps/shop/config"]


def test_instance_deleted_then_readded_bad_is_not_served() -> None:
    """The same forgetting holds for an instance key."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)
    config = {"apps/shop/config": KeyValue(cfg(domains=["shop.example.com"]).encode(), 1, 1)}
    instance = "apps/shop/releases/v1/web.1"
    loader.load(Snapshot(2, {**config, instance: KeyValue(b"10.0.0.1:5000", 2, 2)}))
    loader.load(Snapshot(3, config))
    table = loader.load(Snapshot(4, {**config, instance: KeyValue(b"10.0.0.1:0", 4, 4)}))
    assert table.apps[0].instances == ()
    assert [r.key for r in table.errors] == [f"{PREFIX}/{instance}"]


def test_valid_cert_is_served_over_tls(pki: Pki) -> None:
    """A valid pair for one of an app's domains appears in App.tls and leaves plain_domains."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["shop.example.com", "www.shop.example.com"]),
            "certs/shop.example.com": cert_json(pki.cert_a, pki.key_a),
            "certs/unclaimed.example.com": cert_json(pki.cert_b, pki.key_b),
        }
    )
    assert table.errors == ()
    shop = table.app("shop")
    assert shop is not None
    assert [c.domain for c in shop.tls] == ["shop.example.com"]
    assert shop.plain_domains == ("www.shop.example.com",)
    cert = shop.tls[0]
    assert b"BEGIN CERTIFICATE" in cert.pem and b"PRIVATE KEY" in cert.pem
    assert len(cert.sha256) == 64


def test_wildcard_cert_matches_wildcard_domain(pki: Pki) -> None:
    """A cert stored under a wildcard domain secures the app's identical wildcard domain."""
    table = load(
        {
            "apps/shop/config": cfg(domains=["*.shop.example.org"]),
            "certs/*.shop.example.org": cert_json(pki.cert_a, pki.key_a),
        }
    )
    shop = table.app("shop")
    assert shop is not None
    assert [c.domain for c in shop.tls] == ["*.shop.example.org"]
    assert shop.plain_domains == ()


def test_cert_turning_bad_keeps_last_valid_cert(pki: Pki) -> None:
    """A cert replaced by a mismatched pair keeps serving the last valid pair."""
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=any_host)
    config = {"apps/shop/config": KeyValue(cfg(domains=["shop.example.com"]).encode(), 1, 1)}
    good = cert_json(pki.cert_a, pki.key_a).encode()
    bad = cert_json(pki.cert_a, pki.key_b).encode()
    first = loader.load(Snapshot(2, {**config, CERT: KeyValue(good, 2, 2)}))
    second = loader.load(Snapshot(3, {**config, CERT: KeyValue(bad, 2, 3)}))
    assert second.apps == first.apps
    assert [c.domain for c in second.apps[0].tls] == ["shop.example.com"]
    assert [r.key for r in second.errors] == [f"{PREFIX}/{CERT}"]


def test_prefix_trailing_slash_is_ignored() -> None:
    """A prefix given with a trailing slash names keys exactly like one without."""
    loader = Loader(prefix="/routerd/", pool=POOL, resolves=any_host)
    table = loader.load(snapshot({"apps/shop/config": b"{"}))
    assert [r.key for r in table.errors] == ["/routerd/apps/shop/config"]


def test_an_instance_whose_host_does_not_resolve_is_rejected_alone() -> None:
    """nginx refuses a whole config over one unresolvable upstream host, so the
    loader leaves that instance out, names its key, and keeps the app's others."""
    values = {
        CONFIG: json.dumps({"domains": ["shop.example.com"]}),
        "apps/shop/releases/v1/a": "10.0.0.1:80",
        "apps/shop/releases/v1/b": "gone.internal:80",
        "apps/shop/releases/v1/c": "api.internal:80",
    }
    loader = Loader(prefix=PREFIX, pool=POOL, resolves=lambda host, port: host != "gone.internal")
    table = loader.load(snapshot(values))
    assert [r.key for r in table.errors] == [f"{PREFIX}/apps/shop/releases/v1/b"]
    assert "does not resolve" in table.errors[0].error
    assert [i.host for i in table.apps[0].instances] == ["10.0.0.1", "api.internal"]


def test_instances_of_a_release_not_yet_active_are_checked() -> None:
    """A bad instance of an inactive release is reported before any switch to it."""
    values = {
        CONFIG: json.dumps({"domains": ["shop.example.com"]}),
        ACTIVE: "v1",
        "apps/shop/releases/v1/a": "10.0.0.1:80",
        "apps/shop/releases/v2/a": "10.0.0.2:99999",
    }
    table = Loader(prefix=PREFIX, pool=POOL, resolves=any_host).load(snapshot(values))
    assert [r.key for r in table.errors] == [f"{PREFIX}/apps/shop/releases/v2/a"]
    assert [i.address for i in table.apps[0].instances] == ["10.0.0.1:80"]
