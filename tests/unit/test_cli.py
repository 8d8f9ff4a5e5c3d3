"""The command line's environment handling (SPEC 5: every flag as ROUTERD_<FLAG>)."""

from __future__ import annotations

import pytest

from routerd.cli import EXIT_USAGE, apply_environment, build_parser, main


def parse(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str]):  # type: ignore[no-untyped-def]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = build_parser()
    apply_environment(parser)
    return parser.parse_args(argv)


def test_a_subcommand_flag_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTERD_POOL reaches `apps set --pool`, which has its own default."""
    args = parse(monkeypatch, {"ROUTERD_POOL": "high"}, ["apps", "set", "x", "--domain", "a.com"])
    assert args.pool == "high"


def test_a_repeatable_flag_takes_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTERD_DOMAIN=a,b gives two --domain values, and the flag is no longer required."""
    args = parse(monkeypatch, {"ROUTERD_DOMAIN": "a.com,b.com"}, ["apps", "set", "x"])
    assert args.domain == ["a.com", "b.com"]


def test_a_switch_and_a_typed_flag_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Switches read true/false words; typed flags are converted like on the command line."""
    env = {"ROUTERD_ALLOW_SHRINK": "true", "ROUTERD_DEBOUNCE_MAX": "2.5"}
    args = parse(monkeypatch, env, ["run", "--nginx-conf", "/tmp/nginx.conf", "--supervise"])
    assert args.allow_shrink is True
    assert args.debounce_max == 2.5


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
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --nginx-conf with a space or ';' would break the rendered config: exit 2 naming it."""
    folder = tmp_path / "a b"
    folder.mkdir()
    code = main(["run", "--nginx-conf", str(folder / "nginx.conf"), "--supervise"])
    assert code == EXIT_USAGE
    assert "--nginx-conf" in capsys.readouterr().err
