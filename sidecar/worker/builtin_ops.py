"""The ops every worker serves, with PyTorch.

Each op checks its operands *before* running, so a host gets the shapes, the dimension at fault,
expected vs got and a suggestion rather than torch's message; anything torch still raises goes
through `torch_errors`. Attr values are validated here too (InvalidArgument naming the attr).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sidecar.errors import DeviceMismatch, DtypeMismatch, InvalidArgument, ShapeMismatch, shorten
from sidecar.worker.registry import OpContext, op

# Every built-in is pure torch on its inputs: it runs on meta tensors, so its output sizes are known
# before it runs (an inline output too big for a gRPC message is refused before any compute).
builtin_op = functools.partial(op, meta_ok=True)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_NAMES = "a floating-point dtype (float16, bfloat16, float32, float64)"

# numpy dtype names accepted by `cast` (the wire's dtype names).
CAST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "bfloat16", "float32", "float64", "complex64", "complex128")
    if hasattr(torch, name)
}


# ---------------------------------------------------------------------------------------------------
# checks shared by the ops


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_of(x: Any) -> list[int]:
    return list(x.shape) if isinstance(x, torch.Tensor) else []


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _tensor(opname: str, x: Any, index: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise InvalidArgument(f"{opname}: input {index} must be a tensor, got {type(x).__name__}",
                          op=opname, input_index=index, field="inputs", expected="tensor",
                          got=type(x).__name__)


def _operand(opname: str, x: Any, index: int) -> torch.Tensor | int | float | bool:
    """A tensor or a Python number (elementwise ops accept scalars on either side)."""
    if isinstance(x, (torch.Tensor, int, float, bool)):
        return x
    raise InvalidArgument(f"{opname}: input {index} must be a tensor or a number, got {type(x).__name__}",
                          op=opname, input_index=index, field="inputs", expected="tensor or number",
                          got=type(x).__name__)


def _same_device(opname: str, xs: Sequence[Any]) -> None:
    tensors = [(i, x) for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if tensors:
        first = tensors[0][1].device
        for i, x in tensors[1:]:
            if x.device != first:
                raise DeviceMismatch(f"{opname}: input {i} is on {x.device} but input {tensors[0][0]} is on "
                                     f"{first}", op=opname, expected=str(first), got=str(x.device),
                                     input_index=i)


def _need_float(opname: str, x: torch.Tensor, index: int = 0, complex_ok: bool = False) -> None:
    if x.dtype in FLOAT_DTYPES or (complex_ok and x.dtype.is_complex):
        return
    expected = FLOAT_NAMES if not complex_ok else "a floating-point or complex dtype"
    raise DtypeMismatch(f"{opname}: input {index} has dtype {dtype_name(x.dtype)}; {opname} needs {expected}",
                        op=opname, expected=expected, got=dtype_name(x.dtype), input_index=index,
                        input_dtypes=[dtype_name(x.dtype)],
                        suggestion="cast it first, e.g. cast with dtype=\"float32\"")


def _attr_error(opname: str, attr: str, expected: str, value: Any) -> InvalidArgument:
    return InvalidArgument(f"{opname}: attr {attr!r} must be {expected}, got {shorten(value)}", op=opname,
                           field=f"attrs.{attr}", expected=expected, got=shorten(value), input_index=-1)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _int(opname: str, attr: str, value: Any) -> int:
    n = int(value) if isinstance(value, float) and value.is_integer() else value  # JSON-ish hosts send 1.0
    if isinstance(n, bool) or not isinstance(n, int) or not INT64_MIN <= n <= INT64_MAX:
        raise _attr_error(opname, attr, "an integer (int64)", value)
    return n


def _bool(opname: str, attr: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _attr_error(opname, attr, "a boolean", value)


def _ints(opname: str, attr: str, value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [_int(opname, attr, v) for v in value]
    raise _attr_error(opname, attr, "a list of integers", value)


def check_dim(opname: str, x: torch.Tensor, dim: int, attr: str = "dim", shapes: list[list[int]] | None = None) -> int:
    """dim must lie in [-ndim, ndim-1] (a 0-d tensor accepts -1 and 0, as in torch)."""
    n = max(x.dim(), 1)
    if -n <= dim < n:
        return dim
    raise ShapeMismatch(
        f"{opname}: {attr}={dim} is out of range for a {x.dim()}-d tensor of shape {_fmt(x.shape)}",
        op=opname, input_shapes=shapes or [shape_of(x)], dim=dim, expected=f"a dimension in [{-n}, {n - 1}]",
        got=str(dim),
        suggestion=f"use a dimension between {-n} and {n - 1} (negative counts from the last)")


def _dims(opname: str, x: torch.Tensor, value: Any, attr: str = "dim") -> list[int] | None:
    """The `dim` attr of a reduction: absent, an int or a list of ints; range-checked, no repeats."""
    if value is None:
        return None
    dims = [_int(opname, attr, value)] if not isinstance(value, (list, tuple)) else _ints(opname, attr, value)
    dims = [check_dim(opname, x, d, attr) for d in dims]
    norm = [d % max(x.dim(), 1) for d in dims]
    if len(set(norm)) != len(norm):
        raise _attr_error(opname, attr, "distinct dimensions", value)
    return dims


def broadcast_shapes(opname: str, shapes: Sequence[Sequence[int]], what: str = "") -> list[int]:
    """The broadcast shape of `shapes`, or ShapeMismatch naming the first dimension that does not fit.

    Sizes are compared from the last dimension; each pair must be equal or one of them 1. `dim` is
    the index in the broadcast result, as torch reports it.
    """
    ndim = max((len(s) for s in shapes), default=0)
    out: list[int] = []
    for k in range(1, ndim + 1):
        size, src = 1, -1
        for i, s in enumerate(shapes):
            if k > len(s) or s[-k] == 1:
                continue
            if size == 1:
                size, src = s[-k], i
            elif s[-k] != size:
                dim = ndim - k
                a, b = list(shapes[src]), list(shapes[i])
                if len(a) == len(b) == 2 and a == b[::-1]:
                    hint = f"input {i} looks transposed: transpose it (its shape reversed is {_fmt(a)})"
                elif size in b and len(b) > 0:
                    j = b.index(size)
                    hint = (f"sizes are matched from the last dimension; input {i} has {size} in its dimension "
                            f"{j}: move that dimension last or reshape input {i} so sizes line up (equal or 1)")
                else:
                    hint = (f"sizes are matched from the last dimension and must be equal or 1: give input {i} "
                            f"size {size} or 1 in its dimension {len(b) - k}")
                raise ShapeMismatch(
                    f"{opname}: {what}shapes {_fmt(a)} and {_fmt(b)} cannot be broadcast: dimension {dim} is "
                    f"{size} in input {src} but {s[-k]} in input {i}",
                    op=opname, input_shapes=[list(s) for s in shapes], dim=dim, expected=str(size),
                    got=str(s[-k]), suggestion=hint)
        out.append(size)
    return out[::-1]


def _elementwise(opname: str, a: Any, b: Any) -> tuple[Any, Any, list[int]]:
    """The operands and the shape of their (broadcast) result."""
    a, b = _operand(opname, a, 0), _operand(opname, b, 1)
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        raise InvalidArgument(f"{opname}: at least one input must be a tensor", op=opname, field="inputs",
                              input_index=-1, expected="a tensor", got="two numbers")
    _same_device(opname, [a, b])
    return a, b, broadcast_shapes(opname, [shape_of(a), shape_of(b)])


def _out(ctx: OpContext | None, shape: Sequence[int], dtype: torch.dtype, *inputs: Any) -> dict[str, Any]:
    """`out=` for a result of known shape and dtype: on a CPU worker a block of the worker's arena,
    so the result is leased as it is (no fresh pages to fault in, no copy into a block).

    Only when every tensor input is contiguous: torch then lays its own result out contiguously and
    runs the same loops, so the bits are the same. For other layouts it picks the result's strides
    from the inputs (and e.g. NaN signs can differ with a contiguous out), so it keeps that choice.
    Called directly (no ctx), an op allocates as torch does.
    """
    if ctx is None or not all(x.is_contiguous() for x in inputs if isinstance(x, torch.Tensor)):
        return {}
    return {"out": ctx.empty(shape, dtype)}


# ---------------------------------------------------------------------------------------------------
# the ops


@builtin_op("identity", min_inputs=1, max_inputs=-1, attrs=())
def identity(*xs: Any) -> Any:
    """Returns its inputs unchanged (one output per input). Inputs: 1 or more values. Attrs: none.
    Useful to move a tensor across the boundary (round trip) or to copy it into the worker's arena."""
    return xs[0] if len(xs) == 1 else tuple(xs)


@builtin_op("add")
def add(a: Any, b: Any, ctx: OpContext | None = None) -> torch.Tensor:
    """a + b, elementwise with broadcasting (either side may be a number). Inputs: a, b. Attrs: none.
    Shape rule: sizes matched from the last dimension must be equal or 1."""
    a, b, shape = _elementwise("add", a, b)
    return torch.add(a, b, **_out(ctx, shape, torch.result_type(a, b), a, b))


@builtin_op("sub")
def sub(a: Any, b: Any, ctx: OpContext | None = None) -> torch.Tensor:
    """a - b, elementwise with broadcasting (either side may be a number). Inputs: a, b. Attrs: none.
    Boolean tensors cannot be subtracted."""
    a, b, shape = _elementwise("sub", a, b)
    for i, x in enumerate((a, b)):
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            raise DtypeMismatch("sub: boolean tensors cannot be subtracted", op="sub",
                                expected="a numeric dtype", got="bool", input_index=i,
                                suggestion="cast to an integer or float dtype first, or use a logical op")
    return torch.sub(a, b, **_out(ctx, shape, torch.result_type(a, b), a, b))


@builtin_op("mul")
def mul(a: Any, b: Any, ctx: OpContext | None = None) -> torch.Tensor:
    """a * b, elementwise with broadcasting (either side may be a number). Inputs: a, b. Attrs: none."""
    a, b, shape = _elementwise("mul", a, b)
    return torch.mul(a, b, **_out(ctx, shape, torch.result_type(a, b), a, b))


@builtin_op("div")
def div(a: Any, b: Any, *, rounding_mode: str | None = None, ctx: OpContext | None = None) -> torch.Tensor:
    """a / b, elementwise with broadcasting (either side may be a number). Inputs: a, b.
    Attrs: rounding_mode (optional: "trunc" or "floor"; default true division, which gives floats
    for integer inputs)."""
    a, b, shape = _elementwise("div", a, b)
    if rounding_mode not in (None, "trunc", "floor"):
        raise _attr_error("div", "rounding_mode", '"trunc", "floor" or absent', rounding_mode)
    dtype = torch.result_type(a, b)
    if rounding_mode is None and not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()  # true division of integers gives floats
    return torch.div(a, b, rounding_mode=rounding_mode, **_out(ctx, shape, dtype, a, b))


@builtin_op("matmul")
def matmul(a: Any, b: Any, ctx: OpContext | None = None) -> torch.Tensor:
    """Matrix product with torch.matmul semantics (1-D operands are vectors; leading dims are batch
    dims and broadcast). Inputs: a (..., n, k), b (..., k, m). Attrs: none.
    Both operands must have the same dtype."""
    a, b = _tensor("matmul", a, 0), _tensor("matmul", b, 1)
    shapes = [shape_of(a), shape_of(b)]
    _same_device("matmul", [a, b])
    for i, x in enumerate((a, b)):
        if x.dim() == 0:
            raise ShapeMismatch(f"matmul: input {i} is a 0-d tensor (a scalar); matmul needs at least one dimension",
                                op="matmul", input_shapes=shapes, dim=0, expected="at least 1 dimension",
                                got="0 dimensions", suggestion="use mul to scale a tensor by a scalar")
    ka = a.shape[-1]
    bdim = 0 if b.dim() == 1 else b.dim() - 2
    kb = b.shape[bdim]
    if ka != kb:
        if b.dim() >= 2 and b.shape[-1] == ka:
            hint = f"transpose the second operand (its last dimension is {ka}): transpose with dim0=-2, dim1=-1"
        elif a.dim() >= 2 and b.dim() >= 2 and b.shape[-1] == a.shape[-2]:
            hint = (f"swap the operands: input 1 {_fmt(b.shape)} times input 0 {_fmt(a.shape)} fits "
                    f"(inner dimension {b.shape[-1]})")
        elif a.dim() >= 2 and a.shape[-2] == kb:
            hint = f"transpose the first operand (its dimension -2 is {kb}): transpose with dim0=-2, dim1=-1"
        else:
            hint = (f"the last dimension of input 0 must equal dimension {bdim} of input 1; "
                    f"reshape one of them so both are {ka} or both are {kb}")
        raise ShapeMismatch(
            f"matmul: inner dimensions differ: input 0 {_fmt(a.shape)} has {ka} in dimension {a.dim() - 1} but "
            f"input 1 {_fmt(b.shape)} has {kb} in dimension {bdim}",
            op="matmul", input_shapes=shapes, dim=a.dim() - 1, expected=str(ka), got=str(kb), suggestion=hint)
    batch = broadcast_shapes("matmul", [list(a.shape[:-2]), list(b.shape[:-2])], what="batch ")
    if a.dtype != b.dtype:
        raise DtypeMismatch(f"matmul: operands have different dtypes {dtype_name(a.dtype)} and {dtype_name(b.dtype)}",
                            op="matmul", expected=dtype_name(a.dtype), got=dtype_name(b.dtype), input_index=1,
                            input_dtypes=[dtype_name(a.dtype), dtype_name(b.dtype)],
                            suggestion=f"cast input 1 to {dtype_name(a.dtype)} (or input 0 to {dtype_name(b.dtype)})")
    if a.dtype == torch.bool:
        raise DtypeMismatch("matmul: boolean tensors cannot be multiplied as matrices", op="matmul",
                            expected="a numeric dtype", got="bool", input_index=0,
                            suggestion="cast both operands to a float dtype")
    # (batch..., n, m); a 1-D operand contributes no n (first) or no m (second)
    shape = batch + list(a.shape[-2:-1]) + list(b.shape[-1:] if b.dim() >= 2 else [])
    # (1-D, 2-D) is the one case where torch resizes `out` (and warns): leave it to torch.
    return torch.matmul(a, b, **(_out(ctx, shape, a.dtype, a, b) if a.dim() > 1 or b.dim() != 2 else {}))


@builtin_op("sum")
def sum_(x: Any, *, dim: Any = None, keepdim: Any = False) -> torch.Tensor:
    """Sum of elements. Inputs: x. Attrs: dim (int or list of ints; default: all elements),
    keepdim (bool, default false: reduced dimensions are removed). Booleans and integers sum to int64."""
    x = _tensor("sum", x, 0)
    dims = _dims("sum", x, dim)
    return torch.sum(x, dim=dims, keepdim=_bool("sum", "keepdim", keepdim))


@builtin_op("mean")
def mean(x: Any, *, dim: Any = None, keepdim: Any = False) -> torch.Tensor:
    """Arithmetic mean. Inputs: x (floating-point or complex). Attrs: dim (int or list of ints;
    default: all elements), keepdim (bool, default false)."""
    x = _tensor("mean", x, 0)
    _need_float("mean", x, complex_ok=True)
    dims = _dims("mean", x, dim)
    return torch.mean(x, dim=dims, keepdim=_bool("mean", "keepdim", keepdim))


@builtin_op("max", min_inputs=1, max_inputs=2, attrs=("dim", "keepdim"))
def max_(x: Any, other: Any = None, *, dim: Any = None, keepdim: Any = False) -> torch.Tensor:
    """Maximum. With one input: the largest element, or the largest values along `dim` (values only).
    With two inputs: the elementwise maximum with broadcasting. Attrs (one input only): dim (int or list
    of ints; default all elements), keepdim (bool, default false)."""
    if other is not None:
        if dim is not None:
            raise _attr_error("max", "dim", "absent when two inputs are given", dim)
        a, b = _tensor("max", x, 0), _tensor("max", other, 1)
        _same_device("max", [a, b])
        broadcast_shapes("max", [shape_of(a), shape_of(b)])
        return torch.maximum(a, b)
    x = _tensor("max", x, 0)
    dims = _dims("max", x, dim)
    keep = _bool("max", "keepdim", keepdim)
    if x.numel() == 0:
        raise ShapeMismatch("max: the input is empty, there is no maximum", op="max", input_shapes=[shape_of(x)],
                            expected="at least one element", got="0 elements",
                            suggestion="check the input's shape; an empty tensor has no maximum")
    if dims is None:
        return torch.amax(x, dim=list(range(x.dim())), keepdim=keep) if keep else torch.max(x)
    return torch.amax(x, dim=dims, keepdim=keep)


@builtin_op("softmax")
def softmax(x: Any, *, dim: Any = -1, ctx: OpContext | None = None) -> torch.Tensor:
    """Softmax along a dimension (exp(x) / sum(exp(x)), numerically stable). Inputs: x (floating-point).
    Attrs: dim (int, default -1: the last dimension)."""
    x = _tensor("softmax", x, 0)
    _need_float("softmax", x)
    d = check_dim("softmax", x, _int("softmax", "dim", dim))
    return torch.softmax(x, dim=d, **_out(ctx, x.shape, x.dtype, x))


@builtin_op("relu")
def relu(x: Any, ctx: OpContext | None = None) -> torch.Tensor:
    """max(x, 0) elementwise. Inputs: x (a numeric dtype, not bool). Attrs: none."""
    x = _tensor("relu", x, 0)
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise DtypeMismatch(f"relu: dtype {dtype_name(x.dtype)} is not supported", op="relu",
                            expected="an integer or floating-point dtype", got=dtype_name(x.dtype), input_index=0,
                            suggestion="cast to float32 first")
    return torch.clamp_min(x, 0, **_out(ctx, x.shape, x.dtype, x))  # what torch.relu runs, with out=


@builtin_op("gelu")
def gelu(x: Any, *, approximate: Any = "none", ctx: OpContext | None = None) -> torch.Tensor:
    """Gaussian error linear unit. Inputs: x (floating-point). Attrs: approximate ("none", the exact
    erf form, default; or "tanh", the tanh approximation)."""
    x = _tensor("gelu", x, 0)
    _need_float("gelu", x)
    if approximate not in ("none", "tanh"):
        raise _attr_error("gelu", "approximate", '"none" or "tanh"', approximate)
    # F.gelu is this function; only the binding (not F.gelu) takes out=
    return torch._C._nn.gelu(x, approximate=approximate, **_out(ctx, x.shape, x.dtype, x))


@builtin_op("layer_norm", min_inputs=1, max_inputs=3, attrs=("normalized_shape", "eps"))
def layer_norm(x: Any, weight: Any = None, bias: Any = None, *, normalized_shape: Any = None,
               eps: Any = 1e-5) -> torch.Tensor:
    """Layer normalisation over the trailing dimensions: (x - mean) / sqrt(var + eps) * weight + bias.
    Inputs: x (floating-point), optional weight and bias (shape = normalized_shape).
    Attrs: normalized_shape (int or list of ints; default: the weight's shape, else x's last dimension),
    eps (float, default 1e-5)."""
    x = _tensor("layer_norm", x, 0)
    _need_float("layer_norm", x)
    w = None if weight is None else _tensor("layer_norm", weight, 1)
    b = None if bias is None else _tensor("layer_norm", bias, 2)
    shapes = [shape_of(x)] + [shape_of(t) for t in (w, b) if t is not None]
    _same_device("layer_norm", [x, w, b])
    if normalized_shape is None:
        norm = list(w.shape) if w is not None else list(x.shape[-1:])
    elif isinstance(normalized_shape, (list, tuple)):
        norm = _ints("layer_norm", "normalized_shape", normalized_shape)
        if not norm:
            raise _attr_error("layer_norm", "normalized_shape", "a non-empty list of integers (the trailing "
                              "dimensions to normalise)", normalized_shape)
    else:
        norm = [_int("layer_norm", "normalized_shape", normalized_shape)]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 or not math.isfinite(eps):
        raise _attr_error("layer_norm", "eps", "a finite non-negative number", eps)
    if x.dim() == 0 or len(norm) > x.dim() or list(x.shape[x.dim() - len(norm):]) != norm:
        trailing = list(x.shape[max(x.dim() - len(norm), 0):])
        dim = x.dim() - len(norm) if len(norm) <= x.dim() else 0
        raise ShapeMismatch(
            f"layer_norm: normalized_shape {_fmt(norm)} must equal the last {len(norm)} dimension(s) of the input "
            f"{_fmt(x.shape)}", op="layer_norm", input_shapes=shapes, dim=dim, expected=_fmt(norm), got=_fmt(trailing),
            suggestion=f"set normalized_shape to the trailing dimensions of the input, e.g. {list(x.shape[-1:])}")
    for i, t, what in ((1, w, "weight"), (2, b, "bias")):
        if t is not None and list(t.shape) != norm:
            raise ShapeMismatch(f"layer_norm: {what} has shape {_fmt(t.shape)} but normalized_shape is {_fmt(norm)}",
                                op="layer_norm", input_shapes=shapes, dim=0, expected=_fmt(norm), got=_fmt(t.shape),
                                suggestion=f"give {what} (input {i}) the shape {_fmt(norm)}")
        if t is not None and t.dtype != x.dtype:
            raise DtypeMismatch(f"layer_norm: {what} has dtype {dtype_name(t.dtype)} but the input is "
                                f"{dtype_name(x.dtype)}", op="layer_norm", expected=dtype_name(x.dtype),
                                got=dtype_name(t.dtype), input_index=i,
                                suggestion=f"cast {what} to {dtype_name(x.dtype)}")
    return F.layer_norm(x, norm, w, b, float(eps))


@builtin_op("reshape")
def reshape(x: Any, *, shape: Any) -> torch.Tensor:
    """Same elements in a new shape (row-major order). Inputs: x. Attrs: shape (list of ints; one of
    them may be -1, inferred from the element count). The element count must not change."""
    x = _tensor("reshape", x, 0)
    if shape is None:
        raise _attr_error("reshape", "shape", "a list of integers (required)", shape)
    dims = _ints("reshape", "shape", shape if isinstance(shape, (list, tuple)) else [shape])
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise _attr_error("reshape", "shape", "non-negative sizes with at most one -1", shape)
    known = math.prod(d for d in dims if d != -1)
    n = x.numel()
    if -1 in dims:
        ok = known != 0 and n % known == 0
        expected = f"sizes whose product divides {n} (the element count of {_fmt(x.shape)})"
    else:
        ok = known == n
        expected = f"{n} elements (shape {_fmt(x.shape)})"
    if not ok:
        got = f"{known} elements ({_fmt(dims)})" if -1 not in dims else f"{_fmt(dims)}, known product {known}"
        raise ShapeMismatch(f"reshape: cannot reshape {_fmt(x.shape)} ({n} elements) to {_fmt(dims)}",
                            op="reshape", input_shapes=[shape_of(x)], expected=expected, got=got,
                            suggestion="keep the product of the sizes equal to the element count, or use -1 for "
                                       "one dimension to have it inferred")
    return torch.reshape(x, dims)


@builtin_op("transpose")
def transpose(x: Any, *, dim0: Any = -2, dim1: Any = -1) -> torch.Tensor:
    """Swaps two dimensions. Inputs: x. Attrs: dim0, dim1 (ints, default -2 and -1: the last two,
    i.e. a matrix transpose; a tensor with fewer than 2 dimensions is returned as is under the defaults)."""
    x = _tensor("transpose", x, 0)
    d0, d1 = _int("transpose", "dim0", dim0), _int("transpose", "dim1", dim1)
    if x.dim() < 2 and (d0, d1) == (-2, -1):
        return _tensor("transpose", x, 0)
    check_dim("transpose", x, d0, "dim0")
    check_dim("transpose", x, d1, "dim1")
    return torch.transpose(x, d0, d1)


@builtin_op("cast")
def cast(x: Any, *, dtype: Any, ctx: OpContext | None = None) -> torch.Tensor:
    """Converts to another dtype. Inputs: x. Attrs: dtype (numpy name: bool, int8, int16, int32, int64,
    uint8, uint16, uint32, uint64, float16, bfloat16, float32, float64, complex64, complex128).
    Float to integer truncates toward zero."""
    x = _tensor("cast", x, 0)
    target = CAST_DTYPES.get(dtype) if isinstance(dtype, str) else None
    if target is None:
        raise _attr_error("cast", "dtype", "one of " + ", ".join(CAST_DTYPES), dtype)
    if x.dtype.is_complex and not target.is_complex:
        raise DtypeMismatch(f"cast: complex {dtype_name(x.dtype)} cannot be cast to {dtype} without losing the "
                            "imaginary part", op="cast", expected="a complex target dtype", got=dtype,
                            input_index=0, suggestion="take the real part in your own op, or cast to complex")
    out = _out(ctx, x.shape, target, x) if target != x.dtype else {}
    result: torch.Tensor = out["out"].copy_(x) if out else x.to(target)  # .to() is that copy_ into a new tensor
    return result
