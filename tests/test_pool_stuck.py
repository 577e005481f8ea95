"""A call that hangs and ignores cancellation: its caller is freed at the deadline, the worker says
NOT_SERVING once the call has outlived the cancel grace period, and the pool recycles the worker
(no more calls, SIGTERM, SIGKILL after grace) so that later calls are served again."""
from __future__ import annotations

import threading

import pytest

from sidecar.errors import Cancelled
from sidecar.host import Client
from sidecar.host.crash import Classification
from sidecar.host.events import PoolEvent
from sidecar.host.pool import Pool
from sidecar.protocol.limits import CANCEL_GRACE_ENV
from tests.workers import pid_gone, start_worker, wait_until

OPS = "tests.pool_ops_module"


def test_worker_reports_not_serving_while_a_cancelled_call_runs_past_the_grace() -> None:
    # --grace-period 1: the hung call is still running when the test ends; the stop need not wait 10 s for it.
    with start_worker("--device", "cpu", "--ops", OPS, "--grace-period", "1", env={CANCEL_GRACE_ENV: "0.3"}) as w:
        with Client(w.address) as c:
            assert c.health() == "SERVING"
            assert c.call("hang", seconds=0.0) == 0.0  # ends by itself: nothing stuck
            assert c.health() == "SERVING"
            with pytest.raises(Cancelled):
                c.call("hang", seconds=600, timeout=0.2)
            wait_until(lambda: c.health() == "NOT_SERVING")
        assert "cancelled" in w.stderr_text() and "'hang'" in w.stderr_text()


def test_pool_recycles_a_worker_whose_cancelled_calls_never_finish() -> None:
    # Non-default: a short cancel grace and health interval, so the test takes seconds.
    with Pool(1, ops=[OPS], device="cpu", cancel_grace_s=0.3, health_interval_s=0.2, grace_s=0.5) as pool:
        events: list[PoolEvent] = []
        pool.subscribe(events.append)
        stuck_pid = pool.status()[0].pid
        errors: list[BaseException] = []

        def hang() -> None:
            try:
                pool.call("hang", seconds=600, timeout=0.5)
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        threads = [threading.Thread(target=hang) for _ in range(4)]  # every slot of the worker (--max-concurrency 4)
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 4 and all(isinstance(e, Cancelled) for e in errors), errors
        wait_until(lambda: any(e.event == "recycle" for e in events), 30)
        # Served again (by the replacement); without recycling this call would wait behind the four.
        assert pool.call("hang", seconds=0.0, timeout=60) == 0.0
        wait_until(lambda: pid_gone(stuck_pid), 30)
        wait_until(lambda: any(e.event == "crash" for e in events), 30)
        recycle = next(e for e in events if e.event == "recycle")
        assert recycle.metadata["pid"] == stuck_pid and recycle.metadata["classification"] == "stuck"
        crash = next(e for e in events if e.event == "crash")
        assert crash.metadata["pid"] == stuck_pid and crash.metadata["classification"] == "stuck"
        row = pool.status()[0]
        assert row.pid != stuck_pid and row.last_exit is not None
        assert row.last_exit.classification is Classification.STUCK
