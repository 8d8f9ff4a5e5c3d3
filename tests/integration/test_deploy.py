"""The blue-green deploy: real Docker, real etcd, real nginx and
a real ``routerd run``; ``routerd deploy`` runs as a subprocess.

Every failure test ends the same way (``assert_rolled_back``): the old
release serves, no container of the new release is left, its keys are gone,
``active`` is the old release and the deploy lock is released. Containers run
with ``--network host`` (no bridge network here) and each test uses its own
app name, so tests never see each other's containers.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from typing import Any

import pytest
from deploy_helpers import (
    IMAGE,
    Deploy,
    DockerFaults,
    Load,
    app_containers,
    deploy_args,
    docker_socket,
    release_of,
    remove_app_containers,
    revoke_lease_of,
    run,
    served,
)
from helpers import PREFIX, active_key, app_config, config_key, metric_sum, wait_for

from routerd.deploy.engines import Engines
from routerd.deploy.inventory import collect_garbage
from routerd.deploy.runtime import DockerRuntime
from routerd.settings import EtcdSettings, parse_endpoints
from routerd.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.docker]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def app(docker: Any, etcd: Any) -> Any:
    """A fresh app name with a config in etcd; its containers are removed afterwards."""
    name = f"shop-{secrets.token_hex(3)}"
    etcd.put(config_key(name), app_config([f"{name}.test"]))
    yield name
    remove_app_containers(docker, name)


@pytest.fixture
def faults() -> Any:
    """A Docker engine, through a proxy that fails the requests the test names."""
    proxy = DockerFaults(docker_socket())
    yield proxy
    proxy.stop()


def deploy(etcd: Any, app: str, *, expect: int = 0, **kwargs: Any) -> Deploy:
    done = run(etcd.endpoint, "deploy", *deploy_args(app, **kwargs))
    assert done.proc.returncode == expect, done.output
    return done


def keys(etcd: Any, app: str) -> dict[str, str]:
    return {
        k[len(f"{PREFIX}/apps/{app}/") :]: v
        for k, v in etcd.get_prefix(f"{PREFIX}/apps/{app}/").items()
    }


def releases_of(docker: Any, app: str) -> set[str]:
    return {c.labels["routerd.release"] for c in app_containers(docker, app)}


def assert_rolled_back(etcd: Any, docker: Any, router: Any, app: str, old: str, new: str) -> None:
    """The old release serves; nothing of the new one is left; the lock is released."""
    assert served(router, app) == {old: 8}
    assert releases_of(docker, app) == {old}
    wait_for(lambda: "lock" not in keys(etcd, app), 15, message="the deploy lock released")
    left = keys(etcd, app)
    assert left["active"] == old
    assert not [k for k in left if new in k], left


@pytest.fixture
def live(etcd: Any, routerd: Any, app: str) -> tuple[Any, str]:
    """A router serving the app's first release; (router, release)."""
    router = routerd()
    first = release_of(deploy(etcd, app, env={"MESSAGE": "one"}))
    return router, first


# ---------------------------------------------------------------- the six steps


def test_first_deploy_serves_the_new_release(etcd, routerd, docker, app):
    """The first deploy starts labelled containers, registers them as the active
    release, reports the six steps with durations, and the app is served."""
    router = routerd()
    done = deploy(etcd, app, env={"MESSAGE": "one"})
    release = release_of(done)

    for number, name in enumerate(["start", "register", "render", "reload"], 1):
        assert any(line.startswith(f"[{number}/6] {name}: done in ") for line in done.lines)
    assert any(line.startswith("[5/6] switch: nothing to switch from") for line in done.lines)
    assert any(line.startswith("[6/6] destroy: done in ") for line in done.lines)
    assert served(router, app) == {release: 8}
    containers = app_containers(docker, app)
    assert len(containers) == 2
    assert {c.labels["routerd.release"] for c in containers} == {release}
    stored = keys(etcd, app)
    assert stored["active"] == release
    assert len([k for k in stored if k.startswith(f"releases/{release}/")]) == 2
    assert json.loads(stored[f"history/{release}"])["image"] == IMAGE
    assert "lock" not in stored


def test_second_deploy_moves_all_traffic_with_at_most_one_reload(etcd, docker, app, live):
    """A second deploy moves every request to the new release at the cost of at
    most one reload (the switch; none when the router pushes backends to nginx
    without a reload), then removes the old release's keys and containers."""
    router, first = live
    reloads = metric_sum(router.metrics(), "routerd_reloads", 'result="ok"')

    second = release_of(deploy(etcd, app, env={"MESSAGE": "two"}))

    assert served(router, app, 12) == {second: 12}
    assert metric_sum(router.metrics(), "routerd_reloads", 'result="ok"') <= reloads + 1
    assert releases_of(docker, app) == {second}
    stored = keys(etcd, app)
    assert stored["active"] == second
    assert not [k for k in stored if k.startswith(f"releases/{first}/")]
    assert {k for k in stored if k.startswith("history/")} == {
        f"history/{first}",
        f"history/{second}",
    }


def test_rollback_redeploys_the_previous_release_and_status_shows_it(etcd, docker, app, live):
    """``routerd rollback`` makes a new release like the previous one through the
    same steps; ``routerd status <app>`` lists releases, containers and routers."""
    router, first = live
    second = release_of(deploy(etcd, app, env={"MESSAGE": "two"}))

    done = run(etcd.endpoint, "rollback", app, "--drain", "0.5", "--stop-timeout", "5")
    assert done.proc.returncode == 0, done.output
    third = release_of(done)

    answer = router.http(f"{app}.test")
    assert answer.text.split() == [app, third, "one"]
    assert releases_of(docker, app) == {third}
    history = json.loads(keys(etcd, app)[f"history/{third}"])
    assert history["rollback_of"] == first
    assert history["env"] == {"MESSAGE": "one"}

    status = run(etcd.endpoint, "status", app)
    assert status.proc.returncode == 0, status.output
    for fragment in (first, second, f"*{third}", f"routerd-{app}-{third}-0", "running"):
        assert fragment in status.output
    assert f"test-router: serves {third}" in status.output


def test_a_second_deploy_of_the_same_app_is_refused_with_the_holder(etcd, routerd, docker, app):
    """While a deploy holds the app's lock, another one fails at once, naming the holder."""
    routerd()
    slow = Deploy(etcd.endpoint, "deploy", *deploy_args(app, env={"DELAY": "2"}))
    slow.wait_line("[1/6] start:")

    refused = run(etcd.endpoint, "deploy", *deploy_args(app))

    assert refused.proc.returncode == 1
    assert "another deploy of" in refused.output and "pid" in refused.output
    assert slow.wait() == 0, slow.output


def test_deploy_without_routers_needs_no_wait_routers(etcd, docker, app):
    """No live router in the pool fails the deploy before it starts anything,
    unless --no-wait-routers."""
    failed = deploy(etcd, app, expect=1)
    assert "no live router in pool shared" in failed.output
    assert "[1/6]" not in failed.output
    assert releases_of(docker, app) == set()
    assert set(keys(etcd, app)) == {"config"}

    done = deploy(etcd, app, extra=["--no-wait-routers"])
    assert "[3/6] render: skipped (--no-wait-routers)" in done.output
    assert keys(etcd, app)["active"] == release_of(done)


# ---------------------------------------------------------------- failures


def test_containers_that_never_become_healthy_roll_back(etcd, docker, app, live):
    """A release whose containers never answer the health path fails at step 1."""
    router, first = live
    failed = deploy(
        etcd, app, expect=1, extra=["--health-path", "/missing", "--health-timeout", "1.5"]
    )
    assert "failed at step 1 (start)" in failed.output
    assert "did not answer /missing" in failed.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(failed))


def test_a_container_that_dies_right_after_start_rolls_back(etcd, docker, app, live):
    """A container that exits is noticed at once, with its exit code and output."""
    router, first = live
    failed = deploy(etcd, app, expect=1, env={"DIE": "3"})
    assert "failed at step 1 (start)" in failed.output
    assert "exited with code 3" in failed.output and "dying with code 3" in failed.output
    assert failed.elapsed < 8
    assert_rolled_back(etcd, docker, router, app, first, release_of(failed))


def test_no_router_acknowledging_rolls_back(etcd, docker, app, live):
    """A live router that does not process the registration in time fails step 3,
    and the new release is undone."""
    router, first = live
    router.freeze()
    failed = deploy(etcd, app, expect=1, extra=["--router-timeout", "1"])
    router.thaw()
    assert "failed at step 3 (render)" in failed.output
    assert "did not report revision" in failed.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(failed))


def test_a_router_that_rejects_the_app_rolls_back(etcd, docker, app, live):
    """A router reporting an error about the app fails step 4; it keeps serving the old."""
    router, first = live
    revision = etcd.put(config_key(app), json.dumps({"domains": [f"{app}.test"], "bogus": 1}))
    router.wait_applied(revision)

    failed = deploy(etcd, app, expect=1)

    assert "failed at step 4 (reload)" in failed.output
    assert "rejected" in failed.output and "bogus" in failed.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(failed))


def test_losing_the_switch_race_rolls_back(etcd, docker, app, live):
    """If ``active`` changes while the deploy runs, the switch is refused and undone."""
    router, first = live
    racing = Deploy(etcd.endpoint, "deploy", *deploy_args(app, env={"DELAY": "1"}))
    racing.wait_line("[1/6] start:")
    etcd.put(active_key(app), first)  # someone else writes active meanwhile

    assert racing.wait() == 1, racing.output
    assert "failed at step 5 (switch)" in racing.output
    assert "changed by someone else" in racing.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(racing))


def test_etcd_stopped_mid_deploy_rolls_back_when_it_returns(etcd, docker, app, live):
    """etcd going away fails the deploy; the rollback retries until etcd is back."""
    router, first = live
    broken = Deploy(etcd.endpoint, "deploy", *deploy_args(app, env={"DELAY": "1"}))
    broken.wait_line("[1/6] start:")
    etcd.stop()
    broken.wait_line("[2/6] register: failed", timeout=30)
    time.sleep(1)
    etcd.start()

    assert broken.wait() == 1, broken.output
    assert "failed at step 2 (register)" in broken.output
    assert "rolled back;" in broken.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(broken))


@pytest.mark.parametrize("moment", ["[1/6] start:", "[6/6] destroy:"])
def test_sigterm_mid_deploy_rolls_back(etcd, docker, app, live, moment):
    """SIGTERM while containers start, or during the drain after the switch,
    undoes the deploy: active goes back before the new containers stop."""
    router, first = live
    env = {"DELAY": "1"} if moment.startswith("[1/6]") else {}
    stopped = Deploy(etcd.endpoint, "deploy", *deploy_args(app, env=env, extra=["--drain", "5"]))
    stopped.wait_line(moment)
    time.sleep(0.3)
    stopped.signal(signal.SIGTERM)

    assert stopped.wait() == 130, stopped.output
    assert "interrupted: rolling back" in stopped.output
    if moment.startswith("[6/6]"):
        assert "rollback: active is" in stopped.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(stopped))


def test_a_crashed_deploy_expires_its_lock_and_gc_cleans_up(etcd, routerd, docker, app, live):
    """A controller killed mid-deploy leaves its lock to expire with its lease;
    ``routerd gc`` then deregisters the release it left and removes its
    containers, and those of releases etcd never knew; deploys work again."""
    router, first = live
    router.freeze()  # step 3 waits for a router that does not move on
    crashed = Deploy(etcd.endpoint, "deploy", *deploy_args(app))
    crashed.wait_line("[3/6] render: waiting")
    crashed.signal(signal.SIGKILL)
    crashed.wait()
    router.thaw()
    orphan = docker.containers.create(
        IMAGE, labels={"routerd.app": app, "routerd.release": "unknown"}
    )

    refused = run(etcd.endpoint, "deploy", *deploy_args(app))
    assert refused.proc.returncode == 1 and "another deploy of" in refused.output
    wait_for(lambda: "lock" not in keys(etcd, app), 20, message="the dead deploy's lock expiring")
    done = run(etcd.endpoint, "gc", app)

    assert done.proc.returncode == 0, done.output
    assert f"release {release_of(crashed)} is registered but not active" in done.output
    assert "removed 3 container(s)" in done.output
    assert orphan.id not in {c.id for c in app_containers(docker, app)}
    assert_rolled_back(etcd, docker, router, app, first, release_of(crashed))
    assert served(router, app) == {first: 8}
    deploy(etcd, app)


@pytest.mark.parametrize("how", ["500", "drop"])
def test_a_docker_error_mid_deploy_still_rolls_back(etcd, docker, app, live, faults, how):
    """The engine answering 500, or dropping the connection (docker-py passes
    that on unwrapped), fails step 1 with a one-line reason; the rollback
    still runs and removes the new containers."""
    router, first = live
    faults.fail(r"^GET /v[\d.]+/containers/\w+/logs", how)  # a dead container's output
    extra = ["--docker-host", faults.url]
    failed = deploy(etcd, app, expect=1, env={"DIE": "3"}, extra=extra)
    assert faults.hits
    assert "failed at step 1 (start)" in failed.output
    assert "cannot read the output of" in failed.output
    assert "Traceback" not in failed.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(failed))


def test_a_lock_lost_before_the_destroy_rolls_back(etcd, docker, app, live):
    """When the deploy lock's lease is gone by the end of the drain (etcd
    expired it), step 6 removes nothing and the deploy is rolled back: another
    deploy may hold the app by then."""
    router, first = live
    running = Deploy(etcd.endpoint, "deploy", *deploy_args(app, extra=["--drain", "1.5"]))
    running.wait_line("[6/6] destroy:")
    revoke_lease_of(etcd, f"{PREFIX}/apps/{app}/lock")

    assert running.wait() == 1, running.output
    assert "failed at step 6 (destroy)" in running.output
    assert "lock of" in running.output and "no longer ours" in running.output
    assert_rolled_back(etcd, docker, router, app, first, release_of(running))


def test_a_rollback_the_routers_do_not_confirm_keeps_the_new_containers(etcd, docker, app, live):
    """If the routers do not confirm that ``active`` is back on the old release,
    the rollback keeps the new containers running (they may still get traffic)
    and names them; ``routerd gc`` removes them once the routers caught up."""
    router, first = live
    extra = ["--drain", "5", "--router-timeout", "1.5"]
    stopped = Deploy(etcd.endpoint, "deploy", *deploy_args(app, extra=extra))
    stopped.wait_line("[6/6] destroy:")
    router.freeze()  # its nginx keeps serving the new release
    stopped.signal(signal.SIGTERM)
    try:
        assert stopped.wait() == 130, stopped.output
        second = release_of(stopped)
        assert "rollback: active is" in stopped.output
        assert f"containers of {second} left running" in stopped.output
        assert f"routerd-{app}-{second}-0" in stopped.output
        assert f"routerd gc {app}" in stopped.output
        assert served(router, app) == {second: 8}  # no request cut
    finally:
        router.thaw()
    router.wait_applied(etcd.revision())
    assert served(router, app) == {first: 8}
    assert releases_of(docker, app) == {first, second}

    done = run(etcd.endpoint, "gc", app)
    assert done.proc.returncode == 0, done.output
    assert_rolled_back(etcd, docker, router, app, first, second)


def test_rollback_refuses_a_history_record_that_fails_validation(etcd, docker, app, live):
    """A history record read back from etcd is validated before a rollback makes
    anything of it: a health path that would probe another host is refused,
    naming the key, and nothing starts."""
    router, first = live
    second = release_of(deploy(etcd, app, env={"MESSAGE": "two"}))
    key = f"{PREFIX}/apps/{app}/history/{first}"
    record = json.loads(etcd.get(key) or "{}")
    etcd.put(key, json.dumps({**record, "health_path": "@other.host/"}))

    done = run(etcd.endpoint, "rollback", app, "--health-timeout", "2", "--drain", "0.5")

    assert done.proc.returncode == 1, done.output
    assert f"history record {key} is invalid: health_path '@other.host/'" in done.output
    assert "[1/6]" not in done.output
    assert releases_of(docker, app) == {second}
    assert served(router, app) == {second: 8}


def test_scale_without_hosts_uses_the_one_engine(etcd, docker, app, live):
    """With no hosts registered, ``routerd scale`` adds containers of the active
    release on the local engine and takes the newest out again; the router
    serves throughout and the history record keeps the count."""
    router, first = live
    up = run(etcd.endpoint, "scale", app, "3", "--drain", "0.5", "--stop-timeout", "5")
    assert up.proc.returncode == 0, up.output
    assert len([k for k in keys(etcd, app) if k.startswith(f"releases/{first}/")]) == 3
    names = sorted(c.name for c in app_containers(docker, app))
    assert names == [f"routerd-{app}-{first}-{n}" for n in range(3)]
    assert json.loads(keys(etcd, app)[f"history/{first}"])["replicas"] == 3

    down = run(etcd.endpoint, "scale", app, "1", "--drain", "0.5", "--stop-timeout", "5")
    assert down.proc.returncode == 0, down.output
    assert [c.name for c in app_containers(docker, app)] == [f"routerd-{app}-{first}-0"]
    assert len([k for k in keys(etcd, app) if k.startswith(f"releases/{first}/")]) == 1
    assert served(router, app) == {first: 8}


# ---------------------------------------------------------------- gc


def test_gc_leaves_the_containers_of_an_app_etcd_does_not_know(etcd, docker, app):
    """Containers of an app with no config under the prefix (another
    installation's, or a wrong --prefix) are listed, not removed; forced, they go."""
    foreign = f"other-{secrets.token_hex(3)}"
    container = docker.containers.create(
        IMAGE, labels={"routerd.app": foreign, "routerd.release": "r1"}
    )
    try:
        done = run(etcd.endpoint, "gc", foreign)
        assert done.proc.returncode == 0, done.output
        assert f"skipped {foreign}: etcd has no {PREFIX}/apps/{foreign}/config" in done.output
        assert "would remove" in done.output and "--force" in done.output
        assert [c.id for c in app_containers(docker, foreign)] == [container.id]

        said: list[str] = []
        removed = asyncio.run(_gc(etcd, foreign, said.append, force=True))
        assert removed == 1, said
        assert app_containers(docker, foreign) == []
    finally:
        remove_app_containers(docker, foreign)


async def _gc(etcd: Any, app: str, say: Any, **options: Any) -> int:
    settings = EtcdSettings(endpoints=parse_endpoints("--etcd", etcd.endpoint), prefix=PREFIX)
    store = Store(settings)
    try:
        engines = Engines.local(DockerRuntime())
        return await collect_garbage(store, engines, app=app, say=say, **options)
    finally:
        await store.close()


def test_gc_goes_on_past_a_container_it_cannot_remove(etcd, docker, app, faults):
    """One container the engine fails to remove is reported; gc removes the
    others and exits non-zero."""
    stuck, _ = (
        docker.containers.create(
            IMAGE,
            name=f"routerd-{app}-gone-{n}",
            labels={"routerd.app": app, "routerd.release": "gone"},
        )
        for n in range(2)
    )
    faults.fail(rf"^DELETE /v[\d.]+/containers/{stuck.id}", "500")

    done = run(etcd.endpoint, "gc", app, "--docker-host", faults.url)

    assert done.proc.returncode == 1, done.output
    assert f"could not remove routerd-{app}-gone-0" in done.output
    assert "Traceback" not in done.output
    assert [c.id for c in app_containers(docker, app)] == [stuck.id]


# ---------------------------------------------------------------- zero downtime


def test_no_request_fails_during_deploys_and_a_rollback(etcd, docker, app, live):
    """Requests on new connections run through nginx during three deploys and a
    rollback: every one answers 200, and each release in turn takes the traffic."""
    router, first = live
    made = [first]
    with Load(router, f"{app}.test") as load:
        for number in range(3):
            made.append(release_of(deploy(etcd, app, env={"MESSAGE": f"v{number}"})))
            time.sleep(0.3)
        done = run(etcd.endpoint, "rollback", app, "--drain", "0.5", "--stop-timeout", "5")
        assert done.proc.returncode == 0, done.output
        made.append(release_of(done))
        time.sleep(0.3)

    assert load.failures == []
    assert set(load.ok) == set(made), load.ok
    assert sum(load.ok.values()) > 100
