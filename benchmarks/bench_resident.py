"""Resident models: inference on a resident model vs loading it per call, and how long a crash costs
before the pool serves again with the model restored.

Inference (one Pool(1) worker, the MLP of benchmarks/resident_bench_ops.py: 8.4 M parameters, a
batch of 8 x 1024 float32):
  resident        `pool.load("model", ...)` once, then `bench.resident_forward` (ctx.resource)
  load per call   `bench.load_and_forward`: the checkpoint is read and the model built in every call

Recovery (one serving worker, the model loaded; each trial SIGKILLs the worker and times, from just
before the kill):
  serving         the replacement is installed in the pool with the model restored (its `restart`
                  event, which the pool publishes only after the replay)
  first call      a `bench.resident_forward` issued right after the kill has its answer (what a
                  caller sees: it waits for the replacement, then runs on the restored model)
modes: template (the replacement is forked from the template, then replays the load) and spare (a
warm spare that loaded the model when it was loaded takes over; a new spare restores behind it).

Run: .venv/bin/python benchmarks/bench_resident.py [--calls 30] [--trials 10] [--device cpu]
     [--quick] [--json] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from resident_bench_ops import WIDTH, make_mlp  # noqa: E402
from timing import emit_json  # noqa: E402

from sidecar.host.pool import Pool  # noqa: E402

OPS = str(HERE / "resident_bench_ops.py")


def _pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values), "p90_ms": _pct(values, 0.9)}


def _checkpoint(directory: str) -> str:
    torch.manual_seed(0)
    path = os.path.join(directory, "bench_mlp.pt")
    torch.save(make_mlp().state_dict(), path)
    return path


def inference(checkpoint: str, calls: int, device: str) -> dict[str, Any]:
    x = np.random.rand(8, WIDTH).astype(np.float32)
    with Pool(1, device=device, ops=[OPS]) as pool:
        [info] = pool.load("model", "bench_mlp", checkpoint=checkpoint)
        rows = {}
        for case, call in (("resident", lambda: pool.call("bench.resident_forward", x)),
                           ("load per call", lambda: pool.call("bench.load_and_forward", x, checkpoint=checkpoint))):
            call()  # warm
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1000)
            rows[case] = {"case": case, "calls": calls, **_summary(times)}
        resident = rows["resident"]["median_ms"]
        for r in rows.values():
            r["vs_resident"] = r["median_ms"] / resident
    return {"model_host_bytes": info["host_bytes"], "load_ms": info["load_ns"] / 1e6, "rows": list(rows.values())}


def recovery(checkpoint: str, mode: str, trials: int, device: str) -> dict[str, Any]:
    x = np.random.rand(8, WIDTH).astype(np.float32)
    serving: list[float] = []
    first_call: list[float] = []
    stamp: dict[str, float] = {}
    restarted = threading.Event()

    def on_event(ev: Any) -> None:
        if ev.event == "restart" and "restart" not in stamp:
            stamp["restart"] = time.perf_counter()
            restarted.set()

    with Pool(1, device=device, ops=[OPS], spares=1 if mode == "spare" else 0) as pool:
        assert pool.wait_ready(120, spares=True)
        pool.load("model", "bench_mlp", checkpoint=checkpoint)
        pool.subscribe(on_event)
        for _ in range(trials):
            assert pool.wait_ready(120, spares=True)
            pool.call("bench.resident_forward", x)  # it served: a crash now restarts it without backoff
            stamp.clear()
            restarted.clear()
            victim = pool.status()[0].pid
            assert victim is not None
            t_kill = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            pool.call("bench.resident_forward", x, timeout=120)
            t_answer = time.perf_counter()
            assert restarted.wait(120)
            serving.append((stamp["restart"] - t_kill) * 1000)
            first_call.append((t_answer - t_kill) * 1000)
    return {"mode": mode, "trials": trials, "serving": _summary(serving), "first_call": _summary(first_call),
            "serving_ms": serving, "first_call_ms": first_call}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="10 calls, 3 trials (benchmarks/run_all.py)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = ap.parse_args(argv)
    calls, trials = (10, 3) if args.quick else (args.calls, args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(tmp)
        doc: dict[str, Any] = {
            "env": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "device": args.device},
            "inference": inference(checkpoint, calls, args.device),
            "recovery": [recovery(checkpoint, mode, trials, args.device) for mode in ("template", "spare")],
        }
    rows = {r["case"]: r for r in doc["inference"]["rows"]}
    doc["x_load_per_call_vs_resident"] = rows["load per call"]["vs_resident"]
    if emit_json(doc, args.json_out, args.json):
        return 0
    env, inf = doc["env"], doc["inference"]
    print(f"Inference, MLP of 8.4 M parameters, batch 8 x {WIDTH} float32 ({env['cpus']} CPUs, torch {env['torch']}, "
          f"{env['device']}); the resident copy took {inf['model_host_bytes'] / 2**20:.0f} MiB RSS, "
          f"loaded in {inf['load_ms']:.0f} ms")
    print(f"{'case':<15} {'calls':>5} {'median':>10} {'p90':>10} {'vs resident':>12}")
    for r in inf["rows"]:
        print(f"{r['case']:<15} {r['calls']:>5} {r['median_ms']:>8.2f}ms {r['p90_ms']:>8.2f}ms {r['vs_resident']:>11.1f}x")
    print()
    print("Crash (SIGKILL) -> serving with the model restored, one serving worker")
    print(f"{'mode':<9} {'trials':>6} {'serving med':>12} {'p90':>9} {'first call med':>15} {'p90':>9}")
    for m in doc["recovery"]:
        s, c = m["serving"], m["first_call"]
        print(f"{m['mode']:<9} {m['trials']:>6} {s['median_ms']:>10.1f}ms {s['p90_ms']:>7.1f}ms "
              f"{c['median_ms']:>13.1f}ms {c['p90_ms']:>7.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
