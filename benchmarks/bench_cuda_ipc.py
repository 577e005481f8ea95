"""CUDA benchmark: a GPU tensor's round trip through a sidecar worker, side by side.

A real worker (`sidecar serve --device cuda`) and the host `Client`; for each size (float32):

  ipc_roundtrip     identity op, CUDA tensor in by IPC handle, output device-resident (placement
                    "device"): the handle goes out, the same handle comes back, no byte moves. The
                    previous result is dropped after the next call returns (as a loop naturally does).
  ipc_fresh_output  add(t, 0): the worker writes a new tensor in its own memory; the host opens the
                    worker's handle (cuIpcOpenMemHandle) and closes it when the result is dropped.
  shm_staging       the same round trip without CUDA IPC: host GPU -> its shared-memory arena, worker
                    maps it -> GPU -> identity -> back to shared memory -> host -> GPU.
  torch_mp          torch.multiprocessing: the tensor to a spawned process over a torch queue and
                    back (torch's own CUDA IPC with its reference-counting protocol); the peer must
                    send back a clone, since torch refuses to re-send a tensor it received.
  d2h_pinned        reference: one device-to-host copy of the bytes into pinned memory (in-process),
                    what a single host copy on the path would cost at least.
  h2d_shm_pageable  shared-memory segment -> GPU copy (what a worker does with a shm input),
  h2d_shm_pinned    the same after the segment was registered with the driver (cuMemHostRegister).

Target (issue 6): ipc_roundtrip independent of size and under 300 us median on an H200.
Run: python benchmarks/bench_cuda_ipc.py [--sizes 1MB,100MB,1GB] [--repeat N] [--quick] [--json]
On a machine without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import emit_json, parse_sizes, sample_us  # noqa: E402  (benchmarks/timing.py)

SIZES = {"1MB": 10**6, "100MB": 10**8, "1GB": 10**9}
TARGET_US = 300.0
FLAT_RATIO = 1.5  # "size-independent": the 1 GB median within 1.5x of the 1 MB median


def cuda_reason() -> str | None:
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable: {err}"
    if not torch.version.cuda or not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    from sidecar.dataplane import cuda_ipc

    return cuda_ipc.unavailable_reason()


def mp_echo(q_in: Any, q_out: Any) -> None:
    """torch.multiprocessing peer: sends every tensor back.

    torch.multiprocessing refuses to send on a CUDA tensor that came from another process
    ("Attempted to send CUDA tensor received from another process"), so the peer must clone it: a
    device-to-device copy that an identity round trip by CUDA IPC handle does not need.
    """
    import torch  # noqa: F401  (registers torch's reductions in the child)

    while True:
        x = q_in.get()
        if x is None:
            return
        y = x.clone()
        torch.cuda.synchronize()
        q_out.put(y)
        del x


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> dict[str, float]:
    times = sample_us(fn, repeat, warmup)
    return {"median_us": statistics.median(times), "min_us": min(times), "max_us": max(times), "n": repeat}


class Bench:
    def __init__(self, client: Any, mp_queues: tuple[Any, Any]) -> None:
        self.client = client
        self.q_in, self.q_out = mp_queues
        self.keep: Any = None

    def run_size(self, label: str, nbytes: int, repeat: int) -> list[dict[str, Any]]:
        import torch

        from sidecar.dataplane import cuda_ipc, segments

        n = nbytes // 4
        t = torch.randn(n, device="cuda")
        torch.cuda.synchronize()
        reps = repeat if nbytes < 10**9 else max(5, repeat // 2)
        rows: list[dict[str, Any]] = []

        def record(name: str, fn: Callable[[], Any], reps: int, warmup: int = 2) -> None:
            # One failing scenario must not cost the others their figures (the GPU run is one shot).
            try:
                res: dict[str, Any] = timed(fn, reps, warmup)
            except Exception as err:
                res = {"error": f"{type(err).__name__}: {err}"[:500]}
                print(f"# {label} {name} failed: {res['error']}", file=sys.stderr, flush=True)
            rows.append({"size": label, "bytes": nbytes, "scenario": name, **res})

        def ipc_roundtrip() -> None:
            self.keep = self.client.call("identity", t, placement="device")
            assert self.keep.data_ptr() == t.data_ptr()  # our own memory came back
        record("ipc_roundtrip", ipc_roundtrip, max(reps, 30))

        def ipc_fresh() -> None:
            self.keep = self.client.call("add", t, 0.0, placement="device")
        record("ipc_fresh_output", ipc_fresh, max(reps, 30))
        self.keep = None
        gc.collect()

        staging = self.client.empty((n,), "float32", torch=True)  # the host's arena: shared memory

        def shm_staging() -> None:
            staging.copy_(t)
            out = self.client.call("identity", staging)
            self.keep = out.to("cuda")
            torch.cuda.synchronize()
        record("shm_staging", shm_staging, reps if nbytes < 10**9 else 3, warmup=1)
        self.keep = None
        staging = None  # rebound, not del: the closures above still name it (frees the block)
        gc.collect()

        def torch_mp() -> None:
            self.q_in.put(t)
            self.keep = self.q_out.get(timeout=20)  # a failing peer must not hang the run
        record("torch_mp", torch_mp, max(reps, 30))
        self.keep = None
        gc.collect()

        pinned = torch.empty(n, dtype=torch.float32, pin_memory=True)

        def d2h() -> None:
            pinned.copy_(t)
            torch.cuda.synchronize()
        record("d2h_pinned", d2h, reps)
        pinned = None

        seg = segments.create_segment(n * 4, "benchcuda")
        try:
            host = torch.frombuffer(memoryview(seg), dtype=torch.float32)
            host.fill_(1.0)
            dst = torch.empty(n, device="cuda")

            def h2d() -> None:
                dst.copy_(host, non_blocking=True)
                torch.cuda.synchronize()
            record("h2d_shm_pageable", h2d, reps)
            if cuda_ipc.register_host_memory(seg):
                record("h2d_shm_pinned", h2d, reps)
                host = None  # the view must go before the segment is unregistered/closed
                cuda_ipc.unregister_host_memory(seg)
            else:
                host = None
        finally:
            seg.close()
            segments.unlink_segment(seg.name)
        t = dst = None  # rebound (closures name them): the device memory goes before the next size
        gc.collect()
        torch.cuda.empty_cache()
        return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["size"], r["scenario"]): r for r in rows if "median_us" in r}
    for r in rows:
        ipc = by.get((r["size"], "ipc_roundtrip"))
        ok = "median_us" in r
        r["x_ipc"] = r["median_us"] / ipc["median_us"] if ok and ipc else None
        r["GBps"] = r["bytes"] / (r["median_us"] * 1e-6) / 1e9 if ok and r["median_us"] else None
    ipc_rows = [r for r in rows if r["scenario"] == "ipc_roundtrip"]
    meds = [r["median_us"] for r in ipc_rows if "median_us" in r]
    under = bool(meds) and len(meds) == len(ipc_rows) and all(m < TARGET_US for m in meds)
    flat = bool(meds) and max(meds) / min(meds) <= FLAT_RATIO
    return {"ipc_under_300us": under, "ipc_size_independent": flat,
            "ipc_max_over_min": max(meds) / min(meds) if meds else None}


def fmt_us(us: float) -> str:
    return f"{us:,.1f} us" if us < 10_000 else f"{us / 1000:,.1f} ms"


def print_table(rows: list[dict[str, Any]], verdict: dict[str, Any]) -> None:
    head = f"{'size':>6}  {'scenario':<17} {'median':>11} {'min':>11} {'x ipc':>9} {'GB/s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>6}  {r['scenario']:<17} FAILED: {r['error']}")
            continue
        ratio = f"{r['x_ipc']:.1f}" if r["x_ipc"] is not None else "-"
        gbps = f"{r['GBps']:.1f}" if r["GBps"] is not None and r["scenario"] != "ipc_roundtrip" else "-"
        print(f"{r['size']:>6}  {r['scenario']:<17} {fmt_us(r['median_us']):>11} {fmt_us(r['min_us']):>11} "
              f"{ratio:>9} {gbps:>8}")
    print()
    spread = verdict["ipc_max_over_min"]
    print(f"target: ipc_roundtrip < {TARGET_US:.0f} us median at every size: "
          f"{'met' if verdict['ipc_under_300us'] else 'MISSED'}; size-independent (max/min "
          f"{'-' if spread is None else f'{spread:.2f}'} <= {FLAT_RATIO}): "
          f"{'met' if verdict['ipc_size_independent'] else 'MISSED'}")


def machine() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    from sidecar import _cudaipc

    return {"gpu": props.name, "gpu_memory": props.total_memory, "driver_cuda": _cudaipc.driver_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--repeat", type=int, default=20, help="timed round trips per scenario (default 20; "
                    "IPC scenarios use at least 30, 1 GB copies fewer)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", type=Path, default=None, metavar="FILE",
                    help="also write the JSON to FILE (the table is printed)")
    ap.add_argument("--quick", action="store_true", help="1MB and 100MB, 5 round trips each (benchmarks/run_all.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat = "1MB,100MB", 5
    sizes = parse_sizes(ap, args.sizes, SIZES)
    reason = cuda_reason()
    if reason is not None:
        doc = {"cuda": False, "reason": reason, "results": []}
        if not emit_json(doc, args.json_out, args.json, indent=None):
            print(f"CUDA is absent here ({reason}): nothing to measure.")
        return 0

    import torch
    import torch.multiprocessing as tmp

    from sidecar.host import Client
    from sidecar.host.spawn import start_worker

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = "benchcuda" + os.urandom(3).hex()
    proc = start_worker(["--device", "cuda", "--run-id", run, "--max-concurrency", "1"], env=env,
                        start_timeout=180, cwd=str(ROOT))
    ctx = tmp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    peer = ctx.Process(target=mp_echo, args=(q_in, q_out), daemon=True)
    peer.start()
    rows: list[dict[str, Any]] = []
    client = Client(proc.address, run_id=run, timeout=300)
    try:
        bench = Bench(client, (q_in, q_out))
        for label in sizes:
            rows.extend(bench.run_size(label, SIZES[label], args.repeat))
            print(f"# {label} done", file=sys.stderr, flush=True)
        bench.keep = None
        gc.collect()
        client.release()
    finally:
        q_in.put(None)
        peer.join(30)
        if peer.is_alive():
            peer.kill()
        client.close()
        proc.terminate()
        proc.wait_exit(30)
        if proc.alive:
            proc.kill()
    verdict = summarize(rows)
    m = machine()
    from sidecar.dataplane import cuda_ipc

    doc = {"cuda": True, "machine": m, "results": rows, "verdict": verdict, "host_ipc_stats": cuda_ipc.cache_stats()}
    if not emit_json(doc, args.json_out, args.json):
        print(f"# {m['gpu']} ({m['gpu_memory'] >> 30} GiB), driver CUDA {m['driver_cuda']}, torch {m['torch']} "
              f"(CUDA {m['torch_cuda']}), Python {m['python']}, {m['cpus']} CPUs")
        print_table(rows, verdict)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
