"""The README's demo runs end to end on a small tensor: ops, a shape error, a crash absorbed, no leak."""
from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_absorbs_a_crash() -> None:
    proc = subprocess.run([sys.executable, "-m", "sidecar.demo", "--mb", "8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mul of a 8 MiB tensor by 2 on cpu: correct" in out
    assert out.count("matches NumPy: True") == 4
    assert "ShapeMismatch:" in out and "expected=256 got=512" in out
    assert "WorkerCrashed: classification=segfault signal=11" in out
    assert "pool back to 2 ready workers" in out and "pool events: crash, restart" in out
    assert "sc- segments left in /dev/shm: 0" in out
