"""Progress lines a person can follow: one as a deploy step starts, one as it
ends, with its duration and what it found, or why it failed.

A failing step raises ``StepFailed`` carrying its number and name, so the
controller can say where it stopped and what it rolled back. Errors are
shown on one line: a gRPC error prints as several lines of internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from routerd.errors import RouterdError, StepFailed, StoreError

Say = Callable[[str], None]
STEPS = 6  # a deploy's


class Progress:
    def __init__(self, say: Say, steps: int = STEPS) -> None:
        self.say = say
        self.steps = steps

    def line(self, number: int, name: str, text: str) -> None:
        self.say(f"[{number}/{self.steps}] {name}: {text}")

    @contextlib.asynccontextmanager
    async def step(self, number: int, name: str, what: str) -> AsyncIterator[list[str]]:
        """Report the step around the block; the block may append notes for the end line."""
        self.line(number, name, what)
        started, notes = time.monotonic(), list[str]()
        try:
            yield notes
        except asyncio.CancelledError:
            self.line(number, name, f"interrupted after {since(started)}")
            raise
        except RouterdError as exc:
            reason = brief(exc)
            self.line(number, name, f"failed after {since(started)}: {reason}")
            raise StepFailed(number, name, reason) from exc
        except Exception as exc:  # a bug: say where, and let it through with its traceback
            self.line(number, name, f"failed after {since(started)}: {type(exc).__name__}: {exc}")
            raise
        detail = f" ({'; '.join(notes)})" if notes else ""
        self.line(number, name, f"done in {since(started)}{detail}")


def since(started: float) -> str:
    return f"{time.monotonic() - started:.2f} s"


def brief(exc: BaseException) -> str:
    """One line for a person."""
    cause = exc.__cause__
    if isinstance(exc, StoreError) and callable(getattr(cause, "details", None)):
        return f"etcd unreachable ({cause.code().name}: {cause.details()})"  # type: ignore[union-attr]
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
