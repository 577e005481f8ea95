"""Exceptions raised while running an op -> structured `SidecarError`s.

Torch reports shape and dtype problems as RuntimeError text; the common messages are parsed into the
SHAPE_MISMATCH / DTYPE_MISMATCH fields. Allocation failures (Python MemoryError, numpy's, torch's CPU
allocator, CUDA OOM) become OUT_OF_MEMORY with the device's figures. Anything else is OP_FAILED and
keeps the exception's qualified type name and traceback.
"""
from __future__ import annotations

import re
import traceback as tb_mod
from typing import Any, Sequence

from sidecar.errors import DtypeMismatch, OpFailed, OutOfMemory, ShapeMismatch, SidecarError

# inputs_meta: one (shape, dtype name) per input; shape () and dtype "" for non-tensor inputs.
InputsMeta = Sequence[tuple[Sequence[int], str]]

_TORCH_TYPE_NAMES = {
    "Bool": "bool", "Byte": "uint8", "Char": "int8", "Short": "int16", "Int": "int32", "Long": "int64",
    "Half": "float16", "BFloat16": "bfloat16", "Float": "float32", "Double": "float64",
    "ComplexHalf": "complex32", "ComplexFloat": "complex64", "ComplexDouble": "complex128",
    "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64",
    # C type spellings used by some kernels ("float != double")
    "bool": "bool", "unsigned char": "uint8", "signed char": "int8", "short": "int16", "int": "int32",
    "long int": "int64", "long": "int64", "c10::Half": "float16", "c10::BFloat16": "bfloat16",
    "float": "float32", "double": "float64",
}

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50,
          "KB": 1000, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}

_RE_BROADCAST = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\) at "
                           r"non-singleton dimension (\d+)")
_RE_EXPAND = re.compile(r"expanded size of the tensor \((\d+)\) must match the existing size \((\d+)\) at "
                        r"non-singleton dimension (\d+)")
_RE_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")
_RE_MV = re.compile(r"size mismatch, got input \((\d+)\), mat \((\d+)x(\d+)\), vec \((\d+)\)")
_RE_BMM = re.compile(r"Expected size for first two dimensions of batch2 tensor to be: \[(\d+), (\d+)\] but "
                     r"got: \[(\d+), (\d+)\]")
_RE_VIEW = re.compile(r"shape '\[([-\d, ]*)\]' is invalid for input of size (\d+)")
_RE_DIM = re.compile(r"Dimension out of range \(expected to be in range of \[(-?\d+), (-?\d+)\], but got (-?\d+)\)")
_RE_LAYER_NORM = re.compile(r"Given normalized_shape=(\[[\d, ]*\]), expected input with shape (\[[^\]]*\]), "
                            r"but got input of size ?(\[[\d, ]*\])")
_RE_CAT = re.compile(r"Sizes of tensors must match except in dimension (\d+)\. Expected size (\d+) but got size "
                     r"(\d+) for tensor number (\d+)")
_RE_SAME_DTYPE = re.compile(r"(?:to have the same dtype|must have the same dtype), but got:? ([\w: ]+?) (?:!=|and) "
                            r"([\w: ]+?)\s*$")
_RE_SCALAR_TYPE = re.compile(r"expected scalar type (\w+) but found (\w+)")
_RE_NOT_IMPL = re.compile(r"\"(\w+)\" not implemented for '(\w+)'")
_RE_UNSIGNED_PROMOTION = re.compile(r"Promotion for uint16, uint32, uint64 types is not supported, attempted to "
                                    r"promote (\w+) and (\w+)")
_RE_MEAN_DTYPE = re.compile(r"Input dtype must be either a floating point or complex dtype\. Got: (\w+)")
_RE_CPU_OOM = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")
_RE_CUDA_OOM = re.compile(r"Tried to allocate ([\d.]+) ([KMGTP]?i?B)")
_RE_NUMPY_OOM = re.compile(r"Unable to allocate ([\d.]+) ([KMGTP]?i?B)")

# CUDA errors after which the context is unusable: the worker must be replaced (exit 70).
_STICKY_CUDA = ("illegal memory access", "illegal address", "misaligned address", "unspecified launch failure",
                "device-side assert", "an illegal instruction", "uncorrectable ECC error", "CUDA error: unknown error",
                "cudaErrorLaunchFailure", "hardware stack error")


def qualified_name(cls: type) -> str:
    mod = getattr(cls, "__module__", "") or ""
    return cls.__qualname__ if mod in ("builtins", "") else f"{mod}.{cls.__qualname__}"


def _dtype(name: str) -> str:
    return _TORCH_TYPE_NAMES.get(name.strip(), name.strip())


def _shapes(meta: InputsMeta | None) -> list[list[int]] | None:
    return None if meta is None else [list(shape) for shape, _ in meta]


def _dtypes(meta: InputsMeta | None) -> list[str] | None:
    return None if meta is None else [str(d) for _, d in meta]


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """True when a CUDA error leaves the context unusable (the worker must exit 70 and be replaced)."""
    text = str(exc)
    return ("CUDA" in text or "cuda" in text or "AcceleratorError" in type(exc).__name__) and any(
        s in text for s in _STICKY_CUDA)


def _parse_shape_error(text: str, op: str, meta: InputsMeta | None) -> ShapeMismatch | None:
    shapes = _shapes(meta)
    m = _RE_BROADCAST.search(text)
    if m:
        a, b, dim = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, dim=int(dim), expected=a, got=b,
                             suggestion="sizes are matched from the last dimension and must be equal or 1; "
                                        f"make dimension {dim} agree (reshape or transpose one operand)")
    m = _RE_EXPAND.search(text)
    if m:
        a, b, dim = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, dim=int(dim), expected=b, got=a,
                             suggestion="only dimensions of size 1 can be expanded")
    m = _RE_MATMUL.search(text)
    if m:
        n, k, k2, p = (int(g) for g in m.groups())
        hint = ("transpose the second operand" if p == k else
                "transpose the first operand" if n == k2 else
                "the first operand's last dimension must equal the second operand's first dimension")
        return ShapeMismatch(text, op=op, input_shapes=shapes or [[n, k], [k2, p]], dim=1, expected=str(k),
                             got=str(k2), suggestion=hint)
    m = _RE_MV.search(text)
    if m:
        _, _, want, got = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, dim=1, expected=want, got=got,
                             suggestion="the vector's length must equal the matrix's number of columns")
    m = _RE_BMM.search(text)
    if m:
        eb, ek, gb, gk = m.groups()
        dim = 0 if eb != gb else 1
        return ShapeMismatch(text, op=op, input_shapes=shapes, dim=dim, expected=(eb, ek)[dim], got=(gb, gk)[dim],
                             suggestion="batch sizes must be equal and the inner dimensions must agree")
    m = _RE_VIEW.search(text)
    if m:
        target, count = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, expected=f"{count} elements", got=f"[{target}]",
                             suggestion="keep the product of the sizes equal to the element count (or use -1)")
    m = _RE_DIM.search(text)
    if m:
        lo, hi, got = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, dim=int(got), expected=f"a dimension in [{lo}, {hi}]",
                             got=got, suggestion=f"use a dimension between {lo} and {hi}")
    m = _RE_LAYER_NORM.search(text)
    if m:
        norm, _, size = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, expected=f"input with trailing dimensions {norm}",
                             got=size, suggestion="set normalized_shape to the input's trailing dimensions")
    m = _RE_CAT.search(text)
    if m:
        dim, exp, got, idx = m.groups()
        return ShapeMismatch(text, op=op, input_shapes=shapes, expected=exp, got=got,
                             suggestion=f"tensor {idx} must match the others in every dimension except {dim}")
    return None


def _parse_dtype_error(text: str, op: str, meta: InputsMeta | None) -> DtypeMismatch | None:
    m = _RE_SAME_DTYPE.search(text) or _RE_SCALAR_TYPE.search(text)
    if m:
        a, b = (_dtype(g) for g in m.groups())
        return DtypeMismatch(text, op=op, input_dtypes=_dtypes(meta), expected=a, got=b,
                             suggestion=f"cast the operands to one dtype (e.g. cast with dtype=\"{a}\")")
    m = _RE_NOT_IMPL.search(text)
    if m:
        kernel, tname = m.groups()
        return DtypeMismatch(text, op=op, input_dtypes=_dtypes(meta), expected=f"a dtype supported by {kernel}",
                             got=_dtype(tname), suggestion="cast the input to a supported dtype such as float32")
    m = _RE_UNSIGNED_PROMOTION.search(text)
    if m:
        a, b = (_dtype(g) for g in m.groups())
        return DtypeMismatch(text, op=op, input_dtypes=_dtypes(meta), expected=a, got=b,
                             suggestion=f"torch does not combine {a} with {b}: cast both to one dtype first "
                                        "(e.g. cast with dtype=\"int64\")")
    m = _RE_MEAN_DTYPE.search(text)
    if m:
        return DtypeMismatch(text, op=op, input_dtypes=_dtypes(meta), expected="a floating-point or complex dtype",
                             got=_dtype(m.group(1)), suggestion="cast the input to float32 first")
    return None


def _bytes(value: str, unit: str) -> int:
    return int(float(value) * _UNITS.get(unit, 1))


def _address_space_limit() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        return None if soft == resource.RLIM_INFINITY else int(soft)
    except (ImportError, OSError, ValueError):
        return None


def _cpu_oom(text: str, requested: int | None) -> OutOfMemory:
    import psutil

    vm = psutil.virtual_memory()
    free, total = int(vm.available), int(vm.total)
    limit = _address_space_limit()
    if limit is not None:
        # Under `--memory-limit` the address-space budget is what ran out, not the machine's RAM:
        # report that budget and what is left of it.
        used = int(psutil.Process().memory_info().vms)
        free, total = max(limit - used, 0), limit
        text = f"{text} (address-space limit {limit} bytes, {used} in use)"
    return OutOfMemory(text or "out of memory", device="cpu", requested_bytes=requested,
                       free_bytes=free, total_bytes=total)


def _cuda_oom(text: str, device: Any) -> OutOfMemory:
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    m = _RE_CUDA_OOM.search(text)
    fields: dict[str, Any] = {"requested_bytes": _bytes(*m.groups()) if m else None}
    try:
        torch.cuda.empty_cache()  # give the failed call's cached blocks back before reporting free memory
        free, total = torch.cuda.mem_get_info(dev)
        fields.update(free_bytes=free, total_bytes=total,
                      allocated_bytes=torch.cuda.memory_allocated(dev),
                      reserved_bytes=torch.cuda.memory_reserved(dev))
    except Exception:  # a broken context: report what the message said
        pass
    return OutOfMemory(text.split("\n")[0], device=str(dev), **fields)


def to_sidecar_error(exc: BaseException, *, op: str, inputs_meta: InputsMeta | None = None,
                     device: Any = None) -> SidecarError:
    """The structured error for `exc` raised while running `op` on `device` (a torch.device or a string)."""
    if isinstance(exc, SidecarError):
        if op and "op" not in exc.fields:
            exc.fields["op"] = op
        return exc
    text = str(exc)
    try:
        import torch

        cuda_oom = isinstance(exc, torch.cuda.OutOfMemoryError)
    except Exception:  # torch not importable: only CPU rules apply
        cuda_oom = False
    if cuda_oom or ("CUDA out of memory" in text and isinstance(exc, RuntimeError)):
        return _cuda_oom(text, device)
    if isinstance(exc, MemoryError):
        m = _RE_NUMPY_OOM.search(text)
        return _cpu_oom(text or "out of memory (MemoryError)", _bytes(*m.groups()) if m else None)
    m = _RE_CPU_OOM.search(text)
    if m:
        return _cpu_oom(text[text.find("DefaultCPUAllocator"):], int(m.group(1)))
    if isinstance(exc, (RuntimeError, IndexError, ValueError, NotImplementedError, TypeError)):
        parsed = _parse_shape_error(text, op, inputs_meta) or _parse_dtype_error(text, op, inputs_meta)
        if parsed is not None:
            return parsed
    return OpFailed(text or qualified_name(type(exc)),
                    op=op, exception_type=qualified_name(type(exc)),
                    traceback="".join(tb_mod.format_exception(type(exc), exc, exc.__traceback__)))
