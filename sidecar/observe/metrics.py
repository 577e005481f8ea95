"""Metric names and the per-op call metrics that the pool's and the single worker's exporters share.

Names follow Prometheus conventions: `sidecar_` prefix, base units in the name (`_seconds`,
`_bytes`), `_total` on counters. The Elixir bridge (`Sidecar.Metrics`) renders the same names, so
one dashboard query works for either host.

Every exporter has its own `CollectorRegistry` (never the global one): several pools can live in
one process and each serves only its own figures.
"""
from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from itertools import accumulate
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.errors import ErrorKind, SidecarError

__all__ = ["LATENCY_BUCKETS", "CallMetrics", "LabelledCounter", "outcome_of", "gauge", "render", "OTHER_OP",
           "MAX_OPS"]

# From a 50 us small call to a minute-long op: the buckets a sidecar call actually lands in.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
# "0.00025", ..., "+Inf" (the Elixir side spells them so); prometheus_client.utils has no annotations.
_LE: list[str] = [floatToGoString(b) for b in LATENCY_BUCKETS]  # type: ignore[no-untyped-call]

# Op names come from callers: past this many distinct ones (a client looping over made-up names),
# further names are counted under OTHER_OP so that a scrape stays small.
MAX_OPS = 256
OTHER_OP = "_other"

OK = "ok"
HOST_EXCEPTION = "HOST_EXCEPTION"  # not a SidecarError: e.g. a TypeError in the caller's arguments


def outcome_of(error: BaseException | None) -> str:
    """The `outcome` label: "ok", the error kind (SHAPE_MISMATCH, WORKER_CRASHED, ...), or HOST_EXCEPTION."""
    if error is None:
        return OK
    if isinstance(error, asyncio.CancelledError):  # an awaited call whose task was cancelled
        return ErrorKind.CANCELLED.value
    if isinstance(error, SidecarError):
        return error.kind.value
    return HOST_EXCEPTION


class _OpStats:
    """One op's figures; one lock for all of a call's updates."""

    __slots__ = ("lock", "outcomes", "duration", "queue", "compute", "sums", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: dict[str, int] = {}
        n = len(LATENCY_BUCKETS)
        self.duration, self.queue, self.compute = [0] * n, [0] * n, [0] * n  # per bucket, not cumulative
        self.sums = [0.0, 0.0, 0.0]  # duration, queue, compute
        self.bytes_in = self.bytes_out = 0


class CallMetrics(Collector):
    """Calls by op and outcome, their latency split (total, queue, compute) and the bytes they moved.

    prometheus-client's own Counter/Histogram take a lock per increment (one per bucket walked): about
    5 us for a call's six updates, 1 % of the cheapest round trip. Here a call costs one lock and three
    bisections (~1 us, done in bulk by the owner's flush); the figures become metric families only
    when Prometheus scrapes.
    """

    def __init__(self, registry: CollectorRegistry, total_help: str,
                 before_collect: Callable[[], None] | None = None) -> None:
        self._total_help = total_help
        self._before_collect = before_collect  # folds in what the owner recorded but has not counted yet
        self._lock = threading.Lock()
        self._ops: dict[str, _OpStats] = {}
        registry.register(self)

    def op_label(self, op: str) -> str:
        if op in self._ops or len(self._ops) < MAX_OPS:
            return op
        return OTHER_OP

    def _stats(self, op: str) -> _OpStats:
        stats = self._ops.get(op)
        if stats is None:
            with self._lock:
                op = self.op_label(op)
                stats = self._ops.get(op)
                if stats is None:
                    stats = self._ops[op] = _OpStats()
        return stats

    def observe(self, op: str, outcome: str, total_s: float, queue_s: float | None = None,
                compute_s: float | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Records one finished call. queue/compute are None when the worker's timing is unknown
        (a call that failed before or without a worker answer); bytes count for calls that succeeded."""
        st = self._stats(op)
        with st.lock:
            st.outcomes[outcome] = st.outcomes.get(outcome, 0) + 1
            st.duration[bisect_left(LATENCY_BUCKETS, total_s)] += 1
            st.sums[0] += total_s
            if queue_s is not None:
                st.queue[bisect_left(LATENCY_BUCKETS, queue_s)] += 1
                st.sums[1] += queue_s
            if compute_s is not None:
                st.compute[bisect_left(LATENCY_BUCKETS, compute_s)] += 1
                st.sums[2] += compute_s
            st.bytes_in += bytes_in
            st.bytes_out += bytes_out

    def collect(self) -> Iterator[Any]:
        if self._before_collect is not None:
            self._before_collect()
        with self._lock:
            ops = sorted(self._ops.items())
        calls = CounterMetricFamily("sidecar_calls", "Calls by op and outcome (ok, or the error kind)",
                                    labels=["op", "outcome"])
        hists = [HistogramMetricFamily("sidecar_call_duration_seconds", self._total_help, labels=["op"]),
                 HistogramMetricFamily("sidecar_call_queue_seconds", "Time a call waited in the worker for a "
                                       "free concurrency slot (calls that succeeded)", labels=["op"]),
                 HistogramMetricFamily("sidecar_call_compute_seconds", "Time the op itself ran in the worker "
                                       "(calls that succeeded)", labels=["op"])]
        moved = CounterMetricFamily("sidecar_call_bytes", "Tensor bytes of calls that succeeded, by direction",
                                    labels=["op", "direction"])
        for op, st in ops:
            with st.lock:  # one consistent copy per op
                outcomes = dict(st.outcomes)
                per_bucket = (list(st.duration), list(st.queue), list(st.compute))
                sums = list(st.sums)
                b_in, b_out = st.bytes_in, st.bytes_out
            for outcome, n in sorted(outcomes.items()):
                calls.add_metric([op, outcome], n)
            for family, counts, total in zip(hists, per_bucket, sums, strict=True):
                family.add_metric([op], list(zip(_LE, accumulate(counts), strict=True)), total)
            moved.add_metric([op, "in"], b_in)
            moved.add_metric([op, "out"], b_out)
        yield calls
        yield from hists
        yield moved


class LabelledCounter(Collector):
    """A counter by label values, for events (crashes, restarts, ...): like prometheus-client's
    Counter, without the `_created` series, so the whole scrape has one shape."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Iterable[str]) -> None:
        self.name, self.help_text, self.labels = name, help_text, list(labels)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def inc(self, *values: Any) -> None:
        key = tuple(str(v) for v in values)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.help_text, labels=self.labels)
        with self._lock:
            for values, n in sorted(self._counts.items()):
                family.add_metric(list(values), n)
        yield family


def gauge(name: str, help_text: str, labels: Iterable[str] = (),
          rows: Iterable[tuple[Iterable[str], float]] = ()) -> GaugeMetricFamily:
    """A gauge family for a custom collector: `rows` are (label values, value)."""
    family = GaugeMetricFamily(name, help_text, labels=list(labels))
    for values, value in rows:
        family.add_metric([str(v) for v in values], float(value))
    return family


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format (version 0.0.4)."""
    return generate_latest(registry)
