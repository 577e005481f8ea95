"""Streams against a unary call per chunk, and health-check latency while every slot computes.

One worker (`sidecar serve`, CPU, the test ops in tests/stream_ops_module.py and
tests/busy_ops_module.py), measured from this process:

  stream/blocking   Client.stream("count_up", n=N)            (gRPC ExecuteStream, AckChunks)
  stream/asyncio    AsyncClient.stream(...) on grpc.aio         (the same worker, the same decode)
  unary/per-chunk   N x Client.call("chunk_at", i=i)           (what a host without streams does)
  elixir/stream     Sidecar.stream/4 from a real VM (bridge/bench/stream.exs, a pool of one worker,
                    tensors copied out of the segment), against elixir/unary-per-chunk (Sidecar.call)

for small chunks (one int, inline) and 1 MiB chunks (a NumPy array in shared memory under a lease
per chunk): time to first chunk (median of a fresh stream's first chunk) and chunks per second
(over a stream of N), with the ratio stream / unary. Then the latency of gRPC health checks while
every concurrency slot runs a long op: Python bytecode (`spin`), torch kernels (`matmuls`), and one C
call that holds the GIL (`hold_gil`: the case no in-process server can bound; the pool reports such
a worker BUSY instead of killing it).

Usage: .venv/bin/python benchmarks/bench_stream.py [--chunks 2000] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.host import Client  # noqa: E402 - after the sys.path line
from sidecar.host.aio import AsyncClient  # noqa: E402 - after the sys.path line
from tests.workers import start_worker  # noqa: E402 - after the sys.path line

OPS = ("--ops", str(ROOT / "tests" / "stream_ops_module.py"), "--ops", str(ROOT / "tests" / "busy_ops_module.py"))
SIZES = {"small": 0, "1MiB": 1 << 20}
SLOTS = 2


def first_chunk_ms(client: Client, nbytes: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        stream = client.stream("count_up", n=1, nbytes=nbytes)
        next(stream)
        times.append((time.perf_counter() - t) * 1e3)
        for _ in stream:
            pass
    return statistics.median(times)


def unary_first_ms(client: Client, nbytes: int, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t = time.perf_counter()
        client.call("chunk_at", i=i, nbytes=nbytes)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def blocking_rate(client: Client, n: int, nbytes: int) -> float:
    t = time.perf_counter()
    got = sum(1 for _ in client.stream("count_up", n=n, nbytes=nbytes))
    assert got == n
    return n / (time.perf_counter() - t)


def unary_rate(client: Client, n: int, nbytes: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        client.call("chunk_at", i=i, nbytes=nbytes)
    return n / (time.perf_counter() - t)


def asyncio_figures(address: str, n: int, nbytes: int, repeat: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        async with AsyncClient(address) as client:
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                stream = client.stream("count_up", n=1, nbytes=nbytes)
                await stream.__anext__()
                times.append((time.perf_counter() - t) * 1e3)
                async for _ in stream:
                    pass
            t = time.perf_counter()
            got = 0
            async for _ in client.stream("count_up", n=n, nbytes=nbytes):
                got += 1
            assert got == n
            return statistics.median(times), n / (time.perf_counter() - t)
    return asyncio.run(main())


def elixir_rows(n: int, repeat: int) -> list[dict[str, Any]]:
    """bridge/bench/stream.exs in a real VM (needs `mix`), with ratios against its unary rows."""
    mix = shutil.which("mix")
    if mix is None:
        sys.exit("Elixir is not installed (no `mix`): apt-get install -y elixir")
    env = {**os.environ, "SIDECAR_PYTHON": sys.executable, "HEX_OFFLINE": "1"}
    proc = subprocess.run([mix, "run", "bench/stream.exs", "--chunks", str(n), "--repeat", str(repeat)],
                          cwd=ROOT / "bridge", env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench/stream.exs failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")))[
        "rows"]
    unary = {r["size"]: r["chunks_per_s"] for r in rows if r["case"] == "elixir/unary-per-chunk"}
    for r in rows:
        r["x_vs_unary"] = round(r["chunks_per_s"] / unary[r["size"]], 2)
    return rows


def health_while_busy(client: Client, op: str, seconds: float) -> dict[str, Any]:
    """Health-check latencies while SLOTS calls of `op` run (checks back to back, 2 s timeout)."""
    busy: list[Future[Any]] = [client.submit(op, seconds=seconds) for _ in range(SLOTS)]
    time.sleep(0.2)  # let both calls start in the worker
    latencies, missed = [], 0
    while not all(f.done() for f in busy):
        t = time.perf_counter()
        try:
            client.health(timeout=2.0)
            latencies.append((time.perf_counter() - t) * 1e3)
        except Exception:  # noqa: BLE001 - a check that got no answer within the pool's default timeout
            missed += 1
    for f in busy:
        f.result()
    qs = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"op": op, "checks": len(latencies), "missed": missed, "p50_ms": round(qs[49], 2),
            "p99_ms": round(qs[98], 2), "max_ms": round(max(latencies), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--busy-s", type=float, default=4.0)
    ap.add_argument("--quick", action="store_true", help="fewer chunks, shorter busy phases")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = 300 if args.quick else args.chunks
    busy_s = 1.5 if args.quick else args.busy_s
    repeat = 10 if args.quick else 30
    rows: list[dict[str, Any]] = []
    with start_worker("--device", "cpu", "--threads", "1", "--max-concurrency", str(SLOTS), *OPS) as w, \
            Client(w.address) as client:
        for size, nbytes in SIZES.items():
            count = n if nbytes == 0 else max(50, n // 10)
            unary_ttfc, unary = unary_first_ms(client, nbytes, repeat), unary_rate(client, count, nbytes)
            blocking_ttfc, blocking = first_chunk_ms(client, nbytes, repeat), blocking_rate(client, count, nbytes)
            aio_ttfc, aio = asyncio_figures(w.address, count, nbytes, repeat)
            for host, ttfc, rate in (("stream/blocking", blocking_ttfc, blocking), ("stream/asyncio", aio_ttfc, aio),
                                     ("unary/per-chunk", unary_ttfc, unary)):
                rows.append({"case": host, "size": size, "chunks": count, "first_chunk_ms": round(ttfc, 3),
                             "chunks_per_s": round(rate, 1), "x_vs_unary": round(rate / unary, 2)})
        health = [health_while_busy(client, op, busy_s) for op in ("spin", "matmuls", "hold_gil")]
    rows += elixir_rows(n, repeat)
    if args.json:
        print(json.dumps({"results": rows, "health_while_busy": health, "slots": SLOTS}, indent=2))
        return
    print(f"{'case':22} {'size':6} {'chunks':>6} {'first chunk ms':>15} {'chunks/s':>10} {'x unary':>8}")
    for r in rows:
        print(f"{r['case']:22} {r['size']:6} {r['chunks']:>6} {r['first_chunk_ms']:>15.3f} {r['chunks_per_s']:>10.1f} "
              f"{r['x_vs_unary']:>8.2f}")
    print(f"\nhealth checks while {SLOTS} of {SLOTS} slots compute (2 s timeout each; missed = no answer in 2 s)")
    print(f"{'op':10} {'checks':>7} {'missed':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for h in health:
        print(f"{h['op']:10} {h['checks']:>7} {h['missed']:>7} {h['p50_ms']:>8.2f} {h['p99_ms']:>8.2f} {h['max_ms']:>8.2f}")


if __name__ == "__main__":
    main()
