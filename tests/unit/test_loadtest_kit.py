"""The load-test kit's pure parts: targets checked before any load runs, the
summary read back from Locust's files, and the cluster files agreeing with
the locustfile. (tests/integration/test_loadtest.py runs the kit for real.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "deploy" / "loadtest"
sys.path.insert(0, str(KIT))
import report  # noqa: E402
import targets  # noqa: E402


def valid() -> dict[str, object]:
    return {
        "routers": ["http://10.0.0.5:80"],
        "apps": [{"name": "shop", "host": "shop.example.com", "weight": 2, "expect": "shop"}],
    }


def test_a_valid_targets_file_reads_back_whole() -> None:
    """Routers lose a trailing slash; apps keep every field; the JSON form round-trips."""
    data = valid()
    data["routers"] = ["http://10.0.0.5:80/"]
    found = targets.parse(data, "t.json")
    assert found.routers == ("http://10.0.0.5:80",)
    assert found.apps == (targets.App("shop", "shop.example.com", 2, "shop", "/"),)
    assert targets.parse(json.loads(found.to_json()), "again") == found


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"routers": []}, "no router"),
        ({"routers": ["10.0.0.5:80"]}, "not a base URL"),
        ({"routers": ["http://10.0.0.5/x"]}, "not a base URL"),
        ({"apps": []}, "no app"),
        ({"apps": [{"name": "a"}]}, "needs at least"),
        ({"apps": [{"name": "a", "host": "A B"}]}, "not a lowercase host name"),
        ({"apps": [{"name": "a", "host": "a.com", "weight": 0}]}, "weight 0"),
        ({"apps": [{"name": "a", "host": "a.com", "weight": True}]}, "weight True"),
        ({"apps": [{"name": "a", "host": "a.com", "path": "x"}]}, "must start with /"),
        ({"apps": [{"name": "a", "host": "a.com", "colour": "red"}]}, "unknown field"),
        ({"extra": 1}, "must be an object"),
    ],
)
def test_a_bad_targets_entry_is_refused_naming_it(change: dict[str, object], fragment: str) -> None:
    """Every mistake in a targets file stops the run with the file and entry named."""
    with pytest.raises(targets.TargetsError, match=r"t\.json") as caught:
        targets.parse({**valid(), **change}, "t.json")
    assert fragment in str(caught.value)


def test_targets_from_flags_expect_each_app_to_answer_with_its_name() -> None:
    """--app NAME=HOST[:WEIGHT]: the weight is optional, the expected text is the name."""
    found = targets.from_flags("http://a:80,http://b:80", ["shop=shop.example.com:3", "blog=b.io"])
    assert found.routers == ("http://a:80", "http://b:80")
    assert [(a.name, a.weight, a.expect) for a in found.apps] == [
        ("shop", 3, "shop"),
        ("blog", 1, "blog"),
    ]
    with pytest.raises(targets.TargetsError, match="NAME=HOST"):
        targets.from_flags("http://a:80", ["shop=shop.example.com:many"])


def write_run(tmp_path: Path) -> str:
    """Locust's two CSV files and a timeline, as a run with one deploy leaves them."""
    prefix = str(tmp_path / "run")
    header = "Type,Name,Request Count,Failure Count,Requests/s,50%,95%,99%\n"
    Path(f"{prefix}_stats.csv").write_text(
        header + ",shop,100,3,10.0,5,20,40\n" + ",Aggregated,100,3,10.0,5,20,40\n"
    )
    Path(f"{prefix}_failures.csv").write_text(
        "Method,Name,Error,Occurrences\n"
        'GET,shop,"CatchResponseError(""misroute: \'blog\'"")",2\n'
        "GET,shop,CatchResponseError('connection: ConnectionResetError'),1\n"
    )
    quiet = {"n": 10, "fail": {}, "ms": {"5": 9, "6": 1}}
    busy = {"n": 10, "fail": {"connection": 1}, "ms": {"5": 5, "90": 5}}
    timeline = {str(s): busy if 105 <= s <= 106 else quiet for s in range(100, 110)}
    Path(f"{prefix}_timeline.json").write_text(json.dumps(timeline))
    return prefix


def test_the_summary_sets_each_event_beside_the_quiet_seconds(tmp_path: Path) -> None:
    """Failures are grouped by kind; an event's window is its span plus the margin;
    the quiet window is every other second."""
    prefix = write_run(tmp_path)
    summary = report.summarize(prefix, f"{prefix}_timeline.json", [("deploy 1", 105.2, 106.9)], 1)
    assert summary.requests == 100 and summary.rps == 10.0 and summary.p99_ms == 40
    assert summary.failures == {"misroute": 2, "connection": 1}
    (deploy,) = summary.events
    assert (deploy.requests, deploy.failures, deploy.p99_ms) == (40, {"connection": 2}, 90.0)
    assert (summary.quiet.requests, summary.quiet.failures, summary.quiet.p50_ms) == (60, {}, 5.0)
    assert "deploy 1: 40 requests, 2 failed (connection 2)" in "\n".join(summary.lines())


def test_the_cluster_files_run_the_locustfile_with_its_own_flags() -> None:
    """Compose and Kubernetes start a master and workers from the kit's image, the
    workers find the master, and every routerd flag they pass is the locustfile's."""
    compose = (KIT / "compose.yaml").read_text()
    assert "dockerfile: deploy/loadtest/Dockerfile" in compose
    assert (
        '"--master", "--targets-file"' in compose
        and '"--worker", "--master-host", "master"' in compose
    )
    master = (KIT / "kubernetes" / "master.yaml").read_text()
    worker = (KIT / "kubernetes" / "worker.yaml").read_text()
    assert "name: locust-master" in master and '"--master-host", "locust-master"' in worker
    kustomization = (KIT / "kubernetes" / "kustomization.yaml").read_text()
    for resource in ("namespace.yaml", "master.yaml", "worker.yaml", "targets.json"):
        assert resource in kustomization and (KIT / "kubernetes" / resource).is_file()
    locustfile = (KIT / "locustfile.py").read_text()
    assert '"--targets-file"' in locustfile
    for example in (KIT / "targets.json", KIT / "kubernetes" / "targets.json"):
        targets.from_file(str(example))
