"""One server core under both transports: what a call meets is the same on gRPC and on the port.

Real workers on both transports (`sidecar serve` and `sidecar serve --stdio`), driven the way their
hosts drive them; ops that hold their slot until the test lets them go (tests/hold_ops_module.py).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import Overloaded
from sidecar.etf import Atom as A
from sidecar.host import Client
from tests.test_stdio_transport import HOLD_OPS, PortClient, hold_call
from tests.workers import start_worker, wait_until

LIMITS = ("--max-concurrency", "1", "--max-queue", "0")


def test_overload_reads_the_same_on_both_transports(tmp_path: Path) -> None:
    """One admission: the refusal's message and figures do not depend on the transport."""
    (tmp_path / "grpc").mkdir()
    (tmp_path / "port").mkdir()
    refusals: dict[str, tuple[str, Any, Any]] = {}

    w = start_worker("--device", "cpu", "--ops", HOLD_OPS, *LIMITS)
    try:
        with Client(w.address, timeout=60) as c:
            held: list[Any] = []
            hold = threading.Thread(target=lambda: held.append(c.call(
                "hold", 0, started=str(tmp_path / "grpc" / "started"), release=str(tmp_path / "grpc" / "release"))))
            hold.start()
            wait_until(lambda: (tmp_path / "grpc" / "started").exists(), timeout=30)
            with pytest.raises(Overloaded) as info:
                c.call("hold", 1, started=str(tmp_path / "grpc" / "x"), release=str(tmp_path / "grpc" / "release"))
            refusals["grpc"] = (info.value.message, info.value.queue_depth, info.value.limit)
            (tmp_path / "grpc" / "release").touch()
            hold.join(30)
            assert held == [0]
    finally:
        w.stop()

    port = PortClient("--ops", HOLD_OPS, *LIMITS)
    try:
        port.send(hold_call(0, tmp_path / "port", "zero"))
        wait_until(lambda: (tmp_path / "port" / "zero.started").exists(), timeout=30)
        tag, rid, err = port.request(hold_call(1, tmp_path / "port", "one"))
        assert (tag, rid, err[A("kind")]) == ("error", 1, A("overloaded"))
        refusals["port"] = (err[A("message")].decode(), err[A("queue_depth")], err[A("limit")])
        (tmp_path / "port" / "release").touch()
        assert port.next()[:2] == ("ok", 0)
    finally:
        port.close()

    assert refusals["port"] == refusals["grpc"]
    message, depth, limit = refusals["grpc"]
    assert (depth, limit) == (0, 0) and "1 calls running (max 1)" in message


def test_the_port_drains_for_the_grace_period_it_is_given(tmp_path: Path) -> None:
    """--grace-period is the port's too: with 0, SIGTERM does not wait for a call that never ends."""
    port = PortClient("--ops", HOLD_OPS, "--grace-period", "0")
    port.send(hold_call(1, tmp_path, "one"))  # never released
    wait_until(lambda: (tmp_path / "one.started").exists(), timeout=30)
    port.proc.terminate()
    assert port.proc.wait(30) == 0
    with pytest.raises(EOFError):
        port.next()  # the held call was never answered: the worker did not wait for it
    assert "SIGTERM: stopping, draining 1 calls in flight (up to 0.0 s)" in port.stderr()


def test_a_tainted_port_worker_answers_then_exits_70() -> None:
    """Taint takes the same path on the port as on gRPC (tests/test_lifecycle.py): the call that
    tainted the device is answered, then the worker exits 70 for a fresh one."""
    port = PortClient("--ops", "tests.slow_ops_module")
    tag, _, result = port.request((A("call"), 1, "taint_self", [], {}))
    assert (tag, result[A("outputs")]) == ("ok", [b"tainted"])
    assert port.proc.wait(30) == 70
    assert "tainted" in port.stderr()
