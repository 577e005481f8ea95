"""The Elixir bridge's ExUnit suite (bridge/test), run as part of the project's tests.

It starts real sidecar workers with this interpreter (SIDECAR_PYTHON) from a real BEAM. Elixir is a
required tool of this project (scripts/install.sh installs Debian's `elixir`): when it is missing
this test fails and says so, it does not skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"
TIMEOUT_S = 300


def test_exunit_suite_passes() -> None:
    mix = shutil.which("mix")
    assert mix is not None, (
        "Elixir is not installed (no `mix` on PATH): the Elixir bridge cannot be tested. "
        "Install it with `apt-get install -y elixir` (scripts/install.sh does this).")
    env = {**os.environ, "MIX_ENV": "test", "HEX_OFFLINE": "1", "SIDECAR_PYTHON": sys.executable}
    run = subprocess.run([mix, "test"], cwd=BRIDGE, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"mix test failed (exit {run.returncode}):\n{out[-8000:]}"
    m = re.search(r"(\d+) tests?, 0 failures", out)
    assert m and int(m.group(1)) >= 30, f"expected the full ExUnit suite to run:\n{out[-3000:]}"
    assert "no segment of run" in out  # the suite's own /dev/shm check ran
