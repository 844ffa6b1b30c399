"""Matrix products."""

from __future__ import annotations

import numpy as np

from ..tensor_type import TensorType, promote
from .base import (
    ELEMENT,
    INT_MULTIPLY_ADD,
    MULTIPLY_ADD,
    Call,
    Emitter,
    GradCall,
    OpDef,
    Ref,
    ShapeError,
    default_cost,
    register,
)


def _matmul_infer(attrs, a: TensorType, b: TensorType) -> TensorType:
    dtype, weak = promote(a, b)
    if dtype.kind == "b":
        raise ShapeError("matmul does not take bool operands; cast them first")
    if not a.shape or not b.shape:
        raise ShapeError("matmul operands must have at least 1 dimension (use mul for scalars)")
    a_shape = a.shape if len(a.shape) > 1 else (1, *a.shape)
    b_shape = b.shape if len(b.shape) > 1 else (*b.shape, 1)
    if a_shape[-1] != b_shape[-2]:
        raise ShapeError(
            f"contracted dimensions differ: {list(a.shape)} @ {list(b.shape)} "
            f"({a_shape[-1]} != {b_shape[-2]})"
        )
    try:
        batch = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    except ValueError:
        raise ShapeError(
            f"batch dimensions of {list(a.shape)} and {list(b.shape)} do not broadcast"
        ) from None
    shape = (*batch, a_shape[-2], b_shape[-1])
    if len(a.shape) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(b.shape) == 1:
        shape = shape[:-1]
    return TensorType(dtype, shape, weak)


def _matmul_forward(call: Call, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dtype = call.type.dtype
    return np.matmul(a.astype(dtype, copy=False), b.astype(dtype, copy=False))


def _matmul_cost(call: Call) -> int:
    # Each element of the result is a dot product over the contracted dimension (the last of
    # x): BLAS for floats, numpy's own loops for ints. Writing the result costs more than a
    # pass when the dimension is short (an outer product: 5 ns an element).
    depth = call.input_types[0].shape[-1]
    per = MULTIPLY_ADD if call.type.dtype.kind == "f" else INT_MULTIPLY_ADD
    return per * call.type.size * depth + default_cost(call) + 4 * ELEMENT * call.type.size


def _swap_last(b: Emitter, x: Ref) -> Ref:
    rank = len(x.shape)
    return b.transpose(x, axes=[*range(rank - 2), rank - 1, rank - 2])


def _as_vector(b: Emitter, m: Ref, length: int) -> Ref:
    """A (..., 1, k) or (..., k, 1) gradient of a promoted 1-D operand, summed to shape (k,)."""
    if len(m.shape) > 2:
        m = b.sum_to_shape(m, shape=[d for d in m.shape[-2:]])
    return b.reshape(m, shape=[length])


def _matmul_grad(b: Emitter, call: GradCall, g: Ref):
    # Promote 1-D operands to matrices (a row on the left, a column on the right), use
    # dX = dC @ Y^T and dY = X^T @ dC, then return to the 1-D shapes. Broadcast batch
    # dimensions are summed away by the engine.
    x, y = call.inputs
    x_vector, y_vector = len(x.shape) == 1, len(y.shape) == 1
    xm = b.reshape(x, shape=[1, x.shape[0]]) if x_vector else x
    ym = b.reshape(y, shape=[y.shape[0], 1]) if y_vector else y
    full = list(g.shape)
    if y_vector:
        full.append(1)
    if x_vector:
        full.insert(len(full) - 1, 1)
    gm = b.reshape(g, shape=full) if x_vector or y_vector else g
    dx = b.matmul(gm, _swap_last(b, ym))
    dy = b.matmul(_swap_last(b, xm), gm)
    return (
        _as_vector(b, dx, x.shape[0]) if x_vector else dx,
        _as_vector(b, dy, y.shape[0]) if y_vector else dy,
    )


register(
    OpDef(
        "matmul",
        "Matrix product with numpy.matmul semantics (1-D operands and broadcast batches).",
        ("x", "y"),
        _matmul_infer,
        _matmul_forward,
        _matmul_grad,
        cost=_matmul_cost,
    )
)
