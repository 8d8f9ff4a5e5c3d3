"""Typed, validated routing state built from one etcd snapshot.

Owns the etcd layout of SPEC 2 and the bad-input rules of SPEC 4: every value
is parsed and checked here, one key at a time, and a key that fails falls back
to its last valid form (or is left out when it never had one). Nothing else
in routerd looks at raw etcd values. Does not render, write or talk to etcd.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import re
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from routerd.errors import InvalidValue

APP_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN = re.compile(rf"(\*\.)?{LABEL}(\.{LABEL})*")
DNS_HOST = re.compile(rf"{LABEL}(\.{LABEL})*", re.IGNORECASE)
IPV4 = re.compile(r"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")
SIZE = re.compile(r"[0-9]{1,9}[kKmMgG]?")
MAX_DOMAINS = 100
MAX_ALLOW = 1000


@dataclass(frozen=True)
class KeyValue:
    """One etcd key as read: raw bytes plus the revisions the model needs."""

    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class Snapshot:
    """Every key under the prefix (prefix stripped) at one etcd revision."""

    revision: int
    kvs: Mapping[str, KeyValue]


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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


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

    @functools.cached_property
    def addresses(self) -> str:
        """ "host:port,host:port": the instance list as the balancer takes it."""
        return ",".join(i.address for i in self.instances)

    @functools.cached_property
    def ip_only(self) -> bool:
        """Every instance is an IP address (the dynamic balancer cannot resolve names)."""
        return all(i.host[0] == "[" or IPV4.fullmatch(i.host) for i in self.instances)

    @property
    def plain_domains(self) -> tuple[str, ...]:
        secured = {cert.domain for cert in self.tls}
        return tuple(d for d in self.domains if d not in secured)


@dataclass(frozen=True)
class Rejection:
    key: str
    error: str


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


# ---------------------------------------------------------------- parsers


def parse_json(key: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidValue(key, f"not valid JSON: {exc}") from exc


def _expect(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise InvalidValue(key, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_domain(key: str, value: Any) -> str:
    _expect(key, isinstance(value, str), f"domain {value!r} is not a string")
    ok = len(value) <= 253 and DOMAIN.fullmatch(value) is not None
    _expect(key, ok, f"domain {value!r} is not a lowercase host name")
    return str(value)


def parse_cidr(key: str, value: Any) -> str:
    _expect(key, isinstance(value, str), f"allow entry {value!r} is not a string")
    # ipaddress accepts an IPv6 scope id ("fe80::1%eth0") holding almost any byte
    _expect(key, "%" not in value, f"allow entry {value!r} must not carry a scope id")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise InvalidValue(key, f"allow entry {value!r} is not an address or CIDR") from exc


def _parse_timeout(key: str, name: str, value: Any) -> int:
    ok = _is_int(value) and 1 <= value <= 3600
    _expect(key, ok, f"options.{name} must be whole seconds 1..3600, got {value!r}")
    return int(value)


def _parse_bool(key: str, name: str, value: Any) -> bool:
    _expect(key, isinstance(value, bool), f"options.{name} must be true or false, got {value!r}")
    return bool(value)


def _parse_size(key: str, name: str, value: Any) -> str:
    ok = isinstance(value, str) and SIZE.fullmatch(value) is not None
    _expect(key, ok, f"options.{name} must be a size like '10m', got {value!r}")
    return str(value)


def _parse_allow(key: str, name: str, value: Any) -> tuple[str, ...]:
    ok = isinstance(value, list) and len(value) <= MAX_ALLOW
    _expect(key, ok, f"options.{name} must be a list of at most {MAX_ALLOW} CIDRs")
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
}


def parse_options(key: str, value: Any) -> Options:
    _expect(key, isinstance(value, dict), "options must be an object")
    unknown = sorted(set(value) - set(OPTION_PARSERS))
    _expect(key, not unknown, f"unknown option(s): {', '.join(map(repr, unknown))}")
    return Options(**{n: OPTION_PARSERS[n](key, n, v) for n, v in value.items()})


def parse_app_config(key: str, raw: bytes) -> AppConfig:
    data = parse_json(key, raw)
    _expect(key, isinstance(data, dict), "app config must be a JSON object")
    unknown = sorted(set(data) - {"domains", "pool", "options"})
    _expect(key, not unknown, f"unknown field(s): {', '.join(map(repr, unknown))}")
    domains = data.get("domains")
    ok = isinstance(domains, list) and 1 <= len(domains) <= MAX_DOMAINS
    _expect(key, ok, f"domains must be a list of 1 to {MAX_DOMAINS} host names")
    parsed = tuple(dict.fromkeys(parse_domain(key, d) for d in domains))
    pool = data.get("pool", "shared")
    ok = isinstance(pool, str) and APP_NAME.fullmatch(pool) is not None
    _expect(key, ok, f"pool {pool!r} must match {APP_NAME.pattern}")
    return AppConfig(parsed, pool, parse_options(key, data.get("options", {})))


def parse_host(key: str, host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        _expect(key, "%" not in host, f"host {host!r} must not carry a scope id")
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError as exc:
            raise InvalidValue(key, f"host {host!r} is not an IPv6 address") from exc
    if IPV4.fullmatch(host) and all(int(octet) <= 255 for octet in host.split(".")):
        return host  # the common case, without ipaddress's cost (10,000 apps: -30% load time)
    numeric_tld = host.rsplit(".", 1)[-1].isdigit()  # "010.0.0.1" is no name, nor an address
    ok = len(host) <= 253 and DNS_HOST.fullmatch(host) is not None and not numeric_tld
    _expect(key, ok, f"host {host!r} is not an IPv4 address, [IPv6] or DNS name")
    return host.lower()


def parse_instance(key: str, release: str, name: str, raw: bytes) -> Instance:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidValue(key, "instance address is not ASCII") from exc
    host, sep, port = text.rpartition(":")
    _expect(key, bool(sep) and bool(host), f"instance {text!r} is not host:port")
    ok = port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535
    _expect(key, ok, f"port {port!r} is not 1..65535")
    return Instance(release, name, parse_host(key, host), int(port))


def parse_release_name(key: str, raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    ok = RELEASE_NAME.fullmatch(text) is not None
    _expect(key, ok, f"active release {text!r} must match {RELEASE_NAME.pattern}")
    return text


def parse_cert(key: str, domain: str, raw: bytes) -> Cert:
    data = parse_json(key, raw)
    ok = isinstance(data, dict) and set(data) == {"cert", "key"}
    _expect(key, ok, 'cert must be an object with exactly "cert" and "key"')
    cert, private = data["cert"], data["key"]
    ok = isinstance(cert, str) and isinstance(private, str)
    _expect(key, ok, '"cert" and "key" must be PEM strings')
    _expect(key, "-----BEGIN CERTIFICATE-----" in cert, '"cert" holds no PEM certificate')
    _expect(key, "PRIVATE KEY-----" in private, '"key" holds no PEM private key')
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


# ------------------------------------------------------------ the loader


@dataclass
class _Parsed:
    """What one key parsed to, cached by mod_revision."""

    mod_revision: int
    value: Any = None
    error: str | None = None


@dataclass
class _AppKeys:
    config: tuple[str, KeyValue] | None = None
    active: tuple[str, KeyValue] | None = None
    instances: list[tuple[str, str, str, KeyValue]] = field(default_factory=list)


class Loader:
    """Builds a RoutingTable from snapshots, remembering the last valid form
    of every key so a bad write never takes away what was routed before.

    Parsing is cached by (key, mod_revision): an unchanged key costs nothing,
    which keeps a snapshot of 10,000 apps cheap to reload.
    """

    def __init__(self, *, prefix: str, pool: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.pool = pool
        self._parsed: dict[str, _Parsed] = {}
        self._last_valid: dict[str, Any] = {}
        self._groups: dict[str, _AppKeys] = {}

    def load(self, snapshot: Snapshot) -> RoutingTable:
        errors: list[Rejection] = []
        apps, certs = self._group(snapshot, errors)
        self._groups = apps
        self._forget_deleted(snapshot)
        cert_by_domain = self._certs(certs, errors)
        configs = self._configs(apps, errors)
        built = self._claim_domains(configs, errors)
        table = []
        for name, (config, _) in sorted(built.items()):
            keys = apps[name]
            instances = self._routed_instances(name, keys, errors)
            tls = tuple(cert_by_domain[d] for d in config.domains if d in cert_by_domain)
            table.append(App(name, config.domains, config.options, instances, tls))
        return RoutingTable(snapshot.revision, tuple(table), tuple(errors))

    def update(
        self, previous: RoutingTable, snapshot: Snapshot, changed: set[str]
    ) -> RoutingTable | None:
        """Re-route only the apps whose instances or active release changed.

        The common change (a deploy, a dying instance) costs in proportion to
        the apps it touches, not to all of them. Returns None when a change
        touches anything else (configs, certs): then a full ``load`` is due.
        """
        dirty: set[str] = set()
        for rel in changed:
            parts = rel.split("/")
            if parts[0] != "apps" or len(parts) < 3 or parts[2] == "config":
                return None
            if parts[2] in ("active", "releases"):
                if not self._regroup(rel, parts, snapshot):
                    return None
                dirty.add(parts[1])
        errors = [e for e in previous.errors if self._routing_key_of(e.key) not in dirty]
        apps = []
        for app in previous.apps:
            if app.name in dirty:
                instances = self._routed_instances(app.name, self._groups[app.name], errors)
                app = replace(app, instances=instances)
            apps.append(app)
        return RoutingTable(snapshot.revision, tuple(apps), tuple(errors), frozenset(dirty))

    def _routing_key_of(self, key: str) -> str | None:
        """The app whose active or instance key this is, else None."""
        parts = key[len(self.prefix) + 1 :].split("/")
        is_active = len(parts) == 3 and parts[2] == "active"
        is_instance = len(parts) == 5 and parts[2] == "releases"
        return parts[1] if parts[0] == "apps" and (is_active or is_instance) else None

    def _regroup(self, rel: str, parts: list[str], snapshot: Snapshot) -> bool:
        """Move one changed active/instance key into its app's group; False if unsure."""
        keys = self._groups.get(parts[1])
        if keys is None or APP_NAME.fullmatch(parts[1]) is None:
            return False  # an app the last full load did not see: let a load decide
        key, kv = f"{self.prefix}/{rel}", snapshot.kvs.get(rel)
        if kv is None:
            self._parsed.pop(key, None)
            self._last_valid.pop(key, None)
        if parts[2] == "active" and len(parts) == 3:
            keys.active = None if kv is None else (key, kv)
            return True
        if parts[2] == "releases" and len(parts) == 5:
            keys.instances = [i for i in keys.instances if i[0] != key]
            if kv is not None:
                keys.instances.append((key, parts[3], parts[4], kv))
            return True
        return False

    # -- grouping keys by app

    def _group(
        self, snapshot: Snapshot, errors: list[Rejection]
    ) -> tuple[dict[str, _AppKeys], dict[str, tuple[str, KeyValue]]]:
        apps: dict[str, _AppKeys] = {}
        certs: dict[str, tuple[str, KeyValue]] = {}
        for rel, kv in snapshot.kvs.items():
            key = f"{self.prefix}/{rel}"
            parts = rel.split("/")
            if parts[0] == "certs" and len(parts) == 2:
                certs[parts[1]] = (key, kv)
            elif parts[0] == "apps" and len(parts) >= 3:
                self._group_app_key(key, parts[1], parts[2:], kv, apps, errors)
        return apps, certs

    def _group_app_key(
        self,
        key: str,
        app: str,
        rest: list[str],
        kv: KeyValue,
        apps: dict[str, _AppKeys],
        errors: list[Rejection],
    ) -> None:
        kind = rest[0]
        if kind not in ("config", "active", "releases"):
            return  # other keys under an app (deploy history, locks) are not routing input
        if APP_NAME.fullmatch(app) is None:
            errors.append(Rejection(key, f"app name {app!r} must match {APP_NAME.pattern}"))
            return
        keys = apps.setdefault(app, _AppKeys())
        if kind == "config" and len(rest) == 1:
            keys.config = (key, kv)
        elif kind == "active" and len(rest) == 1:
            keys.active = (key, kv)
        elif kind == "releases" and len(rest) == 3:
            keys.instances.append((key, rest[1], rest[2], kv))
        else:
            errors.append(Rejection(key, "not a key of the routerd layout"))

    def _forget_deleted(self, snapshot: Snapshot) -> None:
        live = {f"{self.prefix}/{rel}" for rel in snapshot.kvs}
        for cache in (self._parsed, self._last_valid):
            for key in [k for k in cache if k not in live]:
                del cache[key]

    # -- parsing with the per-key cache

    def _parse(self, key: str, kv: KeyValue, parser: Callable[[], Any]) -> Any:
        """Parse once per mod_revision; on error fall back to the last valid value."""
        cached = self._parsed.get(key)
        if cached is None or cached.mod_revision != kv.mod_revision:
            try:
                cached = _Parsed(kv.mod_revision, value=parser())
                self._last_valid[key] = cached.value
            except InvalidValue as exc:
                cached = _Parsed(kv.mod_revision, error=exc.message)
            self._parsed[key] = cached
        if cached.error is not None:
            raise InvalidValue(key, cached.error)
        return cached.value

    def _parse_or_last(
        self, key: str, kv: KeyValue, parser: Callable[[], Any], errors: list[Rejection]
    ) -> Any:
        try:
            return self._parse(key, kv, parser)
        except InvalidValue as exc:
            errors.append(Rejection(key, exc.message))
            return self._last_valid.get(key)

    def _certs(
        self, certs: dict[str, tuple[str, KeyValue]], errors: list[Rejection]
    ) -> dict[str, Cert]:
        valid: dict[str, Cert] = {}
        for domain, (key, kv) in sorted(certs.items()):

            def parser(key: str = key, domain: str = domain, kv: KeyValue = kv) -> Cert:
                return parse_cert(key, parse_domain(key, domain), kv.value)

            cert = self._parse_or_last(key, kv, parser, errors)
            if cert is not None:
                valid[domain] = cert
        return valid

    def _configs(
        self, apps: dict[str, _AppKeys], errors: list[Rejection]
    ) -> dict[str, tuple[AppConfig, int]]:
        configs: dict[str, tuple[AppConfig, int]] = {}
        for name, keys in apps.items():
            if keys.config is None:
                continue
            key, kv = keys.config
            config = self._parse_or_last(
                key, kv, lambda key=key, kv=kv: parse_app_config(key, kv.value), errors
            )
            if config is not None and config.pool == self.pool:
                configs[name] = (config, kv.create_revision)
        return configs

    def _claim_domains(
        self, configs: dict[str, tuple[AppConfig, int]], errors: list[Rejection]
    ) -> dict[str, tuple[AppConfig, int]]:
        """The first-created config key wins a contested domain (SPEC 3)."""
        owner: dict[str, str] = {}
        result: dict[str, tuple[AppConfig, int]] = {}
        for name, (config, created) in sorted(configs.items(), key=lambda i: (i[1][1], i[0])):
            kept = []
            for domain in config.domains:
                if domain in owner:
                    key = f"{self.prefix}/apps/{name}/config"
                    errors.append(
                        Rejection(key, f"domain {domain} is already claimed by app {owner[domain]}")
                    )
                else:
                    owner[domain] = name
                    kept.append(domain)
            if kept:
                result[name] = (AppConfig(tuple(kept), config.pool, config.options), created)
        return result

    def _routed_instances(
        self, app: str, keys: _AppKeys, errors: list[Rejection]
    ) -> tuple[Instance, ...]:
        active = None
        if keys.active is not None:
            key, kv = keys.active
            active = self._parse_or_last(
                key, kv, lambda key=key, kv=kv: parse_release_name(key, kv.value), errors
            )
        found: list[Instance] = []
        for key, release, name, kv in keys.instances:
            if active is not None and release != active:
                continue
            instance = self._parse_or_last(
                key, kv, lambda k=key, r=release, n=name, v=kv: _instance(k, r, n, v), errors
            )
            if instance is not None:
                found.append(instance)
        return tuple(sorted(found, key=lambda i: (i.release, i.name)))


def _instance(key: str, release: str, name: str, kv: KeyValue) -> Instance:
    for label, value in (("release", release), ("instance", name)):
        ok = RELEASE_NAME.fullmatch(value) is not None
        _expect(key, ok, f"{label} name {value!r} must match {RELEASE_NAME.pattern}")
    return parse_instance(key, release, name, kv.value)
