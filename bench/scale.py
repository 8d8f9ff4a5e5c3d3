"""Full render plus validation at scale, stage by stage, and routerd's peak RSS.

In-process, the same calls the daemon makes on a cold start: model load,
render, write the shard files, crossplane on every shard beside `nginx -t`
of the whole config (run concurrently, as the daemon does). Then the real
daemon is started against etcd holding the same apps, and its peak RSS
(VmHWM) is read once the config is live.

    python bench/scale.py [--apps 10000] [--instances 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, http_get, wait_until

from routerd.router import validate
from routerd.router.backends import Backends, detect_lua
from routerd.router.install import Installer
from routerd.router.loader import Loader
from routerd.router.master import Master
from routerd.router.render import Layout, Renderer
from routerd.router.settings import PACKAGE_TEMPLATES
from routerd.store import KeyValue, Snapshot


def snapshot(apps: int, instances: int) -> Snapshot:
    kvs = {}
    revision = 1
    for i in range(apps):
        name = f"app{i:05d}"
        kvs[f"apps/{name}/config"] = KeyValue(
            json.dumps({"domains": [f"{name}.example.com", f"www.{name}.example.com"]}).encode(),
            revision,
            revision,
        )
        for j in range(instances):
            kvs[f"apps/{name}/releases/v1/web{j}"] = KeyValue(
                f"10.{j}.{i // 250}.{i % 250 + 1}:5000".encode(), revision, revision
            )
        revision += 1
    return Snapshot(revision, kvs)


def cold_apply(apps: int, instances: int, dynamic: bool) -> dict[str, float]:
    snap = snapshot(apps, instances)
    folder = Path(tempfile.mkdtemp(prefix="routerd-scale-"))
    conf = folder / "nginx.conf"
    lua = None
    if dynamic:
        support = detect_lua("nginx")
        assert support is not None, "this nginx has no Lua module"
        backends = Backends(state_dir=folder / "routerd", runtime_dir=folder,
                            templates=PACKAGE_TEMPLATES)  # fmt: skip
        backends.prepare()
        lua = backends.layout(support)
    layout = Layout(
        "127.0.0.1:18080",
        "127.0.0.1:18443",
        "127.0.0.1:18081",
        str(folder),
        str(folder / "nginx.pid"),
        lua,
    )
    Master(
        binary="nginx", conf=conf, runtime_dir=folder, supervise=True, pid_file=folder / "nginx.pid"
    ).prepare_runtime()
    times: dict[str, float] = {}
    started = time.perf_counter()
    table = Loader(prefix="/routerd", pool="shared").load(snap)
    times["load"] = time.perf_counter() - started
    t = time.perf_counter()
    rendered = Renderer(PACKAGE_TEMPLATES, layout).render(table)
    times["render"] = time.perf_counter() - t
    t = time.perf_counter()
    installer = Installer(conf)
    installer.prepare()
    installer.write_files(rendered)
    staged = installer.stage(rendered)
    times["write"] = time.perf_counter() - t
    t = time.perf_counter()

    def crossplane_all() -> float:
        t0 = time.perf_counter()
        for rel in rendered.shards:
            validate.check_app_file(folder / rel)
        validate.check_main_file(staged, list(rendered.shards))
        return time.perf_counter() - t0

    def nginx_t() -> float:
        t0 = time.perf_counter()
        validate.nginx_test("nginx", staged, folder)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(2) as pool:
        cp, ngx = pool.submit(crossplane_all), pool.submit(nginx_t)
        times["crossplane"], times["nginx -t"] = cp.result(), ngx.result()
    times["validate (both, concurrent)"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - started
    return times


def daemon_rss(apps: int, instances: int, mode: str) -> tuple[float, float]:
    with Bench() as bench:
        bench.load_apps(apps, instances)
        started = time.perf_counter()
        bench.start_routerd("--dynamic-backends", mode)
        bench.wait_ready(timeout=300)
        first_live = time.perf_counter() - started
        host = f"app{apps - 1:05d}.example.com"
        wait_until(lambda: http_get(bench.http_port, host)[0] == 200, 30, "last app served")
        return first_live, bench.routerd_rss_peak_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=10000)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--modes", default="off,on", help="--dynamic-backends values to run")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        label = "reload path" if mode == "off" else "dynamic backends (Lua)"
        print(
            f"{label}: cold render + validate, {args.apps} apps x {args.instances} "
            f"instances, 2 domains each (median of {args.repeat}):"
        )
        runs = [cold_apply(args.apps, args.instances, mode == "on") for _ in range(args.repeat)]
        for stage in runs[0]:
            print(f"  {stage:28s} {statistics.median(r[stage] for r in runs) * 1000:8.0f} ms")
        if not args.skip_daemon:
            first_live, rss = daemon_rss(args.apps, args.instances, mode)
            print(f"  daemon: start to first config live {first_live:.1f} s; peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
