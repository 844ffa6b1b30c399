"""Static tensor types (dtype, shape, weakness) and the dtype promotion rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = (np.dtype("float32"), np.dtype("float64"))
# Order of the dtype kinds: a weakly typed operand of a higher kind wins over a strong one.
_KIND_ORDER = {"b": 0, "i": 1, "f": 2}
_DEFAULT_OF_KIND = {"b": np.dtype("bool"), "i": np.dtype("int64"), "f": np.dtype("float64")}


@dataclass(frozen=True)
class TensorType:
    """The static type of a node's value.

    `weak` marks a value derived only from weakly typed constants (Python numbers in the SDK,
    constants in gradient rules): like a Python scalar in numpy, JAX or PyTorch, it takes the
    dtype of the strongly typed tensor it is combined with.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    weak: bool = False

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)  # Python ints: no overflow for absurd shapes

    @property
    def is_float(self) -> bool:
        """Whether the dtype is differentiable (float32 or float64)."""
        return self.dtype in FLOAT_DTYPES

    def __str__(self) -> str:
        weak = " weak" if self.weak else ""
        return f"{self.dtype.name}{list(self.shape)}{weak}"


def promote(*types: TensorType) -> tuple[np.dtype, bool]:
    """The dtype (and weakness) that the operands of an elementwise op are computed in.

    Strong operands promote as numpy does, which never loses precision
    (float32 with float64 gives float64; int32 with float32 gives float64).
    A weak operand adopts the strong dtype, unless its kind is higher (a weak float
    meeting an int tensor gives float64). Only weak operands give a weak result.
    """
    strong = [t.dtype for t in types if not t.weak]
    weak = [t.dtype for t in types if t.weak]
    if not strong:
        return np.result_type(*weak), True
    dtype = np.result_type(*strong)
    if weak:
        top_weak_kind = max((d.kind for d in weak), key=_KIND_ORDER.__getitem__)
        if _KIND_ORDER[top_weak_kind] > _KIND_ORDER[dtype.kind]:
            dtype = np.result_type(dtype, _DEFAULT_OF_KIND[top_weak_kind])
    return dtype, False


def float_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a transcendental op computes in: floats keep theirs, ints and bools get float64."""
    return dtype if dtype in FLOAT_DTYPES else np.dtype("float64")


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's broadcast of shapes; ValueError when they are incompatible."""
    return tuple(np.broadcast_shapes(*shapes))
