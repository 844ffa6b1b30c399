"""Reductions over axes: sum, mean, max, min, prod, logsumexp, var, norm (each takes `axis`,
an int or a list of ints, default all, and `keepdims`), argmax and argmin (one int `axis`), and
prod_others, the gradient of prod.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..tensor_type import TensorType, float_dtype
from .base import (
    GATHER,
    AttrSpec,
    Call,
    Emitter,
    GradCall,
    OpDef,
    Ref,
    ShapeError,
    default_cost,
    normalize_axis,
    pass_cost,
    register,
)

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
    normalized = [normalize_axis(a, rank) for a in axis]
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"axis {list(axis)} repeats an axis")
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
    extra_attrs: tuple[AttrSpec, ...] = (),
    attr_check: Callable[[Any, tuple[int, ...]], None] | None = None,
    cost: Callable[[Call], int] | None = None,
) -> OpDef:
    def infer(attrs, x: TensorType) -> TensorType:
        axes = reduced_axes(attrs, len(x.shape))
        if nonempty and any(x.shape[a] == 0 for a in axes):
            raise ShapeError(f"{name} of an empty axis has no value")
        if attr_check is not None:
            attr_check(attrs, x.shape)
        return TensorType(dtype_rule(x.dtype), _reduced_shape(attrs, x.shape), x.weak)

    def forward(call: Call, x: np.ndarray) -> np.ndarray:
        axes = reduced_axes(call.attrs, x.ndim)
        extra = {spec.name: call.attrs[spec.name] for spec in extra_attrs}
        out = fn(x, axis=axes, keepdims=call.attrs["keepdims"], **extra)
        return np.asarray(out).astype(call.type.dtype, copy=False)

    def backward(b: Emitter, call: GradCall, g: Ref):
        return (grad(b, call, g),)

    attrs = _AXIS_ATTRS + extra_attrs
    return register(OpDef(name, doc, ("x",), infer, forward, backward, attrs=attrs, cost=cost))


def _accumulating(dtype: np.dtype) -> np.dtype:
    # Integer sums accumulate in int64, as numpy does on 64-bit platforms.
    return dtype if dtype.kind == "f" else np.dtype("int64")


def _sum_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    return b.broadcast_to(_as_keepdims(b, call, g), shape=list(call.inputs[0].shape))


def _mean_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    x = call.inputs[0]
    count = int(np.prod([x.shape[a] for a in reduced_axes(call.attrs, len(x.shape))]))
    return b.div(_sum_grad(b, call, g), count)


def _extremum_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    # The gradient goes to the elements equal to the extremum, split evenly among ties.
    x = call.inputs[0]
    winners = b.cast(b.equal(x, _as_keepdims(b, call, call.out)), dtype=x.dtype.name)
    count = b.sum(winners, axis=list(reduced_axes(call.attrs, len(x.shape))), keepdims=True)
    return b.mul(_as_keepdims(b, call, g), b.div(winners, count))


_reduction("sum", "Sum over axes.", np.sum, _accumulating, _sum_grad)


def _mean(x: np.ndarray, axis: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """np.mean (the same sum, divided the same way) without numpy's warning for an empty
    slice, whose mean is nan: the client's result, not the server's warning."""
    wide = np.float64 if x.dtype.kind in "biu" else None
    total = np.sum(x, axis=axis, keepdims=keepdims, dtype=wide)
    return np.true_divide(total, math.prod(x.shape[a] for a in axis))


_reduction("mean", "Mean over axes.", _mean, float_dtype, _mean_grad)
_reduction(
    "max",
    "Maximum over axes; tied maxima share the gradient evenly.",
    np.max,
    lambda dtype: dtype,
    _extremum_grad,
    nonempty=True,
)
_reduction(
    "min",
    "Minimum over axes; tied minima share the gradient evenly.",
    np.min,
    lambda dtype: dtype,
    _extremum_grad,
    nonempty=True,
)


def _prod_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    # d(prod)/dx_i is the product of the other elements: prod_others, which is exact at zeros
    # (no division). Several reduced axes are moved last and flattened into one.
    x = call.inputs[0]
    axes = reduced_axes(call.attrs, len(x.shape))
    if not axes:
        return _as_keepdims(b, call, g)
    if len(axes) == 1:
        others = b.prod_others(x, axis=axes[0])
    else:
        kept = [a for a in range(len(x.shape)) if a not in axes]
        order = kept + list(axes)
        moved = b.transpose(x, axes=order)
        flat = b.reshape(moved, shape=[*moved.shape[: len(kept)], -1])
        others_flat = b.prod_others(flat, axis=-1)
        others_moved = b.reshape(others_flat, shape=list(moved.shape))
        others = b.transpose(others_moved, axes=[int(i) for i in np.argsort(order)])
    return b.mul(_as_keepdims(b, call, g), others)


_reduction("prod", "Product over axes.", np.prod, _accumulating, _prod_grad, cost=pass_cost(1.5))


def _exclusive_cumprod(x: np.ndarray, axis: int) -> np.ndarray:
    """Products of the elements before each one along an axis (1 for the first)."""
    result = np.ones_like(x)
    into, source = [slice(None)] * x.ndim, [slice(None)] * x.ndim
    into[axis], source[axis] = slice(1, None), slice(None, -1)
    result[tuple(into)] = np.cumprod(x, axis=axis)[tuple(source)]
    return result


def _prod_others_forward(call: Call, x: np.ndarray) -> np.ndarray:
    # Exclusive products from the left times those from the right: exact at zeros, O(n).
    axis = call.attrs["axis"] % x.ndim
    x = x.astype(call.type.dtype, copy=False)
    right = np.flip(_exclusive_cumprod(np.flip(x, axis=axis), axis), axis=axis)
    return _exclusive_cumprod(x, axis) * right


def _prod_others_grad(b: Emitter, call: GradCall, u: Ref):
    # d(prod_others_k)/dx_i = prod over j not in {i, k} of x_j (0 for i == k). With the axis
    # moved last, row i of Y = where(eye, 1, x) leaves out x_i, so prod_others(Y)[i, k] is
    # that product for k != i. Exact at zeros; costs O(n^2) per slice, only at second order.
    x = call.inputs[0]
    rank = len(x.shape)
    axis = call.attrs["axis"] % rank
    order = [a for a in range(rank) if a != axis] + [axis]
    moved = x if axis == rank - 1 else b.transpose(x, axes=order)
    u_moved = u if axis == rank - 1 else b.transpose(u, axes=order)
    n = x.shape[axis]
    # The identity mask is computed when the graph runs, so its n^2 elements count against the
    # request's limits like any other value.
    index = b.op("constant", value=np.arange(n))
    eye = b.equal(b.reshape(index, shape=[n, 1]), index)
    rows = b.broadcast_to(b.expand_dims(moved, axis=[-2]), shape=[*moved.shape[:-1], n, n])
    leave_one_out = b.prod_others(b.where(eye, 1, rows), axis=-1)
    mixed = b.where(eye, 0, leave_one_out)
    result = b.sum(b.mul(b.expand_dims(u_moved, axis=[-1]), mixed), axis=[-2])
    if axis != rank - 1:
        result = b.transpose(result, axes=[int(i) for i in np.argsort(order)])
    return (result,)


def _prod_others_infer(attrs, x: TensorType) -> TensorType:
    normalize_axis(attrs["axis"], len(x.shape))
    return TensorType(_accumulating(x.dtype), x.shape, x.weak)


register(
    OpDef(
        "prod_others",
        "For each element, the product of the other elements along an axis (the gradient of "
        "prod, exact at zeros).",
        ("x",),
        _prod_others_infer,
        _prod_others_forward,
        _prod_others_grad,
        attrs=(AttrSpec("axis", "int", -1, "The axis."),),
        # Two cumulative products (sequential, 5 ns an element) over flipped views, their
        # copies and a product: 25 to 55 ns an element.
        cost=pass_cost(22),
    )
)


def _logsumexp(x: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    # Shift by the maximum so exp never overflows; an all -inf slice gives -inf.
    shift = np.max(x, axis=axis, keepdims=True) if x.size else np.zeros((1,) * x.ndim, x.dtype)
    shift = np.where(np.isfinite(shift), shift, 0)
    out = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)) + shift
    return out if keepdims else np.squeeze(out, axis=axis)


def _logsumexp_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    # The gradient is softmax(x) along the reduced axes: exp(x - logsumexp(x)).
    x = call.inputs[0]
    return b.mul(_as_keepdims(b, call, g), b.exp(b.sub(x, _as_keepdims(b, call, call.out))))


_reduction(
    "logsumexp",
    "log(sum(exp(x))) over axes, computed without overflow.",
    _logsumexp,
    float_dtype,
    _logsumexp_grad,
    cost=pass_cost(5, 1),  # a max, a subtraction, an exp and a sum over the input
)


def _check_ddof(attrs, shape: tuple[int, ...]) -> None:
    count = math.prod(shape[a] for a in reduced_axes(attrs, len(shape)))
    if not 0 <= attrs["ddof"] < count:
        raise ShapeError(
            f"ddof {attrs['ddof']} must be >= 0 and below the {count} reduced elements"
        )


def _var_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    x = call.inputs[0]
    axes = reduced_axes(call.attrs, len(x.shape))
    count = int(np.prod([x.shape[a] for a in axes])) - call.attrs["ddof"]
    centered = b.sub(x, b.mean(x, axis=list(axes), keepdims=True))
    return b.mul(_as_keepdims(b, call, g), b.mul(centered, 2.0 / count))


_reduction(
    "var",
    "Variance over axes, dividing by N - ddof.",
    np.var,
    float_dtype,
    _var_grad,
    extra_attrs=(AttrSpec("ddof", "int", 0, "Delta degrees of freedom (0 <= ddof < N)."),),
    attr_check=_check_ddof,
    cost=pass_cost(6),  # a mean, the deviations, their squares and their sum
)


def _norm(x: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    x = x.astype(float_dtype(x.dtype), copy=False)  # squares of integers would overflow
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


def _norm_grad(b: Emitter, call: GradCall, g: Ref) -> Ref:
    # x / ||x||, defined as 0 at the origin (a subgradient, as PyTorch does).
    x = call.inputs[0]
    norm = _as_keepdims(b, call, call.out)
    at_origin = b.equal(norm, 0)
    direction = b.div(x, b.where(at_origin, 1, norm))
    return b.mul(_as_keepdims(b, call, g), b.where(at_origin, 0, direction))


_reduction(
    "norm",
    "Euclidean (L2) norm over axes.",
    _norm,
    float_dtype,
    _norm_grad,
    cost=pass_cost(4),  # the squares and their sum
)


def _arg_infer(name: str):
    def infer(attrs, x: TensorType) -> TensorType:
        axis = attrs["axis"]
        if x.size == 0:
            raise ShapeError(f"{name} of an empty tensor has no value")
        if axis is None:
            shape = (1,) * len(x.shape) if attrs["keepdims"] else ()
            return TensorType(np.dtype("int64"), shape)
        axis = normalize_axis(axis, len(x.shape))
        kept = tuple(1 if i == axis else d for i, d in enumerate(x.shape))
        reduced = tuple(d for i, d in enumerate(x.shape) if i != axis)
        return TensorType(np.dtype("int64"), kept if attrs["keepdims"] else reduced)

    return infer


def _arg_cost(call: Call) -> int:
    # Along the last axis (or the flattened tensor) a contiguous scan; along another axis
    # numpy's argmax reads across rows, a cache miss an element (13 times slower).
    axis, rank = call.attrs["axis"], len(call.input_types[0].shape)
    if axis is None or axis % rank == rank - 1:
        return default_cost(call)
    return GATHER * call.input_types[0].size + default_cost(call)


def _arg_reduction(name: str, doc: str, fn) -> OpDef:
    def forward(call: Call, x: np.ndarray) -> np.ndarray:
        out = fn(x, axis=call.attrs["axis"], keepdims=call.attrs["keepdims"])
        return np.asarray(out, dtype=np.int64)

    attrs = (
        AttrSpec("axis", "int", None, "The axis; default the flattened tensor."),
        AttrSpec("keepdims", "bool", False, "Keep the reduced axis as size 1."),
    )
    return register(
        OpDef(name, doc, ("x",), _arg_infer(name), forward, attrs=attrs, cost=_arg_cost)
    )


_arg_reduction("argmax", "Index of the (first) maximum along an axis (int64).", np.argmax)
_arg_reduction("argmin", "Index of the (first) minimum along an axis (int64).", np.argmin)
