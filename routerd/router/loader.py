"""From one etcd snapshot to a RoutingTable, key by key.

Groups the keys under the prefix by app, parses each through the model's
parsers once per mod_revision, falls back to a key's last valid form when
it turns bad, settles contested domains, and picks each app's routed
instances: those of the releases ``weights`` gives a share, weighted, or
else those of the ``active`` release, or else all. ``update`` redoes only
the apps whose instances, active release or weights changed. Does not
render, write or talk to etcd.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from routerd import keys
from routerd.errors import InvalidValue
from routerd.keys import APP_NAME, RELEASE_NAME, parse_release_name, parse_weights
from routerd.router.model import (
    IPV4,
    App,
    AppConfig,
    Cert,
    Instance,
    RoutingTable,
    expect,
    instance_weights,
    parse_app_config,
    parse_cert,
    parse_domain,
    parse_instance,
)
from routerd.routerstatus import Rejection
from routerd.store import KeyValue, Snapshot


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
    weights: tuple[str, KeyValue] | None = None
    instances: list[tuple[str, str, str, KeyValue]] = field(default_factory=list)


ROUTING_KINDS = frozenset({"config", "active", "weights", "instance"})  # what an app is routed by
ROUTING_SEGMENTS = frozenset({"config", "active", "weights", "releases"})  # as spelled in a key
REROUTING_KINDS = ("active", "weights", "instance")  # what Loader.update redoes an app for
DNS_TTL_S = 30.0  # how long a DNS name's verdict holds


def dns_resolves(host: str, port: int) -> bool:
    """Whether ``host`` resolves, as nginx will ask when it loads the config."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return True


class Loader:
    """Builds a RoutingTable from snapshots, remembering the last valid form
    of every key so a bad write never takes away what was routed before.

    Parsing is cached by (key, mod_revision): an unchanged key costs nothing,
    which keeps a snapshot of 10,000 apps cheap to reload.
    """

    def __init__(
        self, *, prefix: str, pool: str, resolves: Callable[[str, int], bool] = dns_resolves
    ) -> None:
        self.resolves = resolves
        self.prefix = prefix.rstrip("/")
        self.pool = pool
        self._parsed: dict[str, _Parsed] = {}
        self._last_valid: dict[str, Any] = {}
        self._checked_weights: dict[str, dict[str, int]] = {}  # weights key -> last in force
        self._groups: dict[str, _AppKeys] = {}
        self._dns: dict[str, tuple[bool, float]] = {}  # host -> (resolves, checked at)

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
            instances, registered = self._routed_instances(apps[name], errors)
            tls = tuple(cert_by_domain[d] for d in config.domains if d in cert_by_domain)
            table.append(App(name, config.domains, config.options, instances, tls, registered))
        return RoutingTable(snapshot.revision, tuple(table), tuple(errors))

    def update(
        self, previous: RoutingTable, snapshot: Snapshot, changed: set[str]
    ) -> RoutingTable | None:
        """Re-route only the apps whose instances, active release or weights changed.

        The common change (a deploy, a dying instance) costs in proportion to
        the apps it touches, not to all of them. Returns None when a change
        touches anything else (configs, certs): then a full ``load`` is due.
        """
        dirty: set[str] = set()
        for rel in changed:
            key = keys.parse(rel)
            if key.kind in REROUTING_KINDS:
                if not self._regroup(rel, key, snapshot):
                    return None
                dirty.add(key.app or "")
            elif key.kind in ROUTING_KINDS or _misshapen(key) or key.app is None:
                return None  # configs, certs, anything unsure: a full load decides
        errors = [e for e in previous.errors if self._routing_key_of(e.key) not in dirty]
        apps = [self._reroute(app, errors) if app.name in dirty else app for app in previous.apps]
        return RoutingTable(snapshot.revision, tuple(apps), tuple(errors), frozenset(dirty))

    def _reroute(self, app: App, errors: list[Rejection]) -> App:
        instances, registered = self._routed_instances(self._groups[app.name], errors)
        return replace(app, instances=instances, registered=registered)

    def _routing_key_of(self, key: str) -> str | None:
        """The app whose active, weights or instance key this is, else None."""
        parsed = keys.parse(key[len(self.prefix) + 1 :])
        return parsed.app if parsed.kind in REROUTING_KINDS else None

    def _regroup(self, rel: str, key: keys.Key, snapshot: Snapshot) -> bool:
        """Move one changed active/weights/instance key into its app's group; False if unsure."""
        group = self._groups.get(key.app or "")
        if group is None or APP_NAME.fullmatch(key.app or "") is None:
            return False  # an app the last full load did not see: let a load decide
        full, kv = keys.absolute(self.prefix, rel), snapshot.kvs.get(rel)
        if kv is None:
            for cache in (self._parsed, self._last_valid, self._checked_weights):
                cache.pop(full, None)
        if key.kind == "active":
            group.active = None if kv is None else (full, kv)
        elif key.kind == "weights":
            group.weights = None if kv is None else (full, kv)
        else:
            group.instances = [i for i in group.instances if i[0] != full]
            if kv is not None:
                group.instances.append((full, key.release, key.name, kv))
        return True

    # -- grouping keys by app

    def _group(
        self, snapshot: Snapshot, errors: list[Rejection]
    ) -> tuple[dict[str, _AppKeys], dict[str, tuple[str, KeyValue]]]:
        apps: dict[str, _AppKeys] = {}
        certs: dict[str, tuple[str, KeyValue]] = {}
        for rel, kv in snapshot.kvs.items():
            key, full = keys.parse(rel), keys.absolute(self.prefix, rel)
            if key.kind == "cert":
                certs[key.name] = (full, kv)
            elif key.app is not None:
                self._group_app_key(full, key, kv, apps, errors)
        return apps, certs

    def _group_app_key(
        self,
        full: str,
        key: keys.Key,
        kv: KeyValue,
        apps: dict[str, _AppKeys],
        errors: list[Rejection],
    ) -> None:
        if key.kind not in ROUTING_KINDS and not _misshapen(key):
            return  # the deploy controller's keys are not routing input
        if key.app is None or APP_NAME.fullmatch(key.app) is None:
            errors.append(Rejection(full, f"app name {key.app!r} must match {APP_NAME.pattern}"))
            return
        group = apps.setdefault(key.app, _AppKeys())
        if key.kind == "config":
            group.config = (full, kv)
        elif key.kind == "active":
            group.active = (full, kv)
        elif key.kind == "weights":
            group.weights = (full, kv)
        elif key.kind == "instance":
            group.instances.append((full, key.release, key.name, kv))
        else:
            errors.append(Rejection(full, "not a key of the routerd layout"))

    def _forget_deleted(self, snapshot: Snapshot) -> None:
        live = {keys.absolute(self.prefix, rel) for rel in snapshot.kvs}
        caches: tuple[dict[str, Any], ...] = (self._parsed, self._last_valid, self._checked_weights)
        for cache in caches:
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
        for name, group in apps.items():
            if group.config is None:
                continue
            key, kv = group.config
            config = self._parse_or_last(
                key, kv, functools.partial(parse_app_config, key, kv.value), errors
            )
            if config is not None and config.pool == self.pool:
                configs[name] = (config, kv.create_revision)
        return configs

    def _claim_domains(
        self, configs: dict[str, tuple[AppConfig, int]], errors: list[Rejection]
    ) -> dict[str, tuple[AppConfig, int]]:
        """The first-created config key (lowest create revision) wins a contested domain."""
        owner: dict[str, str] = {}
        result: dict[str, tuple[AppConfig, int]] = {}
        for name, (config, created) in sorted(configs.items(), key=lambda i: (i[1][1], i[0])):
            kept = []
            for domain in config.domains:
                if domain in owner:
                    key = keys.absolute(self.prefix, keys.config(name))
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
        self, group: _AppKeys, errors: list[Rejection]
    ) -> tuple[tuple[Instance, ...], tuple[Instance, ...]]:
        """The instances routed to, and every valid one of any release."""
        active = None
        if group.active is not None:
            key, kv = group.active
            active = self._parse_or_last(
                key, kv, functools.partial(parse_release_name, key, kv.value), errors
            )
            # Never valid: as if absent, which is what was served before it came.
        # Every instance is checked, routed or not, so a deploy sees a bad one
        # of its new release before it switches to it.
        valid: list[tuple[str, Instance]] = []
        for key, release, name, kv in group.instances:
            instance = self._parse_or_last(
                key, kv, functools.partial(_instance, key, release, name, kv), errors
            )
            if instance is not None:
                valid.append((key, instance))
        registered = [instance for _, instance in valid]
        shares = self._shares(group, {i.release for i in registered}, errors)
        found = [
            instance
            for key, instance in valid
            if _routes(instance.release, shares, active) and self._resolves(key, instance, errors)
        ]
        if shares is not None:
            found = _weighted(found, shares)
        return tuple(sorted(found, key=_by_name)), tuple(sorted(registered, key=_by_name))

    def _shares(
        self, group: _AppKeys, releases: set[str], errors: list[Rejection]
    ) -> dict[str, int] | None:
        """The weights in force, or None (``active`` decides). A value naming a
        release without instances is rejected like a bad one: the last value
        in force stays, or none. A value in force whose releases have all
        lost their instances since gives way to ``active``."""
        if group.weights is None:
            return None
        key, kv = group.weights
        rejected = len(errors)
        parsed = functools.partial(parse_weights, key, kv.value)
        shares: dict[str, int] | None = self._parse_or_last(key, kv, parsed, errors)
        if shares is None:
            return None  # never valid: as if absent
        missing = sorted(set(shares) - releases)
        if not missing:
            self._checked_weights[key] = shares
        else:
            if len(errors) == rejected:  # one error per key: a parse error says enough
                named = ", ".join(missing)
                errors.append(Rejection(key, f"weights name release(s) with no instance: {named}"))
            shares = self._checked_weights.get(key)
        if shares is None or not any(shares[r] for r in releases if r in shares):
            return None
        return shares

    def _resolves(self, key: str, instance: Instance, errors: list[Rejection]) -> bool:
        """A DNS name nginx cannot resolve makes it refuse the whole config:
        leave that instance out instead, and say so."""
        if instance.host[0] == "[" or IPV4.fullmatch(instance.host):
            return True
        ok, checked = self._dns.get(instance.host, (False, -DNS_TTL_S))
        if time.monotonic() - checked >= DNS_TTL_S:
            ok = self.resolves(instance.host, instance.port)
            self._dns[instance.host] = (ok, time.monotonic())
        if not ok:
            errors.append(Rejection(key, f"host {instance.host!r} does not resolve"))
        return ok


def _routes(release: str, shares: dict[str, int] | None, active: str | None) -> bool:
    """Whether ``release`` takes traffic: a share of the weights, else being active."""
    if shares is not None:
        return shares.get(release, 0) > 0
    return active is None or release == active


def _weighted(instances: list[Instance], shares: dict[str, int]) -> list[Instance]:
    """The routed instances, each with its weight (``model.instance_weights``)."""
    counts: dict[str, int] = {}
    for instance in instances:
        counts[instance.release] = counts.get(instance.release, 0) + 1
    weights = instance_weights(shares, counts)
    return [replace(i, weight=weights[i.release]) for i in instances]


def _by_name(instance: Instance) -> tuple[str, str]:
    return instance.release, instance.name


def _instance(key: str, release: str, name: str, kv: KeyValue) -> Instance:
    for label, value in (("release", release), ("instance", name)):
        ok = RELEASE_NAME.fullmatch(value) is not None
        expect(key, ok, f"{label} name {value!r} must match {RELEASE_NAME.pattern}")
    return parse_instance(key, release, name, kv.value)


def _misshapen(key: keys.Key) -> bool:
    """A key that claims to be routing input but has the wrong shape."""
    return key.kind == "invalid" and key.name in ROUTING_SEGMENTS
