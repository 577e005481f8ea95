"""The asyncio host: `AsyncClient` (one worker) and `AsyncPool` (a supervised pool) on grpc.aio.

    async with AsyncPool(2, ops=["my_ops"]) as pool:
        y = await pool.call("add", x, 1.0)
        async for chunk in pool.stream("generate", prompt):
            ...

Only the RPCs are asynchronous. The data plane is the blocking host's own: a call is prepared by a
`Client` (inputs into its arena, `out` refs), sent here on a grpc.aio channel, and its answer decoded
by the same `Client` (zero-copy outputs under leases, released when collected); a stream's chunks
are decoded one by one the same way, with the same flow control (`AckChunks` in batches of half a
window). An `AsyncPool` is a `Pool` (spawning, supervision, health, restarts, breakers) whose calls
go through grpc.aio to the worker the pool's scheduler picks, with the pool's crash classification,
poison-call guard and retries of idempotent calls (a stream only while nothing of it was delivered).

Cancelling the awaiting task (`task.cancel()`, `asyncio.wait_for`, leaving an `async for` early and
closing it, `aclose()`) cancels the RPC: the worker sees its caller gone, stops the op (a generator
gets GeneratorExit) and releases what it held.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from typing_extensions import Self  # typing.Self is 3.11+; the package supports 3.10

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.errors import WorkerCrashed, WorkerUnreachable
from sidecar.host.client import Client, PreparedCall, Result
from sidecar.host.crash import ExitInfo
from sidecar.host.grpc_transport import (ACK_TIMEOUT_S, AcksInFlight, channel_options, channel_target, rpc_failure,
                                         stream_request)
from sidecar.host.pool import Pool
from sidecar.host.scheduler import _ProbeOutcome
from sidecar.host.supervisor import Worker
from sidecar.protocol import grpc_codec as wire
from sidecar.protocol.calls import CallResult
from sidecar.protocol.limits import DEFAULT_STREAM_MAX_CHUNKS
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncPool", "AsyncStream"]


class _AioChannel:
    """The grpc.aio side of one worker: Execute, ExecuteStream, AckChunks, ListOps, health."""

    def __init__(self, address: str, max_message_bytes: int | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(channel_target(address), options=channel_options(max_message_bytes))
        self.stub = pb_grpc.SidecarStub(self.channel)  # type: ignore[no-untyped-call]
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        # AckChunks in flight (a reference each, until done; a failed one requeues its releases).
        self.acks = AcksInFlight()

    async def execute(self, p: PreparedCall, timeout: float | None) -> CallResult:
        try:
            response = await self.stub.Execute(wire.call_to_request(p.call), timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failure(err, p.call.op) from None
        return wire.result_from_response(response)

    def ack(self, request_id: str, client_id: str, chunks: int, release: list[str],
            requeue: Callable[[list[str]], None]) -> None:
        self.acks.send(asyncio.ensure_future(self.stub.AckChunks(pb.ChunkAck(
            request_id=request_id, client_id=client_id, chunks=chunks, release=release), timeout=ACK_TIMEOUT_S)),
            release, requeue)

    def release(self, lease_ids: list[str], requeue: Callable[[list[str]], None]) -> None:
        """Sends a Release without waiting for it (on the event loop, never a blocking RPC); a
        Release that fails hands its ids back to `requeue`, and so does one with no loop to run on
        (a stream collected after its loop ended): they go with the client's next message."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            requeue(lease_ids)
            return
        self.acks.send(asyncio.ensure_future(self.stub.Release(pb.ReleaseRequest(leases=lease_ids),
                                                               timeout=ACK_TIMEOUT_S)), lease_ids, requeue)

    async def close(self) -> None:
        """Lets the acks and releases on their way finish (closing the channel would cancel them, and
        their leases would stay held until their TTL), then closes it."""
        pending = self.acks.pending()
        if pending:
            await asyncio.wait(pending, timeout=ACK_TIMEOUT_S)
        await self.channel.close()


class AsyncStream(AsyncIterator[Any]):
    """The chunks of one streaming call, decoded as `Client.stream` decodes them; `aclose()` (or
    leaving `async with`) cancels it. `delivered` counts chunks; `result` is the final `Result`."""

    def __init__(self, client: Client, aio: _AioChannel, p: PreparedCall, timeout: float | None,
                 window: int, on_end: Callable[[], None] | None = None) -> None:
        self._client, self._aio, self._p = client, aio, p
        self._on_end = on_end
        self._rpc = aio.stub.ExecuteStream(stream_request(p.call), timeout=timeout)
        self._ack_every = max(1, window // 2)
        self._unacked = 0
        self._ended = False
        self.delivered = 0
        self.result: Result | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._ended:
            raise StopAsyncIteration
        op = self._p.call.op
        try:
            message = await self._rpc.read()
        except grpc.RpcError as err:
            self._end(None)
            raise rpc_failure(err, op) from None
        except BaseException:  # the awaiting task was cancelled: so is the stream
            await self.aclose()
            raise
        if message is grpc.aio.EOF:
            self._end(None)
            raise WorkerUnreachable(f"the stream of {op!r} ended without its final message", op=op,
                                    classification="unreachable")
        if message.HasField("end"):
            self._end(wire.result_from_response(message.end))
            raise StopAsyncIteration
        value = self._client.decode_chunk(self._p, wire.chunk_from_pb(message))
        self.delivered += 1
        self._unacked += 1
        if self._unacked >= self._ack_every:
            call = self._p.call
            self._aio.ack(call.request_id, call.client_id, self._unacked, self._client.take_releases(),
                          self._client.requeue_releases)
            self._unacked = 0
        return value

    async def aclose(self) -> None:
        """Cancels the stream unless it has ended (the worker closes the generator)."""
        if not self._ended:
            self._rpc.cancel()
            self._end(None, cancelled=True)

    def _end(self, res: CallResult | None, cancelled: bool = False) -> None:
        """The inputs are freed; after a cancel the consumed chunks' leases go back at once."""
        if self._ended:
            return
        self._ended = True
        client = self._client
        try:
            self.result = client.stream_ended(self._p, None if cancelled else res,
                                              lambda ids: self._aio.release(ids, client.requeue_releases))
        finally:
            if self._on_end is not None:
                self._on_end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        """A stream dropped unfinished is cancelled, and the client no longer counts it in use."""
        if not getattr(self, "_ended", True):
            try:
                self._rpc.cancel()
            except Exception:  # noqa: BLE001 - its channel or loop may be gone already
                pass
            self._end(None, cancelled=True)


class AsyncClient:
    """One worker, from asyncio. `address` as for `Client`; or `client=` an existing `Client` whose
    data plane (arena, leases, decoding) is used (an `AsyncPool` passes its workers' clients)."""

    def __init__(self, address: str | None = None, *, client: Client | None = None, timeout: float | None = None,
                 max_message_bytes: int | None = None, **client_kwargs: Any) -> None:
        self._own_client = client is None
        if client is None:
            if address is None:
                raise ValueError("an AsyncClient needs a worker address or a Client")
            client = Client(address, timeout=timeout, max_message_bytes=max_message_bytes, **client_kwargs)
        self.client = client
        self.address = client.address
        self.timeout = timeout if timeout is not None else client.timeout
        self._aio = _AioChannel(client.address, max_message_bytes)

    async def call(self, op: str, *inputs: Any, **kwargs: Any) -> Any:
        """`await`-able `Client.call`: the output (a tuple when several)."""
        outs = (await self.execute(op, *inputs, **kwargs)).outputs
        return outs[0] if len(outs) == 1 else tuple(outs)

    async def execute(self, op: str, *inputs: Any, out: Any = None, placement: str = "auto",
                      timeout: float | None = None, idempotent: bool | None = None, request_id: str | None = None,
                      **attrs: Any) -> Result:
        client = self.client
        with client._in_use():  # the client's lifetime rules: refused once closed
            p = client.prepare(op, inputs, out, placement, idempotent, request_id, attrs)
            try:
                res = await self._aio.execute(p, timeout if timeout is not None else self.timeout)
                return client.complete(p, res)
            finally:
                p.done()

    def stream(self, op: str, *inputs: Any, timeout: float | None = None, idempotent: bool | None = None,
               request_id: str | None = None, max_chunks: int = 0, max_bytes: int = 0, **attrs: Any) -> AsyncStream:
        """`async for chunk in client.stream(op, ...)`: as `Client.stream`, on grpc.aio. Refused with
        ClientClosed once the client is closed; the client counts the stream in use until it ends."""
        client = self.client
        client._enter()
        try:
            p = client.prepare(op, inputs, None, "auto", idempotent, request_id, attrs,
                               stream_window=(max_chunks, max_bytes))
            try:
                return AsyncStream(client, self._aio, p, timeout if timeout is not None else self.timeout,
                                   max_chunks or DEFAULT_STREAM_MAX_CHUNKS, on_end=client._leave)
            except BaseException:
                p.done()
                raise
        except BaseException:
            client._leave()
            raise

    async def list_ops(self) -> list[dict[str, Any]]:
        try:
            resp = await self._aio.stub.ListOps(pb.ListOpsRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise rpc_failure(err, "ListOps") from None
        return [wire.op_from_pb(o) for o in resp.ops]

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        try:
            resp = await self._aio.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failure(err, "Health") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def close(self) -> None:
        await self._aio.close()
        if self._own_client:
            await asyncio.to_thread(self.client.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Attempts:
    """The attempts of one call or stream of an `AsyncPool`: deadline, workers tried, crashes."""

    def __init__(self, retryable: bool, timeout: float | None) -> None:
        self.retryable = retryable
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.excluded: set[int] = set()
        self.work_crashes: list[tuple[WorkerCrashed, ExitInfo]] = []
        self.attempt = 0

    async def next_worker(self, sched: Any, op: str) -> tuple[Worker, int, float | None]:
        """A worker for the next attempt (waiting for one off the loop), its token and the time left."""
        self.attempt += 1
        worker, token = await asyncio.to_thread(sched.acquire, op, self.deadline, self.excluded)
        left = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
        return worker, token, left


class AsyncPool:
    """A `Pool` (same arguments) whose calls and streams are awaited; see the module doc."""

    def __init__(self, workers: int = 2, **pool_kwargs: Any) -> None:
        self.pool = Pool(workers, **pool_kwargs)
        self._clients: dict[int, AsyncClient] = {}  # by worker pid

    async def wait_ready(self, timeout: float = 30.0) -> bool:
        return await asyncio.to_thread(self.pool.wait_ready, timeout)

    async def call(self, op: str, *inputs: Any, **kwargs: Any) -> Any:
        outs = (await self.execute(op, *inputs, **kwargs)).outputs
        return outs[0] if len(outs) == 1 else tuple(outs)

    async def execute(self, op: str, *inputs: Any, idempotent: bool | None = None, timeout: float | None = None,
                      **kwargs: Any) -> Result:
        """`Pool.execute` on grpc.aio: the least busy worker, retries of idempotent calls after a
        crash, the poison-call guard, the op's breaker, `WorkerCrashed` / `CircuitOpen` /
        `PoolClosed`; recorded by the pool's metrics when they are on."""
        sched = self.pool._scheduler
        started = time.perf_counter()
        try:
            with sched._admitted(op) as outcome:
                tries = _Attempts(sched.is_idempotent(op) if idempotent is None else bool(idempotent), timeout)
                while True:
                    worker, token, left = await tries.next_worker(sched, op)
                    try:
                        result = await self._client(worker).execute(op, *inputs, timeout=left,
                                                                    idempotent=tries.retryable, **kwargs)
                    except asyncio.CancelledError:
                        sched.release(worker, token, ok=False, abandoned=True)
                        outcome.crashed_nothing = not tries.work_crashes
                        raise
                    except Exception as exc:  # noqa: BLE001 - classified: a crash, or raised as it is
                        crash = await self._crash_or_raise(exc, worker, token, op, tries, outcome)
                        if not self._may_retry(crash, tries, delivered=0):
                            raise crash from None
                        tries.excluded.add(worker.pid)
                        continue
                    sched.release(worker, token, ok=True)
                    outcome.crashed_nothing = not tries.work_crashes
                    break
        except BaseException as exc:
            self._record(op, started, None, exc)
            raise
        self._record(op, started, result, None)
        return result

    async def stream(self, op: str, *inputs: Any, idempotent: bool | None = None, timeout: float | None = None,
                     **kwargs: Any) -> AsyncIterator[Any]:
        """`async for chunk in pool.stream(op, ...)`: `Pool.stream` on grpc.aio (a crash after a
        delivered chunk ends it with `WorkerCrashed`; before, an idempotent stream is retried), under
        the op's breaker; recorded by the pool's metrics when it ends (closed early: "ok")."""
        sched = self.pool._scheduler
        started = time.perf_counter()
        final: Result | None = None
        try:
            with sched._admitted(op) as outcome:
                tries = _Attempts(sched.is_idempotent(op) if idempotent is None else bool(idempotent), timeout)
                while True:
                    worker, token, left = await tries.next_worker(sched, op)
                    chunks: AsyncStream | None = None
                    delivered = 0
                    try:
                        chunks = self._client(worker).stream(op, *inputs, timeout=left, idempotent=tries.retryable,
                                                             **kwargs)
                        async for value in chunks:
                            delivered += 1
                            yield value
                    except (GeneratorExit, asyncio.CancelledError):  # the consumer stopped early
                        if chunks is not None:
                            await chunks.aclose()
                        sched.release(worker, token, ok=True)
                        outcome.crashed_nothing = not tries.work_crashes
                        raise
                    except Exception as exc:  # noqa: BLE001 - classified: a crash, or raised as it is
                        crash = await self._crash_or_raise(exc, worker, token, op, tries, outcome)
                        if not self._may_retry(crash, tries, delivered):
                            raise crash from None
                        tries.excluded.add(worker.pid)
                        continue
                    sched.release(worker, token, ok=True)
                    outcome.crashed_nothing = not tries.work_crashes
                    final = chunks.result
                    break
        except (GeneratorExit, asyncio.CancelledError):
            self._record(op, started, None, None)
            raise
        except BaseException as exc:
            self._record(op, started, None, exc)
            raise
        self._record(op, started, final, None)

    def _record(self, op: str, started: float, result: Result | None, error: BaseException | None) -> None:
        """Into the pool's metrics, when they are on (the blocking pool's call hook does the same)."""
        observer = self.pool._recording()
        if observer is not None:
            observer._record(op, time.perf_counter() - started, result, error)

    def _client(self, worker: Worker) -> AsyncClient:
        client = self._clients.get(worker.pid)
        if client is None or client.client is not worker.client:
            for pid in [pid for pid, c in self._clients.items() if c.client.closed]:
                asyncio.ensure_future(self._clients.pop(pid).close())  # workers that are gone
            client = self._clients[worker.pid] = AsyncClient(client=worker.client)
        return client

    async def _crash_or_raise(self, exc: Exception, worker: Worker, token: int, op: str, tries: _Attempts,
                              outcome: _ProbeOutcome) -> WorkerCrashed:
        """The crash a failed attempt was (waiting for the worker's exit off the loop), or `exc`
        raised when it was the worker's own answer or the call's timeout."""
        found = await asyncio.to_thread(self.pool._scheduler._failed_attempt, exc, worker, token, op,
                                        tries.work_crashes, outcome)
        if found is None:
            raise exc
        return found[0]

    def _may_retry(self, crash: WorkerCrashed, tries: _Attempts, delivered: int) -> bool:
        """The scheduler's resend rule, for an attempt after which nothing of it was delivered."""
        return not delivered and self.pool._scheduler._may_resend(crash, tries.retryable, tries.attempt)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
        await asyncio.to_thread(self.pool.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        """Everything else is the pool's (status, subscribe, list_ops, ... as blocking calls)."""
        if name in ("status", "subscribe", "events", "size", "ready_count", "run_id", "settings", "empty",
                    "is_idempotent", "watch_telemetry"):
            return getattr(self.pool, name)
        raise AttributeError(name)

