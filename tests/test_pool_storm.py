"""Storm: kill random workers with SIGKILL while several threads issue hundreds of calls, then count.

Every call must end (zero hung) in a correct result or a structured error (zero lost); every
idempotent call must succeed; no segment of the run may remain after the pool closes, and none of a
dead worker may remain even while the pool still runs.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from sidecar.dataplane import reaper
from sidecar.errors import SidecarError, WorkerCrashed
from sidecar.host.pool import Pool

THREADS = 4
CALLS_PER_THREAD = 150
KILL_EVERY_S = (0.15, 0.3)


def test_storm_loses_nothing_and_leaks_nothing() -> None:
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    rng = random.Random(4)
    with Pool(3, debug_ops=True, breaker_threshold=10_000, health_interval_s=0) as pool:
        run = pool.run_id
        crashes: list[Any] = []
        pool.subscribe(lambda ev: crashes.append(ev) if ev.event == "crash" else None)

        def caller(tid: int) -> None:
            local = random.Random(tid)
            for i in range(CALLS_PER_THREAD):
                idempotent = i % 2 == 0
                # Half the inputs are big enough to cross through shared memory.
                n = 40_000 if i % 4 < 2 else 100
                x = np.full(n, float(tid * 1000 + i), dtype=np.float32)
                try:
                    y = pool.call("debug.sleep", x, seconds=local.uniform(0.0, 0.04),
                                  idempotent=idempotent, timeout=30)
                except WorkerCrashed as exc:
                    kind = "crashed"
                    if idempotent:
                        with lock:
                            failures.append(f"idempotent call failed: {exc!r}")
                except SidecarError as exc:  # structured, but not expected here
                    kind = "other:" + exc.kind.value
                    with lock:
                        failures.append(repr(exc))
                except Exception as exc:  # noqa: BLE001 - an unstructured error is a failure
                    kind = "unstructured"
                    with lock:
                        failures.append(f"unstructured: {exc!r}")
                else:
                    kind = "ok"
                    if not (y.shape == (n,) and (y == x).all()):
                        with lock:
                            failures.append(f"wrong result for thread {tid} call {i}")
                with lock:
                    outcomes[kind] += 1
                    outcomes["idempotent_ok" if idempotent and kind == "ok" else "_"] += 1

        threads = [threading.Thread(target=caller, args=(t,), daemon=True) for t in range(THREADS)]
        for t in threads:
            t.start()
        kills = 0
        while any(t.is_alive() for t in threads):
            time.sleep(rng.uniform(*KILL_EVERY_S))
            pids = [r.pid for r in pool.status() if r.pid is not None]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        for t in threads:
            t.join(60)
        hung = sum(t.is_alive() for t in threads)

        assert pool.wait_ready(20)
        live = {r.pid for r in pool.status()}
        stale = [s.name for s in reaper.list_segments(run) if s.pid not in live and s.pid != os.getpid()]
    left = reaper.list_segments(run)

    total = THREADS * CALLS_PER_THREAD
    print(f"storm: {kills} kills, {len(crashes)} crash events, outcomes {dict(outcomes)}")
    assert hung == 0
    assert outcomes["ok"] + outcomes["crashed"] == total, (outcomes, failures[:5])  # zero lost
    assert outcomes["idempotent_ok"] == total // 2
    assert not failures, failures[:5]
    assert kills >= 5 and crashes
    assert not stale, f"segments of dead workers still there: {stale}"
    assert not left, f"segments left after close: {left}"
