"""Every built-in op through a real Client and the in-process transport to a worker runtime: inputs
in real shared memory, results compared with NumPy; shape, dtype and attr errors with their
structured fields."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sidecar.errors import DtypeMismatch, InvalidArgument, ShapeMismatch, UnknownOp
from sidecar.dataplane import tensors
from sidecar.protocol.refs import InlineStorage, TensorRef
from sidecar.worker.runtime import WorkerOptions, build_runtime
from tests.in_process import in_process_client
from tests.workers import session_run

RNG = np.random.default_rng(7)


class Host:
    """A Client of an in-process worker runtime; every tensor input crosses through shared memory."""

    def __init__(self, runtime) -> None:
        self.rt = runtime
        self.client, self.transport = in_process_client(runtime, "bophost")

    def call(self, op, *inputs, **attrs):
        return self.client.call(op, *inputs, **attrs)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def host():
    rt = build_runtime(WorkerOptions(device="cpu", run_id=session_run("bopworker")))
    h = Host(rt)
    yield h
    h.close()
    rt.close()


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# results against NumPy


@pytest.mark.parametrize("x", [rand(3, 5), rand(1000, 100), np.arange(10, dtype=np.int64),
                               np.array([True, False, True]), rand(2, 3, dtype=np.float64)])
def test_identity_round_trips(host, x):
    out = host.call("identity", x)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, x)


def test_identity_bfloat16_and_several_inputs(host):
    t = torch.randn(4, 6).to(torch.bfloat16)
    a, b, c = host.call("identity", t, rand(2), 7)
    assert a.dtype == torch.bfloat16 and torch.equal(a, t)
    assert b.shape == (2,) and c == 7


@pytest.mark.parametrize("op,fn", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                                   ("div", np.divide)])
@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((2, 1, 4), (3, 1)), ((5,), (2, 5)), ((), (3,))])
def test_elementwise_broadcast(host, op, fn, sa, sb):
    a, b = rand(*sa), rand(*sb) + (3.0 if op == "div" else 0.0)
    np.testing.assert_allclose(host.call(op, a, b), fn(a, b), rtol=1e-6, atol=1e-6)


def test_elementwise_with_a_number(host):
    a = rand(3, 3)
    np.testing.assert_allclose(host.call("add", a, 2.5), a + 2.5, rtol=1e-6)
    np.testing.assert_allclose(host.call("mul", 3, a), 3 * a, rtol=1e-6)


def test_div_rounding_modes(host):
    a = np.array([7, -7, 9], dtype=np.int64)
    b = np.array([2, 2, -4], dtype=np.int64)
    np.testing.assert_array_equal(host.call("div", a, b, rounding_mode="floor"), np.floor_divide(a, b))
    np.testing.assert_array_equal(host.call("div", a, b, rounding_mode="trunc"), np.trunc(a / b).astype(np.int64))
    np.testing.assert_allclose(host.call("div", a, b), a / b)


@pytest.mark.parametrize("sa,sb", [((2, 3), (3, 4)), ((5, 2, 3), (3, 4)), ((2, 1, 3, 4), (5, 4, 2)), ((3,), (3, 2)),
                                   ((2, 3), (3,)), ((64, 128), (128, 32))])
def test_matmul(host, sa, sb):
    a, b = rand(*sa), rand(*sb)
    np.testing.assert_allclose(host.call("matmul", a, b), np.matmul(a, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attrs", [{}, {"dim": 0}, {"dim": -1, "keepdim": True}, {"dim": [0, 2]},
                                   {"dim": [1], "keepdim": True}])
def test_reductions(host, attrs):
    x = rand(3, 4, 5)
    axis = attrs.get("dim")
    axis = tuple(axis) if isinstance(axis, list) else axis
    keep = attrs.get("keepdim", False)
    np.testing.assert_allclose(host.call("sum", x, **attrs), np.sum(x, axis=axis, keepdims=keep), rtol=1e-5)
    np.testing.assert_allclose(host.call("mean", x, **attrs), np.mean(x, axis=axis, keepdims=keep), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(host.call("max", x, **attrs), np.max(x, axis=axis, keepdims=keep))


def test_sum_of_ints_and_max_of_two(host):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert host.call("sum", x) == 66
    a, b = rand(3, 1), rand(4)
    np.testing.assert_array_equal(host.call("max", a, b), np.maximum(a, b))


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax(host, dim):
    x = rand(4, 6)
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    expected = e / e.sum(axis=dim, keepdims=True)
    got = host.call("softmax", x) if dim == -1 else host.call("softmax", x, dim=dim)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_relu(host):
    x = rand(5, 5)
    np.testing.assert_array_equal(host.call("relu", x), np.maximum(x, 0))
    xi = np.array([-3, 0, 4], dtype=np.int64)
    np.testing.assert_array_equal(host.call("relu", xi), np.maximum(xi, 0))


def test_gelu_exact_and_tanh(host):
    x = rand(100).astype(np.float64)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(host.call("gelu", x), exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host.call("gelu", x, approximate="tanh"), tanh, rtol=1e-10, atol=1e-12)


def _layer_norm(x, axes, w=None, b=None, eps=1e-5):
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def test_layer_norm(host):
    x = rand(2, 3, 4).astype(np.float64)
    np.testing.assert_allclose(host.call("layer_norm", x), _layer_norm(x, (-1,)), rtol=1e-6, atol=1e-9)
    w, b = rand(3, 4).astype(np.float64), rand(3, 4).astype(np.float64)
    np.testing.assert_allclose(host.call("layer_norm", x, w, b, eps=1e-3),
                               _layer_norm(x, (-2, -1), w, b, eps=1e-3), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(host.call("layer_norm", x, normalized_shape=[3, 4]), _layer_norm(x, (-2, -1)),
                               rtol=1e-6, atol=1e-9)


def test_reshape_transpose_cast(host):
    x = rand(2, 3, 4)
    np.testing.assert_array_equal(host.call("reshape", x, shape=[4, -1]), x.reshape(4, -1))
    np.testing.assert_array_equal(host.call("reshape", x, shape=[24]), x.reshape(24))
    np.testing.assert_array_equal(host.call("transpose", x), np.swapaxes(x, -2, -1))
    np.testing.assert_array_equal(host.call("transpose", x, dim0=0, dim1=2), np.swapaxes(x, 0, 2))
    y = rand(6) * 10
    for name in ("int32", "float16", "bool", "uint8", "float64"):
        out = host.call("cast", y, dtype=name)
        assert out.dtype == np.dtype(name)
        np.testing.assert_array_equal(out, y.astype(name) if name != "uint8" else torch.from_numpy(y).to(
            torch.uint8).numpy())
    bf = host.call("cast", y, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, torch.from_numpy(y).to(torch.bfloat16))


def test_every_builtin_has_a_doc(host):
    names = {s.name for s in host.rt.list_ops()}
    assert {"identity", "add", "sub", "mul", "div", "matmul", "sum", "mean", "max", "softmax", "relu", "gelu",
            "layer_norm", "reshape", "transpose", "cast"} <= names
    for spec in host.rt.list_ops():
        assert len(spec.doc) > 20 and spec.module == "sidecar.worker.builtin_ops"
    ln = host.rt.registry.get("layer_norm")
    assert (ln.min_inputs, ln.max_inputs, ln.attrs) == (1, 3, ("normalized_shape", "eps"))
    assert host.rt.registry.get("identity").max_inputs == -1


# ---------------------------------------------------------------------------------------------------
# errors


def _err(host, cls, op, *inputs, **attrs):
    with pytest.raises(cls) as info:
        host.call(op, *inputs, **attrs)
    return info.value


def test_matmul_inner_dims_error_fields(host):
    e = _err(host, ShapeMismatch, "matmul", rand(2, 3), rand(4, 5))
    assert e.op == "matmul" and e.input_shapes == [[2, 3], [4, 5]]
    assert (e.dim, e.expected, e.got) == (1, "3", "4")
    assert e.suggestion and e.request_id
    e = _err(host, ShapeMismatch, "matmul", rand(2, 3), rand(5, 3))
    assert "transpose the second operand" in e.suggestion
    e = _err(host, ShapeMismatch, "matmul", rand(3, 4), rand(2, 3))
    assert "swap the operands" in e.suggestion


def test_matmul_batch_and_scalar_errors(host):
    e = _err(host, ShapeMismatch, "matmul", rand(2, 3, 4), rand(5, 4, 2))
    assert (e.expected, e.got) == ("2", "5") and "batch" in e.message
    e = _err(host, ShapeMismatch, "matmul", np.array(2.0, dtype=np.float32), rand(3))
    assert e.input_shapes == [[], [3]]


def test_broadcast_error_fields(host):
    e = _err(host, ShapeMismatch, "add", rand(2, 3), rand(4))
    assert e.op == "add" and e.input_shapes == [[2, 3], [4]]
    assert (e.dim, e.expected, e.got) == (1, "3", "4")
    e = _err(host, ShapeMismatch, "mul", rand(3, 4), rand(4, 3))
    assert "transposed" in e.suggestion


@pytest.mark.parametrize("op,attrs,dim", [("sum", {"dim": 2}, 2), ("mean", {"dim": [0, -3]}, -3),
                                          ("max", {"dim": 5}, 5), ("softmax", {"dim": 2}, 2),
                                          ("transpose", {"dim0": 0, "dim1": 3}, 3)])
def test_dim_out_of_range(host, op, attrs, dim):
    e = _err(host, ShapeMismatch, op, rand(2, 3), **attrs)
    assert e.dim == dim and e.expected == "a dimension in [-2, 1]" and e.got == str(dim)
    assert e.input_shapes == [[2, 3]] and e.suggestion


def test_reshape_and_layer_norm_shape_errors(host):
    e = _err(host, ShapeMismatch, "reshape", rand(2, 3), shape=[4, 2])
    assert e.input_shapes == [[2, 3]] and "6" in e.expected and "8" in e.got
    _err(host, ShapeMismatch, "reshape", rand(2, 3), shape=[4, -1])
    e = _err(host, ShapeMismatch, "layer_norm", rand(2, 3), normalized_shape=[4])
    assert e.expected == "(4,)" and e.got == "(3,)"
    e = _err(host, ShapeMismatch, "layer_norm", rand(2, 3), rand(4))
    assert e.input_shapes == [[2, 3], [4]]


def test_dtype_errors(host):
    e = _err(host, DtypeMismatch, "matmul", rand(2, 3), rand(3, 2, dtype=np.float64))
    assert (e.expected, e.got) == ("float32", "float64") and e.op == "matmul"
    e = _err(host, DtypeMismatch, "softmax", np.arange(4, dtype=np.int64))
    assert e.got == "int64" and "float" in e.expected
    _err(host, DtypeMismatch, "mean", np.arange(4, dtype=np.int32))
    _err(host, DtypeMismatch, "sub", np.array([True]), np.array([False]))


def test_attr_and_arity_errors(host):
    e = _err(host, InvalidArgument, "cast", rand(2), dtype="float8")
    assert e.field == "attrs.dtype"
    _err(host, InvalidArgument, "gelu", rand(2), approximate="fast")
    _err(host, InvalidArgument, "reshape", rand(2), shape=[-1, -1])
    e = _err(host, InvalidArgument, "sum", rand(2), dims=0)
    assert e.field == "attrs" and e.close_names[0] == "dim"
    e = _err(host, InvalidArgument, "add", rand(2))
    assert (e.field, e.expected, e.got) == ("inputs", "2", "1")
    _err(host, InvalidArgument, "matmul", rand(2), "not a tensor")
    e = _err(host, UnknownOp, "softmx", rand(2))
    assert "softmax" in e.close_names


def test_worker_keeps_serving_after_errors(host):
    _err(host, ShapeMismatch, "add", rand(2, 3), rand(4))
    _err(host, DtypeMismatch, "softmax", np.arange(3))
    np.testing.assert_array_equal(host.call("add", np.ones(2, np.float32), np.ones(2, np.float32)), [2, 2])
    assert host.rt.arena.stats().in_use_bytes == 0  # failed calls hold nothing


def test_small_result_travels_inline_by_default(host):
    res = host.client.execute("sum", rand(10))
    assert isinstance(host.transport.last.outputs[0].storage, InlineStorage) and res.leases == []


def test_wrong_attrs_are_invalid_argument_not_op_failed(host):
    """Each of these used to fail inside the op (OP_FAILED or a status the wire could not build)."""
    for value in (1e300, 2**70, -(2**64)):
        e = _err(host, InvalidArgument, "sum", rand(2, 3), dim=value)
        assert e.field == "attrs.dim" and "int64" in e.expected
    e = _err(host, InvalidArgument, "reshape", rand(2, 3))
    assert (e.field, e.expected, e.got) == ("attrs.shape", "shape", "absent")
    e = _err(host, InvalidArgument, "cast", rand(2, 3))
    assert e.field == "attrs.dtype" and "needs attr(s) 'dtype'" in e.message
    e = _err(host, InvalidArgument, "layer_norm", rand(2, 3), normalized_shape=[])
    assert e.field == "attrs.normalized_shape" and "non-empty" in e.expected


def test_unsigned_promotion_is_a_dtype_mismatch(host):
    e = _err(host, DtypeMismatch, "add", np.ones(3, np.uint16), np.ones(3, np.uint32))
    assert (e.expected, e.got) == ("uint16", "uint32") and e.input_dtypes == ["uint16", "uint32"]
    assert "cast" in e.suggestion


def test_an_empty_tensor_whose_other_dimensions_overflow_is_an_invalid_ref(host):
    from sidecar.errors import InvalidTensorRef

    huge_empty = TensorRef("float32", (0, 2**62, 4), InlineStorage(b""))  # a descriptor passes as it is
    with pytest.raises(InvalidTensorRef) as info:
        host.call("relu", huge_empty)
    assert info.value.field == "shape" and info.value.input_index == 0


ESTIMATED = [("identity", (rand(3, 5), rand(2)), {}), ("add", (rand(2, 1, 4), rand(3, 1)), {}),
             ("div", (np.arange(6, dtype=np.int64), 2), {}), ("matmul", (rand(5, 2, 3), rand(3, 4)), {}),
             ("sum", (rand(3, 4),), {"dim": 0}), ("max", (rand(3, 4),), {}), ("softmax", (rand(3, 4),), {}),
             ("gelu", (rand(3, 4),), {}), ("layer_norm", (rand(3, 4),), {}), ("reshape", (rand(3, 4),), {"shape": [-1]}),
             ("transpose", (rand(3, 4),), {}), ("cast", (rand(3, 4),), {"dtype": "float64"}),
             ("relu", (np.arange(4, dtype=np.int16),), {})]


@pytest.mark.parametrize("op, inputs, attrs", ESTIMATED, ids=[c[0] for c in ESTIMATED])
def test_output_sizes_are_known_before_a_builtin_runs(host, op, inputs, attrs):
    """On meta tensors (no data, no compute) each built-in tells the bytes it will return."""
    from sidecar.worker.registry import estimate_output_nbytes

    got = host.call(op, *inputs, **attrs)
    refs = host.transport.last_call.inputs  # the descriptors the worker got
    outs = got if isinstance(got, tuple) else [got]
    assert estimate_output_nbytes(host.rt.registry.get(op), refs, attrs) == sum(np.asarray(o).nbytes for o in outs)


def test_no_output_size_is_guessed_for_refused_inputs_or_ops_that_are_not_meta_ok(host):
    from sidecar.worker.registry import estimate_output_nbytes, make_spec

    refs = [tensors.to_ref(rand(2, 3))[0], tensors.to_ref(rand(4))[0]]  # descriptors (inline): meta only
    assert estimate_output_nbytes(host.rt.registry.get("add"), refs, {}) is None  # add refuses these shapes
    user_op = make_spec(lambda x: x, "user.identity")  # may read data or have side effects: never run on meta
    assert estimate_output_nbytes(user_op, refs[:1], {}) is None
