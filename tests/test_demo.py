"""The README's demo runs end to end on a small tensor: ops, a shape error, a crash absorbed, no leak."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.workers import run_id

DEMO = [sys.executable, "-u", "-m", "sidecar.demo", "--mb", "8", "--device", "cpu"]

# Another process with sc- segments of its own run: one per line it reads ("make"), all unlinked when
# it reads "quit" (it is the creator, so it is the one that unlinks them).
FOREIGN_MAKER = r"""
import os, secrets, sys
made = []
for line in sys.stdin:
    if line.strip() == "quit":
        break
    path = f"/dev/shm/sc-{sys.argv[1]}-{os.getpid()}-{secrets.token_hex(8)}"
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    made.append(path)
    print(path, flush=True)
for path in made:
    os.unlink(path)
"""


def test_demo_runs_and_absorbs_a_crash() -> None:
    proc = subprocess.run(DEMO, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mul of a 8 MiB tensor by 2 on cpu: correct" in out
    assert out.count("matches NumPy: True") == 4
    assert "ShapeMismatch:" in out and "expected=256 got=512" in out
    assert "WorkerCrashed: classification=segfault signal=11" in out
    assert "pool back to 2 ready workers" in out and "pool events: crash, restart" in out
    assert re.search(r"segments of this run \(run \w+: its pool, workers and this process\) left in "
                     r"/dev/shm: 0\n", out), out


def test_demo_counts_only_its_own_segments_while_another_process_makes_some() -> None:
    maker = subprocess.Popen([sys.executable, "-c", FOREIGN_MAKER, run_id()], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert maker.stdin is not None and maker.stdout is not None

    def make_foreign_segment() -> str:
        maker.stdin.write("make\n")
        maker.stdin.flush()
        return maker.stdout.readline().strip()

    try:
        made = [make_foreign_segment()]
        demo = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert demo.stdout is not None
        first = demo.stdout.readline()  # printed once its pool is up: the demo has started counting
        assert first.startswith("pool of 2 workers ready"), first + demo.communicate(timeout=120)[1]
        # Held still while the other process makes a segment: it surely appears during the demo.
        os.kill(demo.pid, signal.SIGSTOP)
        made.append(make_foreign_segment())
        os.kill(demo.pid, signal.SIGCONT)
        rest, err = demo.communicate(timeout=120)
        out = first + rest

        assert demo.returncode == 0, out + err[-2000:]
        assert re.search(r"segments of this run \(run \w+: its pool, workers and this process\) left in "
                         r"/dev/shm: 0\n", out), out
        m = re.search(r"not counted: (\d+) sc- segments? of other processes", out)
        assert m and int(m.group(1)) >= 1, out
        # The demo removed nothing of the other process.
        assert all(Path(path).exists() for path in made)
    finally:
        maker.communicate("quit\n", timeout=30)
    assert not any(Path(path).exists() for path in made)
