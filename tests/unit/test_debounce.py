"""The Debouncer, driven by a fake clock of plain floats."""

from __future__ import annotations

import pytest

from routerd.router.debounce import Debouncer

MIN_QUIET = 0.2
MAX_WAIT = 1.0


def make() -> Debouncer:
    return Debouncer(min_quiet=MIN_QUIET, max_wait=MAX_WAIT)


def test_idle_has_no_deadline() -> None:
    """A debouncer that saw no change has no deadline and is never due."""
    debouncer = make()
    assert debouncer.deadline() is None
    assert not debouncer.due(0.0)
    assert not debouncer.due(1e9)


def test_single_change_is_due_after_min_quiet() -> None:
    """One change is due exactly min_quiet after it, and not a moment before."""
    debouncer = make()
    debouncer.notify(100.0)
    assert debouncer.deadline() == pytest.approx(100.0 + MIN_QUIET)
    assert not debouncer.due(100.0)
    assert not debouncer.due(100.0 + MIN_QUIET - 1e-6)
    assert debouncer.due(100.0 + MIN_QUIET)
    assert debouncer.due(100.0 + 10 * MAX_WAIT)


def test_new_change_pushes_the_deadline_back() -> None:
    """A change inside the quiet period restarts it."""
    debouncer = make()
    debouncer.notify(0.0)
    debouncer.notify(0.15)
    assert debouncer.deadline() == pytest.approx(0.15 + MIN_QUIET)
    assert not debouncer.due(MIN_QUIET)
    assert debouncer.due(0.15 + MIN_QUIET)


def test_steady_stream_is_due_by_first_plus_max_wait() -> None:
    """Changes every min_quiet/2 never leave a quiet period, yet are due at first+max_wait."""
    debouncer = make()
    first = 50.0
    now = first
    while now < first + MAX_WAIT:
        debouncer.notify(now)
        assert not debouncer.due(now)
        now += MIN_QUIET / 2
    assert debouncer.deadline() == pytest.approx(first + MAX_WAIT)
    assert debouncer.due(first + MAX_WAIT)


def test_reset_clears_the_pending_burst() -> None:
    """After reset nothing is pending, and the next change starts a new burst."""
    debouncer = make()
    debouncer.notify(0.0)
    debouncer.notify(0.9)
    debouncer.reset()
    assert debouncer.deadline() is None
    assert not debouncer.due(100.0)
    debouncer.notify(5.0)
    assert debouncer.deadline() == pytest.approx(5.0 + MIN_QUIET)  # max_wait counts from 5.0


def simulate_burst(
    min_quiet: float, max_wait: float, count: int, spacing: float
) -> tuple[int, Debouncer]:
    """Drive a loop that applies whenever due: notify every `spacing` s, then drain."""
    debouncer = Debouncer(min_quiet=min_quiet, max_wait=max_wait)
    applies = 0
    for step in range(count):
        now = step * spacing
        debouncer.notify(now)
        if debouncer.due(now):
            applies += 1
            debouncer.reset()
    deadline = debouncer.deadline()
    if deadline is not None:  # the tail of the burst is applied once the loop wakes up
        assert debouncer.due(deadline)
        applies += 1
        debouncer.reset()
    return applies, debouncer


def test_burst_of_notifications_gives_few_applies() -> None:
    """1,000 changes 1 ms apart cost about one apply per max_wait, and nothing is left over."""
    applies, debouncer = simulate_burst(min_quiet=0.1, max_wait=1.0, count=1000, spacing=0.001)
    assert 1 <= applies <= 5
    assert debouncer.deadline() is None


@pytest.mark.parametrize(("max_wait", "low", "high"), [(0.25, 3, 5), (0.5, 2, 3), (2.0, 1, 1)])
def test_burst_applies_scale_with_max_wait(max_wait: float, low: int, high: int) -> None:
    """Over a 1 s burst the number of applies is about ceil(1.0 / max_wait)."""
    applies, _ = simulate_burst(min_quiet=0.1, max_wait=max_wait, count=1000, spacing=0.001)
    assert low <= applies <= high
