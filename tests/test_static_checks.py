"""The static checks of scripts/test.sh, also as tests (so `pytest` alone catches a regression):
ruff (lint), vulture (dead code) and mypy --strict (types), each with its config in pyproject.toml."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff_is_clean() -> None:
    out = run_tool("ruff", "check", "--no-cache", "sidecar", "tests", "benchmarks", "scripts", "setup.py")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_never_reads_generated_code() -> None:
    # sidecar/v1 is generated; a `ruff --fix` there once broke sidecar_pb2.py.
    out = run_tool("ruff", "check", "--no-cache", "--show-files", "sidecar")
    assert out.returncode == 0, out.stderr
    assert "sidecar/protocol/schema.py" in out.stdout and "sidecar/v1/" not in out.stdout


def test_no_dead_code() -> None:
    out = run_tool("vulture")  # sidecar/ and scripts/vulture_whitelist.py ([tool.vulture])
    assert out.returncode == 0, out.stdout + out.stderr



@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    out = run_tool("mypy")  # strict, files = sidecar ([tool.mypy])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout
