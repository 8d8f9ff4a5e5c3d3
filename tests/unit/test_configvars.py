"""Config vars and versioned releases, as pure values: what is refused (never
quoting a value), what changed between releases, which version comes next."""

from __future__ import annotations

import json

import pytest

from routerd.deploy import configvars, releases
from routerd.deploy.lifecycle import DefaultGroup, what_changed
from routerd.deploy.releases import Release, ReleaseSpec
from routerd.errors import InvalidValue
from routerd.store import KeyValue, Snapshot

SECRET = "hunter2-value"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"lower": SECRET}, "must match"),
        ({"PORT": SECRET}, "set by routerd"),
        ({"ROUTERD_RELEASE": SECRET}, "set by routerd"),
        ({"A": SECRET + "\0"}, "NUL"),
        ({"A": 3}, "must be text"),
        ({"A": "x" * (configvars.MAX_VALUE + 1)}, "over"),
        ({f"V{i}": "x" * 30000 for i in range(10)}, "in all"),
    ],
)
def test_bad_config_vars_are_refused_naming_the_variable_never_the_value(
    env: dict[str, object], fragment: str
) -> None:
    """Each rule refuses with the key and the variable's name; no value is quoted."""
    with pytest.raises(InvalidValue) as caught:
        configvars.check("/routerd/apps/shop/env", env)
    assert fragment in str(caught.value) and "/routerd/apps/shop/env" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_the_env_key_reads_back_and_bad_json_says_so_without_its_text() -> None:
    """A valid object round-trips; broken JSON is refused without echoing it."""
    raw = configvars.to_json({"B": "2", "A": "1"})
    assert configvars.parse("k", raw) == {"A": "1", "B": "2"}
    assert configvars.parse("k", None) == {}
    with pytest.raises(InvalidValue) as caught:
        configvars.parse("k", b'{"A": "' + SECRET.encode())
    assert SECRET not in str(caught.value)
    with pytest.raises(InvalidValue, match="object"):
        configvars.parse("k", b'["A"]')


def test_assignments_need_an_equals_sign_and_name_the_argument() -> None:
    """NAME=VALUE, where VALUE may hold '='; a missing '=' names the argument."""
    assert configvars.assignments("cli", ["A=b=c", "EMPTY="]) == {"A": "b=c", "EMPTY": ""}
    with pytest.raises(InvalidValue, match="NAME=VALUE"):
        configvars.assignments("cli", ["JUSTNAME"])


def release(
    name: str, version: int, *, image: str = "shop:1", replicas: int = 1, **env: str
) -> Release:
    spec = ReleaseSpec(image=image, env=env, replicas=replicas)
    return Release(name, spec, f"2026-01-0{version}", version=version, config_vars=tuple(env))


def test_what_changed_names_image_config_vars_and_replicas() -> None:
    """Config var changes are listed by name (+ added, ~ changed, - removed), never value."""
    one = release("r1", 1, A="1", B="2")
    two = release("r2", 2, image="shop:2", replicas=3, A="9", C=SECRET)
    assert what_changed(None, one) == "first release; config +A +B"
    changed = what_changed(one, two)
    assert changed == "image shop:1 -> shop:2; config +C ~A -B; replicas 1 -> 3"
    assert SECRET not in changed


def test_versions_are_never_given_twice() -> None:
    """The next version is one past the counter key, or past the history when the
    counter is missing; a record with a bad version is refused when read."""
    record = release("r1", 4).to_json()
    snapshot = Snapshot(9, {"apps/shop/history/r1": KeyValue(record, 1, 1)})
    assert releases.next_version(snapshot, "shop") == (5, 0)
    counted = {**snapshot.kvs, "apps/shop/version": KeyValue(b"7", 2, 8)}
    assert releases.next_version(Snapshot(9, counted), "shop") == (8, 8)
    bad = json.loads(record)
    bad["version"] = 0
    with pytest.raises(InvalidValue, match="version 0"):
        Release.from_json("r1", json.dumps(bad).encode())
    assert releases.by_version([release("r1", 4)], "v4") is not None
    assert releases.by_version([release("r1", 4)], "v44") is None


def test_config_routes_its_first_argument_to_show_unless_it_names_a_subcommand() -> None:
    """`routerd config shop` shows; `routerd config set shop ...` sets."""
    import click

    from routerd.deploy.lifecycle import config

    assert isinstance(config, DefaultGroup)
    ctx = click.Context(config)
    assert config.resolve_command(ctx, ["shop"])[0] == "show"
    assert config.resolve_command(ctx, ["set", "shop", "A=1"])[0] == "set"
