"""Typed, validated routing state: the values and the rules that admit them.

Owns the value rules of routing input: the app config schema, the instance
addresses and certificates, each parsed and checked here, one value at a
time, raising InvalidValue with the key at fault. Any value that is not
valid JSON, breaks the schema or could smuggle nginx syntax (``;``, braces,
quotes, newlines, ``$``, control characters) is refused, never escaped.
The names (``routerd.keys``) and the reading of ``active`` and ``weights``
are shared with the deploy controller; the loader applies all of them to a
whole snapshot. ``instance_weights`` turns a weights value into the integral
per-instance weights both backend modes balance by.
Nothing else on the router side reads raw etcd values.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import re
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from routerd.errors import InvalidValue
from routerd.keys import APP_NAME
from routerd.routerstatus import Rejection

LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN = re.compile(rf"(\*\.)?{LABEL}(\.{LABEL})*")
DNS_HOST = re.compile(rf"{LABEL}(\.{LABEL})*", re.IGNORECASE)
IPV4 = re.compile(r"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")
SIZE = re.compile(r"[0-9]{1,9}[kKmMgG]?")
MAX_DOMAINS = 100
MAX_ALLOW = 1000
EXACT_LCM = 10_000  # instance weights are exact while the counts' lcm is at most this
WEIGHT_SCALE = 10_000  # per-instance weight of a share of 1 % on one instance, when rounding
MAX_WEIGHT = 100 * max(EXACT_LCM, WEIGHT_SCALE)  # the largest weight routerd writes


@dataclass(frozen=True)
class Options:
    client_max_body_size: str = "10m"
    proxy_connect_timeout: int = 5
    proxy_read_timeout: int = 60
    proxy_send_timeout: int = 60
    websockets: bool = False
    allow: tuple[str, ...] = ()
    https_redirect: bool = False
    hsts: bool = False
    maintenance: bool = False
    access_log: bool = True
    gzip: bool = False


@dataclass(frozen=True)
class AppConfig:
    domains: tuple[str, ...]
    pool: str = "shared"
    options: Options = Options()


@dataclass(frozen=True)
class Instance:
    release: str
    name: str
    host: str
    port: int
    weight: int = 1  # its share of the app's traffic against the other routed instances

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def balanced(self) -> str:
        """The address as the balancer takes it: ``=<weight>`` follows unless it is 1."""
        return self.address if self.weight == 1 else f"{self.address}={self.weight}"


@dataclass(frozen=True)
class Cert:
    """A validated certificate chain and key; ``pem`` holds both."""

    domain: str
    pem: bytes
    sha256: str


@dataclass(frozen=True)
class App:
    """One app as it will be routed: what the templates see."""

    name: str
    domains: tuple[str, ...]
    options: Options
    instances: tuple[Instance, ...]
    tls: tuple[Cert, ...] = ()
    # Every valid instance of every release, routed or not: a request still in
    # flight to a release that was switched away from is counted for it.
    registered: tuple[Instance, ...] = ()

    @functools.cached_property
    def addresses(self) -> str:
        """ "host:port,host:port=w": the instance list as the balancer takes it."""
        return ",".join(i.balanced for i in self.instances)

    @functools.cached_property
    def ip_only(self) -> bool:
        """Every instance is an IP address (the dynamic balancer cannot resolve names)."""
        return all(i.host[0] == "[" or IPV4.fullmatch(i.host) for i in self.instances)

    @property
    def plain_domains(self) -> tuple[str, ...]:
        secured = {cert.domain for cert in self.tls}
        return tuple(d for d in self.domains if d not in secured)


@dataclass(frozen=True)
class RoutingTable:
    revision: int
    apps: tuple[App, ...]
    errors: tuple[Rejection, ...] = ()
    # Set by Loader.update: only these apps' instances differ from the table
    # it was updated from (same apps, domains, options). None: anything may.
    dirty: frozenset[str] | None = None

    def app(self, name: str) -> App | None:
        return next((a for a in self.apps if a.name == name), None)


# ---------------------------------------------------------------- weights


def instance_weights(shares: Mapping[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    """release -> the weight of each of its instances, so that a release's
    instances together take its share (percent) of the requests.

    Exact while the least common multiple L of the instance counts is at most
    EXACT_LCM (always, for two releases of up to 100 instances each): each
    instance weighs share * L / count, and every weight is divided by their
    greatest common divisor (90/10 over 2 and 2 instances: 9, 9, 1, 1). Past
    that, share * WEIGHT_SCALE / count rounded, at least 1: every release's
    part is then within 0.01 % of its share. Releases with no instance or no
    share are left out: they take nothing.
    """
    live = {r: n for r, n in counts.items() if n > 0 and shares.get(r, 0) > 0}
    if not live:
        return {}
    lcm = math.lcm(*live.values())
    if lcm <= EXACT_LCM:
        raw = {r: shares[r] * lcm // n for r, n in live.items()}
    else:
        raw = {r: max(1, round(shares[r] * WEIGHT_SCALE / n)) for r, n in live.items()}
    divisor = math.gcd(*raw.values())
    return {r: w // divisor for r, w in raw.items()}


# ---------------------------------------------------------------- parsers


def parse_json(key: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidValue(key, f"not valid JSON: {exc}") from exc


def expect(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise InvalidValue(key, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_domain(key: str, value: Any) -> str:
    expect(key, isinstance(value, str), f"domain {value!r} is not a string")
    ok = len(value) <= 253 and DOMAIN.fullmatch(value) is not None
    expect(key, ok, f"domain {value!r} is not a lowercase host name")
    return str(value)


def parse_cidr(key: str, value: Any) -> str:
    expect(key, isinstance(value, str), f"allow entry {value!r} is not a string")
    # ipaddress accepts an IPv6 scope id ("fe80::1%eth0") holding almost any byte
    expect(key, "%" not in value, f"allow entry {value!r} must not carry a scope id")
    try:
        network = str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise InvalidValue(key, f"allow entry {value!r} is not an address or CIDR") from exc
    # nginx reads 255.255.255.255 as its "no address" value and refuses the whole config
    expect(key, network != "255.255.255.255/32", f"allow entry {value!r}: nginx cannot allow it")
    return network


def _parse_timeout(key: str, name: str, value: Any) -> int:
    ok = _is_int(value) and 1 <= value <= 3600
    expect(key, ok, f"options.{name} must be whole seconds 1..3600, got {value!r}")
    return int(value)


def _parse_bool(key: str, name: str, value: Any) -> bool:
    expect(key, isinstance(value, bool), f"options.{name} must be true or false, got {value!r}")
    return bool(value)


def _parse_size(key: str, name: str, value: Any) -> str:
    ok = isinstance(value, str) and SIZE.fullmatch(value) is not None
    expect(key, ok, f"options.{name} must be a size like '10m', got {value!r}")
    return str(value)


def _parse_allow(key: str, name: str, value: Any) -> tuple[str, ...]:
    ok = isinstance(value, list) and len(value) <= MAX_ALLOW
    expect(key, ok, f"options.{name} must be a list of at most {MAX_ALLOW} CIDRs")
    return tuple(parse_cidr(key, item) for item in value)


OPTION_PARSERS: dict[str, Callable[[str, str, Any], Any]] = {
    "client_max_body_size": _parse_size,
    "proxy_connect_timeout": _parse_timeout,
    "proxy_read_timeout": _parse_timeout,
    "proxy_send_timeout": _parse_timeout,
    "websockets": _parse_bool,
    "allow": _parse_allow,
    "https_redirect": _parse_bool,
    "hsts": _parse_bool,
    "maintenance": _parse_bool,
    "access_log": _parse_bool,
    "gzip": _parse_bool,
}


def parse_options(key: str, value: Any) -> Options:
    expect(key, isinstance(value, dict), "options must be an object")
    unknown = sorted(set(value) - set(OPTION_PARSERS))
    expect(key, not unknown, f"unknown option(s): {', '.join(map(repr, unknown))}")
    return Options(**{n: OPTION_PARSERS[n](key, n, v) for n, v in value.items()})


def parse_app_config(key: str, raw: bytes) -> AppConfig:
    data = parse_json(key, raw)
    expect(key, isinstance(data, dict), "app config must be a JSON object")
    unknown = sorted(set(data) - {"domains", "pool", "options"})
    expect(key, not unknown, f"unknown field(s): {', '.join(map(repr, unknown))}")
    domains = data.get("domains")
    ok = isinstance(domains, list) and 1 <= len(domains) <= MAX_DOMAINS
    expect(key, ok, f"domains must be a list of 1 to {MAX_DOMAINS} host names")
    parsed = tuple(dict.fromkeys(parse_domain(key, d) for d in domains))
    pool = data.get("pool", "shared")
    ok = isinstance(pool, str) and APP_NAME.fullmatch(pool) is not None
    expect(key, ok, f"pool {pool!r} must match {APP_NAME.pattern}")
    return AppConfig(parsed, pool, parse_options(key, data.get("options", {})))


def parse_host(key: str, host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        expect(key, "%" not in host, f"host {host!r} must not carry a scope id")
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError as exc:
            raise InvalidValue(key, f"host {host!r} is not an IPv6 address") from exc
    if IPV4.fullmatch(host) and all(int(octet) <= 255 for octet in host.split(".")):
        return host  # the common case, without ipaddress's cost (10,000 apps: -30% load time)
    numeric_tld = host.rsplit(".", 1)[-1].isdigit()  # "010.0.0.1" is no name, nor an address
    ok = len(host) <= 253 and DNS_HOST.fullmatch(host) is not None and not numeric_tld
    expect(key, ok, f"host {host!r} is not an IPv4 address, [IPv6] or DNS name")
    return host.lower()


def parse_instance(key: str, release: str, name: str, raw: bytes) -> Instance:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidValue(key, "instance address is not ASCII") from exc
    host, sep, port = text.rpartition(":")
    expect(key, bool(sep) and bool(host), f"instance {text!r} is not host:port")
    ok = port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535
    expect(key, ok, f"port {port!r} is not 1..65535")
    return Instance(release, name, parse_host(key, host), int(port))


def parse_cert(key: str, domain: str, raw: bytes) -> Cert:
    data = parse_json(key, raw)
    ok = isinstance(data, dict) and set(data) == {"cert", "key"}
    expect(key, ok, 'cert must be an object with exactly "cert" and "key"')
    cert, private = data["cert"], data["key"]
    ok = isinstance(cert, str) and isinstance(private, str)
    expect(key, ok, '"cert" and "key" must be PEM strings')
    expect(key, "-----BEGIN CERTIFICATE-----" in cert, '"cert" holds no PEM certificate')
    expect(key, "PRIVATE KEY-----" in private, '"key" holds no PEM private key')
    pem = (cert.strip() + "\n" + private.strip() + "\n").encode()
    _check_pair(key, pem)
    return Cert(domain, pem, hashlib.sha256(pem).hexdigest())


def _check_pair(key: str, pem: bytes) -> None:
    """Let OpenSSL itself load the pair: catches garbage and mismatched keys."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile(suffix=".pem") as handle:
        handle.write(pem)
        handle.flush()
        try:
            context.load_cert_chain(handle.name)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidValue(key, f"certificate and key do not load as a pair: {exc}") from exc
