"""A quiet period with a ceiling, pure and clock-injected.

A change is applied once no new change arrived for ``min_quiet`` seconds,
but never later than ``max_wait`` after the first change of a burst, so a
steady stream of changes still reaches nginx. The daemon drives it; tests
drive it with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Debouncer:
    min_quiet: float
    max_wait: float
    first: float | None = None
    last: float | None = None

    def notify(self, now: float) -> None:
        """Record a change seen at ``now``."""
        if self.first is None:
            self.first = now
        self.last = now

    def deadline(self) -> float | None:
        """When the pending burst is due, or None when nothing is pending."""
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.min_quiet, self.first + self.max_wait)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def reset(self) -> None:
        """The pending burst was taken; start afresh."""
        self.first = self.last = None
