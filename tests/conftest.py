"""Shared fixtures. Every test runs under a /dev/shm leak check: no `sc-` segment may outlive it."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

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


@pytest.fixture
def arena():
    """A fresh arena (run "tests"), closed (every segment unlinked) after the test."""
    from sidecar.dataplane.arena import Arena

    a = Arena("tests")
    yield a
    a.close()


@pytest.fixture
def cache():
    """A fresh consumer-side MappingCache, cleared after the test."""
    from sidecar.dataplane.mapcache import MappingCache

    c = MappingCache()
    yield c
    c.clear()


@pytest.fixture
def run_threads() -> Callable[[Callable[[Any], None], Iterable[Any]], list[BaseException]]:
    """run_threads(work, ids): work(i) on one thread per id, all joined; returns what they raised."""
    def run(work: Callable[[Any], None], ids: Iterable[Any]) -> list[BaseException]:
        errors: list[BaseException] = []

        def guarded(i: Any) -> None:
            try:
                work(i)
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=(i,)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return errors

    return run
