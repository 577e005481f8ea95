"""What metrics cost a caller: small-call round trips with metrics off and on, interleaved call by call.

Two pools of one worker each run side by side; in every round one has metrics on and the other off,
and the calls alternate between them (on, off, off, on, ...), so that whatever the machine does (other
jobs, frequency, the scheduler) hits both alike within microseconds; the roles swap each round, so
that a difference between the two workers cancels too.

  off   no observer: `Pool.call` as everyone gets it by default
  on    `pool.serve_metrics()` running: every call timed and recorded (Prometheus counters and
        histograms, the recent-calls ring), the memory profiler sampling the worker every second
        (one short telemetry round per interval: nothing per call in the worker), the HTTP
        endpoint up and scraped once per round

The call is `add` of two 16-element float32 tensors (inline, ~0.5 ms here): the cheapest real call,
where any per-call cost shows most. Also timed alone, in-process: the call hook's own work per call
(`PoolObserver._record` with a real Result), so the overhead has a floor that noise cannot hide; and
the CPU time host and worker spend per call in each mode (less disturbed by other jobs than latency).

Target: overhead under 1 % of the round trip (the seed's instrumentation target).
The overhead is the median, over rounds, of (median "on" / median "off") of the round's
interleaved calls, with its interquartile range: on a shared machine the spread says how far to trust it.
Run: .venv/bin/python benchmarks/bench_metrics.py [--rounds 16] [--per-round 1000] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.host.pool import Pool  # noqa: E402

TARGET = 0.01


def switch(pool: Pool, on: bool, address: str) -> None:
    """Metrics on: the call hook and the profiler; off: neither (the endpoint stays up)."""
    observer = pool.observer
    if on:
        pool._call_observer = observer.observe_call  # the hook `pool.observer` installs
        observer.profile_memory()
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:  # a scrape
            resp.read()
    else:
        pool._call_observer = None  # what a pool without an observer has
        observer.stop_profiling()


def timed_call(pool: Pool, a: np.ndarray) -> tuple[float, float]:
    """One call: microseconds of round trip, and of this process's CPU during it (every thread: what
    the profiler's background thread spends falls on whichever call runs at the time, so it is
    measured on its own, `sampler_round_cpu_ms`)."""
    c0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    pool.call("add", a, a)
    t1 = time.perf_counter_ns()
    return (t1 - t0) / 1e3, (time.process_time_ns() - c0) / 1e3


def hook_cost_us(pool: Pool, a: np.ndarray, n: int) -> float:
    """Microseconds of the observer's own bookkeeping per call (a real Result, recorded n times)."""
    result = pool.execute("add", a, a)
    record = pool.observer._record
    t0 = time.perf_counter_ns()
    for _ in range(n):
        record("add", 0.0005, result, None)
    return (time.perf_counter_ns() - t0) / 1e3 / n


def cpu_s(worker: psutil.Process) -> tuple[float, float]:
    """CPU seconds used so far by this process (every thread, ns resolution) and by the worker
    (clock ticks: summed over many blocks the rounding averages out)."""
    t = worker.cpu_times()
    return time.process_time(), t.user + t.system


def sampler_round_cpu_ms(pool: Pool, n: int) -> dict[str, float]:
    """CPU milliseconds one memory-sampling round costs (host, and the worker that answers it); the
    profiler does one per interval (1 s by default) whatever the call rate."""
    import threading

    observer = pool.observer
    observer.stop_profiling()
    history = observer.history  # the history the rounds feed
    worker = psutil.Process(pool.status()[0].pid)
    host0, worker0 = cpu_s(worker)
    for _ in range(n):
        observer._sample_round(history, threading.Event(), timeout=5.0)
    host1, worker1 = cpu_s(worker)
    return {"host": 1e3 * (host1 - host0) / n, "worker": 1e3 * (worker1 - worker0) / n}


def run(rounds: int, per: int) -> dict[str, Any]:
    a = np.ones(16, np.float32)
    samples: dict[str, list[float]] = {"off": [], "on": []}
    host_cpu = {"off": 0.0, "on": 0.0}  # microseconds of host CPU over the timed calls
    worker_cpu = {"off": 0.0, "on": 0.0}  # seconds of worker CPU over the rounds
    paired: list[float] = []  # per round: median on / median off of its interleaved calls
    with Pool(1) as first, Pool(1) as second:
        pools = (first, second)
        workers = [psutil.Process(p.status()[0].pid) for p in pools]
        addresses = [p.serve_metrics("127.0.0.1:0") for p in pools]
        for p in pools:  # warm up
            for _ in range(200):
                p.call("add", a, a)
        for i in range(rounds):
            on, off = (0, 1) if i % 2 == 0 else (1, 0)  # the roles swap every round
            switch(pools[on], True, addresses[on])
            switch(pools[off], False, addresses[off])
            times: dict[str, list[float]] = {"off": [], "on": []}
            w0 = [sum(w.cpu_times()[:2]) for w in workers]
            gc.disable()
            try:
                for j in range(per):
                    order = (("on", on), ("off", off)) if j % 2 == 0 else (("off", off), ("on", on))
                    for mode, k in order:
                        wall, cpu = timed_call(pools[k], a)
                        times[mode].append(wall)
                        host_cpu[mode] += cpu
            finally:
                gc.enable()
            w1 = [sum(w.cpu_times()[:2]) for w in workers]
            worker_cpu["on"] += w1[on] - w0[on]
            worker_cpu["off"] += w1[off] - w0[off]
            for mode in ("off", "on"):
                samples[mode] += times[mode]
            paired.append(statistics.median(times["on"]) / statistics.median(times["off"]))
        switch(first, True, addresses[0])
        hook = hook_cost_us(first, a, 20_000)
        sampling = sampler_round_cpu_ms(first, 20)
    med = {m: statistics.median(v) for m, v in samples.items()}
    # The median of the per-round ratios: drift (other jobs on the machine) cancels within a round.
    overhead = statistics.median(paired) - 1
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
    calls = rounds * per
    cpu_us = {m: {"host": host_cpu[m] / calls, "worker": 1e6 * worker_cpu[m] / calls} for m in ("off", "on")}
    cpu_total = {m: c["host"] + c["worker"] for m, c in cpu_us.items()}
    return {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "rounds": rounds, "per_round": per, "call": "add(2 x 16 float32), two Pool(1), CPU workers",
            "off": summary(samples["off"]), "on": summary(samples["on"]),
            "overhead_ratio": overhead, "overhead_iqr": [q[0] - 1, q[2] - 1],
            "overhead_of_medians": med["on"] / med["off"] - 1, "hook_us": hook, "hook_ratio": hook / med["off"],
            "cpu_us_per_call": cpu_us, "cpu_overhead_ratio": cpu_total["on"] / cpu_total["off"] - 1,
            "sampling_round_cpu_ms": sampling,
            "target_ratio": TARGET, "met": overhead < TARGET}


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "median_us": statistics.median(s), "p90_us": s[int(0.9 * (len(s) - 1))], "min_us": s[0]}


def table(r: dict[str, Any]) -> str:
    lines = [f"{r['call']}; {r['rounds']} rounds x {r['per_round']} calls per mode, interleaved call by call, "
             f"roles swapped each round ({r['machine']['cpus']} CPUs)", "",
             f"{'metrics':<8}{'median':>12}{'p90':>12}{'min':>12}{'x off':>8}"]
    for mode in ("off", "on"):
        s = r[mode]
        lines.append(f"{mode:<8}{s['median_us']:>9.1f} us{s['p90_us']:>9.1f} us{s['min_us']:>9.1f} us"
                     f"{s['median_us'] / r['off']['median_us']:>7.3f}x")
    lo, hi = r["overhead_iqr"]
    lines += ["", f"overhead (median over rounds of on/off medians): {100 * r['overhead_ratio']:+.2f} % "
                  f"(interquartile {100 * lo:+.2f} .. {100 * hi:+.2f} %; target < {100 * r['target_ratio']:.0f} %: "
                  f"{'met' if r['met'] else 'MISSED'})",
              f"the call hook's own work: {r['hook_us']:.2f} us per call = {100 * r['hook_ratio']:.2f} % of the "
              f"median round trip"]
    c = r["cpu_us_per_call"]
    lines.append(f"CPU per call (host + worker): off {c['off']['host']:.1f} + {c['off']['worker']:.1f} us, "
                 f"on {c['on']['host']:.1f} + {c['on']['worker']:.1f} us: {100 * r['cpu_overhead_ratio']:+.2f} %")
    m = r["sampling_round_cpu_ms"]
    lines.append(f"one memory-sampling round (1 per second by default, any call rate): {m['host']:.2f} ms host "
                 f"+ {m['worker']:.2f} ms worker CPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=16, help="rounds (default 16; the pools swap roles each round)")
    ap.add_argument("--per-round", type=int, default=1000, help="timed calls per mode and round (default 1000, "
                    "~1 s: the profiler samples once when switched on and then every second, as in real use)")
    ap.add_argument("--quick", action="store_true", help="6 rounds of 400 calls")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    rounds, per = (6, 400) if args.quick else (args.rounds, args.per_round)
    result = run(rounds, per)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
