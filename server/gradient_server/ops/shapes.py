"""Ops that move elements without arithmetic: reshape, transpose, broadcasting, casts, sources."""

from __future__ import annotations

import math

import numpy as np

from ..tensor_type import TensorType
from .base import (
    AttrSpec,
    Call,
    OpDef,
    ShapeError,
    check_shape_attr,
    no_cost,
    pass_cost,
    register,
)

RESHAPE_COST = pass_cost(3)
"""The cost of reshape (and flatten): a view of a contiguous x, but a copy of a strided one
(a transpose's view), whose scattered reads take some 11 ns an element."""

# ---------------------------------------------------------------------------------------------
# Sources


def _input_infer(attrs) -> TensorType:
    # The engine types an input from its feed; this rule is never reached.
    raise ShapeError("an input node is typed by its feed")


def _no_forward(call: Call) -> np.ndarray:
    raise AssertionError("source nodes are evaluated by the executor")


register(
    OpDef(
        "input",
        "A tensor fed per request under the node's name.",
        (),
        _input_infer,
        _no_forward,
        attrs=(
            AttrSpec("dtype", "dtype", None, "If set, the feed must have this dtype."),
            AttrSpec("shape", "ints", None, "If set, the feed must have this shape."),
        ),
        cost=no_cost,
    )
)


def _constant_infer(attrs) -> TensorType:
    value = attrs["value"]
    return TensorType(value.dtype, value.shape, attrs["weak"])


register(
    OpDef(
        "constant",
        "A fixed tensor, held in the attribute `value`.",
        (),
        _constant_infer,
        lambda call: call.attrs["value"],
        attrs=(
            AttrSpec("value", "tensor", doc="The tensor."),
            AttrSpec(
                "weak",
                "bool",
                False,
                "Weakly typed, like a Python number: takes the dtype of the tensor it is "
                "combined with (a float32 tensor times a weak 2.0 stays float32).",
            ),
        ),
        cost=no_cost,  # the attribute's array itself
    )
)


def _zeros_infer(attrs) -> TensorType:
    check_shape_attr(attrs["shape"])
    return TensorType(attrs["dtype"], attrs["shape"])


register(
    OpDef(
        "zeros",
        "A tensor of zeros of the given shape and dtype.",
        (),
        _zeros_infer,
        lambda call: np.zeros(call.type.shape, call.type.dtype),
        attrs=(
            AttrSpec("shape", "ints", doc="The shape."),
            AttrSpec("dtype", "dtype", doc="The dtype name, e.g. float32."),
        ),
    )
)


# ---------------------------------------------------------------------------------------------
# Dtype


register(
    OpDef(
        "cast",
        "x converted to another dtype; the gradient flows between float dtypes.",
        ("x",),
        lambda attrs, x: TensorType(attrs["dtype"], x.shape),
        lambda call, x: x.astype(call.type.dtype),
        # The engine casts the gradient back to x's dtype.
        lambda b, call, g: (g,),
        attrs=(AttrSpec("dtype", "dtype", doc="The target dtype name, e.g. float64."),),
    )
)


# ---------------------------------------------------------------------------------------------
# Shape


def _reshape_target(attrs, x: TensorType) -> tuple[int, ...]:
    shape = list(attrs["shape"])
    unknown = [i for i, d in enumerate(shape) if d == -1]
    if len(unknown) > 1 or any(d < -1 for d in shape):
        raise ShapeError(f"shape {shape} may hold one -1 and otherwise dimensions >= 0")
    known = math.prod(d for d in shape if d != -1)
    if unknown:
        if known == 0 or x.size % known:
            raise ShapeError(f"cannot reshape {list(x.shape)} to {shape}")
        shape[unknown[0]] = x.size // known
    if math.prod(shape) != x.size:
        raise ShapeError(f"cannot reshape {list(x.shape)} ({x.size} elements) to {shape}")
    return tuple(shape)


register(
    OpDef(
        "reshape",
        "x with a new shape of the same size (row-major order); one dimension may be -1.",
        ("x",),
        lambda attrs, x: TensorType(x.dtype, _reshape_target(attrs, x), x.weak),
        lambda call, x: x.reshape(call.type.shape),
        lambda b, call, g: (b.reshape(g, shape=call.inputs[0].shape),),
        attrs=(AttrSpec("shape", "ints", doc="The new shape; one entry may be -1."),),
        cost=RESHAPE_COST,
    )
)


def _permutation(attrs, rank: int) -> tuple[int, ...]:
    axes = attrs["axes"]
    if axes is None:
        return tuple(reversed(range(rank)))
    normalized = tuple(a + rank if a < 0 else a for a in axes)
    if sorted(normalized) != list(range(rank)):
        raise ShapeError(f"axes {list(axes)} are not a permutation of {rank} axes")
    return normalized


def _transpose_infer(attrs, x: TensorType) -> TensorType:
    perm = _permutation(attrs, len(x.shape))
    return TensorType(x.dtype, tuple(x.shape[a] for a in perm), x.weak)


def _transpose_grad(b, call, g):
    perm = _permutation(call.attrs, len(call.inputs[0].shape))
    return (b.transpose(g, axes=[int(a) for a in np.argsort(perm)]),)


register(
    OpDef(
        "transpose",
        "x with its axes permuted (reversed by default).",
        ("x",),
        _transpose_infer,
        lambda call, x: np.transpose(x, _permutation(call.attrs, x.ndim)),
        _transpose_grad,
        attrs=(AttrSpec("axes", "ints", None, "The permutation; default reverses the axes."),),
        cost=no_cost,  # a view
    )
)


def _broadcast_to_infer(attrs, x: TensorType) -> TensorType:
    shape = tuple(attrs["shape"])
    check_shape_attr(shape)
    # numpy's rule, in Python integers: numpy refuses shapes of over 2**63 elements with the
    # same ValueError as a mismatch, and such a shape is a limit's to refuse, not a mismatch.
    fits = len(shape) >= len(x.shape) and all(
        have in (1, want) for have, want in zip(reversed(x.shape), reversed(shape), strict=False)
    )
    if not fits:
        raise ShapeError(f"cannot broadcast {list(x.shape)} to {list(shape)}")
    return TensorType(x.dtype, shape, x.weak)


register(
    OpDef(
        "broadcast_to",
        "x broadcast to a shape, as numpy.broadcast_to.",
        ("x",),
        _broadcast_to_infer,
        lambda call, x: np.broadcast_to(x, call.type.shape),
        # The engine sums the gradient back to x's shape.
        lambda b, call, g: (g,),
        attrs=(AttrSpec("shape", "ints", doc="The target shape."),),
        cost=no_cost,  # a view
    )
)


def summed_axes(source: tuple[int, ...], target: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """How to sum an array of shape `source` down to `target` (which broadcasts to it).

    Returns the axes of `source` to sum with keepdims, and how many leading axes to drop after.
    """
    lead = len(source) - len(target)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(target) if d == 1 and source[lead + i] != 1
    )
    return axes, lead


def _sum_to_shape_infer(attrs, x: TensorType) -> TensorType:
    shape = tuple(attrs["shape"])
    check_shape_attr(shape)
    try:
        if np.broadcast_shapes(x.shape, shape) != x.shape:
            raise ValueError
    except ValueError:
        raise ShapeError(f"{list(shape)} does not broadcast to {list(x.shape)}") from None
    return TensorType(x.dtype, shape, x.weak)


def _sum_to_shape_forward(call: Call, x: np.ndarray) -> np.ndarray:
    axes, _ = summed_axes(x.shape, call.type.shape)
    return np.sum(x, axis=axes, keepdims=True, dtype=call.type.dtype).reshape(call.type.shape)


register(
    OpDef(
        "sum_to_shape",
        "x summed down to a shape that broadcasts to x's: the adjoint of broadcast_to.",
        ("x",),
        _sum_to_shape_infer,
        _sum_to_shape_forward,
        lambda b, call, g: (b.broadcast_to(g, shape=call.inputs[0].shape),),
        attrs=(AttrSpec("shape", "ints", doc="The target shape."),),
    )
)
