"""The template dies on its own (SIGKILL): its workers live on and keep serving, the pool starts a new
template, and the workers the dead one forked are still watched, replaced and classified."""
from __future__ import annotations

import os
import signal
from typing import Any

from sidecar.host.events import PoolEvent
from sidecar.host.pool import Pool, WorkerState
from tests.workers import pid_gone, wait_until


def test_workers_outlive_their_template_and_a_new_template_takes_over() -> None:
    with Pool(2, debug_ops=True) as pool:  # the defaults: template, health checks, breaker
        events: list[PoolEvent] = []
        pool.subscribe(events.append)
        workers = {r.pid for r in pool.status()}
        old_template = pool.template_pid
        assert old_template is not None

        os.kill(old_template, signal.SIGKILL)
        wait_until(lambda: pid_gone(old_template))
        # Served at once by the same workers: no restart, no cold start, nobody waits.
        served = {pool.call("debug.pid", timeout=10) for _ in range(20)}
        assert served <= workers
        wait_until(lambda: any(e.event == "template_restart" for e in events), 60)
        assert pool.template_pid not in (None, old_template)
        assert {r.pid for r in pool.status()} == workers
        assert all(r.state is WorkerState.READY for r in pool.status())
        assert not [e for e in events if e.event in ("crash", "restart")], events

        # A worker of the dead template crashes: nobody can collect its wait status any more, so the
        # classification comes from faulthandler's report; the replacement is a fork of the new template.
        victim = min(workers)
        os.kill(victim, signal.SIGSEGV)
        wait_until(lambda: any(e.event == "restart" for e in events), 60)
        crash = next(e for e in events if e.event == "crash")
        assert crash.metadata["pid"] == victim and crash.metadata["classification"] == "segfault"
        restart = next(e for e in events if e.event == "restart")
        assert restart.metadata["via"] == "template" and restart.metadata["pid"] not in workers
        assert pool.wait_ready(30)
        answers: set[Any] = {pool.call("debug.pid", timeout=10) for _ in range(20)}
        assert victim not in answers
