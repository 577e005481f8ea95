"""Pool benchmark: how fast a crashed worker is replaced, and what the pool costs per call.

Replacement (one pool per mode, one worker, so the retried call has to wait for the replacement):
  template  the replacement is forked from the pool's template, which imported torch once
  spare     a warm spare (spares=1) takes the dead worker's place; a new spare is started behind it
  cold      use_template=False: `python -m sidecar serve` from scratch (imports torch every time)

Each trial: an idempotent `debug.sleep(50 ms)` call is running on the worker, the worker gets
SIGKILL, and we time (from just before the kill) until
  serving   the replacement is installed in the pool (its ready line came: it serves RPCs), and
  retried   the call that was in flight has completed on the replacement (it includes the retry
            backoff, 25-50 ms, and the op's own 50 ms: what a caller sees).
Also the replacement's unique memory (USS) and the one-time template start.

Throughput: threads issue small `add` calls (16 float32 each, inline) for a fixed time through
pools of 1, 2 and 4 workers, next to the same calls through one bare `Client` (no pool); with one
thread, the difference between the bare client and Pool(1) is the pool's own cost per call.

Where a small call's time goes (one thread, the same `add`), each row adding one layer:
  Client, replayed answer   the host's own work: encode inputs, build the Call, decode the result
                            (a transport that answers every call with one recorded answer)
  Client, in-process        plus the worker's dispatcher, in this process (InProcessTransport)
  Client, gRPC              plus the RPC and the worker's server: a real call
  Pool(1), gRPC             plus the pool's routing and bookkeeping

Run: .venv/bin/python benchmarks/bench_pool.py [--trials 15] [--cold-trials 5] [--seconds 3]
     [--device cuda] [--quick] [--json] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil

from sidecar.host.client import Client
from sidecar.worker.local_transport import InProcessTransport
from sidecar.host.pool import Pool
from sidecar.host.spawn import start_worker
from sidecar.protocol.calls import Call, CallResult
from timing import emit_json  # benchmarks/timing.py (a sibling module)

TARGET_MS = 100.0
BUSY_S = 0.05


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _uss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_full_info().uss
    except (psutil.Error, AttributeError):
        return None


def replacement(mode: str, trials: int, device: str = "auto") -> dict[str, Any]:
    kwargs: dict[str, Any] = {"use_template": mode != "cold", "spares": 1 if mode == "spare" else 0,
                              "device": device}
    t0 = time.perf_counter()
    pool = Pool(1, debug_ops=True, **kwargs)  # the defaults: kills from outside open no breaker
    start_s = time.perf_counter() - t0
    serving: list[float] = []
    retried: list[float] = []
    uss: list[int] = []
    restarted = threading.Event()
    stamp: dict[str, float] = {}

    def on_event(ev: Any) -> None:
        if ev.event == "restart" and "restart" not in stamp:
            stamp["restart"] = time.perf_counter()
            restarted.set()

    pool.subscribe(on_event)
    try:
        for _ in range(trials):
            assert pool.wait_ready(60, spares=True)
            pool.call("debug.pid")  # the worker has served: a crash now restarts it without backoff
            stamp.clear()
            restarted.clear()
            box: dict[str, Any] = {}

            def busy(box: dict[str, Any] = box) -> None:  # this trial's box
                box["out"] = pool.call("debug.sleep", seconds=BUSY_S, idempotent=True, timeout=120)
                box["t"] = time.perf_counter()

            t = threading.Thread(target=busy)
            t.start()
            while not any(r.inflight for r in pool.status()):
                time.sleep(0.0005)
            time.sleep(0.01)  # the op is running now
            victim = pool.status()[0].pid
            t_kill = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            restarted.wait(120)
            t.join(120)
            serving.append((stamp["restart"] - t_kill) * 1000)
            retried.append((box["t"] - t_kill) * 1000)
            pid = pool.status()[0].pid
            if pid is not None and (m := _uss(pid)) is not None:
                uss.append(m)
        template_s = pool.template.startup_s if pool.template is not None else None
    finally:
        pool.close()
    return {"mode": mode, "trials": trials, "pool_start_s": start_s, "template_start_s": template_s,
            "serving_ms": serving, "retried_ms": retried,
            "serving_median_ms": statistics.median(serving), "serving_p90_ms": _pct(serving, 0.9),
            "retried_median_ms": statistics.median(retried), "retried_p90_ms": _pct(retried, 0.9),
            "worker_uss_mb": statistics.median(uss) / 2**20 if uss else None}


def _drive(fn: Any, threads: int, seconds: float) -> int:
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    a = np.ones(16, np.float32)

    def loop(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            fn("add", a, a)
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


class ReplayTransport(InProcessTransport):
    """Runs the first call on an in-process runtime, then answers every call with that same answer:
    what a Client costs beyond it is its own work."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(runtime)
        self._answer: CallResult | None = None

    def execute(self, call: Call, timeout: float | None = None) -> CallResult:
        if self._answer is None:
            self._answer = super().execute(call, timeout)
        return self._answer


def small_call_layers(seconds: float, device: str = "auto") -> list[dict[str, Any]]:
    """us per small call through each layer (see the module doc), one thread."""
    from sidecar.worker.runtime import WorkerOptions, build_runtime

    def per_call(fn: Any) -> float:
        _drive(fn, 1, min(0.5, seconds))  # warm up
        return seconds / _drive(fn, 1, seconds) * 1e6

    rows: list[dict[str, Any]] = []
    runtime = build_runtime(WorkerOptions(device="cpu" if device == "auto" else device))
    try:
        for setup, transport in (("Client, replayed answer", ReplayTransport(runtime)),
                                 ("Client, in-process", InProcessTransport(runtime))):
            with Client(transport=transport) as client:
                rows.append({"setup": setup, "us_per_call": per_call(client.call)})
    finally:
        runtime.close()
    proc = start_worker(["--watch-stdin", "--device", device])
    try:
        with Client(proc.address) as client:
            rows.append({"setup": "Client, gRPC", "us_per_call": per_call(client.call)})
    finally:
        proc.terminate()
        proc.wait_exit(15)
    with Pool(1, device=device) as pool:
        rows.append({"setup": "Pool(1), gRPC", "us_per_call": per_call(pool.call)})
    return rows


def throughput(seconds: float, threads_per_worker: int, device: str = "auto") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    proc = start_worker(["--watch-stdin", "--device", device])
    client = Client(proc.address)
    try:
        threads = max(2, threads_per_worker)  # as many as Pool(1) gets below
        _drive(client.call, threads, 0.5)  # warm up
        n = _drive(client.call, 1, seconds)
        rows.append({"setup": "bare Client, 1 worker", "workers": 1, "threads": 1, "calls_per_s": n / seconds})
        n = _drive(client.call, threads, seconds)
        rows.append({"setup": "bare Client, 1 worker", "workers": 1, "threads": threads,
                     "calls_per_s": n / seconds})
    finally:
        client.close()
        proc.terminate()
        proc.wait_exit(15)
    for workers in (1, 2, 4):
        with Pool(workers, device=device) as pool:
            threads = max(2, workers * threads_per_worker)
            _drive(pool.call, threads, 0.5)
            if workers == 1:  # the pool's own cost per call, next to the bare client's
                n = _drive(pool.call, 1, seconds)
                rows.append({"setup": "Pool(1)", "workers": 1, "threads": 1, "calls_per_s": n / seconds})
            n = _drive(pool.call, threads, seconds)
            rows.append({"setup": f"Pool({workers})", "workers": workers, "threads": threads,
                         "calls_per_s": n / seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=15, help="kills per mode for template and spare (default 15)")
    ap.add_argument("--cold-trials", type=int, default=5, help="kills for the cold mode (default 5)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput run (default 3)")
    ap.add_argument("--threads-per-worker", type=int, default=2)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--device", default="auto", help="the workers' --device (default auto)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--json-out", default=None, help="also write the JSON to this file")
    ap.add_argument("--quick", action="store_true",
                    help="3 kills per mode (2 cold), 1 s throughput runs (benchmarks/run_all.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.cold_trials, args.seconds = 3, 2, 1.0

    modes = [replacement("template", args.trials, args.device), replacement("spare", args.trials, args.device),
             replacement("cold", args.cold_trials, args.device)]
    tput = [] if args.skip_throughput else throughput(args.seconds, args.threads_per_worker, args.device)
    layers = [] if args.skip_throughput else small_call_layers(args.seconds, args.device)
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "torch": __import__("torch").__version__, "device": args.device}
    doc = {"env": env, "replacement": modes, "throughput": tput, "small_call_layers": layers}
    if emit_json(doc, args.json_out, args.json):
        return 0

    cold = next(m for m in modes if m["mode"] == "cold")
    print(f"Replacement of a SIGKILLed busy worker ({env['cpus']} CPUs, torch {env['torch']}, "
          f"device {args.device}); "
          f"times from the kill, target < {TARGET_MS:.0f} ms median")
    print(f"{'mode':<9} {'trials':>6} {'serving med':>12} {'p90':>8} {'retried med':>12} {'p90':>8} "
          f"{'vs cold':>8} {'USS MB':>7}")
    for m in modes:
        ratio = cold["serving_median_ms"] / m["serving_median_ms"] if m["serving_median_ms"] else float("nan")
        uss = f"{m['worker_uss_mb']:.0f}" if m["worker_uss_mb"] else "-"
        print(f"{m['mode']:<9} {m['trials']:>6} {m['serving_median_ms']:>10.1f}ms {m['serving_p90_ms']:>6.1f}ms "
              f"{m['retried_median_ms']:>10.1f}ms {m['retried_p90_ms']:>6.1f}ms {ratio:>7.1f}x {uss:>7}")
    tmpl = next(m for m in modes if m["mode"] == "template")
    print(f"one-time template start: {tmpl['template_start_s']:.2f} s; pool start (1 worker): "
          + ", ".join(f"{m['mode']} {m['pool_start_s']:.2f} s" for m in modes))
    print(f"('retried' includes the op's own {BUSY_S * 1000:.0f} ms and the retry backoff)")
    if tput:
        bare = {r["threads"]: r["calls_per_s"] for r in tput if r["setup"].startswith("bare")}
        print()
        print("Small calls (add, 2 x 16 float32, inline); 'vs bare' compares with the bare client at the")
        print("same thread count (1 thread), else with the bare client's multi-threaded row")
        print(f"{'setup':<24} {'threads':>7} {'calls/s':>9} {'us/call':>8} {'vs bare':>8}")
        for r in tput:
            base = bare.get(r["threads"], max(bare.values()))
            us = 1e6 / r["calls_per_s"] * r["threads"] if r["calls_per_s"] else float("nan")
            print(f"{r['setup']:<24} {r['threads']:>7} {r['calls_per_s']:>9.0f} {us:>8.0f} "
                  f"{r['calls_per_s'] / base:>7.2f}x")
    if layers:
        print()
        print("Where a small call's time goes (one thread; each row adds a layer to the one above)")
        print(f"{'setup':<24} {'us/call':>8} {'added':>8} {'share':>7}")
        total = layers[-1]["us_per_call"]
        before = 0.0
        for r in layers:
            us = r["us_per_call"]
            print(f"{r['setup']:<24} {us:>8.1f} {us - before:>+8.1f} {(us - before) / total:>6.0%}")
            before = us
    return 0


if __name__ == "__main__":
    sys.exit(main())
