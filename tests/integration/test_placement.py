"""Placement across Docker hosts: four real engines (one dockerd each, see
tests/engines.py), real etcd, a real ``routerd run`` with nginx, and
``routerd deploy|scale|hosts|gc|status`` as subprocesses.

The hosts are tagged as the platform's cloud-init tags them: shared hosts
``dataPlane=true,routerMesh=true,high=false``, dedicated ones
``dataPlane=true,high=true``, and ``pools/shared`` and ``pools/dedicated``
name those tags; each host also has a ``zone`` tag for constraints. Each
is registered with 2 CPUs and 2048 MB (every engine here reports the whole
machine). dedicated-b's engine is reached over tcp:// with TLS, the others
by their unix sockets. Each test uses its own app; its containers are removed on every
engine afterwards, so a test never counts another's reservations.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from typing import Any

import pytest
from deploy_helpers import IMAGE, Deploy, Load, deploy_args, release_of, run
from engines import Engine
from helpers import PREFIX, app_config, config_key, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.docker]

SHARED_TAGS = {"dataPlane": "true", "routerMesh": "true", "high": "false"}
DEDICATED_TAGS = {"dataPlane": "true", "high": "true"}
TAGS = {
    "shared-a": {**SHARED_TAGS, "zone": "a"},
    "shared-b": {**SHARED_TAGS, "zone": "b"},
    "dedicated-a": {**DEDICATED_TAGS, "zone": "a"},
    "dedicated-b": {**DEDICATED_TAGS, "zone": "b"},
}
CAPACITY = {"cpus": 2, "memory_mb": 2048}


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def fleet(docker_engines: list[Engine], etcd: Any) -> dict[str, Engine]:
    """Every engine running and registered under hosts/, and both pools."""
    for engine in docker_engines:
        engine.ensure_running()
        record = {**engine.registration(), "tags": TAGS[engine.name], "capacity": CAPACITY}
        etcd.put_json(f"{PREFIX}/hosts/{engine.name}", record)
    etcd.put_json(f"{PREFIX}/pools/shared", {"hosts": SHARED_TAGS})
    etcd.put_json(f"{PREFIX}/pools/dedicated", {"hosts": DEDICATED_TAGS})
    return {engine.name: engine for engine in docker_engines}


@pytest.fixture
def app(fleet: dict[str, Engine], etcd: Any) -> Any:
    """A fresh app of pool shared; its containers go from every engine afterwards."""
    name = f"shop-{secrets.token_hex(3)}"
    etcd.put(config_key(name), app_config([f"{name}.test"]))
    yield name
    for engine in fleet.values():
        engine.remove_app(name)
        engine.remove_named(f"busy-{name}")


def deploy(etcd: Any, app: str, *, expect: int = 0, **kwargs: Any) -> Deploy:
    done = run(etcd.endpoint, "deploy", *deploy_args(app, **kwargs))
    assert done.proc.returncode == expect, done.output
    return done


def cli(etcd: Any, command: str, *args: str, expect: int = 0) -> Deploy:
    done = run(etcd.endpoint, command, *args)
    assert done.proc.returncode == expect, done.output
    return done


def placed(fleet: dict[str, Engine], app: str) -> Counter[str]:
    """How many of the app's containers each running engine has."""
    found = Counter({n: len(e.containers(app)) for n, e in fleet.items() if e.running})
    return +found  # without the hosts that have none


def instances(etcd: Any, app: str) -> dict[str, str]:
    base = f"{PREFIX}/apps/{app}/releases/"
    return {k[len(base) :]: v for k, v in etcd.get_prefix(base).items()}


def busy(engine: Engine, app: str, cpus: float) -> Any:
    """A container started outside routerd (no routerd label) reserving ``cpus``."""
    return engine.client.containers.run(
        IMAGE,
        ["/bin/sleep", "600"],
        name=f"busy-{app}",
        detach=True,
        init=True,
        network_mode="host",
        nano_cpus=round(cpus * 1e9),
    )


def history(etcd: Any, app: str, release: str) -> dict[str, Any]:
    return json.loads(etcd.get(f"{PREFIX}/apps/{app}/history/{release}") or "{}")


# ---------------------------------------------------------------- hosts


def test_hosts_add_ls_cordon_and_rm(etcd, fleet, app):
    """``hosts add`` checks and reaches the engine (capacity from docker info
    when not given; tags as cloud-init writes them), ``hosts ls`` shows the
    balance with what others' containers reserve, cordon and rm take effect."""
    etcd.delete_prefix(f"{PREFIX}/hosts/")
    a, b = fleet["shared-a"], fleet["shared-b"]
    added = cli(
        etcd, "hosts", "add", "shared-a", "--docker", a.url, "--address", a.address,
        "--tag", "dataPlane=true,routerMesh=true,high=false", "--tag", "zone=a",
        "--cpus", "2", "--memory", "2048",
    )  # fmt: skip
    assert "host shared-a added" in added.output
    cli(etcd, "hosts", "add", "shared-b", "--docker", b.url, "--address", b.address)
    record = json.loads(etcd.get(f"{PREFIX}/hosts/shared-b") or "{}")
    assert record["capacity"]["cpus"] == b.client.info()["NCPU"]
    refused = cli(etcd, "hosts", "add", "shared-b", "--docker", b.url, "--address", "x", expect=1)
    assert "exists already" in refused.output
    down = cli(
        etcd, "hosts", "add", "gone", "--docker", "unix:///nonexistent.sock", "--address", "a",
        expect=1,
    )  # fmt: skip
    assert "--docker unix:///nonexistent.sock" in down.output
    remote = fleet["dedicated-b"]  # its engine also listens on tcp:// with TLS
    tls = remote.registration()["tls"]
    plain = cli(
        etcd, "hosts", "add", "remote", "--docker", remote.tcp_url, "--address", remote.address,
        expect=1,
    )  # fmt: skip
    assert f"--docker {remote.tcp_url}" in plain.output
    cli(
        etcd, "hosts", "add", "remote", "--docker", remote.tcp_url, "--address", remote.address,
        "--tls-ca", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"],
    )  # fmt: skip
    assert json.loads(etcd.get(f"{PREFIX}/hosts/remote") or "{}")["tls"] == tls
    busy(a, app, 1.5)

    table = cli(etcd, "hosts", "ls").lines
    assert table[0].split()[:3] == ["HOST", "STATE", "TAGS"]
    assert next(line for line in table if line.startswith("remote")).split()[1] == "ready"
    row_a = next(line for line in table if line.startswith("shared-a"))
    assert "ready" in row_a and "high=false" in row_a and "zone=a" in row_a
    assert "2.00 CPU 2048 MB" in row_a  # capacity
    assert "1.50 CPU 256 MB" in row_a  # the outside container: 1.5 CPU, default memory
    assert "[########..]  75%" in row_a

    cli(etcd, "hosts", "cordon", "shared-a")
    assert "cordoned" in next(x for x in cli(etcd, "hosts", "ls").lines if "shared-a" in x)
    cli(etcd, "hosts", "uncordon", "shared-a")
    cli(etcd, "hosts", "rm", "shared-b")
    assert etcd.get(f"{PREFIX}/hosts/shared-b") is None


# ---------------------------------------------------------------- placement


def test_each_pool_runs_on_its_own_hosts_with_replicas_spread(etcd, routerd, fleet, app):
    """A shared app's replicas land one per shared host, a dedicated app's one
    per dedicated host; instances are registered at each host's address with
    Docker limits set from --cpus/--memory, and a rollback keeps them."""
    router = routerd()
    limits = ["--cpus", "0.5", "--memory", "64"]
    first = release_of(deploy(etcd, app, env={"MESSAGE": "one"}, extra=limits))

    assert placed(fleet, app) == {"shared-a": 1, "shared-b": 1}
    hosts = sorted(address.split(":")[0] for address in instances(etcd, app).values())
    assert hosts == ["127.0.0.2", "127.0.0.3"]
    assert router.http(f"{app}.test").text.split() == [app, first, "one"]
    (container, *_) = fleet["shared-a"].containers(app)
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert container.attrs["HostConfig"]["Memory"] == 64 * 2**20

    deploy(etcd, app, env={"MESSAGE": "two"})
    back = cli(etcd, "rollback", app, "--drain", "0.5", "--stop-timeout", "5")
    assert placed(fleet, app) == {"shared-a": 1, "shared-b": 1}
    (container, *_) = fleet["shared-b"].containers(app)
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert history(etcd, app, release_of(back))["memory_mb"] == 64

    dedicated = f"{app}-d"
    etcd.put(config_key(dedicated), app_config([f"{dedicated}.test"], pool="dedicated"))
    try:
        deploy(etcd, dedicated, extra=["--no-wait-routers"])
        assert placed(fleet, dedicated) == {"dedicated-a": 1, "dedicated-b": 1}
    finally:
        for engine in fleet.values():
            engine.remove_app(dedicated)


def test_the_most_free_host_wins_and_the_old_release_counts(etcd, routerd, fleet, app):
    """A container started outside routerd makes shared-a busy, so the release
    goes to shared-b; a next release that cannot fit beside the old one (which
    still runs during a blue-green deploy) fails before step 1, naming the
    shortfall, and starts nothing."""
    router = routerd()
    busy(fleet["shared-a"], app, 1.5)
    done = deploy(etcd, app, replicas=1, extra=["--cpus", "1.25"])
    first = release_of(done)
    assert placed(fleet, app) == {"shared-b": 1}
    assert "placement: needs 1 x 1.25 CPU, 256 MB in pool shared: shared-b x1" in done.output

    refused = deploy(etcd, app, replicas=1, expect=1, extra=["--cpus", "1.25"])

    assert (
        "needs 1 x 1.25 CPU, 256 MB in pool shared: 0 host(s) fit, "
        "shared-a has 0.5 CPU, 1792 MB free, shared-b has 0.75 CPU, 1792 MB free, "
        "2 other host(s) are not in pool shared"
    ) in refused.output
    assert "[1/6]" not in refused.output
    assert placed(fleet, app) == {"shared-b": 1}
    assert {k.split("/")[0] for k in instances(etcd, app)} == {first}
    assert router.http(f"{app}.test").text.split()[1] == first


def test_a_stopped_engine_is_skipped_unless_the_deploy_needs_it(etcd, routerd, fleet, app):
    """With shared-b's engine down, a deploy places both replicas on shared-a
    and says so; one constrained to zone b fails cleanly before anything
    starts; status and gc name the host they could not look at."""
    router = routerd()
    fleet["shared-b"].stop()

    done = deploy(etcd, app)
    assert "host shared-b is unreachable" in done.output
    assert placed(fleet, app) == {"shared-a": 2}
    first = release_of(done)

    refused = deploy(etcd, app, expect=1, extra=["--constraint", "zone=b"])
    assert "in pool shared with zone=b: 0 host(s) fit" in refused.output
    assert "shared-a does not carry zone=b" in refused.output
    assert "shared-b is unreachable" in refused.output
    assert "[1/6]" not in refused.output
    assert placed(fleet, app) == {"shared-a": 2}
    assert router.http(f"{app}.test").text.split()[1] == first

    status = cli(etcd, "status", app)
    assert f"routerd-{app}-{first}-0" in status.output and "host=shared-a" in status.output
    assert "not looked at: shared-b" in status.output
    gc = cli(etcd, "gc", app, expect=1)
    assert "host shared-b not looked at" in gc.output


def test_an_engine_stopped_mid_deploy_rolls_back(etcd, routerd, fleet, app):
    """The engine of one of the new release's hosts stops while its containers
    start: the deploy fails at step 1 and rolls back, the old release serves,
    the rollback names what it left on the stopped host, and gc removes that
    (and an orphan on another host) once the engine is back."""
    router = routerd()
    first = release_of(deploy(etcd, app, replicas=1, extra=["--constraint", "zone=a"]))
    assert placed(fleet, app) == {"shared-a": 1}

    second = Deploy(etcd.endpoint, "deploy", *deploy_args(app, env={"DELAY": "3"}))
    second.wait_line("[1/6] start:")
    wait_for(lambda: fleet["shared-b"].containers(app), 10, message="a container on shared-b")
    fleet["shared-b"].stop()

    assert second.wait() == 1, second.output
    assert "failed at step 1 (start)" in second.output
    assert f"containers of {release_of(second)} on shared-b" in second.output
    assert router.http(f"{app}.test").text.split()[1] == first
    assert {k.split("/")[0] for k in instances(etcd, app)} == {first}
    assert placed(fleet, app) == {"shared-a": 1}

    fleet["shared-b"].ensure_running()
    orphan = fleet["dedicated-a"].client.containers.create(
        IMAGE, labels={"routerd.app": app, "routerd.release": "unknown"}
    )
    gc = cli(etcd, "gc", app)
    assert f"removing routerd-{app}-{release_of(second)}-0 on shared-b" in gc.output
    assert "on dedicated-a" in gc.output and orphan.name in gc.output
    assert fleet["shared-b"].containers(app) == [] and fleet["dedicated-a"].containers(app) == []
    assert router.http(f"{app}.test").text.split()[1] == first


# ---------------------------------------------------------------- scale


def test_scale_up_and_down_under_traffic_fails_no_request(etcd, routerd, fleet, app):
    """``routerd scale`` adds containers where placement says (the host without
    one of the release first) and takes them out from the host with the most
    (deregister, routers confirm, drain, stop), while requests run through
    nginx: not one fails."""
    router = routerd()
    release = release_of(deploy(etcd, app, replicas=1))
    assert placed(fleet, app) == {"shared-a": 1}  # both empty: ties go by name
    with Load(router, f"{app}.test") as load:
        time.sleep(0.3)
        up = cli(etcd, "scale", app, "3", "--drain", "0.5", "--stop-timeout", "5")
        assert placed(fleet, app) == {"shared-a": 2, "shared-b": 1}
        assert len(instances(etcd, app)) == 3
        assert history(etcd, app, release)["replicas"] == 3
        time.sleep(0.5)
        down = cli(etcd, "scale", app, "1", "--drain", "0.5", "--stop-timeout", "5")
        time.sleep(0.3)

    assert "[3/3] confirm: done" in up.output, up.output
    for step in ("[1/4] deregister: done", "[2/4] confirm: done", "[4/4] stop: done"):
        assert step in down.output, down.output
    assert load.failures == []
    assert sum(load.ok.values()) > 50
    assert placed(fleet, app) == {"shared-a": 1}
    assert len(instances(etcd, app)) == 1
    assert history(etcd, app, release)["replicas"] == 1

    refused = cli(etcd, "hosts", "rm", "shared-a", expect=1)
    assert "runs routerd's containers" in refused.output
