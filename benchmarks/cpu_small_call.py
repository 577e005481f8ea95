"""Where the small call's CPU goes: per call, by process and by kind of thread, from the kernel's
accounting (psutil's per-thread CPU times, /proc/<pid>/task/<tid>/status), for the same cases as
bench_grpc.py's echo rows.

  echo/bare-grpc      the bare grpcio echo server (generic handler, no protobuf, no sidecar)
  echo/health         a grpc.health Check through Client to a worker (trivial servicer)
  echo/execute-raw    the identity's ExecuteRequest as pre-encoded bytes to the worker's Execute
  echo/tiny-identity  identity of a 16-byte tensor through Client.call (the small call)

For each: the mean round trip, the CPU microseconds per call of the server process (`server py` =
its Python threads: grpcio's poller and the handler pool; `server ee` = grpcio's C event-engine
threads) and of this process (`host py`, `host ee`), and the context switches per call of both.
Cases run in 10 interleaved blocks. Wall time beyond the sum of the four CPU columns is time
nobody ran (wake-ups, scheduling).

Usage: .venv/bin/python benchmarks/cpu_small_call.py [--calls 3000] [--json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from bench_grpc import raw_execute_of, start_bare_echo, start_worker  # benchmarks/bench_grpc.py (puts the tree on sys.path)
from timing import emit_json  # benchmarks/timing.py

from sidecar.host import Client

BLOCKS = 10


def usage(pid: int) -> tuple[dict[str, float], int]:
    """CPU seconds of `pid`'s live threads summed per kind ("py" / "ee", from the thread's name),
    and their context switches (the process's own `ctxt_switches` count its main thread only)."""
    cpu: dict[str, float] = {"py": 0.0, "ee": 0.0}
    switches = 0
    for thread in psutil.Process(pid).threads():
        try:
            status = dict(line.split(":\t", 1) for line in
                          Path(f"/proc/{pid}/task/{thread.id}/status").read_text().splitlines() if ":\t" in line)
        except FileNotFoundError:  # a thread that ended since threads() listed it
            continue
        cpu["ee" if status["Name"].startswith("event_engine") else "py"] += thread.user_time + thread.system_time
        switches += int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])
    return cpu, switches


def measure(fn: Callable[[], Any], server_pid: int, calls: int, totals: dict[str, float]) -> None:
    """Adds one block of `calls` calls of `fn` to `totals` (seconds, CPU seconds, switches)."""
    before = {"server": usage(server_pid), "host": usage(os.getpid())}
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    totals["wall"] = totals.get("wall", 0.0) + time.perf_counter() - t0
    totals["calls"] = totals.get("calls", 0) + calls
    after = {"server": usage(server_pid), "host": usage(os.getpid())}
    for side in ("server", "host"):
        (cpu0, sw0), (cpu1, sw1) = before[side], after[side]
        for kind in ("py", "ee"):
            totals[f"{side}_{kind}_cpu"] = totals.get(f"{side}_{kind}_cpu", 0.0) + cpu1[kind] - cpu0[kind]
        totals[f"{side}_switches"] = totals.get(f"{side}_switches", 0) + sw1 - sw0


def per_call(totals: dict[str, float]) -> dict[str, float]:
    n = totals["calls"]
    row = {"round_trip_us": totals["wall"] / n * 1e6}
    for key, value in totals.items():
        if key.endswith("_cpu"):
            row[key + "_us"] = value / n * 1e6
        elif key.endswith("_switches"):
            row[key] = value / n
    return row


def run(calls: int) -> dict[str, Any]:
    worker, address = start_worker("--threads", "1", "--max-concurrency", "2")
    echo_proc, echo = start_bare_echo(threads=8)
    client = Client(address)
    tiny = np.arange(4, dtype=np.float32)
    request = bytes(range(90))
    raw_execute = raw_execute_of(address, client, tiny)
    cases: list[tuple[str, int, Callable[[], Any]]] = [
        ("echo/bare-grpc", echo_proc.pid, lambda: echo(request)),
        ("echo/health", worker.pid, client.health),
        ("echo/execute-raw", worker.pid, raw_execute),
        ("echo/tiny-identity", worker.pid, lambda: client.call("identity", tiny)),
    ]
    totals: dict[str, dict[str, float]] = {name: {} for name, _, _ in cases}
    try:
        for _, _, fn in cases:  # warm-up: connections, caches, the handler pools' threads
            for _ in range(300):
                fn()
        for _ in range(BLOCKS):  # interleaved blocks: a shared machine's drift hits every case alike
            for name, pid, fn in cases:
                measure(fn, pid, max(1, calls // BLOCKS), totals[name])
    finally:
        client.close()
        assert echo_proc.stdin is not None
        echo_proc.stdin.close()
        echo_proc.wait(30)
        worker.terminate()
        worker.wait(30)
    rows = [{"case": name, **per_call(totals[name])} for name, _, _ in cases]
    return {"calls": calls, "cpus": os.cpu_count(), "python": sys.version.split()[0], "results": rows}


def table(report: dict[str, Any]) -> str:
    head = (f"{'case':20s} {'round trip':>11s} {'server py':>10s} {'server ee':>10s} {'host py':>9s} "
            f"{'host ee':>9s} {'switches':>9s}")
    lines = [f"{report['calls']} calls per case, {report['cpus']} CPUs, python {report['python']}",
             "(CPU microseconds per call; switches = context switches per call, both processes)", "",
             head, "-" * len(head)]
    for r in report["results"]:
        switches = sum(v for k, v in r.items() if k.endswith("_switches"))
        lines.append(f"{r['case']:20s} {r['round_trip_us']:9.1f}us {r['server_py_cpu_us']:8.1f}us "
                     f"{r['server_ee_cpu_us']:8.1f}us {r['host_py_cpu_us']:7.1f}us {r['host_ee_cpu_us']:7.1f}us "
                     f"{switches:9.1f}")
    by = {r["case"]: r for r in report["results"]}
    bare, health = by["echo/bare-grpc"], by["echo/health"]
    for name in ("echo/health", "echo/execute-raw", "echo/tiny-identity"):
        r = by[name]
        over_health = ("" if r is health else
                       f", {r['server_py_cpu_us'] - health['server_py_cpu_us']:+.0f} us over health")
        lines.append(f"{name}: {r['round_trip_us'] / bare['round_trip_us']:.2f}x the bare echo; server Python "
                     f"{r['server_py_cpu_us'] - bare['server_py_cpu_us']:+.0f} us/call over it{over_health}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = run(args.calls)
    if not emit_json(report, None, args.json):
        print(table(report))


if __name__ == "__main__":
    main()
