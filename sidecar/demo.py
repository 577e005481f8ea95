"""The product's main job on defaults (`python -m sidecar.demo`, or `bash scripts/demo.sh`).

A pool of sidecar workers on this machine's best device; a 100 MB tensor to a worker and back through
shared memory; a few ops checked against NumPy; a structured shape error; the hardware a worker sees
and the timing of each call; a worker segfault absorbed (classified, replaced, the pool serving
again); and none of its shared memory left in /dev/shm. It counts only its own segments (its pool's
run and this process): other processes on the machine may make and keep sc- segments meanwhile.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.dataplane.reaper import list_segments
from sidecar.errors import DeviceUnavailable, ShapeMismatch, WorkerCrashed
from sidecar.host import Pool


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f} ms"


def _timing(result: Any) -> str:
    t = result.timing
    return (f"queue {_ms(t.queue_ns)}, decode {_ms(t.decode_ns)}, compute {_ms(t.compute_ns)}, "
            f"encode {_ms(t.encode_ns)}; worker total {_ms(t.total_ns)}")


def _sc_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("sc-")}


def _own_segments(run_id: str) -> set[str]:
    """Segments of the pool's run (its workers, template and host arena) or owned by this process."""
    me = os.getpid()
    return {seg.name for seg in list_segments() if seg.run == run_id or seg.pid == me}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda[:N]|mps (default: auto)")
    parser.add_argument("--mb", type=int, default=100, help="size of the big tensor in MB (default 100)")
    args = parser.parse_args(argv)

    before = _sc_segments()
    t0 = time.perf_counter()
    # debug_ops: the demo crashes a worker on purpose (never enabled by default).
    try:
        pool = Pool(workers=args.workers, device=args.device, debug_ops=True)
    except DeviceUnavailable as err:
        print(f"cannot run the demo on --device {args.device}: {err.message}\n"
              f"  devices this machine has: {', '.join(err.available or []) or 'none'} "
              f"(try --device {(err.available or ['cpu'])[0]}, or --device auto)", file=sys.stderr)
        return 2
    with pool:
        pool.wait_ready()
        print(f"pool of {args.workers} workers ready in {time.perf_counter() - t0:.2f} s "
              f"(run {pool.run_id}); workers: {[s.pid for s in pool.status()]}")

        hw = pool.hardware()
        cuda = hw["cuda"]
        gpus = ", ".join(f"{d['name']} ({d['memory_total'] >> 30} GiB)" for d in cuda["devices"]) or \
            f"none ({cuda.get('reason') or 'not available'})"
        print(f"hardware: {hw['cpu']['model']}, {hw['cpu']['threads']} threads, "
              f"{hw['cpu']['memory_total'] >> 30} GiB; GPUs: {gpus}; worker device: {hw['device']}")

        # 1. A big tensor both ways through shared memory: only descriptors travel in the messages.
        #    `pool.empty` puts the input straight into the pool's shared arena (no copy on the way in);
        #    the output is a view of the worker's arena, handed back when we drop it. The first call
        #    warms both arenas (fresh shared memory page-faults); the second shows the steady state.
        n = args.mb * (1 << 20) // 4
        big = pool.empty(n, "float32")
        big[:] = np.random.default_rng(0).random(n, dtype=np.float32)
        # Calls go round the workers: the first call to each worker warms its arena, so the call
        # after one round is the steady state.
        for i in range(args.workers + 1):
            t_call = time.perf_counter()
            res = pool.execute("mul", big, 2.0)
            wall = time.perf_counter() - t_call
            out = res.outputs[0]
            assert np.array_equal(out, big * 2.0)
            if i in (0, args.workers):
                label = "first call (cold arenas)" if i == 0 else "same worker again (warm)"
                print(f"\n{label}: mul of a {big.nbytes >> 20} MiB tensor by 2 on {res.device}: correct; "
                      f"{res.bytes_in >> 20} MiB in, {res.bytes_out >> 20} MiB out by shared memory; "
                      f"round trip {wall * 1e3:.1f} ms")
                print(f"  timing: {_timing(res)}")
            del out, res
        res = pool.execute("identity", big)
        print(f"identity of the same {big.nbytes >> 20} MiB: the output is a view of the input's own memory "
              f"(no copy either way); worker total {_ms(res.timing.total_ns)}")
        del res, big

        # 2. A few ops, checked against NumPy.
        a = np.random.default_rng(1).standard_normal((512, 256), dtype=np.float32)
        b = np.random.default_rng(2).standard_normal((256, 128), dtype=np.float32)
        for op, inputs, attrs, expected in (
            ("matmul", (a, b), {}, a @ b),
            ("softmax", (a,), {"dim": -1}, np.exp(a) / np.exp(a).sum(-1, keepdims=True)),
            ("sum", (a,), {"dim": 0}, a.sum(0)),
            ("transpose", (a,), {"dim0": 0, "dim1": 1}, a.T),
        ):
            res = pool.execute(op, *inputs, **attrs)
            ok = np.allclose(res.outputs[0], expected, rtol=1e-4, atol=1e-4)
            print(f"{op:<10} -> shape {tuple(res.outputs[0].shape)}, matches NumPy: {ok}; {_timing(res)}")

        # 3. A structured error: pattern-match on the class, read the fields.
        try:
            pool.call("matmul", a, a)
        except ShapeMismatch as err:
            print(f"\nShapeMismatch: {err.message}")
            print(f"  op={err.op} input_shapes={err.input_shapes} dim={err.dim} expected={err.expected} "
                  f"got={err.got}\n  suggestion: {err.suggestion}")

        # 4. A crash absorbed: a worker segfaults, the call gets a classified error, the pool heals.
        events: list[Any] = []
        unsubscribe = pool.subscribe(events.append)
        t_crash = time.perf_counter()
        try:
            pool.call("debug.segfault")
        except WorkerCrashed as err:
            print(f"\nWorkerCrashed: classification={err.classification} signal={err.signal} pid={err.pid}")
            print(f"  {err.message}")
            victim = err.pid
        pool.wait_ready()
        healed = time.perf_counter() - t_crash
        check = pool.call("add", np.ones(4, np.float32), np.ones(4, np.float32))
        unsubscribe()
        print(f"pool back to {pool.ready_count()} ready workers {healed * 1e3:.0f} ms after the crash "
              f"(pid {victim} replaced); next call: {check.tolist()}")
        print("  pool events: " + ", ".join(e.event for e in events))
        rows = [(s.slot, s.pid, s.state.value, s.calls, s.crashes, s.restarts) for s in pool.status()]
        print("  status (slot, pid, state, calls, crashes, restarts): " + "; ".join(map(str, rows)))

    left = _own_segments(pool.run_id)
    others = {name for name in _sc_segments() - before if "/" + name not in left}
    print(f"\npool closed; segments of this run (run {pool.run_id}: its pool, workers and this process) "
          f"left in /dev/shm: {len(left)}" + (f" {sorted(left)}" if left else ""))
    print(f"  not counted: {len(others)} sc- segments of other processes that appeared meanwhile")
    return 0 if not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
