"""numpy <-> gradient.v1.Tensor conversion: the one place that knows the wire format of tensors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradient.v1 import tensor_pb2

__all__ = [
    "DTYPE_NAMES",
    "TensorFormatError",
    "dtype_from_name",
    "from_proto",
    "to_proto",
]

# Wire dtype -> little-endian numpy dtype.
_NUMPY_DTYPE: dict[tensor_pb2.DType, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_BOOL: np.dtype("bool"),
}
_WIRE_DTYPE: dict[np.dtype, tensor_pb2.DType] = {dt: wire for wire, dt in _NUMPY_DTYPE.items()}

#: Short dtype names accepted wherever a dtype is named in text (attributes, the SDK).
DTYPE_NAMES: dict[str, np.dtype] = {
    "float32": np.dtype("float32"),
    "float64": np.dtype("float64"),
    "int32": np.dtype("int32"),
    "int64": np.dtype("int64"),
    "bool": np.dtype("bool"),
}


MAX_RANK = 32
"""Most dimensions a tensor may have (numpy allows 64)."""


def shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why numpy could not hold an array of this shape, or None if it can.

    numpy needs the product of the non-zero dimensions, in bytes, to fit in an int64, even when
    another dimension is 0; 2**60 elements leaves room for every supported dtype. (A non-empty
    shape that large is left to the element limits, which answer RESOURCE_EXHAUSTED.)
    """
    if any(d < 0 for d in shape):
        return f"shape {list(shape)} has a negative dimension"
    if len(shape) > MAX_RANK:
        return f"shape has {len(shape)} dimensions; the most is {MAX_RANK}"
    if 0 in shape and math.prod(max(d, 1) for d in shape) > 2**60:
        return f"shape {list(shape)} is too large for any array"
    return None


class TensorFormatError(ValueError):
    """A Tensor message or a numpy array that cannot be converted."""


def dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype for a short name such as "float32"; TensorFormatError if unknown."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        known = ", ".join(DTYPE_NAMES)
        raise TensorFormatError(f"unknown dtype {name!r} (known: {known})") from None


def to_proto(value: Any, *, as_lists: bool = False) -> tensor_pb2.Tensor:
    """Encode a numpy array (or anything np.asarray accepts) as a Tensor.

    The payload is raw bytes, or with as_lists=True the plain list form (readable in JSON).
    Python floats become float64, ints int64 and bools bool, as in numpy.
    """
    array = np.asarray(value)
    wire = _WIRE_DTYPE.get(array.dtype.newbyteorder("<"))
    if wire is None:
        known = ", ".join(DTYPE_NAMES)
        raise TensorFormatError(f"dtype {array.dtype} is not supported (supported: {known})")
    if as_lists:
        values = array.reshape(-1).tolist()
        kind = array.dtype.kind
        return tensor_pb2.Tensor(
            dtype=wire,
            shape=array.shape,
            float_values=values if kind == "f" else None,
            int_values=values if kind == "i" else None,
            bool_values=values if kind == "b" else None,
        )
    little = array.astype(_NUMPY_DTYPE[wire], copy=False)
    return tensor_pb2.Tensor(dtype=wire, shape=array.shape, data=little.tobytes(order="C"))


def from_proto(tensor: tensor_pb2.Tensor, *, writeable: bool = False) -> np.ndarray:
    """Decode a Tensor, checking its payload against its shape before allocating anything.

    With writeable=False the array may be a read-only view of the message's bytes.
    """
    dtype = _NUMPY_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise TensorFormatError(f"tensor dtype {tensor.dtype} is not set or not known")
    shape = tuple(tensor.shape)
    problem = shape_problem(shape)
    if problem is not None:
        raise TensorFormatError(f"tensor {problem}")
    count = math.prod(shape)
    forms = {
        "data": len(tensor.data),
        "float_values": len(tensor.float_values),
        "int_values": len(tensor.int_values),
        "bool_values": len(tensor.bool_values),
    }
    given = [form for form, length in forms.items() if length]
    if len(given) > 1:
        raise TensorFormatError(f"tensor sets more than one payload form: {', '.join(given)}")
    if not given:
        if count:
            raise TensorFormatError(f"tensor of shape {list(shape)} has no payload")
        return np.zeros(shape, dtype)
    form = given[0]
    if form == "data":
        if forms["data"] != count * dtype.itemsize:
            raise TensorFormatError(
                f"tensor data has {forms['data']} bytes but shape {list(shape)} of {dtype.name} "
                f"needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(tensor.data, dtype=dtype)
        if dtype.kind == "b" and count and array.view(np.uint8).max() > 1:
            raise TensorFormatError("bool tensor data holds bytes other than 0 and 1")
        if writeable:
            array = array.copy()
        return array.reshape(shape)
    expected = {"f": "float_values", "i": "int_values", "b": "bool_values"}[dtype.kind]
    if form != expected:
        raise TensorFormatError(f"a {dtype.name} tensor takes {expected}, not {form}")
    if forms[form] != count:
        raise TensorFormatError(
            f"tensor {form} has {forms[form]} elements but shape {list(shape)} needs {count}"
        )
    values = getattr(tensor, form)
    if dtype.kind == "i":
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise TensorFormatError(f"int_values do not fit in {dtype.name}")
        return wide.astype(dtype).reshape(shape)
    if dtype.kind == "b":
        return np.array(values, dtype=dtype).reshape(shape)
    wide = np.array(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        array = wide.astype(dtype)
    if not np.array_equal(np.isfinite(array), np.isfinite(wide)):
        raise TensorFormatError(f"float_values do not fit in {dtype.name}")
    return array.reshape(shape)
