"""Two refusals the pipeline makes before it touches a file, pure and clock-free.

``shrink_error``: emptiness is suspicious, not an order. A snapshot with no
apps while the served config has some, or one in which more than half of at
least 10 served apps vanish at once, is held (the last config keeps
serving) unless routerd runs with ``--allow-shrink``: an etcd wiped by
mistake, or a wrong ``--prefix``, must not take every app offline.

``RefusedCandidates``: the same bytes fail the same way, so a candidate that
``nginx -t`` refused is not written and checked again, and one whose reload
was rolled back is retried only after a while (a port held for a moment
frees up). Bounded: a flapping input never grows it without end.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

OVERRIDE = "kept the last config (run with --allow-shrink to apply such a snapshot)"
MAX_REFUSED = 16


def shrink_error(served: Collection[str] | None, names: Collection[str]) -> str | None:
    """Why going from the ``served`` apps to ``names`` must be held, or None.

    ``served`` None: not known (nothing installed by this routerd yet)."""
    if not served:
        return None
    if not names:
        return f"the snapshot has no apps (the served config has {len(served)}); {OVERRIDE}"
    vanished = len(set(served) - set(names))
    if len(served) >= 10 and vanished * 2 > len(served):
        return f"{vanished} of {len(served)} apps would vanish at once; {OVERRIDE}"
    return None


@dataclass
class RefusedCandidates:
    """Refused generations by hash: why, and until when (monotonic seconds)."""

    limit: int = MAX_REFUSED
    _refused: dict[str, tuple[str, float]] = field(default_factory=dict)

    def why(self, generation: str, now: float) -> str | None:
        """The reason ``generation`` was refused, while that refusal still holds."""
        found = self._refused.get(generation)
        return found[0] if found is not None and now < found[1] else None

    def refuse(self, generation: str, reason: str, *, now: float, for_s: float | None) -> None:
        """Refuse ``generation`` for ``for_s`` seconds (None: for good)."""
        self._refused.pop(generation, None)
        self._refused[generation] = (reason, float("inf") if for_s is None else now + for_s)
        while len(self._refused) > self.limit:
            del self._refused[next(iter(self._refused))]

    def __len__(self) -> int:
        return len(self._refused)
