"""`PoolObserver`: metrics, the dashboard's data and the memory history of one `Pool`.

It attaches to the pool's public surfaces only:
  - the call hook (`Pool._invoke` hands each call to `observe_call`): op, outcome, round trip, the
    `Result`'s worker timing and bytes -> call metrics and the recent-calls ring;
  - pool events (`Pool.subscribe`): crashes by classification, restarts, retries, breaker changes,
    memory signals -> counters and the event timeline;
  - `Pool.status()` and the breaker, read at scrape time -> workers by state, breaker state;
  - `Pool.watch_telemetry` memory samples, one round per interval -> the memory history (and
    per-worker gauges);
  - the host arena's statistics and NVML, read at scrape time.

Created by the pool on first use (`pool.serve_metrics()`, `pool.memory_history()`, `pool.observer`);
counters count from then on. `close()` (called by `pool.close()`) stops the HTTP servers and threads.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.host.client import Result
from sidecar.host.crash import summarize_tail
from sidecar.observe.gpu import NvmlGpus
from sidecar.observe.history import CPU, MemoryHistory, MemoryProfile, MemorySeries
from sidecar.observe.journal import Journal
from sidecar.observe.metrics import OK, CallMetrics, LabelledCounter, gauge, outcome_of, render
from sidecar.observe.server import ObservabilityServer, Response, json_response, static_file

if TYPE_CHECKING:
    from sidecar.dataplane.arena import Arena
    from sidecar.host.events import PoolEvent
    from sidecar.host.pool import Pool

log = logging.getLogger(__name__)

__all__ = ["PoolObserver"]

RECENT_CALLS = 500
FLUSH_AT = 1024  # recorded calls a caller lets wait before it folds them in itself
TIMELINE_EVENTS = 1000
_ONE_SAMPLE_S = 3600.0  # a sampling round's watch: the first sample comes at once, the next never

Run = Callable[[str, str, tuple[Any, ...], Any, Any, dict[str, Any]], Any]


def _ms(ns: int) -> float:
    return round(ns / 1e6, 4)


class PoolObserver:
    def __init__(self, pool: Pool, arena: Arena | None = None) -> None:
        self._pool = pool
        self._arena = arena
        self._lock = threading.Lock()
        self._closed = False
        self.registry = CollectorRegistry(auto_describe=False)
        self.calls = CallMetrics(self.registry, "Round trip of a pool call as the caller sees it: waiting for "
                                                "a worker, retries and the worker's own time included",
                                 before_collect=self.flush)
        r = self.registry
        self.crashes = LabelledCounter(r, "sidecar_worker_crashes", "Unexpected worker exits (and failed starts), "
                                       "by classification and phase", ["classification", "phase"])
        self.restarts = LabelledCounter(r, "sidecar_worker_restarts", "Replacement workers installed, by how they "
                                        "were started (template: forked, cold, spare)", ["via"])
        self.retries = LabelledCounter(r, "sidecar_call_retries", "Idempotent calls sent again after their worker "
                                       "crashed", ["op"])
        self.breaker_changes = LabelledCounter(r, "sidecar_breaker_transitions", "Circuit breaker state changes, by "
                                               "the state entered", ["state"])
        self.memory_events = LabelledCounter(r, "sidecar_memory_events", "Memory profiler signals "
                                             "(memory_threshold, memory_growth), by device", ["event", "device"])
        self.recent_calls = Journal(RECENT_CALLS)
        # Calls recorded but not yet counted (see `_record`); deque appends and poplefts are atomic.
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._flush_lock = threading.Lock()
        self.timeline = Journal(TIMELINE_EVENTS)
        self.gpus = NvmlGpus()
        self.history: MemoryHistory | None = None
        self._sampler: threading.Thread | None = None
        self._sampler_stop: threading.Event | None = None
        self._servers: list[ObservabilityServer] = []
        self.registry.register(_PoolCollector(self))
        self._unsubscribe = pool.subscribe(self._on_event)

    # -- the call hook -------------------------------------------------------------------------------

    def observe_call(self, run: Run, method: str, op: str, inputs: tuple[Any, ...], idempotent: Any,
                     timeout: Any, kwargs: dict[str, Any]) -> Any:
        """Runs the call through `run` (the pool's unobserved `_invoke`) and records it. A `call` is
        made as an `execute` (the same RPC; `Client.call` is `execute` plus unpacking the outputs) so
        that the worker's timing and byte counts are known."""
        as_result = method == "call"
        t0 = time.perf_counter()
        try:
            out = run("execute" if as_result else method, op, inputs, idempotent, timeout, kwargs)
        except BaseException as exc:
            self._record(op, time.perf_counter() - t0, None, exc)
            raise
        self._record(op, time.perf_counter() - t0, out if isinstance(out, Result) else None, None)
        if as_result:
            outs = out.outputs
            return outs[0] if len(outs) == 1 else tuple(outs)
        return out

    def observe_stream(self, op: str, chunks: Generator[Any, None, Result | None]) -> Generator[Any, None, None]:
        """The chunks of a pool stream (the scheduler's generator), recorded as one call of `op` when
        the stream ends: its round trip from the first chunk asked for to the last, the worker's
        timing and bytes from its final message; a stream the consumer closed early counts as "ok"
        (without the worker's split), one that failed by its error kind."""
        t0 = time.perf_counter()
        try:
            result = yield from chunks
        except GeneratorExit:
            self._record(op, time.perf_counter() - t0, None, None)
            raise
        except BaseException as exc:
            self._record(op, time.perf_counter() - t0, None, exc)
            raise
        self._record(op, time.perf_counter() - t0, result, None)

    def _record(self, op: str, seconds: float, result: Result | None, error: BaseException | None) -> None:
        """On the caller's thread: one tuple queued, nothing else. Counting it (histogram buckets, the
        ring) right after an RPC costs ~8 us of cold caches per call, 1 % of the cheapest round trip;
        `flush` does it for many at once, when metrics are read, each profiler interval, or here
        once FLUSH_AT calls wait."""
        if result is not None:
            entry: tuple[Any, ...] = (time.time_ns(), op, OK, seconds, result.timing, result.bytes_in,
                                      result.bytes_out, result.device, result.request_id, None)
        elif error is None:  # a stream its consumer closed early: no final message, no worker split
            entry = (time.time_ns(), op, OK, seconds, None, None, None, None, None, None)
        else:
            # Not the exception itself: its traceback would keep the caller's frames (inputs) alive.
            fields = getattr(error, "fields", None) or {}
            failure = {"message": str(error).split("\n")[0][:300],
                       **{k: fields[k] for k in ("classification", "pid", "request_id") if k in fields}}
            entry = (time.time_ns(), op, outcome_of(error), seconds, None, None, None, None, None, failure)
        pending = self._pending
        pending.append(entry)
        if len(pending) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Counts the calls recorded so far into the metrics and the recent-calls ring (every reader
        of either calls it first, so what they show is exact)."""
        pending, observe, ring = self._pending, self.calls.observe, self.recent_calls
        with self._flush_lock:  # one flusher at a time keeps the ring in call order
            while pending:
                entry = pending.popleft()
                _, op, outcome, seconds, t, bytes_in, bytes_out = entry[:7]
                if t is not None:
                    observe(op, outcome, seconds, t.queue_ns / 1e9, t.compute_ns / 1e9, bytes_in, bytes_out)
                else:
                    observe(op, outcome, seconds)
                ring.append(entry)

    @staticmethod
    def _call_dict(seq: int, entry: tuple[Any, ...]) -> dict[str, Any]:
        t_ns, op, outcome, seconds, timing, bytes_in, bytes_out, device, request_id, failure = entry
        out: dict[str, Any] = {"seq": seq, "time_unix_ns": t_ns, "op": op, "outcome": outcome,
                               "total_ms": round(seconds * 1000, 4)}
        if timing is not None:
            out.update(queue_ms=_ms(timing.queue_ns), compute_ms=_ms(timing.compute_ns),
                       worker_ms=_ms(timing.total_ns), bytes_in=bytes_in, bytes_out=bytes_out, device=device,
                       request_id=request_id)
        elif failure is not None:
            out.update(failure)
        return out

    def calls_json(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        self.flush()
        return {"calls": [self._call_dict(seq, e) for seq, e in self.recent_calls.since(since, limit)],
                "last": self.recent_calls.last}

    def events_json(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        return {"events": [{"seq": seq, **e} for seq, e in self.timeline.since(since, limit)],
                "last": self.timeline.last}

    # -- pool events ---------------------------------------------------------------------------------

    def _on_event(self, ev: PoolEvent) -> None:
        """On the pool's thread that raised the event: counters and a ring append, nothing slow."""
        meta = ev.metadata
        name = ev.event
        if name == "crash":
            self.crashes.inc(meta.get("classification", "unknown"), meta.get("phase", "running"))
            history = self.history
            if history is not None and meta.get("pid") is not None:
                history.mark_dead(int(meta["pid"]))
        elif name == "restart":
            self.restarts.inc(meta.get("via", "unknown"))
        elif name == "retry":
            self.retries.inc(self.calls.op_label(str(meta.get("op", ""))))
        elif name.startswith("breaker_"):
            self.breaker_changes.inc(name[len("breaker_"):])
        elif name in ("memory_threshold", "memory_growth"):
            self.memory_events.inc(name, meta.get("device", CPU))
        shown = dict(meta)
        tail = shown.pop("stderr_tail", None)
        if tail:  # the telling line, not the thread dump (the whole tail is in the WorkerCrashed error)
            shown["summary"] = summarize_tail(list(tail))
        self.timeline.append({"time_unix_ns": ev.time_unix_ns, "event": name,
                              "metadata": {k: v for k, v in shown.items() if v is not None}})

    # -- memory history ------------------------------------------------------------------------------
    #
    # The profiler does not keep a telemetry stream open: while one is, every worker builds a span
    # per call and the host decodes two per call (~60 us of host CPU per small call, measured). Each
    # round opens `pool.watch_telemetry`, takes the memory sample a worker sends as soon as a watcher
    # subscribes, and closes it: a fixed cost per worker and interval, nothing per call.

    def profile_memory(self, profile: MemoryProfile | None = None, **options: Any) -> MemoryHistory:
        """Starts the memory profiler (`MemoryProfile` fields as keywords: interval_s, length,
        threshold_bytes, gpu_threshold_ratio, leak_window, leak_min_growth_bytes, leak_min_r2).
        Called again with other settings, it restarts with them (the history starts anew); after
        `stop_profiling()`, without settings, it resumes into the same history."""
        if profile is not None and options:
            raise TypeError("pass a MemoryProfile or keyword settings, not both")
        wanted = profile or (MemoryProfile(**options) if options else None)
        with self._lock:
            if self._closed:
                raise _closed()
            current = self.history
            same = current is not None and (wanted is None or wanted == current.profile)
            if current is not None and same and self._sampler is not None:
                return current  # running with these settings already
        self.stop_profiling()
        history = current if same and current is not None else \
            MemoryHistory(wanted or MemoryProfile(), publish=self._pool.events_bus.publish)
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample_loop, args=(history, stop), name="sidecar-observe-memory",
                                   daemon=True)
        with self._lock:
            if self._closed:
                raise _closed()
            self.history, self._sampler, self._sampler_stop = history, sampler, stop
        sampler.start()
        return history

    def stop_profiling(self) -> None:
        """Stops memory sampling (the history is kept)."""
        with self._lock:
            sampler, stop = self._sampler, self._sampler_stop
            self._sampler = self._sampler_stop = None
        if stop is not None:
            stop.set()
        if sampler is not None and sampler is not threading.current_thread():
            sampler.join(10)

    def _sample_loop(self, history: MemoryHistory, stop: threading.Event) -> None:
        interval = history.profile.interval_s
        while True:
            started = time.monotonic()
            self.flush()  # off the callers' threads, while they wait on their workers
            try:
                self._sample_round(history, stop, timeout=max(1.0, interval))
            except Exception:  # noqa: BLE001 - the pool closing under us, a worker going away
                log.debug("memory sampling round failed", exc_info=True)
            if stop.wait(max(0.0, interval - (time.monotonic() - started))):
                return

    def _sample_round(self, history: MemoryHistory, stop: threading.Event, timeout: float) -> None:
        wanted = {s.pid: s.slot for s in self._pool.status() if s.pid is not None and s.slot >= 0}
        if not wanted:
            return
        watch = self._pool.watch_telemetry(memory_interval_s=_ONE_SAMPLE_S)
        try:
            deadline = time.monotonic() + timeout
            while wanted and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # a worker that does not answer in time (busy starting, dying) has no point
                ev = watch.get(timeout=min(left, 0.1))
                if ev is not None and ev.get("type") == "memory" and ev.get("pid") in wanted:
                    history.add(ev, wanted.pop(ev["pid"]))
        finally:
            watch.close()

    def memory_history(self, pid: int | None = None, device: str | None = None) -> list[MemorySeries]:
        """The memory series (copies); the first call starts the profiler with defaults."""
        history = self.history or self.profile_memory()
        return history.series(pid, device)

    # -- HTTP ----------------------------------------------------------------------------------------

    def serve(self, address: str = "127.0.0.1:9464", *, allow_remote: bool = False) -> str:
        """Serves /metrics, the dashboard (/) and its /api/* on `address` (port 0: any free port);
        returns the bound HOST:PORT. Starts the memory profiler (defaults) if it is not running."""
        if self.history is None:
            self.profile_memory()
        server = ObservabilityServer(address, self.routes(), allow_remote=allow_remote)
        with self._lock:
            if self._closed:
                server.close()
                raise _closed()
            self._servers.append(server)
        log.info("pool %s: metrics on http://%s/metrics, dashboard on http://%s/", self._pool.run_id,
                 server.address, server.address)
        return server.address

    def routes(self) -> dict[str, Callable[[Mapping[str, str]], Response]]:
        return {
            "/": lambda q: static_file("index.html"),
            "/metrics": lambda q: (200, "text/plain; version=0.0.4; charset=utf-8", render(self.registry)),
            "/api/status": lambda q: json_response(self.status_json()),
            "/api/calls": lambda q: json_response(self.calls_json(*_since(q))),
            "/api/events": lambda q: json_response(self.events_json(*_since(q))),
            "/api/memory": lambda q: json_response(self.memory_json(int(q.get("last", "0")) or None)),
        }

    def status_json(self) -> dict[str, Any]:
        self.flush()
        pool = self._pool
        latest = self.history.latest() if self.history is not None else {}
        workers = []
        for s in pool.status():
            mem = latest.get(s.pid, {}) if s.pid is not None else {}
            gpus = {d: f for d, f in mem.items() if d != CPU}
            workers.append({
                "slot": s.slot, "pid": s.pid, "state": s.state.value, "calls": s.calls, "crashes": s.crashes,
                "restarts": s.restarts, "inflight": s.inflight, "gpu": s.gpu,
                "device": _device_of(pool.device, mem),
                "last_exit": ({**s.last_exit.as_fields(), "description": s.last_exit.describe()}
                              if s.last_exit is not None else None),
                "memory": mem.get(CPU), "gpu_memory": gpus})
        b = pool.breaker
        return {"run_id": pool.run_id, "time_unix_ns": time.time_ns(), "device": pool.device,
                "breaker": {"state": b.state.value, "recent_failures": b.recent_failures(),
                            "retry_after_s": round(b.retry_after(), 3), "opened": b.opened_count},
                "workers": workers, "calls_seen": self.recent_calls.last, "events_seen": self.timeline.last,
                "memory_interval_s": self.history.profile.interval_s if self.history is not None else None}

    def memory_json(self, last: int | None = None) -> dict[str, Any]:
        """The history for /api/memory; `last`: at most that many of each series' newest points."""
        history = self.history
        if history is None:
            return {"interval_s": None, "series": []}
        series = []
        for s in history.series():
            doc = s.to_dict()
            if last:
                doc["points"] = doc["points"][-last:]
            series.append(doc)
        return {"interval_s": history.profile.interval_s, "length": history.profile.length, "series": series}

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servers, self._servers = self._servers, []
        self._unsubscribe()
        for server in servers:
            server.close()
        self.stop_profiling()
        self.gpus.close()


def _device_of(configured: str, memory: Mapping[str, Any]) -> str:
    """What a worker runs on, from its memory sample: GPU figures mean CUDA; a sample without them
    means CPU (or MPS, when asked for); no sample yet: what the pool was configured with."""
    gpus = [d for d in memory if d != CPU]
    if gpus:
        return gpus[0]
    if memory:
        return "mps" if configured == "mps" else CPU
    return configured


def _since(query: Mapping[str, str]) -> tuple[int, int | None]:
    """?since=SEQ&limit=N of the /api/calls and /api/events polls."""
    return int(query.get("since", "0")), int(query.get("limit", "0")) or None


def _closed() -> Exception:
    from sidecar.host.pool import PoolClosed

    return PoolClosed("the pool is closed: its metrics and memory history are stopped")


class _PoolCollector(Collector):
    """Gauges read at scrape time: workers by state, the breaker, arenas, memory, GPUs."""

    def __init__(self, observer: PoolObserver) -> None:
        self._o = observer

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sidecar.host.breaker import BreakerState
        from sidecar.host.pool import WorkerState

        o = self._o
        pool = o._pool
        rows = pool.status()
        by_state = {state.value: 0 for state in WorkerState}
        for s in rows:
            by_state[s.state.value] += 1
        yield gauge("sidecar_workers", "Worker slots and spares by state", ["state"],
                    (((k,), v) for k, v in by_state.items()))
        current = pool.breaker.state
        yield gauge("sidecar_breaker_state", "1 for the circuit breaker's current state, 0 for the others",
                    ["state"], (((st.value,), 1.0 if st is current else 0.0) for st in BreakerState))
        yield gauge("sidecar_breaker_recent_crashes", "Crashes within the breaker's window",
                    rows=[((), pool.breaker.recent_failures())])
        if o._arena is not None:
            stats = o._arena.stats()
            yield gauge("sidecar_host_arena_reserved_bytes", "Shared memory the host's arena holds (in use + warm)",
                        rows=[((), stats.reserved_bytes)])
            yield gauge("sidecar_host_arena_in_use_bytes", "Host arena memory handed out to inputs/empty()",
                        rows=[((), stats.in_use_bytes)])
        yield from self._worker_memory(rows)
        yield from self._nvml()

    def _worker_memory(self, rows: list[Any]) -> Iterator[GaugeMetricFamily]:
        history = self._o.history
        if history is None:
            return
        latest = history.latest()
        live = [(s, latest[s.pid]) for s in rows if s.pid is not None and s.pid in latest]
        cpu = [((str(s.slot), str(s.pid)), m[CPU]) for s, m in live if CPU in m]
        labels = ["slot", "pid"]
        for name, key, text in (
                ("sidecar_worker_rss_bytes", "rss_bytes", "Resident memory of a worker process"),
                ("sidecar_worker_arena_reserved_bytes", "arena_reserved_bytes", "Shared memory a worker's arena holds"),
                ("sidecar_worker_arena_in_use_bytes", "arena_in_use_bytes", "A worker's arena memory holding outputs"),
                ("sidecar_worker_leases", "leases", "Output leases a worker holds for the host (not yet released)")):
            yield gauge(name, text, labels, ((lv, f[key]) for lv, f in cpu))
        gpu_rows = []
        for s, m in live:
            for device, f in m.items():
                if device != CPU:
                    index = device.split(":", 1)[1]
                    gpu = s.gpu if s.gpu is not None and index == "0" else index  # placed: the physical id
                    gpu_rows.append(((gpu, str(s.slot), str(s.pid)), f))
        if not gpu_rows:
            return  # a CPU pool: no GPU series at all (never zeros standing in for a GPU)
        glabels = ["gpu", "slot", "pid"]
        yield gauge("sidecar_gpu_memory_allocated_bytes", "GPU memory torch has allocated in a worker", glabels,
                    ((lv, f["allocated_bytes"]) for lv, f in gpu_rows))
        yield gauge("sidecar_gpu_memory_reserved_bytes", "GPU memory torch's caching allocator holds in a worker",
                    glabels, ((lv, f["reserved_bytes"]) for lv, f in gpu_rows))
        if not self._o.gpus.read():  # without NVML, the device figures the workers measured
            per_gpu = {lv[0]: f for lv, f in gpu_rows}
            yield gauge("sidecar_gpu_memory_free_bytes", "Free memory of a GPU", ["gpu"],
                        (((g,), f["free_bytes"]) for g, f in per_gpu.items()))
            yield gauge("sidecar_gpu_memory_total_bytes", "Memory of a GPU", ["gpu"],
                        (((g,), f["total_bytes"]) for g, f in per_gpu.items()))

    def _nvml(self) -> Iterator[GaugeMetricFamily]:
        readings = self._o.gpus.read()
        if not readings:
            return
        yield gauge("sidecar_gpu_utilization_ratio", "Share of the last sample period a kernel ran on the GPU "
                    "(NVML)", ["gpu", "name"], (((str(g.index), g.name), g.utilization_ratio) for g in readings))
        yield gauge("sidecar_gpu_memory_used_bytes", "GPU memory in use by every process (NVML)", ["gpu"],
                    (((str(g.index),), g.used_bytes) for g in readings))
        yield gauge("sidecar_gpu_memory_free_bytes", "Free memory of a GPU (NVML)", ["gpu"],
                    (((str(g.index),), g.free_bytes) for g in readings))
        yield gauge("sidecar_gpu_memory_total_bytes", "Memory of a GPU (NVML)", ["gpu"],
                    (((str(g.index),), g.total_bytes) for g in readings))
