"""What a user saw: the summary of one load-test run, from Locust's own CSV
files and the per-second timeline the locustfile writes.

    summary = summarize(csv_prefix, timeline_path, events)

``events`` are (label, started, ended) wall-clock times of the deploys or
config changes run meanwhile; for each, the failures and latencies of the
requests that started in the seconds around it (``margin`` before and
after) are set beside the quiet seconds' figures. Pure reading: runs
nothing.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MARGIN_S = 2


@dataclass(frozen=True)
class Window:
    label: str
    requests: int
    failures: dict[str, int]
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Summary:
    requests: int
    failures: dict[str, int]  # by kind: misroute, connection, timeout, http 502, ...
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    quiet: Window  # every second not around an event
    events: list[Window] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def lines(self) -> list[str]:
        failed = sum(self.failures.values())
        total = (
            f"requests {self.requests}, failed {failed} {_kinds(self.failures)}, "
            f"{self.rps:.0f} req/s, p50 {self.p50_ms:.0f} ms, p95 {self.p95_ms:.0f} ms, "
            f"p99 {self.p99_ms:.0f} ms"
        )
        return [total, _window_line(self.quiet)] + [_window_line(w) for w in self.events]


def _kinds(failures: dict[str, int]) -> str:
    return (
        "(" + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())) + ")" if failures else ""
    )


def _window_line(window: Window) -> str:
    failed = sum(window.failures.values())
    return (
        f"  {window.label}: {window.requests} requests, {failed} failed "
        f"{_kinds(window.failures)}, p50 {window.p50_ms:.0f} ms, p99 {window.p99_ms:.0f} ms"
    )


def aggregated(csv_prefix: str) -> dict[str, str]:
    """Locust's "Aggregated" row of <prefix>_stats.csv."""
    with open(f"{csv_prefix}_stats.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] == "Aggregated"]
    if not rows:
        raise ValueError(f"{csv_prefix}_stats.csv has no Aggregated row")
    return rows[0]


def failures_by_kind(csv_prefix: str) -> dict[str, int]:
    """<prefix>_failures.csv, grouped by kind (the text before the first colon)."""
    found: dict[str, int] = {}
    with open(f"{csv_prefix}_failures.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            kind = row["Error"].split(":", 1)[0].strip().removeprefix("CatchResponseError(")
            kind = kind.strip("'\"()")
            found[kind] = found.get(kind, 0) + int(row["Occurrences"])
    return found


def percentile(histogram: dict[str, int], q: float) -> float:
    total = sum(histogram.values())
    if total == 0:
        return 0.0
    seen, rank = 0, q / 100 * total
    for ms, count in sorted(histogram.items(), key=lambda item: float(item[0])):
        seen += count
        if seen >= rank:
            return float(ms)
    return float(max(histogram, key=float))


def window(label: str, seconds: list[dict[str, Any]]) -> Window:
    histogram: dict[str, int] = {}
    failures: dict[str, int] = {}
    for counts in seconds:
        for ms, count in counts["ms"].items():
            histogram[ms] = histogram.get(ms, 0) + count
        for kind, count in counts["fail"].items():
            failures[kind] = failures.get(kind, 0) + count
    requests = sum(c["n"] for c in seconds)
    return Window(label, requests, failures, percentile(histogram, 50), percentile(histogram, 99))


def summarize(
    csv_prefix: str,
    timeline_path: str,
    events: list[tuple[str, float, float]] = [],  # noqa: B006  (read only)
    margin: int = MARGIN_S,
) -> Summary:
    row = aggregated(csv_prefix)
    timeline = {int(s): c for s, c in json.loads(Path(timeline_path).read_text()).items()}
    around: set[int] = set()
    windows = []
    for label, started, ended in events:
        span = range(int(started) - margin, int(ended) + margin + 1)
        around.update(span)
        windows.append(window(label, [timeline[s] for s in span if s in timeline]))
    quiet = window("quiet", [c for s, c in timeline.items() if s not in around])
    return Summary(
        requests=int(row["Request Count"]),
        failures=failures_by_kind(csv_prefix),
        rps=_number(row["Requests/s"]),
        p50_ms=_number(row["50%"]),
        p95_ms=_number(row["95%"]),
        p99_ms=_number(row["99%"]),
        quiet=quiet,
        events=windows,
    )


def _number(text: str) -> float:
    """A figure of Locust's CSV; "N/A" (no request at all) as 0."""
    return 0.0 if text == "N/A" else float(text)
