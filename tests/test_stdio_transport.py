"""`sidecar serve --stdio`: the Erlang port transport, driven from Python with real frames.

Each test starts a real worker process and speaks to it exactly as a BEAM port would: 4-byte
big-endian length + one External Term Format term per frame, on the worker's stdin/stdout.
"""
from __future__ import annotations

import os
import queue
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from sidecar import etf
from sidecar.dataplane import segments
from sidecar.etf import Atom as A
from tests.workers import ROOT, STARTED_PIDS, run_id, wait_until

READY_TIMEOUT_S = 60
HOLD_OPS = str(ROOT / "tests" / "hold_ops_module.py")  # `hold`: runs until the test lets it go


class PortClient:
    """A BEAM port seen from Python: frames out on stdin, frames in on stdout (a reader thread)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.run_id = run_id()
        cmd = [sys.executable, "-m", "sidecar", "serve", "--stdio", "--debug-ops", "--run-id", self.run_id, *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        STARTED_PIDS.add(self.proc.pid)
        self.frames: queue.Queue[Any] = queue.Queue()
        self.raw: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_lines: list[str] = []
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_reader.start()
        self.ready = self.next(READY_TIMEOUT_S)

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            header = out.read(4)
            if len(header) < 4:
                self.frames.put(EOFError("stdout closed"))
                return
            (n,) = struct.unpack(">I", header)
            body = out.read(n)
            self.raw.append(body)
            self.frames.put(etf.decode(body))  # a corrupted stream fails here, loudly

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err_lines.append(line.decode(errors="replace"))

    def stderr_so_far(self) -> str:
        return "".join(self._err_lines)

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()

    def send(self, term: Any) -> None:
        self.send_raw(etf.encode(term))

    def next(self, timeout: float = 20) -> Any:
        item = self.frames.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def replies(self, n: int, timeout: float = 20) -> Iterator[Any]:
        """The next n frames that are not telemetry events."""
        got = 0
        while got < n:
            frame = self.next(timeout)
            if frame[0] != "telemetry":
                got += 1
                yield frame

    def request(self, term: Any, timeout: float = 20) -> Any:
        self.send(term)
        return next(self.replies(1, timeout))

    def close(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        """Everything the worker wrote on stderr (waits for it to close, after the worker exited)."""
        self._err_reader.join(15)
        return self.stderr_so_far()


@pytest.fixture
def port() -> Iterator[PortClient]:
    client = PortClient()
    yield client
    client.close()


def inline(arr: np.ndarray) -> tuple[Any, ...]:
    return (A("tensor"), {A("dtype"): arr.dtype.name, A("shape"): list(arr.shape), A("data"): arr.tobytes()})


def as_array(value: Any) -> np.ndarray:
    tag, t = value
    assert tag == "tensor"
    assert A("data") in t, f"expected an inline tensor, got {t}"
    return np.frombuffer(t[A("data")], dtype=t[A("dtype")].decode()).reshape(t[A("shape")])


# ---------------------------------------------------------------------------------------------------


def test_ready_frame_comes_first_and_describes_the_worker(port: PortClient) -> None:
    tag, pid, info = port.ready
    assert tag == "ready" and pid == port.proc.pid
    assert info[A("version")].decode() and info[A("device")] == b"cpu"
    ops = [o.decode() for o in info[A("ops")]]
    assert {"add", "identity", "debug.segfault"} <= set(ops)
    assert b"add" in info[A("idempotent")] and b"debug.segfault" not in info[A("idempotent")]
    assert info[A("run_id")] == port.run_id.encode()


def test_call_with_inline_tensors_and_attrs(port: PortClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    tag, rid, result = port.request((A("call"), 1, "add", [inline(a), inline(a)], {}))
    assert (tag, rid) == ("ok", 1)
    np.testing.assert_array_equal(as_array(result[A("outputs")][0]), a + a)
    assert result[A("leases")] == [] and result[A("device")] == b"cpu"
    assert set(result[A("timing")]) == {A(k) for k in ("queue_ns", "decode_ns", "compute_ns", "encode_ns", "total_ns")}
    # attrs as a map and as an Elixir keyword list ([dim: 1] == [{:dim, 1}]); binary ids echo back too.
    for attrs in ({A("dim"): 1}, [(A("dim"), 1)]):
        tag, rid, result = port.request((A("call"), b"req-2", "sum", [inline(a)], attrs))
        assert (tag, rid) == ("ok", b"req-2")
        np.testing.assert_array_equal(as_array(result[A("outputs")][0]), a.sum(axis=1))


def test_shared_memory_in_and_out_with_a_lease(port: PortClient) -> None:
    a = np.random.default_rng(0).random(1 << 18, dtype=np.float32)  # 1 MiB
    seg = segments.create_segment(a.nbytes, port.run_id)
    try:
        np.frombuffer(seg, dtype=np.float32)[:] = a
        ref = (A("tensor"), {A("dtype"): "float32", A("shape"): [a.size],
                             A("shm"): {A("name"): seg.name, A("offset"): 0, A("nbytes"): a.nbytes,
                                        A("inode"): seg.inode}})
        tag, _, result = port.request((A("call"), 7, "mul", [ref, 2.0], {}))
        assert tag == "ok", result
        (out,) = result[A("outputs")]
        shm = out[1][A("shm")]
        assert shm[A("name")].decode().startswith(f"/sc-{port.run_id}-{port.proc.pid}-")  # the worker's
        (lease,) = result[A("leases")]
        with segments.open_segment(shm[A("name")].decode()) as view:
            got = np.frombuffer(view, dtype=np.float32, count=a.size, offset=shm[A("offset")]).copy()
        np.testing.assert_array_equal(got, a * 2)
        tag, _, rel = port.request((A("release"), 8, [lease, "l-unknown"]))
        assert (tag, rel) == ("ok", {A("released"): 1, A("unknown"): [b"l-unknown"]})
    finally:
        seg.close()
        segments.unlink_segment(seg.name)
    # The piggybacked form: opts map with release, placement :inline.
    tag, _, result = port.request((A("call"), 9, "identity", [inline(a[:4])], {},
                                   {A("placement"): A("inline"), A("release"): [], A("request_id"): "mine"}))
    assert tag == "ok" and result[A("request_id")] == b"mine"
    np.testing.assert_array_equal(as_array(result[A("outputs")][0]), a[:4])


def test_errors_carry_kind_and_fields(port: PortClient) -> None:
    a = np.zeros((2, 3), np.float32)
    b = np.zeros((3, 2), np.float32)
    tag, rid, err = port.request((A("call"), 3, "add", [inline(a), inline(b)], {}))
    assert (tag, rid) == ("error", 3)
    assert err[A("kind")] == A("shape_mismatch")
    assert err[A("input_shapes")] == [[2, 3], [3, 2]] and err[A("dim")] == 1
    assert err[A("op")] == b"add" and b"transpose" in err[A("suggestion")]
    tag, _, err = port.request((A("call"), 4, "addd", [], {}))
    assert err[A("kind")] == A("unknown_op") and b"add" in err[A("close_names")]
    bad = (A("tensor"), {A("dtype"): "float32", A("shape"): [4],
                         A("shm"): {A("name"): "/etc/passwd", A("offset"): 0, A("nbytes"): 16}})
    tag, _, err = port.request((A("call"), 5, "identity", [bad], {}))
    assert err[A("kind")] == A("invalid_tensor_ref") and err[A("field")] == b"name" and err[A("input_index")] == 0
    tag, _, err = port.request((A("call"), 6, "identity", [(A("tensor"), {A("dtype"): "float32"})], {}))
    assert err[A("kind")] == A("invalid_tensor_ref") and err[A("field")] == b"shape"
    assert err[A("request_id")]  # refused before dispatch, and still correlatable
    no_storage = (A("tensor"), {A("dtype"): "float32", A("shape"): [1]})
    tag, _, err = port.request((A("call"), 7, "identity", [no_storage], {}, {A("request_id"): "mine"}))
    assert (err[A("field")], err[A("request_id")]) == (b"storage", b"mine")


def test_bignums_are_invalid_argument(port: PortClient) -> None:
    a = np.ones(3, np.float32)
    tag, rid, err = port.request((A("call"), 1, "add", [inline(a), 2**100], {}))
    assert (tag, rid, err[A("kind")]) == ("error", 1, A("invalid_argument"))
    assert (err[A("field")], err[A("input_index")]) == (b"value", 1) and b"int64" in err[A("message")]
    tag, rid, err = port.request((A("call"), 2, "transpose", [inline(a)], {A("dim0"): -(2**70)}))
    assert (tag, err[A("kind")], err[A("field")]) == ("error", A("invalid_argument"), b"attrs.dim0")


def test_malformed_frames_are_answered_and_the_worker_goes_on() -> None:
    port = PortClient("--max-frame-bytes", "4K")
    nan = struct.pack(">d", float("nan"))
    long_atom = b"\x76\x01\x2c" + b"a" * 300  # ATOM_UTF8_EXT of 300 characters
    pid = b"\x58\x77\x0dnonode@nohost" + bytes(12)  # NEW_PID_EXT
    ref = b"\x5a\x00\x03\x77\x0dnonode@nohost" + bytes(16)  # NEWER_REFERENCE_EXT
    inflating = b"\x6d" + struct.pack(">I", (256 << 20) - 5) + bytes((256 << 20) - 5)
    try:
        cases: list[tuple[bytes, Any, str]] = [
            (b"", A("undefined"), "malformed frame"),
            (b"\x83", A("undefined"), "malformed frame"),
            (b"junk", A("undefined"), "version byte"),
            (b"\x83\x6c\x00\x00\x00\x01\x61\x01\x61\x02", A("undefined"), "improper list"),
            (b"\x83" + b"\x6c\x00\x00\x00\x01" * 300 + b"\x6a" * 301, A("undefined"), "nested deeper"),
            (b"\x83\x6d\xff\xff\xff\xff", A("undefined"), "binary needs"),
            (etf.encode(42), A("undefined"), "unknown request"),
            (etf.encode((A("call"), 5)), 5, "unknown request"),
            (etf.encode((A("frobnicate"), 6)), 6, "unknown request"),
            (etf.encode((A("call"), 7, 3.5, [], {})), 7, "op must be"),
            (etf.encode((A("call"), 8, "add", "not-a-list", {})), 8, "inputs must be a list"),
            (etf.encode((A("call"), 9, "add", [], {}, {A("placement"): A("sideways")})), 9, "placement must be"),
            (etf.encode((A("release"), 10, "nope")), 10, "list of lease ids"),
            (b"\x83" + b"\x6a" * 5000, A("undefined"), "exceeds the 4096-byte limit"),
            # {:call, 12, "add", ...} over the limit: the id at its start is still read
            (etf.encode((A("call"), 12, "add", [b"x" * 5000], {})), 12, "exceeds the 4096-byte limit"),
            # a 19-byte frame whose id (NaN) could never be sent back; it used to end the worker with exit 0
            (b"\x83\x68\x02\x77\x05bogus\x46" + nan, A("undefined"), "no Erlang form"),
            (b"\x83\x68\x05\x77\x04call" + long_atom + etf.encode("add")[1:] + b"\x6a\x74\x00\x00\x00\x00",
             A("undefined"), "exceeds Erlang's 255"),
            # a pid in the inputs, a reference in the attrs: the id before them still decodes
            (b"\x83\x68\x05" + etf.encode(A("call"))[1:] + etf.encode(13)[1:] + etf.encode("identity")[1:]
             + b"\x6c\x00\x00\x00\x01" + pid + b"\x6a" + b"\x74\x00\x00\x00\x00", 13, "NEW_PID_EXT"),
            (b"\x83\x68\x05" + etf.encode(A("call"))[1:] + etf.encode((b"req", 14))[1:]
             + etf.encode("identity")[1:] + b"\x6a" + b"\x74\x00\x00\x00\x01\x77\x01r" + ref,
             (b"req", 14), "NEWER_REFERENCE_EXT"),
            # a compressed term declaring 256 MiB inflated (its zlib stream cut to fit the frame limit)
            (b"\x83\x50" + struct.pack(">I", 256 << 20) + zlib.compress(inflating)[:4000], A("undefined"),
             "over the 4096-byte limit"),
        ]
        for data, rid, message in cases:
            port.send_raw(data)
            tag, got_id, err = port.next()
            assert (tag, got_id) == ("error", rid), (data[:20], err)
            assert err[A("kind")] == A("invalid_argument")
            assert message.encode() in err[A("message")], (message, err[A("message")])
        assert port.proc.poll() is None
        tag, _, result = port.request((A("call"), 11, "debug.pid", [], {}))
        assert (tag, result[A("outputs")]) == ("ok", [port.proc.pid])
    finally:
        assert port.close() == 0


def test_several_calls_in_flight_answer_by_id(port: PortClient) -> None:
    for i in range(3):
        port.send((A("call"), ("slow", i), "debug.sleep", [], {A("seconds"): 0.6}))
    port.send((A("call"), "fast", "debug.pid", [], {}))
    order = [rid for _, rid, _ in port.replies(4)]
    assert order[0] == b"fast"  # overtakes the sleeps: they run on other threads
    assert sorted(map(repr, order[1:])) == sorted(repr((b"slow", i)) for i in range(3))


def test_control_requests(port: PortClient) -> None:
    tag, _, ops = port.request((A("list_ops"), 1))
    add = next(o for o in ops if o[A("name")] == b"add")
    assert add[A("min_inputs")] == 2 and add[A("idempotent")] is True
    tag, _, hw = port.request((A("hardware"), 2))
    assert tag == "ok" and hw[A("pid")] == port.proc.pid and hw[A("cpu")][A("threads")] >= 1
    assert A("available") in hw[A("cuda")]


def test_telemetry_subscription_streams_spans(port: PortClient) -> None:
    assert port.request((A("subscribe"), 1, {A("memory_interval_s"): 0.2})) == ("ok", 1, A("subscribed"))
    assert port.request((A("subscribe"), 2)) == ("ok", 2, A("already_subscribed"))
    port.send((A("call"), 3, "debug.pid", [], {}))
    events, reply = [], None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (reply is None or len({e[0] for e in events}) < 3):
        frame = port.next()
        if frame[0] == "telemetry":
            events.append((tuple(frame[1]), frame[2], frame[3]))
        else:
            reply = frame
    assert reply is not None and reply[0] == "ok"
    names = {e[0] for e in events}
    assert {("sidecar", "call", "start"), ("sidecar", "call", "stop"), ("sidecar", "memory")} <= names
    _, meas, meta = next(e for e in events if e[0] == ("sidecar", "call", "stop"))
    assert meas[A("duration")] > 0 and meta[A("op")] == b"debug.pid" and meta[A("os_pid")] == port.proc.pid
    assert port.request((A("unsubscribe"), 4)) == ("ok", 4, A("unsubscribed"))


def test_a_calls_telemetry_comes_before_its_answer() -> None:
    """With a subscription, a call's stop or exception event is sent before its reply: a host that
    has the answer has its telemetry too, even if the worker dies right after (a crash loses
    nothing that was already answered)."""
    port = PortClient()
    try:
        assert port.request((A("subscribe"), 0, {A("memory_interval_s"): 600})) == ("ok", 0, A("subscribed"))
        a, b = np.zeros(2, np.float32), np.zeros(3, np.float32)
        for i in range(20):
            inputs = [inline(a), inline(a if i % 2 else b)]
            port.send((A("call"), i, "add", inputs, {}, {A("request_id"): f"req-{i}"}))
            seen: list[Any] = []
            while (frame := port.next())[0] == "telemetry":
                seen.append(frame)
            assert frame[:2] == (("ok" if i % 2 else "error"), i)
            phase = "stop" if i % 2 else "exception"
            assert any(f[1] == ["sidecar", "call", phase] and f[3][A("request_id")] == f"req-{i}".encode()
                       for f in seen), (i, seen)
        port.send((A("call"), 99, "debug.segfault", [], {}))
        assert port.proc.wait(20) == -11
    finally:
        port.close()


def hold_call(rid: Any, tmp_path: Path, name: str) -> tuple[Any, ...]:
    """A call of `hold` (tests/hold_ops_module.py): it runs until tmp_path/release exists."""
    return (A("call"), rid, "hold", [rid if isinstance(rid, int) else 0],
            {A("started"): str(tmp_path / f"{name}.started"), A("release"): str(tmp_path / "release")})


def test_cancel_stops_a_running_call(tmp_path: Path) -> None:
    port = PortClient("--ops", HOLD_OPS)
    try:
        port.send(hold_call(1, tmp_path, "one"))  # never released: only the cancel ends it
        wait_until(lambda: (tmp_path / "one.started").exists(), timeout=30)
        port.send((A("cancel"), 1))
        tag, rid, err = next(port.replies(1))
        assert (tag, rid, err[A("kind")]) == ("error", 1, A("cancelled"))
    finally:
        assert port.close() == 0


def test_overload_is_refused_with_figures(tmp_path: Path) -> None:
    port = PortClient("--max-concurrency", "1", "--max-queue", "0", "--ops", HOLD_OPS)
    try:
        port.send(hold_call(0, tmp_path, "zero"))
        wait_until(lambda: (tmp_path / "zero.started").exists(), timeout=30)
        for i in (1, 2):
            port.send(hold_call(i, tmp_path, str(i)))
        refused = list(port.replies(2))
        assert [(tag, rid) for tag, rid, _ in refused] == [("error", 1), ("error", 2)]
        assert all(e[A("kind")] == A("overloaded") and e[A("limit")] == 0 for _, _, e in refused)
        (tmp_path / "release").touch()
        assert port.next()[:2] == ("ok", 0)
    finally:
        port.close()


def test_prints_in_ops_do_not_corrupt_the_frame_stream(tmp_path: Path) -> None:
    (tmp_path / "noisy_ops.py").write_text(textwrap.dedent("""
        import os, sys
        import sidecar

        @sidecar.op("noisy")
        def noisy(x):
            print("print() from an op")
            sys.stdout.write("sys.stdout.write\\n")
            os.write(1, b"os.write to fd 1\\n")
            return x
    """))
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = PortClient("--ops", "noisy_ops", env=env)
    try:
        for i in range(3):
            tag, _, result = port.request((A("call"), i, "noisy", [41 + i], {}))
            assert (tag, result[A("outputs")]) == ("ok", [41 + i])
    finally:
        assert port.close() == 0
    assert "os.write to fd 1" in port.stderr()


def test_a_crash_is_a_signal_exit_and_stdin_eof_is_a_clean_one() -> None:
    port = PortClient()
    port.send((A("call"), 1, "debug.segfault", [], {}))
    assert port.proc.wait(20) == -11
    port = PortClient()
    assert port.close() == 0  # exited by itself on EOF (close() kills a worker that does not: not 0)


def test_sigterm_drains_calls_in_flight_then_exits_0(tmp_path: Path) -> None:
    port = PortClient("--ops", HOLD_OPS)
    port.send(hold_call(1, tmp_path, "one"))
    wait_until(lambda: (tmp_path / "one.started").exists(), timeout=30)
    port.proc.terminate()
    wait_until(lambda: "SIGTERM: stopping" in port.stderr_so_far(), timeout=30)  # new calls refused now
    port.send((A("call"), 2, "debug.pid", [], {}))
    tag, rid, err = port.next()
    assert (tag, rid, err[A("kind")]) == ("error", 2, A("cancelled")) and b"shutting down" in err[A("message")]
    (tmp_path / "release").touch()  # the call in flight finishes and is answered before the exit
    tag, rid, result = port.next()
    assert (tag, rid, result[A("outputs")]) == ("ok", 1, [1])
    assert port.proc.wait(15) == 0


def test_a_reply_with_no_term_form_is_answered_with_an_error_and_its_lease_released(tmp_path: Path) -> None:
    (tmp_path / "unencodable_ops.py").write_text(textwrap.dedent("""
        import torch
        import sidecar

        @sidecar.op("unencodable")
        def unencodable():
            # a leased shared-memory output next to a string no Erlang binary can hold
            return torch.ones(1 << 16), "\\udc80"

        @sidecar.op("lease_count")
        def lease_count(ctx=None):
            return ctx.runtime.leases.count
    """))
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = PortClient("--ops", "unencodable_ops", env=env)
    try:
        tag, rid, err = port.request((A("call"), ("bad", 1), "unencodable", [], {}))
        assert (tag, rid) == ("error", (b"bad", 1))
        assert err[A("kind")] == A("op_failed") and err[A("exception_type")] == b"EncodeError"
        assert b"no Erlang term form" in err[A("message")]
        tag, _, result = port.request((A("call"), 2, "lease_count", [], {}))
        assert (tag, result[A("outputs")]) == ("ok", [0])  # the output's lease went with the reply
    finally:
        assert port.close() == 0


def test_a_frame_header_costs_nothing_until_its_body_arrives() -> None:
    """A 4-byte header declaring 200 MiB used to make the worker allocate (and zero) 200 MiB at once."""
    import tracemalloc

    from sidecar.worker.runtime import WorkerOptions, build_runtime
    from sidecar.worker.stdio_server import StdioServer
    from tests.workers import session_run

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with build_runtime(WorkerOptions(device="cpu", run_id=session_run("stdiohdr"))) as rt:
        server = StdioServer(rt, in_r, out_w, max_frame=256 << 20)
        try:
            os.write(in_w, struct.pack(">I", 200 << 20) + b"\x83\x68\x02")  # then the host goes away
            os.close(in_w)
            tracemalloc.start()
            try:
                server.read_loop()  # returns at EOF in the middle of the body
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            server.close()
            for fd in (in_r, out_r, out_w):
                os.close(fd)
    assert peak < 8 << 20, f"reading a 3-byte body of a 200 MiB frame allocated {peak >> 20} MiB"
