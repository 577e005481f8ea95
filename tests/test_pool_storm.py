"""Storm: SIGKILL random workers while four threads make calls through a Pool with its defaults
(health checks and breakers on), then count. The small version of `benchmarks/storm.py` (10,000
calls, 100 kills), run by that script in its own host process so that a host crash is a count too.

Every call must end (zero lost) in the right value or a structured error; every idempotent call must
succeed (a kill from outside is retried, never a transport error, never CIRCUIT_OPEN); no breaker
opens; no segment of a dead worker remains while the pool runs, none of the run after it closes.
"""
from __future__ import annotations

import json
import subprocess
import sys

from tests.workers import ROOT

CALLS = 1500
KILLS = 15


def test_storm_with_the_pool_defaults_loses_nothing_and_leaks_nothing() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "storm.py"), "--calls", str(CALLS),
                           "--kills", str(KILLS), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    report = json.loads(proc.stdout)
    (run,), total = report["runs"], report["total"]
    print(f"storm: {json.dumps(total)}")
    assert run["host_crash"] is None, run
    assert run["kills"] == KILLS and run["crash_events"] >= KILLS
    assert run["lost"] == 0 and run["hung_threads"] == 0
    assert run["wrong"] == 0
    assert run["unstructured"] == 0, run["examples"]
    assert run["idempotent_ok"] == run["idempotent"] >= CALLS // 2, run["examples"]
    assert set(run["failed"]) <= {"WORKER_CRASHED"}, run["examples"]  # non-idempotent calls under a kill
    assert run["ok"] + sum(run["failed"].values()) == CALLS
    assert run["breaker_opens"] == 0
    assert run["stale_segments"] == 0 and run["segments_left"] == 0
    assert total["goal_met"] and proc.returncode == 0
