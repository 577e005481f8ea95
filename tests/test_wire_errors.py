"""The error mapping of the gRPC transport, message by message (proto3 cannot tell 0 from unset)."""
from __future__ import annotations

import pytest

from sidecar.errors import ERROR_CLASSES, ErrorKind, OutOfMemory, Overloaded, ShapeMismatch
from sidecar.protocol import grpc_codec, limits


def round_trip(err):
    return grpc_codec.error_from_pb(grpc_codec.error_to_pb(err))


def test_every_kind_keeps_its_class_and_message() -> None:
    for kind, cls in ERROR_CLASSES.items():
        back = round_trip(cls(f"a {kind.value} error", op="x"))
        assert type(back) is cls and back.kind is kind and back.message == f"a {kind.value} error"
        assert back.op == "x"


def test_gpu_out_of_memory_keeps_zero_allocator_figures() -> None:
    """On a GPU, 'torch holds 0 bytes' is an answer (the memory is someone else's), not a missing field."""
    err = OutOfMemory("CUDA out of memory", device="cuda:0", requested_bytes=1 << 40, free_bytes=5,
                      total_bytes=10, allocated_bytes=0, reserved_bytes=0)
    back = round_trip(err)
    assert (back.allocated_bytes, back.reserved_bytes) == (0, 0)
    assert (back.requested_bytes, back.free_bytes, back.total_bytes) == (1 << 40, 5, 10)


def test_cpu_out_of_memory_has_no_gpu_figures() -> None:
    back = round_trip(OutOfMemory("cannot allocate", device="cpu", requested_bytes=8, free_bytes=0, total_bytes=9))
    assert back.allocated_bytes is None and back.reserved_bytes is None and back.free_bytes == 0


@pytest.mark.parametrize("err, fields", [
    (Overloaded("busy", queue_depth=0, limit=0), {"queue_depth": 0, "limit": 0}),
    (ShapeMismatch("bad", op="add", input_shapes=[[2, 3], [4]], dim=0, expected="3", got="4"),
     {"input_shapes": [[2, 3], [4]], "dim": 0, "expected": "3", "got": "4"}),
])
def test_structured_fields_survive_including_zeros(err, fields) -> None:
    back = round_trip(err)
    assert {k: getattr(back, k) for k in fields} == fields
    assert back.kind is err.kind and isinstance(back.kind, ErrorKind)


def test_an_error_of_any_size_fits_the_metadata_budget() -> None:
    from sidecar.errors import OpFailed

    huge = ShapeMismatch("m" * 50_000 + " END", op="o" * 5000, input_shapes=[[1] * 100] * 100,
                         expected="e" * 9999, got="g" * 9999, suggestion="s" * 9999, close_names=["c" * 300] * 100)
    m = grpc_codec.error_to_pb(huge)
    assert m.ByteSize() <= limits.ERROR_BYTES
    assert m.message.startswith("mmm") and m.message.endswith(" END") and "bytes cut" in m.message
    status = grpc_codec.error_to_status(huge)
    assert sum(len(v) for _, v in status.trailing_metadata) + len(status.details) < 6 << 10
    back = grpc_codec.error_from_pb(m)
    assert back.input_shapes and back.close_names and back.suggestion  # shortened, not dropped
    tb = "Traceback (most recent call last):\n" + "  frame\n" * 10_000 + "ValueError: the last line\n"
    m = grpc_codec.error_to_pb(OpFailed("x", traceback=tb, exception_type="ValueError"))
    assert m.traceback.endswith("ValueError: the last line\n")  # a traceback keeps its end


def test_values_protobuf_cannot_hold_are_mapped_not_raised() -> None:
    from sidecar.errors import OpFailed

    m = grpc_codec.error_to_pb(OpFailed("lone surrogate \udc80 here", got="\ud800"))
    assert m.message == "lone surrogate ? here" and m.got == "?"
    m = grpc_codec.error_to_pb(ShapeMismatch("dim", dim=1e300, input_shapes=[[2**70]], requested_bytes=-5))
    assert m.dim == 2**63 - 1 and m.has_dim and m.input_shapes[0].dims == [2**63 - 1]
    m = grpc_codec.error_to_pb(OutOfMemory("oom", requested_bytes=float("inf"), free_bytes=-1, total_bytes=2**65))
    assert (m.requested_bytes, m.free_bytes, m.total_bytes) == (2**64 - 1, 0, 2**64 - 1)


def test_str_of_every_kind_shows_every_field_it_carries() -> None:
    from sidecar.errors import ERROR_FIELDS

    values = {name: f"<{name}>" for name in ERROR_FIELDS}
    values.update(input_shapes=[[2, 3]], dim=7, close_names=["<close>"], stderr_tail=["<tail line>"],
                  traceback='Traceback (most recent call last):\n  File "/srv/ops.py", line 12, in mine\n'
                            '    raise KeyError(x)\nKeyError: x\n')
    for cls in ERROR_CLASSES.values():
        text = str(cls("the message", **values))
        assert text.splitlines()[0] == "the message"
        assert "<exception_type> raised at /srv/ops.py:12 in mine: raise KeyError(x)" in text
        assert "did you mean: <close>" in text and "suggestion: <suggestion>" in text
        assert "input_shapes=[[2, 3]]" in text and "dim=7" in text and "last output: <tail line>" in text
        for name in set(ERROR_FIELDS) - {"traceback", "input_shapes", "dim", "close_names", "stderr_tail",
                                          "suggestion", "exception_type"}:
            assert f"{name}=<{name}>" in text, (cls.__name__, name)
        assert "Traceback" not in text
