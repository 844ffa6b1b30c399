"""Reductions over axes: sum, mean, max.

Each takes `axis` (an int or a list of ints; default all axes) and `keepdims`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..tensor_type import TensorType, float_dtype
from .base import AttrSpec, Call, Emitter, GradCall, OpDef, Ref, ShapeError, register

_AXIS_ATTRS = (
    AttrSpec(
        "axis", "axes", None, "Axis or axes to reduce (negative counts from the end); default all."
    ),
    AttrSpec("keepdims", "bool", False, "Keep reduced axes as dimensions of size 1."),
)


def reduced_axes(attrs, rank: int) -> tuple[int, ...]:
    """The reduced axes as sorted non-negative ints; ShapeError if out of range or repeated."""
    axis = attrs["axis"]
    if axis is None:
        return tuple(range(rank))
    normalized = [a + rank if a < 0 else a for a in axis]
    if any(not 0 <= a < rank for a in normalized) or len(set(normalized)) != len(normalized):
        raise ShapeError(f"axis {list(axis)} is out of range or repeated for rank {rank}")
    return tuple(sorted(normalized))


def keepdims_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` with each reduced axis set to 1."""
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _reduced_shape(attrs, shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = reduced_axes(attrs, len(shape))
    if attrs["keepdims"]:
        return keepdims_shape(shape, axes)
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _as_keepdims(b: Emitter, call: GradCall, value: Ref) -> Ref:
    """A reduction's output (or its gradient) reshaped so it broadcasts against the input."""
    x = call.inputs[0]
    shape = keepdims_shape(x.shape, reduced_axes(call.attrs, len(x.shape)))
    return value if value.shape == shape else b.reshape(value, shape=list(shape))


def _reduction(
    name: str,
    doc: str,
    fn: Callable[..., np.ndarray],
    dtype_rule: Callable[[np.dtype], np.dtype],
    grad: Callable[[Emitter, GradCall, Ref], Ref],
    *,
    nonempty: bool = False,
) -> OpDef:
    def infer(attrs, x: TensorType) -> TensorType:
        axes = reduced_axes(attrs, len(x.shape))
        if nonempty and any(x.shape[a] == 0 for a in axes):
            raise ShapeError(f"{name} of an empty axis has no value")
        return TensorType(dtype_rule(x.dtype), _reduced_shape(attrs, x.shape), x.weak)

    def forward(call: Call, x: np.ndarray) -> np.ndarray:
        axes = reduced_axes(call.attrs, x.ndim)
        out = fn(x, axis=axes, keepdims=call.attrs["keepdims"])
        return np.asarray(out).astype(call.type.dtype, copy=False)

    def backward(b: Emitter, call: GradCall, g: Ref):
        return (grad(b, call, g),)

    return register(OpDef(name, doc, ("x",), infer, forward, backward, attrs=_AXIS_ATTRS))


def _accumulating(dtype: np.dtype) -> np.dtype:
    # Integer sums accumulate in int64, as numpy does on 64-bit platforms.
    return dtype if dtype.kind == "f" else np.dtype("int64")


def _sum_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    return b.broadcast_to(_as_keepdims(b, call, g), shape=list(call.inputs[0].shape))


def _mean_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    x = call.inputs[0]
    count = int(np.prod([x.shape[a] for a in reduced_axes(call.attrs, len(x.shape))]))
    return b.div(_sum_grad(b, call, g), count)


def _max_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    # The gradient goes to the elements equal to the maximum, split evenly among ties.
    x = call.inputs[0]
    winners = b.cast(b.equal(x, _as_keepdims(b, call, call.out)), dtype=x.dtype.name)
    count = b.sum(winners, axis=list(reduced_axes(call.attrs, len(x.shape))), keepdims=True)
    return b.mul(_as_keepdims(b, call, g), b.div(winners, count))


_reduction("sum", "Sum over axes.", np.sum, _accumulating, _sum_grad)
_reduction("mean", "Mean over axes.", np.mean, float_dtype, _mean_grad)
_reduction(
    "max",
    "Maximum over axes; tied maxima share the gradient evenly.",
    np.max,
    lambda dtype: dtype,
    _max_grad,
    nonempty=True,
)
