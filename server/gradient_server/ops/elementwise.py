"""Elementwise ops: arithmetic, transcendental functions, comparisons and selection.

Binary ops broadcast as numpy does; their gradient rules return gradients of the broadcast
shape and the engine sums them back to each operand's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..tensor_type import TensorType, broadcast_shapes, float_dtype, promote
from .base import (
    AttrSpec,
    Call,
    Emitter,
    GradCall,
    OpDef,
    Ref,
    ShapeError,
    pass_cost,
    register,
)


def _broadcast(*types: TensorType) -> tuple[int, ...]:
    first = types[0].shape
    if all(t.shape == first for t in types):
        return first
    try:
        return broadcast_shapes(*(t.shape for t in types))
    except ValueError:
        shapes = " and ".join(str(list(t.shape)) for t in types)
        raise ShapeError(f"shapes {shapes} do not broadcast") from None


def _cast(call: Call, arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """The operands in the dtype the node computes in (its output dtype)."""
    return [a.astype(call.type.dtype, copy=False) for a in arrays]


def _direct(fn: Callable[..., np.ndarray]) -> Callable[[Call], Callable[..., np.ndarray] | None]:
    """A bind rule: numpy's function itself when every operand has the result's dtype."""

    def bind(call: Call) -> Callable[..., np.ndarray] | None:
        dtype = call.type.dtype
        return fn if all(t.dtype == dtype for t in call.input_types) else None

    return bind


def _numeric(op: str, dtype: np.dtype) -> np.dtype:
    if dtype.kind == "b":
        raise ShapeError(f"{op} does not take bool operands; cast them first")
    return dtype


# ---------------------------------------------------------------------------------------------
# Binary arithmetic


def _binary(
    name: str,
    doc: str,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    grad: Callable[[Emitter, Ref, Ref, Ref, Ref], tuple[Ref | None, Ref | None]],
    *,
    floating: bool = False,
    cost: Callable[[Call], int] | None = None,
) -> OpDef:
    """Declare a broadcasting binary op. floating=True computes ints in float64 (div, pow).
    cost: its cost rule, default_cost if None."""

    def infer(attrs, a: TensorType, b: TensorType) -> TensorType:
        dtype, weak = promote(a, b)
        dtype = _numeric(name, dtype)
        return TensorType(float_dtype(dtype) if floating else dtype, _broadcast(a, b), weak)

    def forward(call: Call, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return fn(*_cast(call, (a, b)))

    def backward(b: Emitter, call: GradCall, g: Ref):
        x, y = call.inputs
        return grad(b, x, y, call.out, g)

    return register(
        OpDef(name, doc, ("x", "y"), infer, forward, backward, bind=_direct(fn), cost=cost)
    )


_binary("add", "x + y, broadcasting.", np.add, lambda b, x, y, out, g: (g, g))
_binary("sub", "x - y, broadcasting.", np.subtract, lambda b, x, y, out, g: (g, b.neg(g)))
_binary(
    "mul", "x * y, broadcasting.", np.multiply, lambda b, x, y, out, g: (b.mul(g, y), b.mul(g, x))
)
_binary(
    "div",
    "x / y (true division; integers divide in float64), broadcasting.",
    np.true_divide,
    lambda b, x, y, out, g: (b.div(g, y), b.neg(b.div(b.mul(g, out), y))),
    floating=True,
)


def _pow_grad(b: Emitter, x: Ref, y: Ref, out: Ref, g: Ref):
    # d/dx x^y = y x^(y-1), taken as 0 where y == 0 (so 0^0 has gradient 0, not nan).
    # d/dy x^y = x^y log x, taken as 0 where x == 0 (the limit for y > 0), as JAX does.
    dx = b.where(b.equal(y, 0), 0, b.mul(y, b.pow(x, b.sub(y, 1))))
    dy = b.mul(out, b.log(b.where(b.equal(x, 0), 1, x)))
    return b.mul(g, dx), b.mul(g, dy)


_binary(
    "pow",
    "x ** y in floating point, broadcasting.",
    np.power,
    _pow_grad,
    floating=True,
    cost=pass_cost(transcendental=2),  # exp(y * log(x)), in effect
)


def _tie_weight(b: Emitter, wins: Ref, x: Ref, y: Ref) -> Ref:
    """1 where x wins, 1/2 where x and y tie, 0 where y wins: ties split the gradient evenly."""
    return b.where(wins, 1, b.where(b.equal(x, y), 0.5, 0))


def _extremum_grad(winner: str):
    def grad(b: Emitter, x: Ref, y: Ref, out: Ref, g: Ref):
        weight = _tie_weight(b, b.op(winner, x, y), x, y)
        return b.mul(g, weight), b.mul(g, b.sub(1, weight))

    return grad


_binary(
    "maximum",
    "Elementwise larger of x and y; a tie splits the gradient evenly.",
    np.maximum,
    _extremum_grad("greater"),
)
_binary(
    "minimum",
    "Elementwise smaller of x and y; a tie splits the gradient evenly.",
    np.minimum,
    _extremum_grad("less"),
)


# ---------------------------------------------------------------------------------------------
# Unary ops


def _unary(
    name: str,
    doc: str,
    fn: Callable[[np.ndarray], np.ndarray],
    grad: Callable[[Emitter, Ref, Ref, Ref], Ref | None],
    *,
    floating: bool = True,
    cost: Callable[[Call], int] | None = None,
) -> OpDef:
    """Declare an elementwise unary op.

    floating=True: computes in float (ints and bools in float64); otherwise keeps the dtype.
    grad(b, x, out, g) returns the gradient with respect to x.
    cost: its cost rule, default_cost if None (right for ops without transcendental functions).
    """

    def infer(attrs, x: TensorType) -> TensorType:
        dtype = float_dtype(x.dtype) if floating else _numeric(name, x.dtype)
        return TensorType(dtype, x.shape, x.weak)

    def forward(call: Call, x: np.ndarray) -> np.ndarray:
        return fn(*_cast(call, (x,)))

    def backward(b: Emitter, call: GradCall, g: Ref):
        return (grad(b, call.inputs[0], call.out, g),)

    return register(OpDef(name, doc, ("x",), infer, forward, backward, bind=_direct(fn), cost=cost))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-softplus(-x)): no overflow for any x, full relative precision in both tails.
    return np.exp(-np.logaddexp(0, -x))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


_unary("neg", "-x.", np.negative, lambda b, x, out, g: b.neg(g), floating=False)
_unary("exp", "e ** x.", np.exp, lambda b, x, out, g: b.mul(g, out), cost=pass_cost(1, 1))
_unary("log", "Natural logarithm.", np.log, lambda b, x, out, g: b.div(g, x), cost=pass_cost(1, 1))
_unary(
    "sqrt",
    "Square root.",
    np.sqrt,
    lambda b, x, out, g: b.div(b.mul(g, 0.5), out),
    cost=pass_cost(1.5),
)
_unary("square", "x * x.", np.square, lambda b, x, out, g: b.mul(g, b.mul(2, x)), floating=False)
_unary(
    "abs",
    "Absolute value; its gradient at 0 is 0.",
    np.abs,
    lambda b, x, out, g: b.mul(g, b.sign(x)),
    floating=False,
)
_unary(
    "sign",
    "-1, 0 or 1 by the sign of x; its gradient is 0.",
    np.sign,
    lambda b, x, out, g: None,
    floating=False,
)
_unary(
    "tanh",
    "Hyperbolic tangent.",
    np.tanh,
    lambda b, x, out, g: b.mul(g, b.sub(1, b.square(out))),
    cost=pass_cost(1, 1.5),
)
_unary(
    "sigmoid",
    "1 / (1 + e ** -x), computed without overflow.",
    _sigmoid,
    lambda b, x, out, g: b.mul(g, b.mul(out, b.sub(1, out))),
    cost=pass_cost(3, 3),  # two negations, logaddexp (an exp and a log1p) and an exp
)
# relu'(0) = 0 (as in PyTorch and JAX): the gradient passes only where x > 0 strictly.
_unary(
    "relu",
    "max(x, 0); its gradient at 0 is 0.",
    _relu,
    lambda b, x, out, g: b.where(b.greater(x, 0), g, 0),
    floating=False,
)


# ---------------------------------------------------------------------------------------------
# Comparisons and selection


def _comparison(name: str, doc: str, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpDef:
    def infer(attrs, a: TensorType, b: TensorType) -> TensorType:
        return TensorType(np.dtype(bool), _broadcast(a, b), False)

    def forward(call: Call, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        dtype, _ = promote(*call.input_types)
        return fn(a.astype(dtype, copy=False), b.astype(dtype, copy=False))

    return register(OpDef(name, doc, ("x", "y"), infer, forward))


_comparison("equal", "x == y (bool), broadcasting.", np.equal)
_comparison("not_equal", "x != y (bool), broadcasting.", np.not_equal)
_comparison("greater", "x > y (bool), broadcasting.", np.greater)
_comparison("greater_equal", "x >= y (bool), broadcasting.", np.greater_equal)
_comparison("less", "x < y (bool), broadcasting.", np.less)
_comparison("less_equal", "x <= y (bool), broadcasting.", np.less_equal)


def _where_infer(attrs, cond: TensorType, a: TensorType, b: TensorType) -> TensorType:
    if cond.dtype.kind != "b":
        raise ShapeError(f"condition must be bool, got {cond.dtype.name}")
    dtype, weak = promote(a, b)
    return TensorType(dtype, _broadcast(cond, a, b), weak)


def _where_forward(call: Call, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _cast(call, (a, b))
    return np.where(cond, a, b)


register(
    OpDef(
        "where",
        "Elementwise choice: x where cond is true, y elsewhere, broadcasting.",
        ("cond", "x", "y"),
        _where_infer,
        _where_forward,
        lambda b, call, g: (None, b.where(call.inputs[0], g, 0), b.where(call.inputs[0], 0, g)),
        differentiable=(False, True, True),
    )
)


# ---------------------------------------------------------------------------------------------
# More elementwise functions


def _softplus(x: np.ndarray) -> np.ndarray:
    # log(1 + e^x) without overflow for large x.
    return np.logaddexp(0, x)


_unary("sin", "Sine.", np.sin, lambda b, x, out, g: b.mul(g, b.cos(x)), cost=pass_cost(1, 1))
_unary(
    "cos",
    "Cosine.",
    np.cos,
    lambda b, x, out, g: b.neg(b.mul(g, b.sin(x))),
    cost=pass_cost(1, 1.5),
)
_unary(
    "log1p",
    "log(1 + x), accurate near 0.",
    np.log1p,
    lambda b, x, out, g: b.div(g, b.add(x, 1)),
    cost=pass_cost(1, 1.5),
)
_unary(
    "expm1",
    "e ** x - 1, accurate near 0.",
    np.expm1,
    lambda b, x, out, g: b.mul(g, b.add(out, 1)),
    cost=pass_cost(1, 2),
)
_unary(
    "softplus",
    "log(1 + e ** x), computed without overflow.",
    _softplus,
    lambda b, x, out, g: b.mul(g, b.sigmoid(x)),
    cost=pass_cost(1, 3),  # logaddexp: an exp and a log1p, and their branches
)
_unary(
    "reciprocal",
    "1 / x.",
    np.reciprocal,
    lambda b, x, out, g: b.neg(b.mul(g, b.square(out))),
)


def _leaky_relu_infer(attrs, x: TensorType) -> TensorType:
    return TensorType(float_dtype(x.dtype), x.shape, x.weak)


def _leaky_relu_forward(call: Call, x: np.ndarray) -> np.ndarray:
    (x,) = _cast(call, (x,))
    return np.where(x > 0, x, x * call.type.dtype.type(call.attrs["alpha"]))


register(
    OpDef(
        "leaky_relu",
        "x where x > 0, alpha * x elsewhere (the gradient at 0 is alpha).",
        ("x",),
        _leaky_relu_infer,
        _leaky_relu_forward,
        lambda b, call, g: (
            b.where(b.greater(call.inputs[0], 0), g, b.mul(g, call.attrs["alpha"])),
        ),
        attrs=(AttrSpec("alpha", "float", 0.01, "Slope for x <= 0."),),
        cost=pass_cost(4),  # a comparison, a product and a where
    )
)


def _clip_forward(call: Call, x: np.ndarray) -> np.ndarray:
    (x,) = _cast(call, (x,))
    low, high = call.attrs["min"], call.attrs["max"]
    return np.clip(x, -np.inf if low is None else low, np.inf if high is None else high).astype(
        call.type.dtype, copy=False
    )


def _clip_grad(b: Emitter, call: GradCall, g: Ref):
    # The gradient passes where min <= x <= max (bounds included, as in PyTorch), 0 outside.
    x = call.inputs[0]
    low, high = call.attrs["min"], call.attrs["max"]
    inside = None
    if low is not None:
        inside = b.greater_equal(x, low)
    if high is not None:
        below = b.less_equal(x, high)
        inside = below if inside is None else b.logical_and(inside, below)
    return (g if inside is None else b.where(inside, g, 0),)


register(
    OpDef(
        "clip",
        "x limited to [min, max]; the gradient is 0 outside the bounds.",
        ("x",),
        lambda attrs, x: TensorType(_numeric("clip", x.dtype), x.shape, x.weak),
        _clip_forward,
        _clip_grad,
        attrs=(
            AttrSpec("min", "float", None, "Lower bound; none for no bound."),
            AttrSpec("max", "float", None, "Upper bound; none for no bound."),
        ),
    )
)


# ---------------------------------------------------------------------------------------------
# Logic


def _logical(name: str, doc: str, fn: Callable[..., np.ndarray], arity: int) -> OpDef:
    def infer(attrs, *types: TensorType) -> TensorType:
        if any(t.dtype.kind != "b" for t in types):
            raise ShapeError(f"{name} takes bool operands; compare or cast first")
        return TensorType(np.dtype(bool), _broadcast(*types))

    operands = ("x", "y")[:arity]
    return register(OpDef(name, doc, operands, infer, lambda call, *xs: fn(*xs)))


_logical("logical_and", "x and y (bool), broadcasting.", np.logical_and, 2)
_logical("logical_or", "x or y (bool), broadcasting.", np.logical_or, 2)
_logical("logical_not", "not x (bool).", np.logical_not, 1)
