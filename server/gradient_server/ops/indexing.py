"""Shape and indexing ops: expand_dims, squeeze, flatten, concat, stack, slice, pad, take, one_hot.

Each op that selects elements has an adjoint that puts them back (slice / unslice,
take / scatter_add), so the gradients of gradients stay within the table.
"""

from __future__ import annotations

import math

import numpy as np

from ..tensor_type import TensorType, promote
from .base import (
    ELEMENT,
    GATHER,
    AttrSpec,
    Call,
    Emitter,
    GradCall,
    InvalidValue,
    OpDef,
    Ref,
    ShapeError,
    check_shape_attr,
    no_cost,
    normalize_axis,
    pass_cost,
    register,
    strided_cost,
)


def _reshape_back(b: Emitter, call: GradCall, g: Ref):
    return (b.reshape(g, shape=list(call.inputs[0].shape)),)


# ---------------------------------------------------------------------------------------------
# Adding and removing axes


def _expand_dims_shape(attrs, x: TensorType) -> tuple[int, ...]:
    rank = len(x.shape) + len(attrs["axis"])
    axes = sorted(normalize_axis(a, rank) for a in attrs["axis"])
    if len(set(axes)) != len(axes):
        raise ShapeError(f"axis {list(attrs['axis'])} repeats an axis")
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return tuple(shape)


register(
    OpDef(
        "expand_dims",
        "x with new axes of size 1 inserted at the given positions.",
        ("x",),
        lambda attrs, x: TensorType(x.dtype, _expand_dims_shape(attrs, x), x.weak),
        lambda call, x: x.reshape(call.type.shape),
        _reshape_back,
        attrs=(AttrSpec("axis", "axes", doc="Positions of the new axes in the result."),),
        cost=no_cost,  # a view, whatever the layout of x
    )
)


def _squeeze_shape(attrs, x: TensorType) -> tuple[int, ...]:
    if attrs["axis"] is None:
        return tuple(d for d in x.shape if d != 1)
    axes = {normalize_axis(a, len(x.shape)) for a in attrs["axis"]}
    if any(x.shape[a] != 1 for a in axes):
        raise ShapeError(f"cannot squeeze axes {sorted(axes)} of shape {list(x.shape)}")
    return tuple(d for i, d in enumerate(x.shape) if i not in axes)


register(
    OpDef(
        "squeeze",
        "x without axes of size 1 (the given ones, or all).",
        ("x",),
        lambda attrs, x: TensorType(x.dtype, _squeeze_shape(attrs, x), x.weak),
        lambda call, x: x.reshape(call.type.shape),
        _reshape_back,
        attrs=(AttrSpec("axis", "axes", None, "Axes to remove (each of size 1); default all."),),
        cost=no_cost,  # a view, whatever the layout of x
    )
)


def _flatten_shape(attrs, x: TensorType) -> tuple[int, ...]:
    rank = max(len(x.shape), 1)
    shape = x.shape or (1,)
    start, end = normalize_axis(attrs["start_axis"], rank), normalize_axis(attrs["end_axis"], rank)
    if start > end:
        raise ShapeError(f"start_axis {start} comes after end_axis {end}")
    return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])


register(
    OpDef(
        "flatten",
        "x with the axes from start_axis to end_axis merged into one (as torch.flatten).",
        ("x",),
        lambda attrs, x: TensorType(x.dtype, _flatten_shape(attrs, x), x.weak),
        lambda call, x: x.reshape(call.type.shape),
        _reshape_back,
        attrs=(
            AttrSpec("start_axis", "int", 0, "First axis to merge."),
            AttrSpec("end_axis", "int", -1, "Last axis to merge."),
        ),
        cost=pass_cost(3),  # as reshape's: a copy when x is strided
    )
)


# ---------------------------------------------------------------------------------------------
# Slicing and its adjoint


def _slices(attrs, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Python slices per axis from the starts/stops/steps/axes attributes (numpy semantics)."""
    rank = len(shape)
    axes = attrs["axes"] if attrs["axes"] is not None else tuple(range(len(attrs["starts"])))
    starts, stops = attrs["starts"], attrs["stops"]
    steps = attrs["steps"] if attrs["steps"] is not None else (1,) * len(axes)
    if not len(axes) == len(starts) == len(stops) == len(steps):
        raise ShapeError("axes, starts, stops and steps must have one entry per sliced axis")
    if any(step == 0 for step in steps):
        raise ShapeError("a slice step cannot be 0")
    chosen = [slice(None)] * rank
    for axis, start, stop, step in zip(axes, starts, stops, steps, strict=True):
        chosen[normalize_axis(axis, rank)] = slice(start, stop, step)
    return tuple(chosen)


def _sliced_shape(attrs, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(
        len(range(*s.indices(d))) for s, d in zip(_slices(attrs, shape), shape, strict=True)
    )


_SLICE_ATTRS = (
    AttrSpec("starts", "ints", doc="Start index per sliced axis (negative counts from the end)."),
    AttrSpec("stops", "ints", doc="Stop index per sliced axis (exclusive; clamped as in Python)."),
    AttrSpec("steps", "ints", None, "Step per sliced axis (may be negative); default 1."),
    AttrSpec("axes", "ints", None, "The sliced axes; default 0, 1, ... in order."),
)


def _slice_attrs(attrs) -> dict:
    return {name: attrs[name] for name in ("starts", "stops", "steps", "axes")}


register(
    OpDef(
        "slice",
        "x[start:stop:step] along the given axes (numpy basic slicing).",
        ("x",),
        lambda attrs, x: TensorType(x.dtype, _sliced_shape(attrs, x.shape), x.weak),
        lambda call, x: x[_slices(call.attrs, x.shape)],
        lambda b, call, g: (
            b.unslice(g, shape=list(call.inputs[0].shape), **_slice_attrs(call.attrs)),
        ),
        attrs=_SLICE_ATTRS,
        cost=no_cost,  # a view
    )
)


def _unslice_infer(attrs, x: TensorType) -> TensorType:
    shape = tuple(attrs["shape"])
    check_shape_attr(shape)
    if _sliced_shape(attrs, shape) != x.shape:
        raise ShapeError(f"{list(x.shape)} is not the shape of that slice of {list(shape)}")
    return TensorType(x.dtype, shape, x.weak)


def _unslice_forward(call: Call, x: np.ndarray) -> np.ndarray:
    out = np.zeros(call.type.shape, call.type.dtype)
    out[_slices(call.attrs, call.type.shape)] = x
    return out


register(
    OpDef(
        "unslice",
        "Zeros of `shape` with x written into the slice: the adjoint of slice.",
        ("x",),
        _unslice_infer,
        _unslice_forward,
        lambda b, call, g: (b.slice(g, **_slice_attrs(call.attrs)),),
        attrs=(AttrSpec("shape", "ints", doc="Shape of the result."), *_SLICE_ATTRS),
        cost=pass_cost(1.5),  # zeros, and x written into a strided slice of them
    )
)


def _pad_widths(attrs, rank: int) -> list[tuple[int, int]]:
    pads = attrs["pads"]
    if len(pads) != 2 * rank or any(p < 0 for p in pads):
        raise ShapeError(
            f"pads {list(pads)} must hold a non-negative (before, after) pair for each of "
            f"{rank} axes"
        )
    return [(pads[2 * i], pads[2 * i + 1]) for i in range(rank)]


def _pad_infer(attrs, x: TensorType) -> TensorType:
    widths = _pad_widths(attrs, len(x.shape))
    value = attrs["value"]
    if x.dtype.kind != "f" and not (math.isfinite(value) and value == int(value)):
        raise ShapeError(f"cannot pad a {x.dtype.name} tensor with {value}")
    shape = tuple(d + before + after for d, (before, after) in zip(x.shape, widths, strict=True))
    return TensorType(x.dtype, shape, x.weak)


def _pad_forward(call: Call, x: np.ndarray) -> np.ndarray:
    if not x.ndim:  # nothing to pad (numpy refuses an empty list of widths)
        return x.astype(call.type.dtype)
    padded = np.pad(x, _pad_widths(call.attrs, x.ndim), constant_values=call.attrs["value"])
    return padded.astype(call.type.dtype, copy=False)


def _pad_grad(b: Emitter, call: GradCall, g: Ref):
    x = call.inputs[0]
    widths = _pad_widths(call.attrs, len(x.shape))
    starts = [before for before, _ in widths]
    stops = [before + d for (before, _), d in zip(widths, x.shape, strict=True)]
    return (b.slice(g, starts=starts, stops=stops),)


register(
    OpDef(
        "pad",
        "x padded with a constant value.",
        ("x",),
        _pad_infer,
        _pad_forward,
        _pad_grad,
        attrs=(
            AttrSpec("pads", "ints", doc="(before, after) counts for each axis, flattened."),
            AttrSpec("value", "float", 0.0, "The padding value."),
        ),
        cost=pass_cost(2),  # the padded result, then x copied into its middle
    )
)


# ---------------------------------------------------------------------------------------------
# Joining


def _concat_infer(attrs, *xs: TensorType) -> TensorType:
    first = xs[0]
    if not first.shape:
        raise ShapeError("cannot concatenate scalars (use stack)")
    axis = normalize_axis(attrs["axis"], len(first.shape))
    for x in xs[1:]:
        if len(x.shape) != len(first.shape) or any(
            a != b for i, (a, b) in enumerate(zip(x.shape, first.shape, strict=True)) if i != axis
        ):
            shapes = ", ".join(str(list(t.shape)) for t in xs)
            raise ShapeError(f"shapes {shapes} differ outside axis {axis}")
    dtype, weak = promote(*xs)
    shape = list(first.shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return TensorType(dtype, tuple(shape), weak)


def _concat_grad(b: Emitter, call: GradCall, g: Ref):
    axis = normalize_axis(call.attrs["axis"], len(g.shape))
    grads, offset = [], 0
    for x in call.inputs:
        size = x.shape[axis]
        grads.append(b.slice(g, starts=[offset], stops=[offset + size], axes=[axis]))
        offset += size
    return tuple(grads)


register(
    OpDef(
        "concat",
        "The inputs joined along an existing axis.",
        ("x",),
        _concat_infer,
        lambda call, *xs: np.concatenate(
            [x.astype(call.type.dtype, copy=False) for x in xs], axis=call.attrs["axis"]
        ),
        _concat_grad,
        attrs=(AttrSpec("axis", "int", 0, "The axis to join along."),),
        variadic=True,
        cost=pass_cost(2),  # each input copied into a strided part of the result
    )
)


def _stack_infer(attrs, *xs: TensorType) -> TensorType:
    if any(x.shape != xs[0].shape for x in xs):
        shapes = ", ".join(str(list(t.shape)) for t in xs)
        raise ShapeError(f"stacked tensors must have one shape, got {shapes}")
    axis = normalize_axis(attrs["axis"], len(xs[0].shape) + 1)
    shape = list(xs[0].shape)
    shape.insert(axis, len(xs))
    dtype, weak = promote(*xs)
    return TensorType(dtype, tuple(shape), weak)


def _stack_grad(b: Emitter, call: GradCall, g: Ref):
    axis = normalize_axis(call.attrs["axis"], len(g.shape))
    return tuple(
        b.reshape(b.slice(g, starts=[i], stops=[i + 1], axes=[axis]), shape=list(x.shape))
        for i, x in enumerate(call.inputs)
    )


register(
    OpDef(
        "stack",
        "The inputs (of one shape) joined along a new axis.",
        ("x",),
        _stack_infer,
        lambda call, *xs: np.stack(
            [x.astype(call.type.dtype, copy=False) for x in xs], axis=call.attrs["axis"]
        ),
        _stack_grad,
        attrs=(AttrSpec("axis", "int", 0, "Position of the new axis in the result."),),
        variadic=True,
        cost=pass_cost(2),  # each input copied into a strided part of the result
    )
)


# ---------------------------------------------------------------------------------------------
# Gathering and its adjoint


def _check_indices(indices: TensorType) -> None:
    if indices.dtype.kind != "i":
        raise ShapeError(f"indices must be int32 or int64, got {indices.dtype.name}")


def _take_infer(attrs, x: TensorType, indices: TensorType) -> TensorType:
    _check_indices(indices)
    axis = normalize_axis(attrs["axis"], len(x.shape))
    shape = (*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])
    return TensorType(x.dtype, shape, x.weak)


def _valid_indices(indices: np.ndarray, size: int) -> np.ndarray:
    if indices.size and (indices.min() < -size or indices.max() >= size):
        bad = indices[(indices < -size) | (indices >= size)].flat[0]
        raise InvalidValue(f"index {bad} is out of range for an axis of size {size}")
    return indices


def _take_forward(call: Call, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    axis = call.attrs["axis"]
    return np.take(x, _valid_indices(indices, x.shape[axis]), axis=axis)


def _take_cost(call: Call) -> int:
    # The indices are checked (a min and a max); each one copies a run of the elements after
    # the axis, far from the previous run.
    x, indices = call.input_types
    axis = call.attrs["axis"] % len(x.shape)
    run = math.prod(x.shape[axis + 1 :])
    return 2 * ELEMENT * indices.size + strided_cost(call.type.size, run)


register(
    OpDef(
        "take",
        "Elements of x at integer indices along an axis (numpy.take; negative indices count "
        "from the end).",
        ("x", "indices"),
        _take_infer,
        _take_forward,
        lambda b, call, g: (
            b.scatter_add(
                g, call.inputs[1], shape=list(call.inputs[0].shape), axis=call.attrs["axis"]
            ),
            None,
        ),
        differentiable=(True, False),
        attrs=(AttrSpec("axis", "int", 0, "The axis to index."),),
        cost=_take_cost,
    )
)


def _scatter_add_infer(attrs, updates: TensorType, indices: TensorType) -> TensorType:
    _check_indices(indices)
    shape = tuple(attrs["shape"])
    check_shape_attr(shape)
    if not shape:
        raise ShapeError("shape must have at least one dimension")
    axis = normalize_axis(attrs["axis"], len(shape))
    expected = (*shape[:axis], *indices.shape, *shape[axis + 1 :])
    if updates.shape != expected:
        raise ShapeError(
            f"updates of shape {list(updates.shape)} do not fit indices {list(indices.shape)} "
            f"into {list(shape)} along axis {axis} (expected {list(expected)})"
        )
    return TensorType(updates.dtype, shape, updates.weak)


def _scatter_add_forward(call: Call, updates: np.ndarray, indices: np.ndarray) -> np.ndarray:
    shape = call.type.shape
    axis = call.attrs["axis"] % len(shape)
    out = np.zeros(shape, call.type.dtype)
    index = _valid_indices(indices, shape[axis])
    # Move the indexed axis first so np.add.at accumulates repeated indices in one call.
    moved = np.moveaxis(out, axis, 0)
    flat_updates = np.moveaxis(
        updates.reshape((*shape[:axis], index.size, *shape[axis + 1 :])), axis, 0
    )
    np.add.at(moved, index.reshape(-1), flat_updates)
    return out


def _scatter_add_cost(call: Call) -> int:
    # Zeros, the indices checked, and np.add.at: 4 to 15 ns an update along the first axis,
    # twice that along another (the updates are read through a moved axis).
    updates, indices = call.input_types
    per_update = GATHER if call.attrs["axis"] % len(call.type.shape) == 0 else 2 * GATHER
    return ELEMENT * (2 * call.type.size + 2 * indices.size) + per_update * updates.size


register(
    OpDef(
        "scatter_add",
        "Zeros of `shape` with the updates added at indices along an axis (repeats "
        "accumulate): the adjoint of take.",
        ("updates", "indices"),
        _scatter_add_infer,
        _scatter_add_forward,
        lambda b, call, g: (b.take(g, call.inputs[1], axis=call.attrs["axis"]), None),
        differentiable=(True, False),
        attrs=(
            AttrSpec("shape", "ints", doc="Shape of the result."),
            AttrSpec("axis", "int", 0, "The axis the indices address."),
        ),
        cost=_scatter_add_cost,
    )
)


def _one_hot_infer(attrs, indices: TensorType) -> TensorType:
    _check_indices(indices)
    if attrs["depth"] < 0:
        raise ShapeError(f"depth {attrs['depth']} is negative")
    return TensorType(attrs["dtype"], (*indices.shape, attrs["depth"]))


def _one_hot_forward(call: Call, indices: np.ndarray) -> np.ndarray:
    depth = call.attrs["depth"]
    _valid_indices(indices, depth)
    return (np.arange(depth) == (indices % max(depth, 1))[..., None]).astype(call.type.dtype)


def _one_hot_cost(call: Call) -> int:
    # The indices are checked and reduced modulo depth; each is compared with the depth
    # classes (numpy's inner loop costs some 25 ns an index) into a bool array, then cast.
    return ELEMENT * (3 * call.type.size + 30 * call.input_types[0].size)


register(
    OpDef(
        "one_hot",
        "A new last axis of size depth holding 1 at each index and 0 elsewhere.",
        ("indices",),
        _one_hot_infer,
        _one_hot_forward,
        attrs=(
            AttrSpec("depth", "int", doc="Number of classes."),
            AttrSpec("dtype", "dtype", "float64", "dtype of the result."),
        ),
        cost=_one_hot_cost,
    )
)
