"""Shared fixtures. Every test runs under a /dev/shm leak check: no `sc-` segment it made may outlive it."""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Iterable

import pytest

# One /dev/shm guard for every test (autouse): see tests/workers.py. Importing it also tags this
# session's run ids ($SIDECAR_RUN_PREFIX) before any sidecar code makes one up.
from tests.workers import no_shm_leaks, session_run  # noqa: E402,F401


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def arena():
    """A fresh arena (a run of this session), closed (every segment unlinked) after the test."""
    from sidecar.dataplane.arena import Arena

    a = Arena(session_run("tests"))
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
