"""A real etcd cluster on loopback, and a TCP proxy that cuts or slows a
client's way to it: what the fault tests and the benches build on.

``Cluster`` runs three (or five) etcd members as child processes, each on
its own ports with its data in its own folder. It finds the leader through
each member's ``/v3/maintenance/status``, SIGKILLs and restarts members,
removes one for good (out of the membership, its data gone) and adds a new
one, and heals back to full size between tests. Its key-value calls (the
same as ``helpers.Etcd``'s) go to any live member and are tried again on
another while an election runs, so a test can write while it breaks
things; every write a test makes is a put or a delete, which a repeat
leaves as it was.

``TcpProxy`` forwards one loopback port to one member. ``stop()`` cuts
every connection and refuses new ones until ``start()``; ``delay`` holds
every chunk that long in each direction; ``mute()`` delivers what the
client sends but drops what the member answers (a reply lost on the way).

Does not import routerd: routers run as subprocesses (``helpers.Routerd``
with ``etcd=cluster``, ``--etcd`` listing every member).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from helpers import Background, Etcd, EtcdApi, free_ports, wait_for

TOKEN = "routerd-test-cluster"
CALL_TIMEOUT_S = 3.0  # per attempt: a follower whose leader just died holds a write this long
RETRY_FOR_S = 20.0  # an election takes 1-2 s; a member restart a few more


class Member(Etcd):
    """One member of a Cluster: a name, its own ports and folder."""

    def __init__(
        self, workdir: Path, name: str, ports: list[int], *, initial_cluster: str, state: str
    ) -> None:
        super().__init__(workdir)
        self.name = name
        self.client_port, self.peer_port = ports
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.initial_cluster = initial_cluster
        self.state = state  # "new" for a founding member, "existing" for one that joins
        self.member_id: str | None = None  # learnt from its first status answer

    def command(self) -> list[str]:
        return [
            self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", self.state, "--initial-cluster-token", TOKEN,
        ]  # fmt: skip

    @property
    def answers(self) -> bool:
        """Running and not frozen: worth sending a request to."""
        return self.running and not self.frozen

    def status(self) -> dict[str, Any]:
        """This member's own view: its id (``header.member_id``), the leader's id, the raft term."""
        answer = self._http.post(f"{self.endpoint}/v3/maintenance/status", json={}, timeout=1)
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        self.member_id = data["header"]["member_id"]
        return data

    def is_leader(self) -> bool:
        status = self.status()
        return bool(status["leader"] == status["header"]["member_id"])


class Cluster(EtcdApi):
    """``size`` etcd members on loopback that elect a leader among themselves."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.members: list[Member] = []
        self.removed: list[Member] = []
        self._names = (f"m{number}" for number in range(1000))
        self._http = requests.Session()

    # -- the whole cluster

    def start(self, timeout: float = 30.0) -> None:
        """Start ``size`` members together and wait until they agree on a leader."""
        names = [next(self._names) for _ in range(self.size)]
        flat = free_ports(2 * self.size)  # all at once, so no two are the same
        ports = [flat[i : i + 2] for i in range(0, len(flat), 2)]
        initial = ",".join(
            f"{n}=http://127.0.0.1:{p[1]}" for n, p in zip(names, ports, strict=True)
        )
        for name, pair in zip(names, ports, strict=True):
            member = Member(self.workdir / name, name, pair, initial_cluster=initial, state="new")
            self.members.append(member)
        for member in self.members:
            member.launch()
        for member in self.members:
            member.wait_healthy(timeout)
        self.wait_leader()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    @property
    def endpoint(self) -> str:
        """Every member's client URL, comma-separated: what a router's ``--etcd`` gets."""
        return ",".join(m.endpoint for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def heal(self, timeout: float = 30.0) -> None:
        """Back to ``size`` healthy members: thaw, restart, and replace removed ones."""
        for member in self.members:
            if member.frozen:
                member.thaw()
            if not member.running:
                member.launch()
        while len(self.members) < self.size:
            self.add()
        for member in self.members:
            member.wait_healthy(timeout)
        self.wait_leader()

    # -- leaders

    def leader(self) -> Member | None:
        """The member that the answering members agree leads, if one does."""
        votes: dict[str, int] = {}
        for member in self.members:
            if member.answers:
                with contextlib.suppress(requests.RequestException, KeyError, ValueError):
                    leader = member.status()["leader"]
                    votes[leader] = votes.get(leader, 0) + 1
        for member in self.members:
            if member.answers and votes.get(member.member_id or "", 0) * 2 > len(self.members):
                return member
        return None

    def wait_leader(self, timeout: float = 15.0, *, not_: Member | None = None) -> Member:
        """The leader, once a majority agrees on one (other than ``not_``)."""

        def elected() -> Member | None:
            leader = self.leader()
            return leader if leader is not None and leader is not not_ else None

        return wait_for(elected, timeout, interval=0.02, message="an etcd leader")

    def followers(self) -> list[Member]:
        leader = self.wait_leader()
        return [m for m in self.members if m is not leader and m.answers]

    # -- faults

    def kill(self, member: Member) -> None:
        """SIGKILL one member; ``restart`` brings it back with its data."""
        member.kill()

    def restart(self, member: Member, timeout: float = 30.0) -> None:
        member.start(timeout)

    def remove(self, member: Member) -> None:
        """Lose a member for good: killed, taken out of the membership, its data deleted."""
        member.status()  # learn its id while it still answers
        member.kill()
        self._call("cluster/member/remove", {"ID": member.member_id})
        self.members.remove(member)
        self.removed.append(member)
        shutil.rmtree(member.data_dir, ignore_errors=True)

    def add(self, timeout: float = 30.0) -> Member:
        """A new member with an empty folder, joining the running cluster."""
        name, ports = next(self._names), free_ports(2)
        peer_url = f"http://127.0.0.1:{ports[1]}"
        self._call("cluster/member/add", {"peerURLs": [peer_url]})
        initial = ",".join(
            [*(f"{m.name}={m.peer_url}" for m in self.members), f"{name}={peer_url}"]
        )
        member = Member(self.workdir / name, name, ports, initial_cluster=initial, state="existing")
        self.members.append(member)
        member.start(timeout)
        return member

    # -- the KV API, through any live member

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One gateway call to the first member that answers it, tried again on
        the others until RETRY_FOR_S (a member down, an election under way)."""
        deadline = time.monotonic() + RETRY_FOR_S
        last: object = None
        while time.monotonic() < deadline:
            for member in [m for m in self.members if m.answers]:
                try:
                    answer = self._http.post(
                        f"{member.endpoint}/v3/{path}", json=body, timeout=CALL_TIMEOUT_S
                    )
                except requests.RequestException as exc:
                    last = exc
                    continue
                if answer.ok:
                    data: dict[str, Any] = answer.json()
                    return data
                last = f"HTTP {answer.status_code} {answer.text}"
                if answer.status_code < 500:  # refused for what it is: no other member will differ
                    break
            else:
                time.sleep(0.1)
                continue
            break
        raise RuntimeError(f"etcd cluster {path} {body}: {last}")


# ------------------------------------------------------------------ proxy


class TcpProxy:
    """127.0.0.1:<port> forwarded to ``target`` (host, port), on an asyncio loop
    in a thread of its own. The port stays the same across stop and start."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        (self.port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.delay = 0.0  # seconds each chunk is held, each way
        self.muted = False  # drop what the target answers
        self.accepted = 0  # connections taken, over the proxy's life
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @classmethod
    def to(cls, endpoint: str) -> TcpProxy:
        """A proxy to an ``http://host:port`` endpoint."""
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        return cls((host, int(port)))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # -- control, from the test's thread

    def start(self) -> TcpProxy:
        self._run(self._listen())
        return self

    def stop(self) -> None:
        """Refuse new connections and reset every open one (a cut cable, noticed at once)."""
        self._run(self._close())

    def mute(self) -> None:
        self.muted = True

    def unmute(self) -> None:
        self.muted = False

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- the loop's side

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.accepted += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            await asyncio.gather(
                self._pump(client_r, server_w, answer=False),
                self._pump(server_r, client_w, answer=True),
            )
        except (OSError, asyncio.CancelledError):
            pass  # a side went away, or stop() cancelled us: end quietly either way
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.transport.abort()  # a reset, not a polite close
            self._connections.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, answer: bool
    ) -> None:
        """Copy one direction, each chunk sent ``delay`` after it arrived, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while chunk := await _due(queue):
                if not (answer and self.muted):
                    sink.write(chunk)
                    await sink.drain()

        sender = asyncio.ensure_future(send())
        try:
            while chunk := await source.read(65536):
                queue.put_nowait((time.monotonic() + self.delay, chunk))
            queue.put_nowait((time.monotonic() + self.delay, b""))
            await sender
        finally:
            sender.cancel()
            sink.transport.abort()  # one side gone: the whole connection goes


async def _due(queue: asyncio.Queue[tuple[float, bytes]]) -> bytes:
    """The next chunk, once its time has come (b"" at the end of the stream)."""
    due, chunk = await queue.get()
    wait = due - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
    return chunk


def rotated(endpoints: list[str], number: int) -> str:
    """The ``--etcd`` of router ``number``: every member, from member ``number``
    on, so each member (the leader among them) has a router connected to it first."""
    number %= len(endpoints)
    return ",".join(endpoints[number:] + endpoints[:number])


def endpoint_of(proxies: list[TcpProxy]) -> str:
    """The ``--etcd`` value that reaches the members through ``proxies``."""
    return ",".join(p.endpoint for p in proxies)


# ---------------------------------------------------------------- traffic


class Traffic(Background):
    """Requests to ``host`` through every router, a new connection each, from one
    thread per router until the block ends. Every outcome is kept with its time:
    (monotonic seconds, router index, status code or exception name, body)."""

    def __init__(self, routers: list[Any], host: str, *, timeout: float = 2.0) -> None:
        self.routers, self.host, self.timeout = routers, host, timeout
        self.seen: list[tuple[float, int, int | str, str]] = []
        super().__init__()
        for number in range(len(routers)):
            self.spawn(self._run, number)

    def _run(self, number: int) -> None:
        router = self.routers[number]
        while not self.stopping.is_set():
            at = time.monotonic()
            try:
                answer = router.http(self.host, timeout=self.timeout)
                self.seen.append((at, number, answer.status_code, answer.text.strip()))
            except requests.RequestException as exc:
                self.seen.append((at, number, type(exc).__name__, ""))
            time.sleep(0.01)

    def failures(self) -> list[tuple[float, int, int | str, str]]:
        return [outcome for outcome in self.seen if outcome[2] != 200]

    def bodies(self, number: int | None = None) -> set[str]:
        return {body for _, n, _, body in self.seen if number is None or n == number}
