"""etcd: a snapshot at one revision, a watch from a revision, small writes.

Wraps aetcd (asyncio, gRPC). Adds what both programs need and aetcd lacks:
TLS channels, several endpoints tried in turn, unary calls retried across
an election, and errors mapped onto routerd's own. The gRPC options are
measured ones: without an HTTP/2 ping timeout a frozen etcd (process
stopped, TCP open) went unnoticed for a minute, with it for about 5 s;
gRPC's default reconnect backoff made catch-up after an etcd restart take
5.7 s, capped it takes 0.4 s. Keys go in and come out relative to the
prefix; what they mean is ``routerd.keys``' business, not this module's.

Retries. When the leader of a cluster dies, a call to the dead member fails
at once and a write sent to a follower that has not noticed yet waits out
its whole timeout (the follower forwarded it to the dead leader); the new
leader is elected 1-2 s later. So every unary call that ends in
``Unavailable`` (UNAVAILABLE, DEADLINE_EXCEEDED, a broken connection) is
sent again on the next endpoint, with a short backoff, until
``EtcdSettings.retry_for`` has passed. Watches are streams and are not
retried here: the follower resumes them from the last revision it saw.

A write that failed so may still have been applied, and is sent again all
the same, because every write here is a put or a delete, which leaves
etcd as it was when applied twice. A transaction is safe to repeat too,
by how etcd evaluates it: its compare is checked when it is applied, so
if an earlier attempt was applied the repeat either finds the compare
still true and writes the same bytes again, or finds it false and is
refused. That refusal is ambiguous (the earlier attempt's own doing, or
someone else's), so after it the keys are read back: when every put of
the transaction holds its value and lease, all at one mod revision, and
every deleted key is absent, the earlier attempt was applied and its
revision is returned; otherwise the refusal stands. Two caveats, both
accepted: another writer putting exactly the same bytes in one
transaction would pass for the earlier attempt, and a repeated transaction
whose compare still holds overwrites, like any write made at that moment,
what someone changed in between on keys its compare does not cover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher

from routerd.errors import Compacted, StoreError, Unavailable
from routerd.logs import log
from routerd.settings import EtcdSettings

logger = logging.getLogger("routerd.store")

GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 5000,
    "grpc.http2.ping_timeout_ms": 5000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}
RETRY_WAITS_S = (0.1, 1.0)  # first and longest wait between attempts of a unary call
# etcd did not answer; CANCELLED: the channel was closed under the call (fail_over)
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True)
class KeyValue:
    """One etcd key as read: raw bytes plus the revisions readers need."""

    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class Snapshot:
    """Keys under the prefix (prefix stripped) at one etcd revision."""

    revision: int
    kvs: Mapping[str, KeyValue]


@dataclass(frozen=True)
class Check:
    """A transaction condition on one key: its value, its mod revision, or (both
    None) that it does not exist."""

    key: str
    value: bytes | None = None
    mod_revision: int | None = None


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0  # a lease id; 0 for none


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False  # every key under ``key``


@dataclass(frozen=True)
class Event:
    key: str  # relative to the prefix
    kv: KeyValue | None  # None for a delete
    revision: int


class _Client(aetcd.Client):
    """aetcd's client with TLS: its connect() only builds insecure channels."""

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # another task connects: wait, as aetcd does
            async with asyncio.timeout(self._connect_wait_timeout):
                await self._connected.wait()
            return
        self._is_connecting = True
        try:
            await self._connect_tls()
        finally:
            self._is_connecting = False
        return

    async def _connect_tls(self) -> None:
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
        if self._username is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            except rpc.AioRpcError as exc:
                aetcd.exceptions._handle_exception(exc)
            self.metadata = (("token", response.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def _credentials(settings: EtcdSettings) -> grpc.ChannelCredentials | None:
    if not settings.tls:
        return None

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.ca),
        private_key=read(settings.key),
        certificate_chain=read(settings.cert),
    )


class Store:
    """One etcd session over the configured endpoints, failing over in turn."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.prefix = settings.prefix.rstrip("/") + "/"
        self.last_heard = time.monotonic()
        self._credentials = _credentials(settings)
        self._endpoint = 0
        self._client: _Client | None = None

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- connection

    def _new_client(self) -> _Client:
        endpoint = self.settings.endpoints[self._endpoint % len(self.settings.endpoints)]
        return _Client(
            host=endpoint.host,
            port=endpoint.port,
            username=self.settings.user,
            password=self.settings.password,
            timeout=self.settings.timeout,
            options=dict(GRPC_OPTIONS),
            credentials=self._credentials,
        )

    @property
    def client(self) -> _Client:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    async def fail_over(self, failed: _Client | None = None) -> None:
        """Drop the channel and move to the next endpoint, once per failed client:
        two tasks failing together must not skip past the next endpoint."""
        if failed is not None and failed is not self._client:
            return
        await self.close()
        self._endpoint += 1

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close()
            except Exception:  # a broken channel may fail to close; it is dropped anyway
                logger.debug("closing the etcd client failed", exc_info=True)

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def key(self, rel: str) -> bytes:
        return (self.prefix + rel).encode()

    async def _call(self, what: str, coro: Any) -> Any:
        """Await one call made on the current client; map its errors, failing over
        to the next endpoint when etcd did not answer."""
        client = self._client  # the coroutine was made on this one
        try:
            result = await coro
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being cancelled: let it
            # gRPC cancels every call on a channel that another task closed in
            # fail_over(): for this caller that is a failed call, not a stop.
            raise Unavailable(f"etcd {what} failed: the channel was closed") from exc
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise Compacted(f"{what}: revision compacted at {exc.compacted_revision}") from exc
        except (aetcd.exceptions.ClientError, grpc.RpcError, grpc.aio.UsageError) as exc:
            await self.fail_over(client)
            error = Unavailable if _transient(exc) else StoreError
            raise error(f"etcd {what} failed: {_details(exc)}") from exc
        except (OSError, TimeoutError) as exc:
            await self.fail_over(client)
            raise Unavailable(f"etcd {what} failed: {exc or type(exc).__name__}") from exc
        self.heard()
        return result

    async def _unary(self, what: str, call: Callable[[_Client], Awaitable[Any]]) -> Any:
        """``call`` on the current client, made again on the next endpoint while etcd
        is unavailable (see the module's notes on retries), for ``retry_for`` seconds."""
        deadline = time.monotonic() + self.settings.retry_for
        wait = RETRY_WAITS_S[0]
        while True:
            try:
                return await self._call(what, call(self.client))
            except Unavailable as exc:
                if time.monotonic() + wait > deadline:
                    raise Unavailable(f"{exc} (retried for {self.settings.retry_for:g} s)") from exc
                if wait == RETRY_WAITS_S[0]:  # once per call: an outage is not a log flood
                    fields = {"call": what, "error": str(exc), "for_s": self.settings.retry_for}
                    log(logger, "etcd unavailable; retrying", logging.WARNING, **fields)
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_WAITS_S[1])

    # -- reads

    async def snapshot(self) -> Snapshot:
        """Every key under the prefix, at the revision of the range response."""
        return await self.range("")

    async def range(self, rel: str) -> Snapshot:
        """The keys under ``rel`` (relative to the prefix), at the range's revision.

        The revision comes from the response header, not from the largest
        mod_revision, which can lag far behind and invite compaction errors."""
        result = await self._unary("read", lambda client: client.get_prefix(self.key(rel)))
        kvs = {
            kv.key.decode("utf-8", "replace")[len(self.prefix) :]: KeyValue(
                kv.value, kv.create_revision, kv.mod_revision
            )
            for kv in result.kvs
        }
        return Snapshot(result.header.revision, kvs)

    async def get(self, rel: str) -> bytes | None:
        result = await self._unary("get", lambda client: client.get(self.key(rel)))
        return None if result is None else bytes(result.value)

    async def watch(self, start_revision: int) -> AsyncIterator[Event]:
        """Events under the prefix from ``start_revision`` on, until the stream breaks."""
        watch = await self._call(
            "watch", self.client.watch_prefix(self.prefix.encode(), start_revision=start_revision)
        )
        try:
            iterator = watch.__aiter__()
            while True:
                event = await self._call("watch", iterator.__anext__())
                yield _event(self.prefix, event)
        except StopAsyncIteration:
            raise StoreError("etcd watch ended") from None
        finally:
            try:
                await watch.cancel()
            except Exception:  # the stream may already be gone
                logger.debug("cancelling the watch failed", exc_info=True)

    # -- writes

    async def put(self, rel: str, value: bytes, lease: Any = None) -> None:
        await self._unary("put", lambda client: client.put(self.key(rel), value, lease=lease))

    async def delete_prefix(self, rel: str) -> None:
        await self._unary("delete", lambda client: client.delete_prefix(self.key(rel)))

    async def transaction(self, checks: Sequence[Check], ops: Sequence[Put | Delete]) -> int | None:
        """Apply ``ops`` atomically if every check holds: the new revision, else None.

        Sent again while etcd is unavailable; a refusal after such a repeat is
        checked against the keys (see the module's notes on retries). Built on
        the gRPC request directly: aetcd's ``transaction()`` drops the
        response header, and with it the revision a waiter needs.
        """
        request = rpc.TxnRequest(
            compare=[self._compare(c) for c in checks], success=[self._op(o) for o in ops]
        )
        attempts = 0

        def send(client: _Client) -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            return self._txn(client, request)

        reply = await self._unary("transaction", send)
        if reply.succeeded:
            return int(reply.header.revision)
        if attempts > 1:  # an earlier attempt may have been applied, and refused this one
            return await self._written(ops)
        return None

    async def _txn(self, client: _Client, request: Any) -> Any:
        await client.connect()
        return await client.kvstub.Txn(
            request, timeout=self.settings.timeout, metadata=client.metadata
        )

    async def _written(self, ops: Sequence[Put | Delete]) -> int | None:
        """The revision at which ``ops`` were applied together, if every put's key
        holds its value and lease at one mod revision and every deleted key is
        gone; None when etcd does not look like that."""
        request = rpc.TxnRequest(success=[self._read_back(op) for op in ops])
        reply = await self._unary("transaction read-back", lambda c: self._txn(c, request))
        revisions = set()
        for op, response in zip(ops, reply.responses, strict=True):
            found = response.response_range
            if isinstance(op, Delete):
                if found.count:
                    return None
                continue
            if len(found.kvs) != 1 or (found.kvs[0].value, found.kvs[0].lease) != (
                op.value,
                op.lease,
            ):
                return None
            revisions.add(int(found.kvs[0].mod_revision))
        if len(revisions) > 1:
            return None
        return revisions.pop() if revisions else int(reply.header.revision)

    def _read_back(self, op: Put | Delete) -> Any:
        """A range over what ``op`` writes: the key itself, or (a delete) its count."""
        key = self.key(op.key)
        if isinstance(op, Put):
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))
        end = _prefix_end(key) if op.prefix else b""
        count = rpc.RangeRequest(key=key, range_end=end, count_only=True)
        return rpc.RequestOp(request_range=count)

    def _compare(self, check: Check) -> Any:
        compare = rpc.Compare(key=self.key(check.key), result=rpc.Compare.EQUAL)
        if check.value is not None:
            compare.target, compare.value = rpc.Compare.VALUE, check.value
        elif check.mod_revision is not None:
            compare.target, compare.mod_revision = rpc.Compare.MOD, check.mod_revision
        else:
            compare.target, compare.create_revision = rpc.Compare.CREATE, 0
        return compare

    def _op(self, op: Put | Delete) -> Any:
        if isinstance(op, Put):
            put = rpc.PutRequest(key=self.key(op.key), value=op.value, lease=op.lease)
            return rpc.RequestOp(request_put=put)
        key = self.key(op.key)
        delete = rpc.DeleteRangeRequest(key=key, range_end=_prefix_end(key) if op.prefix else b"")
        return rpc.RequestOp(request_delete_range=delete)

    async def lease(self, ttl: int) -> Any:
        # A grant repeated after a lost reply leaves an unused lease, which expires.
        return await self._unary("lease", lambda client: client.lease(ttl))

    async def refresh(self, lease: Any) -> int:
        """Refresh a lease; its remaining TTL, 0 when it had already expired."""
        # Through the current client: a Lease keeps the client it was granted
        # on, which may be the endpoint we failed over from.
        reply = await self._unary("lease refresh", lambda client: client.refresh_lease(lease.id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease: Any) -> None:
        await self._unary("lease revoke", lambda client: client.revoke_lease(lease.id))


def _transient(exc: BaseException) -> bool:
    """etcd did not answer (rather than refusing the request for what it is)."""
    errors = aetcd.exceptions
    if isinstance(exc, errors.ConnectionFailedError | errors.ConnectionTimeoutError):
        return True
    if isinstance(exc, grpc.aio.UsageError):  # a channel another task closed meanwhile
        return True
    cause = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    code = getattr(cause, "code", None)
    return callable(code) and code() in TRANSIENT


def _details(exc: BaseException) -> str:
    """gRPC's own words for an error, without its debug string."""
    for candidate in (exc, exc.__cause__):
        details = getattr(candidate, "details", None)
        if callable(details) and details():
            return str(details())
    return str(exc) or type(exc).__name__


def _prefix_end(key: bytes) -> bytes:
    """The range end that covers every key starting with ``key``."""
    end = bytearray(key)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def _event(prefix: str, event: Any) -> Event:
    key = event.kv.key.decode("utf-8", "replace")[len(prefix) :]
    revision = event.kv.mod_revision
    if event.kind == aetcd.rtypes.EventKind.DELETE:
        return Event(key, None, revision)
    return Event(key, KeyValue(event.kv.value, event.kv.create_revision, revision), revision)
