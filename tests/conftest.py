"""Shared fixtures. Every test runs under a /dev/shm leak check: no `sc-` segment may outlive it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


def sc_segments() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("sc-")}


@pytest.fixture(autouse=True)
def no_shm_leaks():
    """Fails the test if it leaves a new sc-* segment behind."""
    before = sc_segments()
    yield
    left = sc_segments() - before
    if left:
        for name in left:  # clean up so one leak does not fail every later test
            try:
                os.unlink(SHM / name)
            except FileNotFoundError:
                pass
        pytest.fail(f"shared-memory segments leaked: {sorted(left)}")


@pytest.fixture
def python_exe() -> str:
    return sys.executable
