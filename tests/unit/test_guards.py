"""The shrink guard and the refused-candidate cache, alone and inside a Router
built from its parts (no nginx run, no folder touched)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from routerd.errors import Held, ValidationError
from routerd.router.guards import MAX_REFUSED, RefusedCandidates, shrink_error
from routerd.router.install import Installer
from routerd.router.master import Master
from routerd.router.metrics import Metrics
from routerd.router.model import App, Options, RoutingTable
from routerd.router.nginx import Nginx
from routerd.router.pipeline import Router
from routerd.router.render import Layout, Rendered, Renderer
from routerd.router.settings import PACKAGE_TEMPLATES, NginxSettings, Settings
from routerd.settings import EtcdSettings


def names(count: int, prefix: str = "app") -> set[str]:
    return {f"{prefix}{i}" for i in range(count)}


# ------------------------------------------------------------ shrink guard


@pytest.mark.parametrize(
    ("served", "now", "held"),
    [
        (None, set(), False),  # nothing known served: nothing to protect
        (set(), set(), False),
        ({"a"}, set(), True),  # every app gone: held, whatever the count
        (names(3), set(), True),
        (names(10), names(5), False),  # exactly half of 10 vanish: applied
        (names(10), names(4), True),  # six of ten vanish: held
        (names(9), names(2), False),  # fewer than 10 served: only "none left" holds
        (names(20), names(10, "new"), True),  # all renamed at once: 20 of 20 vanish
        (names(20), names(20) | names(30, "x"), False),  # growth is never held
    ],
)
def test_shrink_error(served: set[str] | None, now: set[str], held: bool) -> None:
    """Held when all apps vanish, or more than half of at least 10; never on growth."""
    assert (shrink_error(served, now) is not None) == held


def test_shrink_error_says_how_to_override() -> None:
    """The message counts what would vanish and names --allow-shrink."""
    message = shrink_error(names(10), names(3)) or ""
    assert "7 of 10 apps" in message and "--allow-shrink" in message


# ------------------------------------------------------- refused candidates


def test_a_refused_candidate_stays_refused_until_its_time() -> None:
    """for_s=None refuses for good; a timed refusal lapses at its deadline."""
    cache = RefusedCandidates()
    cache.refuse("aa", "nginx -t failed", now=0.0, for_s=None)
    cache.refuse("bb", "rolled back", now=0.0, for_s=30.0)
    assert cache.why("aa", 1e9) == "nginx -t failed"
    assert cache.why("bb", 29.9) == "rolled back"
    assert cache.why("bb", 30.0) is None
    assert cache.why("cc", 0.0) is None


def test_the_cache_is_bounded_dropping_the_oldest() -> None:
    """A flapping input never grows it past its limit; the oldest refusal goes first."""
    cache = RefusedCandidates()
    for number in range(MAX_REFUSED + 5):
        cache.refuse(f"{number:064x}", str(number), now=0.0, for_s=None)
    assert len(cache) == MAX_REFUSED
    assert cache.why(f"{0:064x}", 0.0) is None
    assert cache.why(f"{MAX_REFUSED + 4:064x}", 0.0) == str(MAX_REFUSED + 4)


def test_refusing_again_renews_the_refusal() -> None:
    """A candidate refused anew gets the new reason and deadline, and counts as newest."""
    cache = RefusedCandidates(limit=2)
    cache.refuse("aa", "first", now=0.0, for_s=10.0)
    cache.refuse("bb", "other", now=0.0, for_s=None)
    cache.refuse("aa", "again", now=5.0, for_s=10.0)
    cache.refuse("cc", "third", now=5.0, for_s=None)  # pushes out bb, not the renewed aa
    assert cache.why("aa", 14.0) == "again"
    assert cache.why("bb", 0.0) is None


# ------------------------------------------------------ inside the Router


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(tmp_path: Path, *, allow_shrink: bool = False) -> tuple[Router, Clock]:
    """A Router from its parts: nothing started, detected or created on disk."""
    conf = tmp_path / "conf" / "nginx.conf"
    ns = NginxSettings(conf=conf, runtime_dir=tmp_path / "run")
    settings = Settings(etcd=EtcdSettings(), nginx=ns, allow_shrink=allow_shrink)
    master = Master(
        binary="nginx-never-run",
        conf=conf,
        runtime_dir=ns.runtime_dir,
        supervise=True,
        pid_file=ns.pid_path,
    )
    layout = Layout("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "/run", "/run/nginx.pid")
    clock = Clock()
    built = Router(
        settings,
        Metrics(),
        renderer=Renderer(PACKAGE_TEMPLATES, layout),
        installer=Installer(conf),
        nginx=Nginx(master, status_listen=ns.status_listen, reload_timeout=1),
        clock=clock,
    )
    return built, clock


def table(apps: set[str]) -> RoutingTable:
    made = tuple(App(name, (f"{name}.example.com",), Options(), ()) for name in sorted(apps))
    return RoutingTable(1, made)


def test_a_router_is_built_without_touching_anything(tmp_path: Path) -> None:
    """Constructing a Router runs no nginx and creates no folder."""
    router(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_router_holds_a_snapshot_that_drops_most_apps(tmp_path: Path) -> None:
    """Once it served 12 apps, a table of 3 is Held; --allow-shrink lets it through."""
    guarded, _ = router(tmp_path)
    guarded.served_apps = frozenset(names(12))
    with pytest.raises(Held, match="9 of 12 apps would vanish"):
        guarded.guard_shrink(table(names(3)))
    guarded.guard_shrink(table(names(12) | {"extra"}))

    allowed, _ = router(tmp_path, allow_shrink=True)
    allowed.served_apps = frozenset(names(12))
    allowed.guard_shrink(table(set()))


def test_after_a_restart_the_guard_reads_the_installed_record(tmp_path: Path) -> None:
    """With nothing served in this run, the apps come from the installed generation's
    record, by name: twelve apps renamed at once are held although the count is equal."""
    guarded, _ = router(tmp_path)
    guarded.installer.prepare()
    rendered = Rendered("# x\n", "0" * 64, 12, {}, {}, frozenset(names(12)))
    guarded.installer.install(guarded.installer.stage(rendered))
    with pytest.raises(Held, match="12 of 12"):
        guarded.guard_shrink(table(names(12, "renamed")))


def test_a_refused_candidate_is_refused_again_without_disk_work(tmp_path: Path) -> None:
    """stage_and_validate raises the cached reason before writing any file, until the
    refusal lapses on the router's clock."""
    refusing, clock = router(tmp_path)
    rendered = Rendered("# x\n", "a" * 64, 0, {"routerd/apps/00-x.conf": "server {}\n"}, {})
    refusing.refused.refuse("a" * 64, "nginx said no", now=clock.now, for_s=30)
    with pytest.raises(ValidationError, match="nginx said no"):
        asyncio.run(refusing.stage_and_validate(rendered))
    assert list(tmp_path.iterdir()) == []
    clock.now += 31
    assert refusing.refused.why("a" * 64, clock.now) is None
