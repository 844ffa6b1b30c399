"""numpy <-> gradient.v1.Tensor conversion: the one place that knows the wire format of tensors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradient.v1 import tensor_pb2

__all__ = [
    "DTYPE_NAMES",
    "TensorFormatError",
    "array_from_data",
    "dtype_and_count",
    "dtype_from_name",
    "from_proto",
    "to_proto",
    "wire_array",
]

# Wire dtype -> little-endian numpy dtype.
_NUMPY_DTYPE: dict[tensor_pb2.DType, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_BOOL: np.dtype("bool"),
}
# numpy dtype (either byte order) -> wire dtype.
_WIRE_DTYPE: dict[np.dtype, tensor_pb2.DType] = {
    order: wire for wire, dt in _NUMPY_DTYPE.items() for order in (dt, dt.newbyteorder(">"))
}

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


def wire_array(value: Any) -> tuple[tensor_pb2.DType, np.ndarray]:
    """The wire dtype of a value and the value as a little-endian C-contiguous array.

    Copies only what must change (byte order, layout); TensorFormatError for other dtypes.
    """
    array = np.asarray(value)
    wire = _WIRE_DTYPE.get(array.dtype)
    if wire is None:
        known = ", ".join(DTYPE_NAMES)
        raise TensorFormatError(f"dtype {array.dtype} is not supported (supported: {known})")
    return wire, array.astype(_NUMPY_DTYPE[wire], order="C", copy=False)


def to_proto(value: Any, *, as_lists: bool = False) -> tensor_pb2.Tensor:
    """Encode a numpy array (or anything np.asarray accepts) as a Tensor.

    The payload is raw bytes, or with as_lists=True the plain list form (readable in JSON).
    Python floats become float64, ints int64 and bools bool, as in numpy.
    """
    wire, array = wire_array(value)
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
    return tensor_pb2.Tensor(dtype=wire, shape=array.shape, data=array.tobytes())


def dtype_and_count(dtype: int, shape: tuple[int, ...]) -> tuple[np.dtype, int]:
    """The numpy dtype of a wire dtype and the element count of a shape, both checked
    (TensorFormatError if either is not valid)."""
    numpy_dtype = _NUMPY_DTYPE.get(dtype)  # type: ignore[call-overload]
    if numpy_dtype is None:
        raise TensorFormatError(f"tensor dtype {dtype} is not set or not known")
    problem = shape_problem(shape)
    if problem is not None:
        raise TensorFormatError(f"tensor {problem}")
    return numpy_dtype, math.prod(shape)


_layouts: dict[tuple[int, tuple[int, ...]], tuple[np.dtype, int, int]] = {}
"""(wire dtype, shape) -> (numpy dtype, element count, payload bytes), once checked: shapes
repeat from call to call, and their checks need not."""


def array_from_data(
    dtype: int, shape: tuple[int, ...], offset: int = 0, nbytes: int = 0, *, buffer: Any
) -> np.ndarray:
    """A read-only array viewing the `data` payload (`nbytes` of `buffer` from `offset`).

    Checks the dtype, the shape and the payload's length against them before anything is
    allocated; the array shares the buffer's memory (no copy).
    """
    layout = _layouts.get((dtype, shape))
    if layout is None:
        numpy_dtype, count = dtype_and_count(dtype, shape)
        layout = (numpy_dtype, count, count * numpy_dtype.itemsize)
        if len(_layouts) >= 4096:
            _layouts.clear()
        _layouts[(dtype, shape)] = layout
    numpy_dtype, count, expected = layout
    if nbytes != expected:
        if not nbytes:
            raise TensorFormatError(f"tensor of shape {list(shape)} has no payload")
        raise TensorFormatError(
            f"tensor data has {nbytes} bytes but shape {list(shape)} of {numpy_dtype.name} "
            f"needs {expected}"
        )
    array = np.ndarray(shape, numpy_dtype, buffer, offset)  # a view: read-only for bytes
    if dtype == tensor_pb2.DTYPE_BOOL and count and array.view(np.uint8).max() > 1:
        raise TensorFormatError("bool tensor data holds bytes other than 0 and 1")
    return array if array.flags.aligned else aligned_copy(array)


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A read-only copy of an array whose data is not aligned for its dtype.

    numpy computes on unaligned data by other routes (no BLAS, other loops), which are slower
    and may round differently: results would depend on where a tensor lay in its message.
    """
    copy = array.copy()
    copy.flags.writeable = False
    return copy


def from_proto(tensor: tensor_pb2.Tensor, *, writeable: bool = False) -> np.ndarray:
    """Decode a Tensor, checking its payload against its shape before allocating anything.

    With writeable=False the array may be a read-only view of the message's bytes.
    """
    shape = tuple(tensor.shape)
    forms = {
        "data": len(tensor.data),
        "float_values": len(tensor.float_values),
        "int_values": len(tensor.int_values),
        "bool_values": len(tensor.bool_values),
    }
    given = [form for form, length in forms.items() if length]
    if len(given) > 1:
        raise TensorFormatError(f"tensor sets more than one payload form: {', '.join(given)}")
    form = given[0] if given else "data"
    if form == "data":
        array = array_from_data(tensor.dtype, shape, 0, forms["data"], buffer=tensor.data)
        return array.copy() if writeable else array
    dtype, count = dtype_and_count(tensor.dtype, shape)
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
