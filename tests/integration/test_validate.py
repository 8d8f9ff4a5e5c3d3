"""The order of the two checks: crossplane's verdict is the one reported.

crossplane and ``nginx -t`` run side by side on every candidate. When both
refuse it, for different faults, which one finished first must not decide
the error a person reads: crossplane's is reported, every time.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from helpers import REPO, require_binary

from routerd.errors import ValidationError
from routerd.router.guards import RefusedCandidates
from routerd.router.metrics import Metrics
from routerd.router.model import App, Options, RoutingTable
from routerd.router.pipeline import Router
from routerd.router.render import shard_of
from routerd.router.settings import NginxSettings, Settings
from routerd.settings import EtcdSettings

pytestmark = pytest.mark.integration
APPS = [f"app{number:04d}" for number in range(2000)]


def last_parsed() -> str:
    """An app in the shard crossplane parses last (shards go in order of first use)."""
    first_of: dict[int, str] = {}
    for name in APPS:
        first_of.setdefault(shard_of(name), name)
    return list(first_of.values())[-1]


def router_in(tmp_path: Path) -> Router:
    """A router whose app template gives APPS[0] a fault only nginx -t sees (an ssl
    listener without a certificate) and the last-parsed app one only crossplane
    sees (an include in an app file)."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "nginx", templates)
    with (templates / "app.conf.j2").open("a") as handle:
        handle.write(
            f'{{% if app.name == "{APPS[0]}" %}}\n'
            "server { listen 127.0.0.1:4 ssl; server_name nginx-only.invalid; }\n"
            f'{{% elif app.name == "{last_parsed()}" %}}\n'
            "include /dev/null;\n"
            "{% endif %}\n"
        )
    conf = tmp_path / "conf" / "nginx.conf"
    conf.parent.mkdir()
    nginx = NginxSettings(
        conf=conf,
        runtime_dir=conf.parent,
        binary=require_binary("nginx"),
        supervise=True,
        templates=templates,
        http_listen="127.0.0.1:1",
        https_listen="127.0.0.1:2",
        status_listen="127.0.0.1:3",
    )
    settings = Settings(etcd=EtcdSettings(), nginx=nginx, dynamic_backends="off")
    return Router.create(settings, Metrics())


def test_when_both_checks_refuse_crossplane_is_reported(tmp_path: Path) -> None:
    """crossplane needs longer here (2,000 apps in 256 files) than nginx -t needs to
    find its fault, yet every validation reports crossplane's error."""
    router = router_in(tmp_path)
    apps = tuple(App(name, (f"{name}.example.com",), Options(), ()) for name in APPS)
    rendered = router.renderer.render(RoutingTable(1, apps))
    errors = set()
    for _ in range(3):
        router.refused = RefusedCandidates()  # validate afresh, not from the cache
        with pytest.raises(ValidationError) as caught:
            asyncio.run(router.stage_and_validate(rendered))
        errors.add(str(caught.value).split(" (candidate kept in")[0])
    assert len(errors) == 1, errors
    assert '"include" is not allowed' in errors.pop()
