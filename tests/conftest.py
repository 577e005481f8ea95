"""Shared fixtures. Every test runs under a /dev/shm leak check: no `sc-` segment may outlive it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

SHM = Path("/dev/shm")


def sc_segments() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("sc-")}


def _owned_here(name: str) -> bool:
    # /dev/shm is shared with every other test session running at the same time: a new segment counts
    # as this test's leak only if its owner pid (sc-<run>-<pid>-<rand>) is this process, one of its
    # children, or gone (a child that died and left it). Other live processes' segments are not ours
    # to fail on, nor to unlink.
    try:
        pid = int(name.split("-")[2])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid() or not psutil.pid_exists(pid):
        return True
    return pid in {c.pid for c in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def no_shm_leaks():
    """Fails the test if it leaves a new sc-* segment behind."""
    before = sc_segments()
    yield
    left = {n for n in sc_segments() - before if _owned_here(n)}
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
