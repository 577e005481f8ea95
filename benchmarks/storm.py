"""Kill storm: calls from several threads through a Pool with its defaults while random workers get
SIGKILL; counts what became of every call.

Each run is its own host process (so a host that crashes is counted, not suffered): `--threads`
threads make `--calls` calls of `debug.sleep` (it returns its input), half of them idempotent, half
with inputs big enough to cross through shared memory, every answer compared with what was sent;
meanwhile `--kills` SIGKILLs hit a random ready worker, spread evenly over the calls. Printed per
run, and summed:

  ok          calls that returned the right value
  failed      calls that raised, by error kind (a non-idempotent call whose worker was killed under
              it gets WORKER_CRASHED: that is the expected outcome; an idempotent one must not fail)
  unstructured  calls that raised something other than a structured SidecarError
  lost        calls that never returned (their thread still hung at the end)
  wrong       calls that returned a wrong value
  idempotent ok  share of the idempotent calls that succeeded (the goal: 100 %)
  breaker opens, host crashes, segments left (of dead workers while the pool ran, and of the run
              after it closed)

Goal with the defaults: 0 lost, 0 wrong, 0 unstructured, 100 % of idempotent calls ok, 0 breaker
opens, 0 host crashes, 0 segments left.

Run: .venv/bin/python benchmarks/storm.py [--calls 10000] [--kills 100] [--workers 2] [--threads 4]
     [--runs 1] [--device auto] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

BIG = 40_000  # float32 elements: 160 KB, through shared memory (the inline threshold is 64 KiB)
SMALL = 100
MAX_SLEEP_S = 0.002
HOST_TIMEOUT_S = 900


def storm(calls: int, kills: int, workers: int, threads: int, device: str, seed: int) -> dict[str, Any]:
    """One storm in this process; returns its counts."""
    import numpy as np

    from sidecar.dataplane import reaper
    from sidecar.errors import SidecarError
    from sidecar.host.pool import Pool

    lock = threading.Condition()
    outcomes: Counter[str] = Counter()
    examples: dict[str, str] = {}
    done = [0]
    idempotent_total = [0]
    idempotent_ok = [0]
    wrong = [0]
    per_thread = [calls // threads + (1 if t < calls % threads else 0) for t in range(threads)]

    t0 = time.monotonic()
    pool = Pool(workers, debug_ops=True, device=device)  # the defaults otherwise
    run = pool.run_id
    start_s = time.monotonic() - t0

    def caller(tid: int) -> None:
        rng = random.Random(seed * 1000 + tid)
        for i in range(per_thread[tid]):
            idempotent = i % 2 == 0
            n = BIG if i % 4 < 2 else SMALL
            x = np.full(n, float(tid * 1_000_000 + i), dtype=np.float32)
            kind = "ok"
            try:
                y = pool.call("debug.sleep", x, seconds=rng.uniform(0.0, MAX_SLEEP_S), idempotent=idempotent,
                              timeout=60)
            except SidecarError as exc:
                kind = exc.kind.value
                detail = repr(exc)[:300]
            except Exception as exc:  # noqa: BLE001 - counted: an unstructured error is a failure
                kind = "unstructured:" + type(exc).__name__
                detail = repr(exc)[:300]
            else:
                if not (y.shape == (n,) and (y == x).all()):
                    with lock:
                        wrong[0] += 1
            with lock:
                outcomes[kind] += 1
                if kind != "ok":
                    examples.setdefault(kind + (" (idempotent)" if idempotent else ""), detail)
                done[0] += 1
                if idempotent:
                    idempotent_total[0] += 1
                    idempotent_ok[0] += kind == "ok"
                lock.notify_all()

    def killer(out: list[int]) -> None:
        rng = random.Random(seed)
        for k in range(kills):
            mark = (k + 1) * calls // (kills + 1)  # evenly spread over the calls
            with lock:
                lock.wait_for(lambda mark=mark: done[0] >= mark or all_done.is_set())
            while not all_done.is_set():
                pids = [r.pid for r in pool.status() if r.pid is not None and r.state.value == "ready"]
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        out[0] += 1
                        break
                    except ProcessLookupError:
                        pass
                time.sleep(0.001)  # no ready worker this instant: both restarting

    all_done = threading.Event()
    killed = [0]
    callers = [threading.Thread(target=caller, args=(t,), daemon=True) for t in range(threads)]
    kill_thread = threading.Thread(target=killer, args=(killed,), daemon=True)
    t1 = time.monotonic()
    for t in callers:
        t.start()
    kill_thread.start()
    for t in callers:
        t.join(HOST_TIMEOUT_S / 2)
    storm_s = time.monotonic() - t1
    hung = sum(t.is_alive() for t in callers)
    all_done.set()
    with lock:
        lock.notify_all()
    kill_thread.join(10)

    ready = pool.wait_ready(60)
    live = {r.pid for r in pool.status() if r.pid is not None}
    stale = [s.name for s in reaper.list_segments(run) if s.pid not in live and s.pid != os.getpid()]
    breaker_opens = pool.events_bus.counts.get("breaker_open", 0)
    crash_events = pool.events_bus.counts.get("crash", 0)
    retries = pool.events_bus.counts.get("retry", 0)
    pool.close()
    left = [s.name for s in reaper.list_segments(run)]
    with lock:
        returned = sum(outcomes.values())
        return {"calls": calls, "kills": killed[0], "workers": workers, "threads": threads,
                "ok": outcomes["ok"], "failed": {k: v for k, v in outcomes.items() if k != "ok"},
                "unstructured": sum(v for k, v in outcomes.items() if k.startswith("unstructured")),
                "lost": calls - returned, "hung_threads": hung, "wrong": wrong[0],
                "idempotent": idempotent_total[0], "idempotent_ok": idempotent_ok[0],
                "breaker_opens": breaker_opens, "crash_events": crash_events, "retries": retries,
                "ready_after": ready, "stale_segments": len(stale), "segments_left": len(left),
                "pool_start_s": round(start_s, 2), "storm_s": round(storm_s, 2), "examples": examples}


def run_host(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One storm in a fresh host process; a host that dies is reported as a host crash."""
    cmd = [sys.executable, os.path.abspath(__file__), "--host", "--calls", str(args.calls), "--kills",
           str(args.kills), "--workers", str(args.workers), "--threads", str(args.threads), "--device",
           args.device, "--seed", str(seed)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=HOST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"host_crash": "timed out", "seed": seed}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"host_crash": why, "seed": seed, "stderr_tail": proc.stderr.splitlines()[-15:]}
    result = json.loads(lines[-1])
    result.update(host_crash=None, seed=seed)
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in results if r.get("host_crash") is None]
    failed: Counter[str] = Counter()
    for r in ran:
        failed.update(r["failed"])
    total = {k: sum(r[k] for r in ran) for k in ("calls", "kills", "ok", "unstructured", "lost", "wrong",
                                                   "idempotent", "idempotent_ok", "breaker_opens",
                                                   "stale_segments", "segments_left")}
    total.update(runs=len(results), host_crashes=len(results) - len(ran), failed=dict(failed))
    total["idempotent_ok_pct"] = round(100.0 * total["idempotent_ok"] / total["idempotent"], 3) \
        if total["idempotent"] else None
    total["goal_met"] = bool(ran) and total["host_crashes"] == 0 and total["lost"] == 0 and total["wrong"] == 0 \
        and total["unstructured"] == 0 and total["idempotent_ok"] == total["idempotent"] \
        and total["breaker_opens"] == 0 and total["segments_left"] == 0 and total["stale_segments"] == 0
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1, help="storms, each in a fresh host process (default 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=1, help="of the first run (each run adds 1)")
    ap.add_argument("--json", action="store_true", help="print JSON (every run and the sums)")
    ap.add_argument("--host", action="store_true", help=argparse.SUPPRESS)  # one storm, in this process
    args = ap.parse_args(argv)
    if args.host:
        print(json.dumps(storm(args.calls, args.kills, args.workers, args.threads, args.device, args.seed)),
              flush=True)
        return 0

    results = [run_host(args, args.seed + i) for i in range(args.runs)]
    total = summarize(results)
    if args.json:
        print(json.dumps({"runs": results, "total": total}, indent=2))
        return 0 if total["goal_met"] else 1
    print(f"Kill storm: {args.calls} calls from {args.threads} threads, {args.kills} SIGKILLs of random workers, "
          f"Pool({args.workers}) with its defaults, device {args.device}")
    print(f"{'run':>3} {'ok':>6} {'failed (kind: n)':<28} {'unstr':>5} {'lost':>4} {'wrong':>5} {'idem ok':>8} "
          f"{'kills':>5} {'breaker':>7} {'host':>6} {'segs':>4} {'secs':>5}")
    for i, r in enumerate(results, 1):
        if r.get("host_crash"):
            print(f"{i:>3} host crashed: {r['host_crash']}")
            continue
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(r["failed"].items())) or "-"
        pct = 100.0 * r["idempotent_ok"] / r["idempotent"] if r["idempotent"] else float("nan")
        print(f"{i:>3} {r['ok']:>6} {failed:<28} {r['unstructured']:>5} {r['lost']:>4} {r['wrong']:>5} "
              f"{pct:>7.2f}% {r['kills']:>5} {r['breaker_opens']:>7} {'ok':>6} "
              f"{r['segments_left'] + r['stale_segments']:>4} {r['storm_s']:>5.1f}")
    print(f"sum: {total['ok']} ok of {total['calls']}; failed {total['failed'] or '-'}; unstructured "
          f"{total['unstructured']}; lost {total['lost']}; wrong {total['wrong']}; idempotent ok "
          f"{total['idempotent_ok_pct']}%; breaker opens {total['breaker_opens']}; host crashes "
          f"{total['host_crashes']}; segments left {total['segments_left'] + total['stale_segments']}; "
          f"goal {'met' if total['goal_met'] else 'NOT met'}")
    for r in results:
        for kind, example in r.get("examples", {}).items():
            print(f"  e.g. {kind}: {example}")
    return 0 if total["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
