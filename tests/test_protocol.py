"""`sidecar.protocol`: one description (the .proto) for both codecs, and everything that must agree
with it (the neutral classes, the error kinds and fields, the Elixir error struct, the defaults).

Expectations here are read from the descriptors, so a field added to the .proto is checked by
these tests without editing them.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar import etf
from sidecar.errors import ERROR_CLASSES, ERROR_FIELDS, ErrorKind, SidecarError
from sidecar.etf import Atom as A
from sidecar.protocol import grpc_codec, limits, port_codec, records, schema
from sidecar.protocol.calls import Call, CallResult, OutputSpec, Placement, Timing
from sidecar.protocol.refs import ArrowRef, CudaIpcStorage, InlineStorage, ShmStorage, TensorRef
from sidecar.v1 import sidecar_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
ERROR_EX = ROOT / "bridge" / "lib" / "sidecar" / "error.ex"
# Sidecar.Error fields that only the Elixir pool fills (they are in no worker's answer).
ELIXIR_HOST_ONLY = ("crashes",)
# Attributes of neutral classes that never travel (the transport sets them).
NOT_ON_THE_WIRE = {Call: {"is_cancelled"}}


# ---------------------------------------------------------------------------------------------------
# Errors


def test_error_kinds_are_the_protos_in_its_order() -> None:
    proto = [name for name in pb.ErrorKind.keys() if name != "ERROR_KIND_UNSPECIFIED"]
    assert [k.value for k in ErrorKind] == proto
    assert set(ERROR_CLASSES) == set(ErrorKind)


def test_error_fields_are_the_protos_error_fields() -> None:
    fields = [f.name for f in pb.Error.DESCRIPTOR.fields]
    assert list(ERROR_FIELDS) == [n for n in fields if n not in ("kind", "message", "has_dim")]


def elixir_list(source: str, attribute: str) -> list[str]:
    """The atoms of `@attribute [...]` or `@attribute ~w(...)a` in an Elixir module (comments out)."""
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    m = re.search(rf"@{attribute}\s+\[(.*?)\]", code, re.S)
    if m:
        return re.findall(r":(\w+)", m.group(1))
    m = re.search(rf"@{attribute}\s+~w\((.*?)\)a", code, re.S)
    assert m, f"no @{attribute} list found"
    return m.group(1).split()


def test_the_elixir_error_struct_has_the_protos_fields_and_kinds() -> None:
    source = ERROR_EX.read_text()
    assert elixir_list(source, "fields") == [*ERROR_FIELDS, *ELIXIR_HOST_ONLY], (
        "bridge/lib/sidecar/error.ex @fields must list sidecar.v1.Error's fields in proto order "
        "(then the host-only ones)")
    assert elixir_list(source, "kinds") == [k.value.lower() for k in ErrorKind]


def test_a_field_missing_from_the_elixir_list_is_noticed() -> None:
    source = ERROR_EX.read_text().replace("    :suggestion,\n", "")
    assert elixir_list(source, "fields") != [*ERROR_FIELDS, *ELIXIR_HOST_ONLY]


def _sample(f: schema.Field, i: int) -> Any:
    """A value that is not the field's default, of the field's kind."""
    one: Any = {"int": 3 + i, "float": 1.5 + i, "bool": True, "str": f"v{i}", "bytes": b"b%d" % i}.get(f.kind)
    return [one, one] if f.repeated else one


def test_every_error_field_crosses_both_transports() -> None:
    spec = schema.message("Error")
    fields: dict[str, Any] = {}
    for i, name in enumerate(ERROR_FIELDS):
        f = spec.by_name[name]
        fields[name] = [[2, 3], [4]] if f.message == "Shape" else _sample(f, i)
    for cls in ERROR_CLASSES.values():
        err = cls("message", **fields)
        back = grpc_codec.error_from_pb(grpc_codec.error_to_pb(err))
        assert (type(back), back.message, back.fields) == (cls, "message", fields)
        term = etf.decode(etf.encode(port_codec.error_to_term(err)))
        assert term[A("kind")] == A(err.kind.value.lower()) and term[A("message")] == b"message"
        assert {str(k) for k in term} - {"kind", "message"} == set(ERROR_FIELDS)
        assert term[A("input_shapes")] == [[2, 3], [4]] and term[A("op")] == fields["op"].encode()


# ---------------------------------------------------------------------------------------------------
# Neutral classes <-> messages


@pytest.mark.parametrize("binding", list(records.BINDINGS.values()), ids=lambda b: b.cls.__name__)
def test_a_bound_class_has_an_attribute_for_each_field_and_no_other(binding: records.Binding) -> None:
    """A field added to a bound message needs its attribute (and nothing else: the codecs carry it)."""
    spec = schema.message(binding.message)
    held = set(spec.oneofs[next(iter(spec.oneofs))]) if binding.oneof_attr else set()
    attrs = {f.name for f in dataclasses.fields(binding.cls)} - NOT_ON_THE_WIRE.get(binding.cls, set())
    assert attrs == set(spec.names) - held | ({binding.oneof_attr} if binding.oneof_attr else set())
    assert {m for _, m in binding.members} == held


SHM = ShmStorage("/sc-run1-42-0123abcd", 8, 24, 77)
CUDA = CudaIpcStorage(b"h" * 64, 16, 24, 1, "GPU-0000", 4096)
TENSORS = [TensorRef("float32", (2, 3), SHM, (12, 4)), TensorRef("int8", (3,), InlineStorage(b"abc")),
           TensorRef("float16", (4, 3), CUDA)]
TABLES = [ArrowRef(SHM, 5), ArrowRef(InlineStorage(b"arrow ipc"), 2)]
VALUES = [*TENSORS, *TABLES, 7, -2.5, True, "text", None, [1, [2, "x"]], {"a": 1, "b": [None, 2.0]}]


@pytest.mark.parametrize("ref", TENSORS + TABLES, ids=repr)
def test_refs_cross_both_codecs_unchanged(ref: Any) -> None:
    assert grpc_codec.read_value(_value_pb(ref), 0) == ref
    term = etf.decode(etf.encode(port_codec.value_to_term(ref)))
    assert port_codec.value_from_term(term, 0) == ref


def _value_pb(v: Any) -> pb.Value:
    m = pb.Value()
    grpc_codec.fill_value(m, v)
    return m


def test_a_call_crosses_both_codecs_unchanged() -> None:
    call = Call(op="add", inputs=list(VALUES), attrs={"dim": 1, "keepdim": True, "name": "x"},
                output=OutputSpec(Placement.OUT, tuple(TENSORS[:2]), 1024, True), release=["l-1", "l-2"],
                request_id="r-1", idempotent=True, client_pid=1234, client_id="c-1")
    back = grpc_codec.call_from_request(grpc_codec.codec("ExecuteRequest").fill(pb.ExecuteRequest(), call))
    assert back == call
    # The port: op, inputs, attrs in place, every other field of the request flat in opts.
    term = port_codec.term_codec("ExecuteRequest").encode(call)
    opts = {k: v for k, v in term.items() if k not in ("op", "inputs", "attrs", "output")}
    opts.update(term[A("output")])
    opts[A("placement")] = A("out")
    frame = etf.decode(etf.encode((A("call"), 1, term[A("op")], term[A("inputs")], term[A("attrs")], opts)))
    assert port_codec.call_from_term(frame) == call


def test_a_result_crosses_both_codecs_unchanged() -> None:
    result = CallResult(outputs=list(VALUES), leases=["l-9"], timing=Timing(1, 2, 3, 4, 10), device="cpu",
                        bytes_in=100, bytes_out=200, request_id="r-2")
    assert grpc_codec.result_from_response(grpc_codec.result_to_response(result)) == result
    term = etf.decode(etf.encode(port_codec.result_to_term(result)))
    assert set(term) == {A(n) for n in schema.message("ExecuteResponse").names}
    assert term[A("timing")] == {A(k): v for k, v in dataclasses.asdict(result.timing).items()}
    assert [port_codec.value_from_term(v, i) for i, v in enumerate(term[A("outputs")])] == VALUES


@pytest.mark.parametrize("message", ["Hardware", "OpInfo", "ReleaseResponse", "MemorySample", "CallSpan"])
def test_records_carry_every_field_of_their_message(message: str) -> None:
    """Built from the descriptor: a field added to one of these messages is carried by both codecs."""
    record = _record(message)
    back = grpc_codec.message_to_dict(grpc_codec.dict_to_message(record, getattr(pb, message)()))
    assert back == record
    term = etf.decode(etf.encode(port_codec.record_to_term(message, record)))
    assert set(term) == {A(n) for n in record}


def _record(message: str, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, f in enumerate(schema.message(message).fields):
        if f.kind == "message":
            sub = _record(f.message or "", depth + 1)
            out[f.name] = [sub] if f.repeated else sub
        elif f.kind == "map":
            out[f.name] = {"k": "v"}
        elif f.kind == "enum":
            out[f.name] = f.enum_names[-1][0]
        else:
            out[f.name] = _sample(f, i)
    return out


def test_telemetry_spans_keep_their_port_shape() -> None:
    """guides/elixir.md's table: the derived layout puts each CallSpan field where it was."""
    stop = {"type": "span", "phase": "stop", "op": "add", "request_id": "r", "duration_ns": 9, "bytes_in": 1,
            "bytes_out": 2, "outcome": "ok", "timing": {k: 1 for k in schema.message("Timing").names},
            "time_unix_ns": 5, "pid": 7}
    tag, name, meas, meta = port_codec.telemetry_to_term(stop)
    assert (tag, name) == ("telemetry", ["sidecar", "call", "stop"])
    assert set(meas) == {"duration", "bytes_in", "bytes_out", *schema.message("Timing").names}
    assert meta == {"op": "add", "request_id": "r", "os_pid": 7}
    _, name, meas, meta = port_codec.telemetry_to_term({**stop, "phase": "start"})
    assert (name[-1], meas) == ("start", {"bytes_in": 1, "system_time": 5})
    _, name, _, meta = port_codec.telemetry_to_term({**stop, "phase": "exception", "outcome": "SHAPE_MISMATCH",
                                                      "message": "boom"})
    assert (meta[A("kind")], meta[A("message")]) == (A("shape_mismatch"), "boom")


# ---------------------------------------------------------------------------------------------------
# Defaults, written once


def test_every_default_comes_from_the_limits() -> None:
    from sidecar.cli import build_parser
    from sidecar.dataplane import arrow, tensors
    from sidecar.host import Client
    from sidecar.host.pool import Pool
    from sidecar.worker.leases import LeaseTable
    from sidecar.worker.runtime import WorkerOptions

    args = build_parser().parse_args(["serve"])
    assert (args.inline_threshold, args.max_concurrency, args.max_queue, args.lease_ttl, args.max_leases,
            args.max_message_bytes, args.grace_period) == (
        limits.DEFAULT_INLINE_THRESHOLD, limits.DEFAULT_MAX_CONCURRENCY, limits.DEFAULT_MAX_QUEUE,
        limits.DEFAULT_LEASE_TTL_S, limits.DEFAULT_MAX_LEASES, limits.DEFAULT_MAX_MESSAGE_BYTES,
        limits.DEFAULT_GRACE_PERIOD_S)
    opts = WorkerOptions()
    assert (opts.inline_threshold, opts.max_concurrency, opts.max_queue, opts.lease_ttl_s, opts.max_leases) == (
        limits.DEFAULT_INLINE_THRESHOLD, limits.DEFAULT_MAX_CONCURRENCY, limits.DEFAULT_MAX_QUEUE,
        limits.DEFAULT_LEASE_TTL_S, limits.DEFAULT_MAX_LEASES)
    for fn in (Client, Pool, tensors.to_ref, arrow.table_to_ref):
        assert inspect.signature(fn).parameters["inline_threshold"].default == limits.DEFAULT_INLINE_THRESHOLD, fn
    table = inspect.signature(LeaseTable).parameters
    assert (table["ttl_s"].default, table["max_leases"].default) == (limits.DEFAULT_LEASE_TTL_S,
                                                                     limits.DEFAULT_MAX_LEASES)


def test_sidecar_errors_stays_the_public_path() -> None:
    from sidecar.errors import ShapeMismatch

    assert ShapeMismatch.kind is ErrorKind.SHAPE_MISMATCH and issubclass(ShapeMismatch, SidecarError)
