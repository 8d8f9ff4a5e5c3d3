"""Flags and ROUTERD_* environment, the part both programs share.

Every flag can also come from the environment as ROUTERD_<FLAG> (upper
case, dashes as underscores); the command line wins. click reads both, by
its ``auto_envvar_prefix``: ``Flag`` adds what routerd promises on top (a
repeatable flag takes a comma list, and a bad value in a variable is a usage
error naming the variable), and ``check_environment`` holds every ROUTERD_*
variable to its flag's rules before any command runs. The etcd flags and
their frozen dataclass live here; each program's own flags live beside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from routerd import logs
from routerd.errors import ConfigError

ENV_PREFIX = "ROUTERD"
CONTEXT: dict[str, Any] = {
    "auto_envvar_prefix": ENV_PREFIX,  # on every command, so no command name joins the prefix
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}
LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[0-9.]+|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
F = TypeVar("F", bound=Callable[..., Any])


def env_name(flag: str) -> str:
    return f"{ENV_PREFIX}_" + flag.lstrip("-").upper().replace("-", "_")


# ------------------------------------------------------------------ click


class Flag(click.Option):
    """An option that also comes from ROUTERD_<FLAG>."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        kwargs.setdefault("show_default", True)
        super().__init__(*args, **kwargs)

    def env(self) -> str:
        return f"{ENV_PREFIX}_{(self.name or '').upper()}"

    def value_from_envvar(self, ctx: click.Context) -> Any:
        if self.multiple:  # a comma list, as the README promises for repeatable flags
            raw = self.resolve_envvar_value(ctx)
            return None if raw is None else [item for item in raw.split(",") if item]
        return super().value_from_envvar(ctx)

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            if ctx.get_parameter_source(self.name or "") is ParameterSource.ENVIRONMENT:
                raise self.bad_variable(value, exc) from exc
            raise

    def bad_variable(self, value: Any, exc: click.BadParameter) -> ConfigError:
        return ConfigError(self.env(), f"{value!r} is not valid for {self.opts[-1]}: {exc.message}")


class Command(click.Command):
    """A routerd command: ROUTERD_* variables, -h, and logs set up from its flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT, **kwargs.get("context_settings", {})}
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        logs.setup(ctx.params.get("log_format", "text"), ctx.params.get("log_level", "info"))
        return super().invoke(ctx)


class Group(click.Group):
    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT, **kwargs.get("context_settings", {})}
        super().__init__(*args, **kwargs)


Group.group_class = Group


def flag(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` for a routerd flag."""
    return click.option(*decls, cls=Flag, **kwargs)


def check_environment(root: click.Command) -> None:
    """Every ROUTERD_* variable some command reads must hold a value its flag
    accepts, whichever command runs: a sidecar's environment with one typo
    fails at once, by the variable's name."""
    for command in _commands(root):
        ctx = click.Context(command, info_name=command.name, auto_envvar_prefix=ENV_PREFIX)
        for param in command.params:
            if not isinstance(param, Flag):
                continue
            raw = param.value_from_envvar(ctx)
            if raw is None:
                continue
            try:
                param.type_cast_value(ctx, raw)
            except click.BadParameter as exc:
                raise param.bad_variable(raw, exc) from exc


def _commands(command: click.Command) -> Iterator[click.Command]:
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _commands(sub)


# ------------------------------------------------------------------- etcd


def parse_listen(flag_name: str, value: str) -> str:
    match = LISTEN.fullmatch(value)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise ConfigError(flag_name, f"{value!r} is not host:port (port 1..65535)")
    return value


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_endpoints(flag_name: str, value: str) -> tuple[Endpoint, ...]:
    endpoints = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                flag_name, f"{item!r} is not an etcd endpoint like http://127.0.0.1:2379"
            )
        try:
            port = url.port or 2379
        except ValueError as exc:
            raise ConfigError(flag_name, f"{item!r} has a bad port") from exc
        endpoints.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ConfigError(flag_name, "needs at least one endpoint")
    return tuple(endpoints)


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 2379, False),)
    prefix: str = "/routerd"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 5.0  # one call
    retry_for: float = 12.0  # a unary call etcd does not answer, sent again (an election)

    @property
    def tls(self) -> bool:
        return any(e.tls for e in self.endpoints) or self.ca is not None


def etcd_options(command: F) -> F:
    """The flags of every command that talks to etcd, and the log flags."""
    options = [
        flag("--etcd", default="http://127.0.0.1:2379", help="comma-separated endpoints"),
        flag("--prefix", default="/routerd", help="key prefix of every routerd key"),
        flag("--etcd-ca", help="CA bundle to verify etcd's TLS certificate"),
        flag("--etcd-cert", help="client certificate for etcd TLS"),
        flag("--etcd-key", help="client key for etcd TLS"),
        flag("--etcd-user", help="etcd user name"),
        flag("--etcd-password", help="etcd password (prefer the variable)"),
        flag("--log-format", default="text", type=click.Choice(["text", "json"])),
        flag(
            "--log-level",
            default="info",
            type=click.Choice(["debug", "info", "warning", "error"]),
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def resolved(value: str | None) -> Path | None:
    return Path(value).resolve() if value else None


def etcd_settings(params: Mapping[str, Any]) -> EtcdSettings:
    prefix = params["prefix"] if params["prefix"].startswith("/") else "/" + params["prefix"]
    for name in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = params[name]
        if path and not Path(path).is_file():
            raise ConfigError("--" + name.replace("_", "-"), f"{path} is not a readable file")
    if bool(params["etcd_user"]) != bool(params["etcd_password"]):
        raise ConfigError("--etcd-user", "user and password go together")
    return EtcdSettings(
        endpoints=parse_endpoints("--etcd", params["etcd"]),
        prefix=prefix.rstrip("/") or "/",
        ca=resolved(params["etcd_ca"]),
        cert=resolved(params["etcd_cert"]),
        key=resolved(params["etcd_key"]),
        user=params["etcd_user"],
        password=params["etcd_password"],
    )


def environ_flag(name: str) -> str | None:
    """A flag's value in the environment, for the rare default that needs it early."""
    return os.environ.get(env_name(name))
