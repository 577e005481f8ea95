"""Dtype names on the wire (NumPy's names) <-> NumPy and torch dtypes.

bfloat16 has no NumPy dtype. We do not depend on `ml_dtypes`: on the NumPy side a bfloat16 tensor is
viewed as its raw 16-bit patterns (`uint16`), so the bytes round-trip exactly and `to_torch` turns
them back into `torch.bfloat16` with a dtype view (no copy). An `ml_dtypes.bfloat16` array handed
to `name_of` is still recognised as "bfloat16" (by the dtype's name, without importing ml_dtypes).

torch is imported lazily so that NumPy-only code paths never pay for importing it.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from sidecar.errors import InvalidTensorRef

# name -> bytes per element, in the order the wire contract lists them.
_ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16,
}

SUPPORTED: tuple[str, ...] = tuple(_ITEMSIZE)

# NumPy dtype of each name; bfloat16 -> its bit pattern (see module docstring).
_NUMPY: dict[str, np.dtype] = {
    name: np.dtype("uint16" if name == "bfloat16" else name) for name in SUPPORTED
}


def _unknown(what: Any) -> InvalidTensorRef:
    return InvalidTensorRef(
        f"unsupported dtype {what!r}; supported: {', '.join(SUPPORTED)}", field="dtype"
    )


def check_name(name: Any) -> str:
    """Returns `name` if it is a supported dtype name, else raises InvalidTensorRef(field="dtype")."""
    if isinstance(name, str) and name in _ITEMSIZE:
        return name
    raise _unknown(name)


def itemsize(name: str) -> int:
    try:
        return _ITEMSIZE[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None


def to_numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype that views this tensor's bytes (bfloat16 -> uint16 bit patterns)."""
    try:
        return _NUMPY[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None


def to_torch_dtype(name: str) -> Any:
    import torch

    try:
        return getattr(torch, check_name(name))  # torch uses the same names
    except AttributeError:
        raise _unknown(name) from None


# torch dtype -> wire name (None: not one of ours), filled as dtypes are seen (str() of one is slow).
_TORCH_NAMES: dict[Any, str | None] = {}


def _torch_dtype_name(dtype_like: Any) -> str | None:
    torch = sys.modules.get("torch")  # a torch dtype can only exist if torch is already imported
    if torch is None or not isinstance(dtype_like, torch.dtype):
        return None
    try:
        return _TORCH_NAMES[dtype_like]
    except KeyError:
        name = str(dtype_like).removeprefix("torch.")
        known = _TORCH_NAMES[dtype_like] = name if name in _ITEMSIZE else None
        return known


# Native-endian NumPy dtype -> name, for the hot path (np.dtype.name is computed in Python, slowly).
_NUMPY_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _NUMPY.items() if name != "bfloat16"}


def name_of(dtype_like: Any) -> str:
    """Wire name of a NumPy dtype (or anything np.dtype accepts) or a torch dtype.

    Non-native byte order is refused: the wire format is native-endian and the name alone could not
    say otherwise (convert with `astype(dtype.newbyteorder("="))` first).
    """
    if isinstance(dtype_like, np.dtype):
        known = _NUMPY_NAMES.get(dtype_like)
        if known is not None:
            return known
    torch_name = _torch_dtype_name(dtype_like)
    if torch_name is not None:
        return torch_name
    if isinstance(dtype_like, str) and dtype_like in _ITEMSIZE:
        return dtype_like
    try:
        dt = np.dtype(dtype_like)
    except (TypeError, ValueError):
        raise _unknown(dtype_like) from None
    if dt.name == "bfloat16" and dt.itemsize == 2:  # ml_dtypes.bfloat16
        return "bfloat16"
    if dt.fields is not None or dt.subdtype is not None or dt.name not in _ITEMSIZE:
        raise _unknown(str(dt))
    if not dt.isnative:
        raise InvalidTensorRef(f"dtype {dt.str!r} is not in native byte order", field="dtype")
    return str(dt.name)
