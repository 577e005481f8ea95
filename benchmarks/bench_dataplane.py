"""Data-plane benchmark: how long it takes a tensor to reach another process, side by side.

Two processes (this one and a spawned worker) joined by a multiprocessing pipe. For each size:

  ping            pipe round trip with an empty message: the floor under every transfer below
  arena_view      (a) the array already lies in an arena block: to_ref (zero copy) -> descriptor over
                  the pipe -> worker maps it through its MappingCache (a hit) -> ack
  arena_copy      (b) a plain NumPy array: to_ref copies it into a warm arena block -> descriptor ->
                  worker view -> ack -> block released (reused by the next transfer)
  memcpy          np.copyto of the same bytes into a warm private buffer, in-process (what (b) is
                  compared with; no second process involved)
  pickle_pipe     the array pickled through the same pipe, unpickled by the worker -> ack
  mp_shm_fresh    multiprocessing.shared_memory created per transfer: create, copy in, send the name,
                  worker attaches and views it -> ack, close + unlink
  decode_hit      in-process: to_numpy(ref, cache) on an already cached mapping (validation + one stat
                  of the segment + view)
  decode_private  in-process: what a CPU worker does per input and call: check a cached private
                  (copy-on-write) mapping out of the cache, view it, check it for written pages
                  (/proc/self/pagemap) and hand it back
  dirty_check     in-process: the post-call check alone (Segment.private_pages over the whole mapping)

Each transfer is timed from the sender's first step to the worker's ack (perf_counter_ns); the table
shows medians and ratios. Run: .venv/bin/python benchmarks/bench_dataplane.py [--sizes 1MB,100MB]
[--repeat N] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from timing import parse_sizes, sample_us  # benchmarks/timing.py

from sidecar.dataplane.arena import Arena
from sidecar.dataplane.mapcache import CallMappings, MappingCache
from sidecar.dataplane.tensors import to_numpy, to_ref
from sidecar.protocol.refs import ShmStorage, TensorRef

SIZES = {"1MB": 10**6, "100MB": 10**8, "1GB": 10**9}
DECODE_CALLS = 2000
TARGET_VIEW_US = 50.0
TARGET_DECODE_US = 10.0
TARGET_COPY_RATIO = 1.3


# --- the worker ------------------------------------------------------------------------------------

def encode(ref: TensorRef) -> tuple:
    """The descriptor as a plain tuple: a few hundred bytes on the pipe whatever the tensor's size."""
    s = ref.storage
    return ("ref", ref.dtype, ref.shape, s.name, s.offset, s.nbytes, s.inode, ref.strides)


def worker_main(conn: Connection) -> None:
    cache = MappingCache()
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "ref":
            _, dtype, shape, name, offset, nbytes, inode, strides = msg
            ref = TensorRef(dtype, shape, ShmStorage(name, offset, nbytes, inode), strides)
            view = to_numpy(ref, cache)  # a view: nothing is read or copied
            del view
        elif kind == "pickle":
            data = msg[1]  # already unpickled by recv(): the copy happened
            del data
        elif kind == "mp_shm":
            _, name, shape, dtype = msg
            # Attaching registers the name with the resource tracker. A spawned child shares the
            # parent's tracker, so that is a no-op here; an unrelated process would have its own
            # tracker, which unlinks the segment when that process exits (why the sidecar does not
            # use multiprocessing.shared_memory).
            shm = SharedMemory(name=name)
            view = np.ndarray(shape, dtype, buffer=shm.buf)
            del view
            shm.close()
        elif kind == "stop":
            conn.send_bytes(b"k")
            cache.clear()
            return
        conn.send_bytes(b"k")


# --- the sender side -------------------------------------------------------------------------------

class Bench:
    def __init__(self, conn: Connection, arena: Arena) -> None:
        self.conn = conn
        self.arena = arena

    def roundtrip(self, msg: tuple) -> None:
        self.conn.send(msg)
        self.conn.recv_bytes()

    def run_size(self, label: str, nbytes: int, repeat: int) -> list[dict[str, Any]]:
        n = nbytes // 4
        rows: list[dict[str, Any]] = []

        def record(scenario: str, samples: list[float]) -> None:
            rows.append({"size": label, "bytes": n * 4, "scenario": scenario,
                         "median_us": statistics.median(samples), "min_us": min(samples),
                         "max_us": max(samples), "repeat": len(samples)})

        src = np.random.default_rng(0).random(n, dtype=np.float32)  # plain private memory

        record("ping", sample_us(lambda: self.roundtrip(("ping",)), max(repeat, 50)))

        # (a) already in the arena
        block = self.arena.alloc(n * 4)
        host = block.ndarray(np.float32, (n,))
        np.copyto(host, src)
        record("arena_view", sample_us(lambda: self.roundtrip(encode(to_ref(host, self.arena)[0])),
                                   max(repeat, 50)))
        # cache-hit decode, in-process, on the same block
        ref, _ = to_ref(host, self.arena)
        cache = MappingCache()
        to_numpy(ref, cache)
        record("decode_hit", sample_us(lambda: to_numpy(ref, cache), DECODE_CALLS, warmup=100))

        def decode_private() -> None:
            mappings = CallMappings(cache)
            to_numpy(ref, mappings)
            mappings.close()
        record("decode_private", sample_us(decode_private, DECODE_CALLS // 4, warmup=20))
        private = cache.checkout(ref.storage.name, ref.storage.inode)
        int(np.frombuffer(private, np.uint8)[::4096].sum())  # an op read every page: all mapped now
        record("dirty_check", sample_us(private.private_pages, DECODE_CALLS // 4, warmup=20))
        cache.checkin(private, dirty=False)
        cache.clear()
        host = None  # rebound, not del: a lambda above names it; the view goes before the block
        block.release()  # its warm segment is what (b) gets next

        # (b) copy into the arena, then view
        def arena_copy() -> None:
            ref, copied = to_ref(src, self.arena, inline_threshold=0)
            self.roundtrip(encode(ref))
            copied.release()
        record("arena_copy", sample_us(arena_copy, repeat))

        # baselines
        dst = np.empty_like(src)
        np.copyto(dst, src)  # fault the destination in first: a warm buffer, like the arena's
        record("memcpy", sample_us(lambda: np.copyto(dst, src), repeat))
        dst = None  # rebound (a lambda names it)

        record("pickle_pipe", sample_us(lambda: self.roundtrip(("pickle", src)), repeat, warmup=1))

        def mp_shm_fresh() -> None:
            shm = SharedMemory(create=True, size=n * 4)
            try:
                np.copyto(np.ndarray((n,), np.float32, buffer=shm.buf), src)
                self.roundtrip(("mp_shm", shm.name, (n,), "float32"))
            finally:
                shm.close()
                shm.unlink()
        record("mp_shm_fresh", sample_us(mp_shm_fresh, repeat, warmup=1))
        return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ratios: copying scenarios against memcpy, everything against arena_view."""
    by = {(r["size"], r["scenario"]): r for r in rows}
    for r in rows:
        memcpy = by.get((r["size"], "memcpy"))
        view = by.get((r["size"], "arena_view"))
        r["vs_memcpy"] = r["median_us"] / memcpy["median_us"] if memcpy else None
        r["vs_arena_view"] = r["median_us"] / view["median_us"] if view else None
        target = {"arena_view": ("< 50 us", r["median_us"] < TARGET_VIEW_US),
                  "decode_hit": ("< 10 us", r["median_us"] < TARGET_DECODE_US)}.get(r["scenario"])
        if r["scenario"] == "arena_copy" and r["bytes"] >= 10**8 and memcpy:
            target = ("<= 1.3x memcpy", r["vs_memcpy"] <= TARGET_COPY_RATIO)
        r["target"], r["met"] = target if target else (None, None)
    return rows


def fmt_us(us: float) -> str:
    return f"{us:,.1f} us" if us < 10_000 else f"{us / 1000:,.1f} ms"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'size':>6}  {'scenario':<13} {'median':>11} {'min':>11} {'x memcpy':>9} {'x view':>9}  target"
    print(head)
    print("-" * len(head) + "-" * 14)
    for r in rows:
        ratio = "-" if r["vs_memcpy"] is None else "<0.01" if r["vs_memcpy"] < 0.01 else f"{r['vs_memcpy']:.2f}"
        vratio = f"{r['vs_arena_view']:.1f}" if r["vs_arena_view"] is not None else "-"
        target = f"{r['target']}: {'met' if r['met'] else 'MISSED'}" if r["target"] else ""
        print(f"{r['size']:>6}  {r['scenario']:<13} {fmt_us(r['median_us']):>11} {fmt_us(r['min_us']):>11} "
              f"{ratio:>9} {vratio:>9}  {target}")


def machine() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "numpy": np.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--repeat", type=int, default=7, help="timed transfers per scenario (default 7; "
                    "ping, arena_view use at least 50)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--quick", action="store_true", help="1MB and 100MB, 3 timed transfers each (benchmarks/run_all.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat = "1MB,100MB", 3
    sizes = parse_sizes(ap, args.sizes, SIZES)

    ctx = mp.get_context("spawn")  # a fresh interpreter, like a real worker (no inherited mappings)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker_main, args=(child,), daemon=True)
    proc.start()
    rows: list[dict[str, Any]] = []
    try:
        with Arena("bench") as arena:
            bench = Bench(parent, arena)
            for label in sizes:
                rows.extend(bench.run_size(label, SIZES[label], args.repeat))
        parent.send(("stop",))
        parent.recv_bytes()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    summarize(rows)
    if args.json:
        print(json.dumps({"machine": machine(), "results": rows}, indent=2))
    else:
        m = machine()
        print(f"# {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, NumPy {m['numpy']}")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
