"""The command line's environment handling: every flag as ROUTERD_<FLAG>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest

from routerd.cli import EXIT_USAGE, main, routerd


def parse(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str]) -> dict[str, Any]:
    """The parameters the command named by ``argv`` would run with."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    group = routerd.make_context("routerd", list(argv), resilient_parsing=False)
    command: click.Command = routerd
    args = list(argv)
    while isinstance(command, click.Group):
        name, sub, args = command.resolve_command(group, args)
        assert sub is not None, name
        command = sub
        group = command.make_context(name, args, parent=group)
    return group.params


def test_a_subcommand_flag_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTERD_POOL reaches `apps set --pool`, which has its own default."""
    params = parse(monkeypatch, {"ROUTERD_POOL": "high"}, ["apps", "set", "x", "--domain", "a.com"])
    assert params["pool"] == "high"


def test_a_repeatable_flag_takes_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTERD_DOMAIN=a,b gives two --domain values, and the flag is no longer required."""
    params = parse(monkeypatch, {"ROUTERD_DOMAIN": "a.com,b.com"}, ["apps", "set", "x"])
    assert list(params["domain"]) == ["a.com", "b.com"]


def test_a_switch_and_a_typed_flag_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Switches read true/false words; typed flags are converted like on the command line."""
    env = {"ROUTERD_ALLOW_SHRINK": "true", "ROUTERD_DEBOUNCE_MAX": "2.5"}
    params = parse(monkeypatch, env, ["run", "--nginx-conf", "/tmp/nginx.conf", "--supervise"])
    assert params["allow_shrink"] is True
    assert params["debounce_max"] == 2.5


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("ROUTERD_LOG_LEVEL", "verbose"),
        ("ROUTERD_DYNAMIC_BACKENDS", "yes"),
        ("ROUTERD_DEBOUNCE_MAX", "soon"),
    ],
)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, value: str
) -> None:
    """A value the flag would refuse exits 2 with the variable's name, not a traceback."""
    monkeypatch.setenv(env, value)
    assert main(["status"]) == EXIT_USAGE
    assert env in capsys.readouterr().err


def test_a_path_nginx_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --nginx-conf with a space or ';' would break the rendered config: exit 2 naming it."""
    folder = tmp_path / "a b"
    folder.mkdir()
    code = main(["run", "--nginx-conf", str(folder / "nginx.conf"), "--supervise"])
    assert code == EXIT_USAGE
    assert "--nginx-conf" in capsys.readouterr().err


def test_a_bad_flag_on_the_command_line_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A value click refuses on the command line exits 2 and names the flag."""
    assert main(["run", "--nginx-conf", "/tmp/x.conf", "--supervise", "--debounce-max", "0"]) == 2
    assert "--debounce-max" in capsys.readouterr().err


def test_version_and_help_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package's one version; --help teaches the variables."""
    from routerd import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["run", "--help"]) == 0
    assert "ROUTERD_NGINX_CONF" in capsys.readouterr().out


# Found by fuzzing `apps set`: a value the router refuses exited 1 naming the etcd key,
# after connecting to etcd; it is the flag's fault, refused before etcd is asked.
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--domain", "*"], "--domain"),
        (["--domain", "Shop.example.com"], "--domain"),
        (["--domain", "a.example.com", "--pool", "High"], "--pool"),
        (["--domain", "a.example.com", "--option", "websockets=yes"], "--option"),
        (["--domain", "a.example.com", "--option", "proxy_read_timeout=0"], "--option"),
        (["--domain", "a.example.com", "--option", "allow=10.0.0.0/8;x"], "--option"),
        (["--domain", "a.example.com", "--option", "client_max_body_size=1mb"], "--option"),
    ],
)
def test_apps_set_refuses_a_bad_value_naming_its_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """`apps set` with a value the router's rules refuse exits 2 naming the flag, without
    reaching etcd (none listens at the endpoint given)."""
    code = main(["apps", "set", "shop", *argv, "--etcd", "http://127.0.0.1:1"])
    assert code == EXIT_USAGE
    assert f"routerd: {flag}: " in capsys.readouterr().err


def test_edge_flags_become_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Trusted proxies are normalised CIDRs, the access log defaults to the runtime
    folder, HTTP/2 and the keepalive timeout come from the environment, and the
    metrics address advertised replaces a wildcard host with loopback."""
    from routerd.router.commands import run_settings

    env = {"ROUTERD_HTTP2": "false", "ROUTERD_KEEPALIVE_TIMEOUT": "120"}
    argv = ["run", "--nginx-conf", str(tmp_path / "nginx.conf"), "--supervise",
            "--trusted-proxies", "10.0.0.1, 2001:db8::/32,10.0.0.1/32", "--proxy-protocol",
            "--metrics-listen", "0.0.0.0:9145", "--access-log-format", "heroku"]  # fmt: skip
    settings = run_settings(parse(monkeypatch, env, argv))
    edge = settings.nginx.edge
    assert edge.trusted_proxies == ("10.0.0.1/32", "2001:db8::/32")
    assert edge.proxy_protocol and not edge.http2 and edge.keepalive_timeout == 120
    assert settings.access_log == str(tmp_path / "access.log")
    assert settings.access_log_format == "heroku"
    assert settings.metrics_advertise == "127.0.0.1:9145"
    assert settings.nginx.traffic_log == tmp_path / "traffic.log"


def test_with_logs_and_metrics_off_nginx_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--access-log off with --no-traffic-metrics: no traffic file for nginx to write."""
    from routerd.router.commands import run_settings

    argv = ["run", "--nginx-conf", str(tmp_path / "nginx.conf"), "--supervise",
            "--access-log", "off", "--no-traffic-metrics"]  # fmt: skip
    settings = run_settings(parse(monkeypatch, {}, argv))
    assert settings.nginx.traffic_log is None and settings.access_log == "off"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--trusted-proxies", "10.0.0.0/8,fe80::1%eth0"], "--trusted-proxies"),
        (["--trusted-proxies", "proxy.internal"], "--trusted-proxies"),
        (["--proxy-protocol"], "--trusted-proxies"),
        (["--access-log", "/no/such/folder/access.log"], "--access-log"),
        (["--keepalive-timeout", "3601"], "--keepalive-timeout"),
    ],
)
def test_bad_edge_flags_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], flag: str
) -> None:
    """Each bad edge flag is a usage error that names it."""
    base = ["run", "--nginx-conf", str(tmp_path / "nginx.conf"), "--supervise"]
    assert main(base + args) == EXIT_USAGE
    assert flag in capsys.readouterr().err
