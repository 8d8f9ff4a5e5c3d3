"""``routerd logs``: what an app's containers print, on every engine, by time.

Each line comes out as ``<time> <release>/<container> <text>``. Without
``follow`` the last ``tail`` lines of every container are read, merged and
printed in time order. With ``follow`` those come first, then new lines as
each container prints them (one thread per container; a line is printed
whole, never mixed with another). Containers started after the command
began are not followed: run it again after a deploy.
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from routerd.deploy.runtime import Container, DockerRuntime, engine_call

Say = Callable[[str], None]


@dataclass(frozen=True, order=True)
class Line:
    time: str  # RFC 3339 with nanoseconds, as the engine stamps it: sorts as text
    source: str
    text: str

    def __str__(self) -> str:
        return f"{self.time} {self.source} {self.text}"


def source(container: Container) -> str:
    return f"{container.release or '-'}/{container.name}"


def _lines(runtime: DockerRuntime, container: Container, **options: object) -> Iterator[Line]:
    with engine_call(f"cannot read the output of {container.name}"):
        handle = runtime.client.containers.get(container.id)
        output = handle.logs(stdout=True, stderr=True, timestamps=True, **options)
    chunks: Iterable[bytes] = output if options.get("stream") else [output]
    pending = b""
    for chunk in chunks:
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for raw in whole:
            stamp, _, text = raw.decode("utf-8", "replace").partition(" ")
            yield Line(stamp, source(container), text)
    if pending:
        stamp, _, text = pending.decode("utf-8", "replace").partition(" ")
        yield Line(stamp, source(container), text)


def recent(found: list[tuple[DockerRuntime, Container]], tail: int) -> list[Line]:
    """The last ``tail`` lines of each container, merged in time order."""
    per_container = [sorted(_lines(r, c, tail=tail)) for r, c in found]
    return list(heapq.merge(*per_container))


def follow(found: list[tuple[DockerRuntime, Container]], tail: int, say: Say) -> None:
    """The recent lines in time order, then new lines as they come, until interrupted."""
    for line in recent(found, tail):
        say(str(line))
    lines: queue.Queue[Line | None] = queue.Queue()

    def pump(runtime: DockerRuntime, container: Container) -> None:
        try:
            for line in _lines(runtime, container, stream=True, follow=True, tail=0):
                lines.put(line)
        finally:
            lines.put(None)  # this container stopped printing

    for runtime, container in found:
        threading.Thread(target=pump, args=(runtime, container), daemon=True).start()
    open_streams = len(found)
    while open_streams:
        if (got := lines.get()) is None:
            open_streams -= 1
        else:
            say(str(got))
