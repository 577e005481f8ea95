"""Property-based fuzz of both transports against real workers (Hypothesis, about a minute in all).

gRPC: random bytes as an Execute body, and random but well-formed ExecuteRequests (ops, tensors whose
dtype, shape, strides and storage disagree, nested values, attrs, placements, out refs). The port:
random terms, call frames holding what Erlang cannot hold (NaN, pids, references, bignums, long
atoms), truncated, compressed and oversized frames. Every request is answered with a structured
error or a result, the worker stays up and serving, and its RSS stays bounded. A bigger storm (100,000
requests) belongs in a script; this is the suite's bounded version.
"""
from __future__ import annotations

import itertools
import math
import struct
import zlib
from typing import Any, Iterator

import grpc
import numpy as np
import psutil
import pytest
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import etf
from sidecar.errors import ErrorKind, SidecarError
from sidecar.etf import Atom as A
from sidecar.host import Client
from sidecar.protocol import grpc_codec
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.worker.registry import Registry
from sidecar.worker.runtime import BUILTIN_OPS
from tests.test_stdio_transport import PortClient, inline
from tests.workers import long_lived_run, long_lived_worker

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
RSS_BOUND = 256 << 20  # generous: a leak of ~20 KB per request or a 1 GiB allocation goes far past it
MAX_FRAME = 64 << 10

_BUILTINS = Registry()
_BUILTINS.load_module(BUILTIN_OPS)
ARITY = {s.name: (s.min_inputs, s.max_inputs if s.max_inputs >= 0 else s.min_inputs + 2) for s in _BUILTINS.specs()}
OP_ATTRS = {s.name: list(s.attrs) for s in _BUILTINS.specs()}
OPS = list(ARITY)
DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16",
          "uint32", "uint64", "bool", "complex64", "complex128"]
ATTRS = sorted({a for attrs in OP_ATTRS.values() for a in attrs})

# Most of what is drawn is plausible (a real op, tensors whose data fits), so the fuzz reaches the ops
# and the encoders of their results, not only the first check; the rest is wild.
texts = st.text(max_size=30)
ops = st.one_of(st.sampled_from(OPS), st.sampled_from(OPS), st.sampled_from(OPS), texts)
dtypes = st.one_of(st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.sampled_from(DTYPES), texts)
small_shapes = st.lists(st.integers(0, 6), max_size=4)
attr_values = st.one_of(st.integers(-3, 3), st.lists(st.integers(-2, 6), max_size=3), st.sampled_from(DTYPES),
                        st.sampled_from(["tanh", "none", "floor", "trunc"]), st.booleans(), st.floats())
placements = st.sampled_from([0, 0, 0, 0, 1, 2, 4])
wild_ints = st.one_of(st.integers(-3, 8), st.integers(-(2**63), 2**63 - 1))
numbers = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans())
segment_names = st.one_of(
    st.builds(lambda run, pid, rand: f"/sc-{run}-{pid}-{rand}", st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
              st.integers(0, 2**31), st.from_regex(r"[0-9a-f]{8,16}", fullmatch=True)),
    texts)


def itemsize(dtype: str) -> int:
    return {"bfloat16": 2}.get(dtype) or (np.dtype(dtype).itemsize if dtype in DTYPES else 4)


# ---------------------------------------------------------------------------------------------------
# gRPC


@st.composite
def pb_tensors(draw: Any) -> pb.Tensor:
    dtype = draw(dtypes)
    shape = draw(st.one_of(small_shapes, small_shapes, st.lists(wild_ints, max_size=5)))
    t = pb.Tensor(dtype=dtype, shape=shape)
    if draw(st.integers(0, 5)) == 0:
        t.strides.extend(draw(st.lists(wild_ints, max_size=5)))
    storage = draw(st.sampled_from(["inline_exact"] * 6 + ["inline", "shm", "cuda_ipc", "none"]))
    if storage == "inline_exact":  # consistent, so that real ops run on it
        n = math.prod(max(d, 0) for d in shape) * itemsize(dtype)
        t.inline_data = draw(st.binary(min_size=n, max_size=n)) if n <= 4096 else b""
    elif storage == "inline":
        t.inline_data = draw(st.binary(max_size=64))
    elif storage == "shm":
        t.shm.name = draw(segment_names)
        t.shm.offset, t.shm.nbytes, t.shm.inode = (draw(st.integers(0, 2**64 - 1)) for _ in range(3))
    elif storage == "cuda_ipc":
        t.cuda_ipc.handle = draw(st.binary(max_size=70))
        t.cuda_ipc.nbytes = draw(st.integers(0, 2**64 - 1))
    return t


def pb_scalar(draw: Any) -> pb.Value:
    kind = draw(st.sampled_from(["f64", "i64", "i64", "b", "s", "raw", "none", "empty", "arrow"]))
    v = pb.Value()
    if kind == "f64":
        v.f64 = draw(st.floats())
    elif kind == "i64":
        v.i64 = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "b":
        v.b = draw(st.booleans())
    elif kind == "s":
        v.s = draw(texts)
    elif kind == "raw":
        v.raw = draw(st.binary(max_size=32))
    elif kind == "none":
        v.none.SetInParent()
    elif kind == "arrow":
        v.arrow.inline_data = draw(st.binary(max_size=64))
    return v  # "empty": a value with no kind


pb_scalars = st.composite(pb_scalar)()


@st.composite
def pb_values(draw: Any, depth: int = 0) -> pb.Value:
    pick = draw(st.integers(0, 11))
    if pick < 6:
        return pb.Value(tensor=draw(pb_tensors()))
    if pick < 10 or depth >= 2:
        return pb_scalar(draw)
    v = pb.Value()
    if pick == 10:
        v.list.SetInParent()
        for item in draw(st.lists(pb_values(depth + 1), max_size=3)):
            v.list.items.add().CopyFrom(item)
    else:
        v.map.SetInParent()
        for key, item in draw(st.dictionaries(texts, pb_values(depth + 1), max_size=3)).items():
            v.map.items[key].CopyFrom(item)
    return v


def _value_pb(v: Any) -> pb.Value:
    m = pb.Value()
    grpc_codec.fill_value(m, v)
    return m


@st.composite
def execute_requests(draw: Any) -> pb.ExecuteRequest:
    op = draw(ops)
    req = pb.ExecuteRequest(op=op, request_id=draw(texts), idempotent=draw(st.booleans()),
                            release=draw(st.lists(texts, max_size=3)))
    lo, hi = ARITY.get(op, (0, 4))
    n = draw(st.integers(lo, hi)) if draw(st.integers(0, 4)) else draw(st.integers(0, 5))
    for v in draw(st.lists(pb_values(), min_size=n, max_size=n)):
        req.inputs.add().CopyFrom(v)
    plausible = st.dictionaries(st.sampled_from(OP_ATTRS.get(op) or ATTRS), attr_values.map(_value_pb),
                                max_size=2)
    for key, v in draw(plausible | st.dictionaries(texts, pb_scalars, max_size=3)).items():
        req.attrs[key].CopyFrom(v)
    req.output.placement = draw(placements) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**31 - 1))
    req.output.inline_threshold = draw(st.sampled_from([0, 0, 16]) | st.integers(0, 2**64 - 1))
    req.output.allow_alias = draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        for t in draw(st.lists(pb_tensors(), max_size=2)):
            req.output.out.add().CopyFrom(t)
    return req


@pytest.fixture(scope="module")
def grpc_run() -> Any:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def grpc_worker(grpc_run: str) -> Iterator[Any]:
    w = next(worker := long_lived_worker(grpc_run))
    proc = psutil.Process(w.pid)
    channel = grpc.insecure_channel(w.address)
    execute = channel.unary_unary("/sidecar.v1.Sidecar/Execute")  # raw bytes both ways
    with Client(w.address, run_id=grpc_run, timeout=30) as client:
        client.call("add", np.ones(4, np.float32), np.ones(4, np.float32))  # warm
        w.rss_before = proc.memory_info().rss
        w.execute, w.client, w.proc_info = execute, client, proc
        yield w
        assert w.alive(), w.stderr_text()[-3000:]
        assert client.health() == "SERVING"
        np.testing.assert_array_equal(client.call("add", np.ones(4, np.float32), np.ones(4, np.float32)), [2] * 4)
        grown = proc.memory_info().rss - w.rss_before
        assert grown < RSS_BOUND, f"worker RSS grew by {grown >> 20} MiB under the fuzz"
    channel.close()
    next(worker, None)  # stops the worker: exit 0, none of its segments left


def answered(w: Any, body: bytes) -> None:
    """A result (its leases handed back) or a structured error: never a bare status."""
    try:
        reply = w.execute(body, timeout=30)
    except grpc.RpcError as err:
        status = rpc_status.from_call(err)
        assert status is not None and status.details, f"unstructured {err.code()}: {err.details()}"
        structured = grpc_codec.error_from_rpc(err)
        assert isinstance(structured, SidecarError) and structured.request_id, repr(structured)
        if structured.kind is ErrorKind.OP_FAILED:
            assert structured.exception_type, repr(structured)
        return
    leases = list(pb.ExecuteResponse.FromString(reply).leases)
    if leases:
        w.client.release(leases)


@settings(FUZZ, max_examples=150)
@given(body=st.one_of(st.binary(max_size=200), st.binary(max_size=8).map(lambda b: b"\xff" + b)))
def test_random_bytes_as_an_execute_body(grpc_worker: Any, body: bytes) -> None:
    answered(grpc_worker, body)


@settings(FUZZ, max_examples=600)
@given(req=execute_requests())
def test_well_formed_but_wrong_execute_requests(grpc_worker: Any, req: pb.ExecuteRequest) -> None:
    answered(grpc_worker, req.SerializeToString())


# ---------------------------------------------------------------------------------------------------
# the port


class Raw(bytes):
    """A term's bytes as they are (what our encoder would refuse to write: NaN, a pid, ...)."""


HOSTILE_LEAVES = [
    Raw(b"\x46" + struct.pack(">d", float("nan"))),
    Raw(b"\x46" + struct.pack(">d", float("inf"))),
    Raw(b"\x58\x77\x0dnonode@nohost" + bytes(12)),               # NEW_PID_EXT
    Raw(b"\x5a\x00\x01\x77\x0dnonode@nohost" + bytes(8)),         # NEWER_REFERENCE_EXT
    Raw(b"\x59\x77\x0dnonode@nohost" + bytes(12)),               # NEW_PORT_EXT
    Raw(b"\x76\x01\x2c" + b"a" * 300),                            # a 300-character atom
    Raw(b"\x4d\x00\x00\x00\x01\x03\xff"),                         # a 3-bit bitstring
    Raw(b"\x6c\x00\x00\x00\x01\x61\x01\x61\x02"),                 # an improper list
    Raw(b"\x64\x00\x03\xe9t\xe9"),                                # a latin-1 atom
]


def enc(term: Any) -> bytes:
    """`term` in the external format without the version byte; Raw pieces spliced in as they are."""
    if isinstance(term, Raw):
        return bytes(term)
    if isinstance(term, float) and not math.isfinite(term):
        return b"\x46" + struct.pack(">d", term)  # our encoder refuses it; a hostile host need not
    if isinstance(term, tuple):
        head = bytes((104, len(term))) if len(term) < 256 else b"\x69" + struct.pack(">I", len(term))
        return head + b"".join(enc(x) for x in term)
    if isinstance(term, list):
        return (b"\x6c" + struct.pack(">I", len(term)) + b"".join(enc(x) for x in term) + b"\x6a") if term else b"\x6a"
    if isinstance(term, dict):
        return b"\x74" + struct.pack(">I", len(term)) + b"".join(enc(k) + enc(v) for k, v in term.items())
    return etf.encode(term)[1:]


atoms = st.one_of(st.sampled_from([A(a) for a in ATTRS + ["tensor", "bytes", "arrow", "inline", "shm", "auto"]]),
                  st.text(max_size=20).map(A))
_plain_scalars = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                           st.binary(max_size=24), st.text(max_size=12), atoms, st.booleans(), st.none())
port_scalars = st.one_of(*[_plain_scalars] * 5, st.sampled_from(HOSTILE_LEAVES))


@st.composite
def port_tensors(draw: Any) -> tuple[Any, ...]:
    dtype = draw(dtypes)
    shape = draw(st.one_of(small_shapes, small_shapes, small_shapes, st.lists(st.integers(-(2**70), 2**70), max_size=4),
                           port_scalars))
    m: dict[Any, Any] = {A("dtype"): draw(st.one_of(st.just(dtype), st.just(dtype), port_scalars)), A("shape"): shape}
    storage = draw(st.sampled_from(["data_exact"] * 6 + ["data", "shm", "cuda_ipc", "none"]))
    if storage == "data_exact" and isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        n = math.prod(max(d, 0) for d in shape) * itemsize(dtype)
        m[A("data")] = draw(st.binary(min_size=n, max_size=n)) if n <= 4096 else b""
    elif storage == "data":
        m[A("data")] = draw(st.one_of(st.binary(max_size=32), port_scalars))
    elif storage == "shm":
        m[A("shm")] = draw(st.one_of(st.fixed_dictionaries({
            A("name"): st.one_of(segment_names, port_scalars), A("offset"): st.integers(-(2**65), 2**65),
            A("nbytes"): st.integers(-(2**65), 2**65)}), port_scalars))
    elif storage == "cuda_ipc":
        m[A("cuda_ipc")] = {A("handle"): draw(st.binary(max_size=70)), A("nbytes"): draw(st.integers(0, 2**64))}
    if draw(st.integers(0, 5)) == 0:
        m[A("strides")] = draw(st.one_of(st.lists(st.integers(-(2**65), 2**65), max_size=4), port_scalars))
    return (A("tensor"), m)


port_values = st.recursive(st.one_of(port_scalars, port_tensors()),
                           lambda children: st.one_of(st.lists(children, max_size=3),
                                                      st.dictionaries(atoms, children, max_size=3),
                                                      st.tuples(atoms, children)), max_leaves=8)
_ids = itertools.count()


@st.composite
def call_frames(draw: Any) -> tuple[bytes, Any]:
    """(frame body, the id a reply must carry)."""
    rid = next(_ids)
    wild = draw(st.integers(0, 4)) == 0
    op = draw(port_scalars) if wild else draw(ops)
    lo, hi = ARITY.get(op, (0, 3)) if isinstance(op, str) else (0, 3)
    n = draw(st.integers(lo, hi))
    plausible = st.one_of(port_tensors(), port_tensors(), port_tensors(), st.integers(-3, 3), st.floats())
    inputs = draw(st.lists(port_values, max_size=3) | port_scalars) if wild else \
        draw(st.lists(plausible | port_values, min_size=n, max_size=n))
    attrs = draw(st.dictionaries(atoms, port_values, max_size=3) | port_scalars) if wild else \
        draw(st.dictionaries(st.sampled_from([A(a) for a in OP_ATTRS.get(op) or ATTRS]), attr_values, max_size=2))
    term: list[Any] = [A("call"), rid, op, inputs, attrs]
    if draw(st.integers(0, 2)) == 0:
        placement = st.sampled_from([A("auto"), A("auto"), A("shm"), A("inline"), A("out"), A("device")])
        term.append(draw(st.one_of(st.fixed_dictionaries({}, optional={
            A("placement"): placement | port_scalars,
            A("out"): st.lists(port_tensors(), max_size=2) | port_scalars,
            A("release"): st.lists(st.text(max_size=8), max_size=2) | port_scalars,
            A("request_id"): st.text(max_size=8) | port_scalars, A("inline_threshold"): st.integers(-5, 2**70),
            A("idempotent"): port_scalars}), port_scalars)))
    return b"\x83" + enc(tuple(term)), rid


@st.composite
def control_frames(draw: Any) -> tuple[bytes, Any]:
    rid = next(_ids)
    tag = draw(st.sampled_from(["list_ops", "hardware", "release", "frobnicate"]))
    rest = [draw(port_values)] if tag in ("release", "frobnicate") else []
    return b"\x83" + enc((A(tag), rid, *rest)), rid


@st.composite
def damaged_frames(draw: Any) -> tuple[bytes, Any]:
    """Frames whose id may or may not survive: any reply id is fine, one reply is required."""
    body, rid = draw(call_frames())
    how = draw(st.sampled_from(["truncated", "compressed", "corrupt_compressed", "oversized", "random_term",
                                "random_bytes"]))
    if how == "truncated":
        body = body[:draw(st.integers(0, max(len(body) - 1, 0)))]
    elif how == "compressed":
        body = b"\x83\x50" + struct.pack(">I", len(body) - 1) + zlib.compress(body[1:])
    elif how == "corrupt_compressed":
        body = b"\x83\x50" + struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + draw(st.binary(max_size=40))
    elif how == "oversized":
        body = body + bytes(MAX_FRAME + 1 - len(body))  # over --max-frame-bytes: skipped, answered
    elif how == "random_term":
        body = b"\x83" + enc(draw(port_values))
    else:
        body = draw(st.binary(max_size=64))
    return body, None


@pytest.fixture(scope="module")
def port_worker() -> Iterator[PortClient]:
    port = PortClient("--device", "cpu", "--max-frame-bytes", str(MAX_FRAME), "--threads", "1")
    proc = psutil.Process(port.proc.pid)
    port.rss_before = proc.memory_info().rss
    yield port
    try:
        assert port.proc.poll() is None, port.stderr()[-3000:]
        ones = np.ones(3, np.float32)
        tag, rid, result = port.request((A("call"), "final", "add", [inline(ones), inline(ones)], {}))
        assert (tag, rid) == ("ok", b"final") and result[A("outputs")][0][1][A("data")] == (ones * 2).tobytes()
        grown = proc.memory_info().rss - port.rss_before
        assert grown < RSS_BOUND, f"port worker RSS grew by {grown >> 20} MiB under the fuzz"
    finally:
        assert port.close() == 0


@settings(FUZZ, max_examples=800)
@given(frame=st.one_of(call_frames(), call_frames(), call_frames(), control_frames(), damaged_frames()))
def test_hostile_port_frames_are_each_answered(port_worker: PortClient, frame: tuple[bytes, Any]) -> None:
    body, rid = frame
    port_worker.send_raw(body)
    tag, got_id, reply = port_worker.next(timeout=30)
    assert tag in ("ok", "error"), (tag, body[:80])
    if rid is not None:
        assert got_id == rid, (got_id, rid, body[:80])
    if tag == "error":
        assert isinstance(reply, dict) and isinstance(reply.get(A("kind")), A) and reply.get(A("message")), reply
        return
    leases = reply.get(A("leases")) if isinstance(reply, dict) else None
    if leases:
        assert port_worker.request((A("release"), "rel", leases))[0] == "ok"
