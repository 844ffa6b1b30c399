"""Gradient conformance, table-driven: every op of the op table against an independent truth.

- ROWS: one row per op, attribute variant and operand shapes (with broadcasting), plus fan-out
  graphs. The server's vector-Jacobian product (through the real gRPC client) must match
  central finite differences of sum(seed * output) in float64, its value must match numpy (or
  a loop-based numpy reference for the windowed ops), and every node's gradient must have that
  node's shape and dtype.
- Exact values where finite differences do not apply: kinks and ties (relu, abs, maximum, max,
  min, max_pool2d), 0 ** 0, zeros of prod and norm, the edges of sqrt and log, saturation at
  logits of +-1000, and paths through integer or bool nodes.
- Casts, float32 graphs and mixed precision.
- Ops without gradients (sources, comparisons, logic, arg reductions, one_hot), and a coverage
  check that every op in OPS, read at test time, has a row here or a reason in
  NOT_DIFFERENTIABLE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from gradcheck import (
    NOT_DIFFERENTIABLE,
    Domain,
    avg_pool2d_grad_ref,
    avg_pool2d_ref,
    boolean,
    conv2d_input_grad_ref,
    conv2d_ref,
    conv2d_weight_grad_ref,
    distinct,
    distinct_shifted,
    integers,
    max_pool2d_gather_ref,
    max_pool2d_grad_ref,
    max_pool2d_ref,
    nonzero,
    numerical_vjp,
    positive,
    real,
    rng_for,
)

from gradient_client import GradientError, Graph
from gradient_client.graph import Node
from gradient_server.ops import OPS

RTOL = 1e-6
ATOL = 1e-6
"""Analytic gradients against central differences (eps 1e-6, float64)."""

VALUE_TOL = 1e-12
"""Forward values against numpy."""

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# The table


def _axes(axis: Any) -> Any:
    return tuple(axis) if isinstance(axis, list) else axis


def _reduction_ref(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda x, axis=None, keepdims=False: fn(x, axis=_axes(axis), keepdims=keepdims)


def _sum_to_shape_ref(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    total = x.sum(axis=tuple(range(x.ndim - len(shape))))
    for axis, size in enumerate(shape):
        if size == 1:
            total = total.sum(axis=axis, keepdims=True)
    return total.reshape(shape)


def _logsumexp_ref(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    shift = np.max(x, axis=_axes(axis), keepdims=True)
    total = np.log(np.sum(np.exp(x - shift), axis=_axes(axis), keepdims=True)) + shift
    return total if keepdims else np.squeeze(total, axis=_axes(axis))


def _softmax_ref(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax_ref(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x - _logsumexp_ref(x, axis=axis, keepdims=True)


def _cross_entropy_ref(
    logits: np.ndarray, labels: np.ndarray, reduction: str = "mean", label_smoothing: float = 0.0
):
    # The target distribution: one-hot rows for class indices, the labels themselves for
    # probabilities; smoothed towards the uniform one, -sum(target * log_softmax) per row.
    classes = logits.shape[-1]
    if labels.dtype.kind == "f":
        target = labels
    else:
        target = (labels[..., None] == np.arange(classes)).astype(np.float64)
    target = (1 - label_smoothing) * target + label_smoothing / classes
    losses = -np.sum(target * _log_softmax_ref(logits, axis=-1), axis=-1)
    return {"mean": np.mean, "sum": np.sum, "none": np.asarray}[reduction](losses)


def probabilities(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of class probabilities (softmax of normal draws) along the last axis."""
    return _softmax_ref(rng.standard_normal(shape), axis=-1)


def _flatten_ref(x: np.ndarray, start_axis: int = 0, end_axis: int = -1) -> np.ndarray:
    shape = x.shape or (1,)
    start, end = start_axis % len(shape), end_axis % len(shape)
    return x.reshape((*shape[:start], -1, *shape[end + 1 :]))


def _slices_ref(rank, starts, stops, steps=None, axes=None) -> tuple[slice, ...]:
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    chosen = [slice(None)] * rank
    for axis, start, stop, step in zip(axes, starts, stops, steps, strict=True):
        chosen[axis] = slice(start, stop, step)
    return tuple(chosen)


def _unslice_ref(x: np.ndarray, shape, starts, stops, steps=None, axes=None) -> np.ndarray:
    out = np.zeros(shape)
    out[_slices_ref(len(shape), starts, stops, steps, axes)] = x
    return out


def _pad_ref(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    if not x.ndim:  # a scalar has no axis to pad
        return x.copy()
    widths = [(pads[2 * i], pads[2 * i + 1]) for i in range(x.ndim)]
    return np.pad(x, widths, constant_values=value)


def _scatter_add_ref(updates: np.ndarray, indices: np.ndarray, shape, axis: int = 0):
    out = np.zeros(shape)
    lead = (slice(None),) * (axis % len(shape))
    for position in np.ndindex(indices.shape):
        out[(*lead, indices[position])] += updates[(*lead, *position)]
    return out


def _clip_ref(x: np.ndarray, min: float | None = None, max: float | None = None):
    return np.clip(x, -np.inf if min is None else min, np.inf if max is None else max)


NUMPY: dict[str, Callable[..., np.ndarray]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "square": np.square,
    "abs": np.abs,
    "sign": np.sign,
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "relu": lambda x: np.where(x > 0, x, 0.0),
    "where": np.where,
    "matmul": np.matmul,
    "sum": _reduction_ref(np.sum),
    "mean": _reduction_ref(np.mean),
    "max": _reduction_ref(np.max),
    "transpose": lambda x, axes=None: np.transpose(x, axes),
    "reshape": lambda x, shape: np.reshape(x, shape),
    "broadcast_to": lambda x, shape: np.broadcast_to(x, shape),
    "sum_to_shape": _sum_to_shape_ref,
    "cast": lambda x, dtype: x.astype(dtype),
    "sin": np.sin,
    "cos": np.cos,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "softplus": lambda x: np.log1p(np.exp(x)),
    "reciprocal": lambda x: 1 / x,
    "leaky_relu": lambda x, alpha=0.01: np.where(x > 0, x, alpha * x),
    "clip": _clip_ref,
    "min": _reduction_ref(np.min),
    "prod": _reduction_ref(np.prod),
    "prod_others": lambda x, axis=-1: np.prod(x, axis=axis, keepdims=True) / x,
    "logsumexp": _logsumexp_ref,
    "var": lambda x, axis=None, keepdims=False, ddof=0: np.var(
        x, axis=_axes(axis), keepdims=keepdims, ddof=ddof
    ),
    "norm": lambda x, axis=None, keepdims=False: np.sqrt(
        np.sum(x * x, axis=_axes(axis), keepdims=keepdims)
    ),
    "expand_dims": lambda x, axis: np.expand_dims(x, _axes(axis)),
    "squeeze": lambda x, axis=None: np.squeeze(x, _axes(axis)),
    "flatten": _flatten_ref,
    "slice": lambda x, **attrs: x[_slices_ref(x.ndim, **attrs)],
    "unslice": _unslice_ref,
    "pad": _pad_ref,
    "concat": lambda *xs, axis=0: np.concatenate(xs, axis=axis),
    "stack": lambda *xs, axis=0: np.stack(xs, axis=axis),
    "take": lambda x, indices, axis=0: np.take(x, indices, axis=axis),
    "scatter_add": _scatter_add_ref,
    "softmax": _softmax_ref,
    "log_softmax": _log_softmax_ref,
    "cross_entropy": _cross_entropy_ref,
    "conv2d": conv2d_ref,
    "conv2d_input_grad": conv2d_input_grad_ref,
    "conv2d_weight_grad": conv2d_weight_grad_ref,
    "avg_pool2d": avg_pool2d_ref,
    "avg_pool2d_grad": avg_pool2d_grad_ref,
    "max_pool2d": max_pool2d_ref,
    "max_pool2d_grad": max_pool2d_grad_ref,
    "max_pool2d_gather": max_pool2d_gather_ref,
}
"""numpy's value of each op, the truth for forward values."""


@dataclass(frozen=True)
class Row:
    """One gradient check: operand shapes and domains, and how to build the output from them."""

    id: str
    shapes: tuple[Shape, ...]
    domains: tuple[Domain, ...]
    build: Callable[..., Node]
    """(graph, *operand input nodes) -> the output node."""
    op: str | None = None
    """The op under test; None for a graph of several ops (fan-out rows)."""
    reference: Callable[..., np.ndarray] | None = None
    """numpy's value of the output given the operand values."""


def _shape_id(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _attr_id(name: str, value: Any) -> str:
    if value is True:
        return name
    if name == "shape":
        return f"to-{_shape_id(value)}"
    if isinstance(value, list):
        return f"{name}={','.join(str(v) for v in value)}"
    return f"{name}={value}"


def op_row(
    op: str, shapes: Sequence[Shape], domains: Domain | Sequence[Domain] = real, **attrs: Any
) -> Row:
    """A row applying one op, with attributes `attrs`, to operands of `shapes`."""
    shapes = tuple(tuple(s) for s in shapes)
    if callable(domains):
        domains = (domains,) * len(shapes)
    parts = [op, *(_shape_id(s) for s in shapes)]
    parts += [_attr_id(k, v) for k, v in attrs.items() if v is not None and v is not False]
    reference = NUMPY[op]
    return Row(
        id="-".join(parts),
        shapes=shapes,
        domains=tuple(domains),
        build=lambda g, *xs: g.op(op, *xs, name="out", **attrs),
        op=op,
        reference=lambda *arrays: reference(*arrays, **attrs),
    )


def graph_row(
    id: str, shapes: Sequence[Shape], build: Callable[..., Node], domains: Domain | Sequence = real
) -> Row:
    """A row for a graph of several ops (fan-out: a node used more than once)."""
    shapes = tuple(tuple(s) for s in shapes)
    if callable(domains):
        domains = (domains,) * len(shapes)
    return Row(id=id, shapes=shapes, domains=tuple(domains), build=build)


UNARY_DOMAINS: dict[str, Domain] = {
    "neg": real,
    "exp": real,
    "log": positive,
    "sqrt": positive,
    "square": real,
    "abs": nonzero,  # away from the kink at 0
    "sign": nonzero,  # away from the jump at 0 (the gradient is 0 everywhere else)
    "tanh": real,
    "sigmoid": real,
    "relu": nonzero,
    "sin": real,
    "cos": real,
    "log1p": positive,
    "expm1": real,
    "softplus": real,
    "reciprocal": nonzero,
    "leaky_relu": nonzero,  # away from the kink at 0
}
UNARY_SHAPES: list[Shape] = [(), (3,), (2, 3)]

BINARY_DOMAINS: dict[str, tuple[Domain, Domain]] = {
    "add": (real, real),
    "sub": (real, real),
    "mul": (real, real),
    "div": (real, nonzero),
    "pow": (positive, real),
    # No ties between the operands: each pair differs by at least 0.15.
    "maximum": (distinct, distinct_shifted),
    "minimum": (distinct, distinct_shifted),
}
BINARY_SHAPES: list[tuple[Shape, Shape]] = [
    ((), (3,)),
    ((3,), ()),
    ((2, 3), (1, 3)),
    ((4, 1), (1, 3)),
    ((2, 3), (2, 3)),
]

REDUCTION_DOMAINS: dict[str, Domain] = {
    "sum": real,
    "mean": real,
    "max": distinct,  # no ties
    "min": distinct,
    "prod": nonzero,
    "logsumexp": real,
    "var": real,
    "norm": real,
}
REDUCTION_SHAPES: list[Shape] = [(2, 3), (2, 3, 4)]
REDUCTION_AXES: list[Any] = [None, 0, -1, [0, 1]]

WHERE_SHAPES: list[tuple[Shape, Shape, Shape]] = [
    ((2, 3), (2, 3), (2, 3)),
    ((2, 3), (3,), ()),
    ((3,), (2, 1), (2, 3)),
    ((), (2, 3), (1, 3)),
]

MATMUL_SHAPES: list[tuple[Shape, Shape]] = [
    ((3,), (3,)),
    ((2, 3), (3,)),
    ((3,), (3, 4)),
    ((2, 3), (3, 4)),
    ((5, 2, 3), (3, 4)),
    ((2, 3), (5, 3, 4)),
    ((1, 2, 3), (4, 3, 2)),
    ((3,), (5, 3, 4)),
    ((5, 2, 3), (3,)),
]

OP_ROWS: list[Row] = [
    *(
        op_row(op, [shape], domain)
        for op, domain in UNARY_DOMAINS.items()
        for shape in UNARY_SHAPES
    ),
    *(
        op_row(op, shapes, domains)
        for op, domains in BINARY_DOMAINS.items()
        for shapes in BINARY_SHAPES
    ),
    *(op_row("where", shapes, (boolean, real, real)) for shapes in WHERE_SHAPES),
    *(
        op_row(op, [shape], domain, axis=axis, keepdims=keepdims)
        for op, domain in REDUCTION_DOMAINS.items()
        for shape in REDUCTION_SHAPES
        for axis in REDUCTION_AXES
        for keepdims in (False, True)
    ),
    *(op_row(op, [()], domain) for op, domain in REDUCTION_DOMAINS.items()),
    *(op_row("matmul", shapes) for shapes in MATMUL_SHAPES),
    op_row("prod_others", [(4,)], nonzero),
    op_row("prod_others", [(2, 3, 4)], nonzero, axis=1),
    op_row("transpose", [(2, 3)]),
    op_row("transpose", [(3,)]),
    op_row("transpose", [(2, 3, 4)]),
    op_row("transpose", [(2, 3, 4)], axes=[1, 0, 2]),
    op_row("transpose", [(2, 3, 4)], axes=[2, 0, 1]),
    op_row("transpose", [(2, 3, 4)], axes=[-1, 0, 1]),
    op_row("reshape", [(2, 3)], shape=[3, -1]),
    op_row("reshape", [(2, 3, 4)], shape=[-1]),
    op_row("reshape", [(2, 3, 4)], shape=[4, -1, 2]),
    op_row("reshape", [(6,)], shape=[2, -1, 1]),
    op_row("reshape", [()], shape=[1, 1]),
    op_row("broadcast_to", [(3,)], shape=[2, 3]),
    op_row("broadcast_to", [(2, 1)], shape=[2, 3]),
    op_row("broadcast_to", [()], shape=[2, 3]),
    op_row("broadcast_to", [(1, 3)], shape=[4, 2, 3]),
    op_row("broadcast_to", [(2, 3)], shape=[2, 3]),
    op_row("sum_to_shape", [(2, 3)], shape=[3]),
    op_row("sum_to_shape", [(2, 3)], shape=[2, 1]),
    op_row("sum_to_shape", [(2, 3)], shape=[]),
    op_row("sum_to_shape", [(4, 2, 3)], shape=[1, 3]),
    op_row("sum_to_shape", [(2, 3)], shape=[2, 3]),
    # float64 -> float64 is the only cast finite differences can check; the float32 paths
    # are checked exactly in test_cast_gradient_is_the_seed_cast_back.
    op_row("cast", [(2, 3)], dtype="float64"),
    op_row("leaky_relu", [(2, 3)], nonzero, alpha=0.2),
    # Bounds on the grid 0.3·k, operands on 0.3·k + 0.15: never within 0.15 of a bound.
    op_row("clip", [(2, 3)], distinct_shifted, min=-0.3, max=0.6),
    op_row("clip", [(2, 3)], distinct_shifted, min=-0.3),
    op_row("clip", [(2, 3)], distinct_shifted, max=0.3),
    op_row("clip", [(3,)], distinct_shifted),
    op_row("var", [(2, 3)], real, axis=0, ddof=1),
    op_row("var", [(2, 3, 4)], real, axis=[0, 2], keepdims=True, ddof=1),
    op_row("expand_dims", [(2, 3)], axis=0),
    op_row("expand_dims", [(2, 3)], axis=[-1]),
    op_row("expand_dims", [(2, 3)], axis=[0, 2]),
    op_row("expand_dims", [()], axis=0),
    op_row("squeeze", [(1, 3, 1)]),
    op_row("squeeze", [(1, 3, 1)], axis=[0]),
    op_row("squeeze", [(1, 3, 1)], axis=-1),
    op_row("squeeze", [(1,)]),
    op_row("flatten", [(2, 3, 4)]),
    op_row("flatten", [(2, 3, 4)], start_axis=1),
    op_row("flatten", [(2, 3, 4)], start_axis=0, end_axis=1),
    op_row("flatten", [()]),
    op_row("slice", [(5,)], starts=[1], stops=[4]),
    op_row("slice", [(4, 5)], starts=[1, 0], stops=[3, 5], steps=[1, 2]),
    op_row("slice", [(4, 5)], starts=[-3], stops=[-1], axes=[1]),
    op_row("slice", [(6,)], starts=[-1], stops=[-7], steps=[-2]),
    op_row("slice", [(2, 3, 4)], starts=[3, 0], stops=[0, 2], steps=[-1, 1], axes=[-1, 0]),
    op_row("unslice", [(2,)], shape=[5], starts=[1], stops=[5], steps=[2]),
    op_row("unslice", [(2, 3)], shape=[4, 3], starts=[1], stops=[3]),
    op_row("unslice", [(4, 2)], shape=[4, 5], starts=[4], stops=[0], steps=[-3], axes=[1]),
    op_row("pad", [()], pads=[]),
    op_row("pad", [(3,)], pads=[1, 2]),
    op_row("pad", [(2, 3)], pads=[0, 1, 2, 0], value=1.5),
    op_row("concat", [(2, 3), (1, 3)]),
    op_row("concat", [(2, 1), (2, 3), (2, 2)], axis=-1),
    op_row("concat", [(3,)]),
    op_row("stack", [(3,), (3,)]),
    op_row("stack", [(2, 3), (2, 3), (2, 3)], axis=-1),
    op_row("stack", [(), ()]),
    # Repeated indices: the gradient of a repeated element accumulates.
    op_row("take", [(4, 3), (5,)], (real, integers(-4, 4))),
    op_row("take", [(2, 3), (2, 2)], (real, integers(0, 3)), axis=1),
    op_row("take", [(4, 3), ()], (real, integers(0, 4)), axis=-2),
    op_row("scatter_add", [(5, 3), (5,)], (real, integers(0, 4)), shape=[4, 3]),
    op_row("scatter_add", [(2, 2, 2), (2,)], (real, integers(-3, 3)), shape=[2, 3, 2], axis=1),
    op_row("softmax", [(2, 3)]),
    op_row("softmax", [(2, 3)], axis=0),
    op_row("softmax", [(4,)]),
    op_row("softmax", [(2, 3, 4)], axis=1),
    op_row("log_softmax", [(2, 3)]),
    op_row("log_softmax", [(2, 3)], axis=0),
    op_row("log_softmax", [(2, 3, 4)], axis=1),
    op_row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3))),
    op_row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3)), reduction="sum"),
    op_row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3)), reduction="none"),
    op_row("cross_entropy", [(2, 3, 5), (2, 3)], (real, integers(0, 5))),
    op_row("cross_entropy", [(5,), ()], (real, integers(0, 5))),
    op_row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3)), label_smoothing=0.2),
    op_row(
        "cross_entropy",
        [(2, 3, 5), (2, 3)],
        (real, integers(0, 5)),
        reduction="none",
        label_smoothing=1.0,
    ),
    op_row("cross_entropy", [(4, 3), (4, 3)], (real, probabilities)),
    op_row("cross_entropy", [(4, 3), (4, 3)], (real, probabilities), reduction="sum"),
    op_row("cross_entropy", [(4, 3), (4, 3)], (real, probabilities), reduction="none"),
    op_row("cross_entropy", [(2, 3, 5), (2, 3, 5)], (real, real), label_smoothing=0.1),
    op_row("cross_entropy", [(5,), (5,)], (real, probabilities), reduction="sum"),
    op_row(
        "cross_entropy",
        [(4, 3), (4, 3)],
        (real, probabilities),
        reduction="none",
        label_smoothing=0.3,
    ),
    op_row("conv2d", [(2, 2, 5, 5), (3, 2, 3, 3)]),
    op_row("conv2d", [(1, 2, 5, 5), (3, 2, 3, 3)], stride=[2], padding=[1]),
    op_row("conv2d", [(1, 2, 6, 5), (2, 2, 2, 3)], stride=[1, 2], padding=[1, 0], dilation=[2]),
    op_row("conv2d", [(1, 1, 4, 4), (1, 1, 1, 1)]),
    op_row("conv2d_input_grad", [(1, 3, 3, 3), (3, 2, 3, 3)], input_shape=[1, 2, 5, 5]),
    op_row(
        "conv2d_input_grad",
        [(1, 3, 3, 3), (3, 2, 3, 3)],
        input_shape=[1, 2, 5, 5],
        stride=[2],
        padding=[1],
    ),
    op_row("conv2d_weight_grad", [(1, 2, 5, 5), (1, 3, 3, 3)], weight_shape=[3, 2, 3, 3]),
    op_row(
        "conv2d_weight_grad",
        [(2, 2, 6, 5), (2, 2, 6, 1)],
        weight_shape=[2, 2, 2, 3],
        stride=[1, 2],
        padding=[1, 0],
        dilation=[2],
    ),
    op_row("avg_pool2d", [(2, 2, 4, 4)], kernel=[2]),
    op_row("avg_pool2d", [(1, 2, 4, 4)], kernel=[3], stride=[1], padding=[1]),
    op_row("avg_pool2d", [(1, 2, 5, 4)], kernel=[2, 3], stride=[2, 1], padding=[1]),
    op_row("avg_pool2d_grad", [(1, 2, 2, 2)], input_shape=[1, 2, 4, 4], kernel=[2]),
    op_row(
        "avg_pool2d_grad",
        [(1, 2, 4, 4)],
        input_shape=[1, 2, 4, 4],
        kernel=[3],
        stride=[1],
        padding=[1],
    ),
    # No ties inside a window, so the routing is constant under the finite differences.
    op_row("max_pool2d", [(2, 2, 4, 4)], distinct, kernel=[2]),
    op_row("max_pool2d", [(1, 2, 4, 4)], distinct, kernel=[3], stride=[1], padding=[1]),
    op_row("max_pool2d", [(1, 2, 5, 4)], distinct, kernel=[2, 3], stride=[2, 1], padding=[1]),
    # x only routes: its gradient is 0 (finite differences agree); g and u are linear.
    op_row("max_pool2d_grad", [(1, 2, 4, 4), (1, 2, 2, 2)], (distinct, real), kernel=[2]),
    op_row(
        "max_pool2d_grad",
        [(1, 2, 4, 4), (1, 2, 4, 4)],
        (distinct, real),
        kernel=[3],
        stride=[1],
        padding=[1],
    ),
    op_row("max_pool2d_gather", [(1, 2, 4, 4), (1, 2, 4, 4)], (distinct, real), kernel=[2]),
    op_row(
        "max_pool2d_gather",
        [(1, 2, 4, 4), (1, 2, 4, 4)],
        (distinct, real),
        kernel=[3],
        stride=[1],
        padding=[1],
    ),
]


def _log_softmax(g: Graph, x: Node) -> Node:
    return g.sub(x, g.log(g.sum(g.exp(x), axis=-1, keepdims=True)))


def _softmax(g: Graph, x: Node) -> Node:
    e = g.exp(g.sub(x, g.max(x, axis=-1, keepdims=True)))
    return g.div(e, g.sum(e, axis=-1, keepdims=True))


def _variance(g: Graph, x: Node) -> Node:
    centered = g.sub(x, g.mean(x, axis=0, keepdims=True))
    return g.mean(g.square(centered), axis=0)


FANOUT_ROWS: list[Row] = [
    graph_row("mul(x,x)", [(3,)], lambda g, x: g.mul(x, x)),
    graph_row("add(exp(x),x)", [(2, 3)], lambda g, x: g.add(g.exp(x), x)),
    graph_row("mul(tanh(x),sigmoid(x))", [(2, 3)], lambda g, x: g.mul(g.tanh(x), g.sigmoid(x))),
    graph_row("mul(add(mul(x,x),x),x)", [(3,)], lambda g, x: g.mul(g.add(g.mul(x, x), x), x)),
    graph_row(
        "diamond-add(mul(e,e),e)-e=exp(x)",
        [(2, 3)],
        lambda g, x: (lambda e: g.add(g.mul(e, e), e))(g.exp(x)),
    ),
    graph_row("matmul(W,transpose(W))", [(2, 3)], lambda g, w: g.matmul(w, g.transpose(w))),
    graph_row(
        "matmul(transpose(W),W)-batched",
        [(2, 3, 4)],
        lambda g, w: g.matmul(g.transpose(w, [0, 2, 1]), w),
    ),
    graph_row("matmul(x,x)", [(3, 3)], lambda g, x: g.matmul(x, x)),
    graph_row("add(x,mul(x,y))-broadcast", [(3,), (2, 3)], lambda g, x, y: g.add(x, g.mul(x, y))),
    graph_row(
        "mul(add(x,y),sub(x,y))", [(2, 3), (3,)], lambda g, x, y: g.mul(g.add(x, y), g.sub(x, y))
    ),
    graph_row(
        "add(x,reshape(transpose(x)))",
        [(2, 2)],
        lambda g, x: g.add(x, g.reshape(g.transpose(x), [2, 2])),
    ),
    graph_row("pow(x,x)", [(3,)], lambda g, x: g.pow(x, x), positive),
    graph_row("maximum(x,neg(x))", [(2, 3)], lambda g, x: g.maximum(x, g.neg(x)), nonzero),
    graph_row(
        "where(x>0,x,0.1x)",
        [(2, 3)],
        lambda g, x: g.where(g.greater(x, 0.0), x, g.mul(x, 0.1)),
        nonzero,
    ),
    graph_row("x/sqrt(sum(x*x))", [(4,)], lambda g, x: g.div(x, g.sqrt(g.sum(g.mul(x, x))))),
    graph_row("log_softmax", [(2, 3)], _log_softmax),
    graph_row("softmax-max-shifted", [(2, 3)], _softmax, distinct),
    graph_row("variance", [(4, 3)], _variance),
    graph_row(
        "lecture-sum(square(matmul(W,x)))",
        [(2, 2), (2,)],
        lambda g, w, x: g.sum(g.square(g.matmul(w, x))),
    ),
    graph_row(
        "mlp-tanh-layer-shared-W",
        [(3, 3), (2, 3)],
        lambda g, w, x: g.matmul(g.tanh(g.matmul(x, w)), w),
    ),
]

ROWS: list[Row] = OP_ROWS + FANOUT_ROWS


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_gradient_matches_finite_differences(client, engine, row):
    rng = rng_for(row.id)
    g = Graph()
    operands = [g.input(f"x{i}") for i in range(len(row.shapes))]
    out = row.build(g, *operands)
    feeds = {
        node.name: domain(rng, shape)
        for node, domain, shape in zip(operands, row.domains, row.shapes, strict=True)
    }
    float_names = [name for name, value in feeds.items() if value.dtype == np.float64]
    graph = engine.load_graph(g.to_proto())
    out_shape = engine.forward(graph, feeds, fetch=[out.name])[out.name].shape
    seed = np.asarray(rng.standard_normal(out_shape), dtype=np.float64)

    # Every node's gradient (the default): each float node's has that node's shape and dtype.
    result = client.gradient(g, output=out, inputs=feeds, seed=seed)

    value = result.values[out.name]
    assert value.dtype == np.float64
    if row.reference is not None:
        expected_value = row.reference(*feeds.values())
        assert value.shape == expected_value.shape
        np.testing.assert_allclose(value, expected_value, rtol=VALUE_TOL, atol=VALUE_TOL)
    for name, node_value in result.values.items():
        if node_value.dtype.kind == "f":
            assert result.gradients[name].shape == node_value.shape, name
            assert result.gradients[name].dtype == node_value.dtype, name
        else:
            assert name not in result.gradients and name in result.skipped, name
    expected = numerical_vjp(engine, graph, feeds, out.name, seed, float_names)
    for name in float_names:
        gradient = result.gradients[name]
        assert gradient.shape == feeds[name].shape, name
        assert gradient.dtype == feeds[name].dtype, name
        np.testing.assert_allclose(
            gradient, expected[name], rtol=RTOL, atol=ATOL, err_msg=f"gradient of {name}"
        )


def _one_row_per_op() -> list[Row]:
    seen: dict[str, Row] = {}
    for row in OP_ROWS:
        if row.op is not None and row.op not in seen:
            seen[row.op] = row
    return list(seen.values())


@pytest.mark.parametrize("row", _one_row_per_op(), ids=lambda row: row.id)
def test_check_gradient_rpc_passes_for_every_op(client, engine, row):
    """The server's own CheckGradient agrees, op by op, at the rows' random points."""
    rng = rng_for("check-" + row.id)
    g = Graph()
    operands = [g.input(f"x{i}") for i in range(len(row.shapes))]
    out = row.build(g, *operands)
    feeds = {
        node.name: domain(rng, shape)
        for node, domain, shape in zip(operands, row.domains, row.shapes, strict=True)
    }
    out_shape = engine.forward(engine.load_graph(g.to_proto()), feeds, [out.name])[out.name].shape
    report = client.check_gradient(g, out, feeds, seed=rng.standard_normal(out_shape))
    float_inputs = {name for name, value in feeds.items() if value.dtype.kind == "f"}
    assert report.passed, report
    assert set(report.nodes) == float_inputs
    assert all(check.checked == feeds[name].size for name, check in report.nodes.items())


# ---------------------------------------------------------------------------------------------
# Exact values at points where finite differences are not valid


def _exact(
    id: str,
    build: Callable[..., Node],
    inputs: Sequence[Any],
    gradients: Sequence[Any],
    seed: Any = None,
):
    return pytest.param(build, inputs, seed, gradients, id=id)


EXACT_CASES = [
    # relu'(0) = 0 and abs'(0) = 0, as in PyTorch and JAX.
    _exact("relu-at-0", lambda g, x: g.relu(x), [[-1.5, 0.0, 2.0]], [[0, 0, 4]], [2.0, 3.0, 4.0]),
    _exact("relu-at-0-scalar", lambda g, x: g.relu(x), [0.0], [0.0]),
    _exact(
        "relu(x)-relu(-x)-at-0",
        lambda g, x: g.sub(g.relu(x), g.relu(g.neg(x))),
        [[-1.0, 0.0, 1.0]],
        [[1, 0, 1]],
        [1.0, 1.0, 1.0],
    ),
    _exact("abs-at-0", lambda g, x: g.abs(x), [[-1.5, 0.0, 2.0]], [[-2, 0, 4]], [2.0, 3.0, 4.0]),
    _exact(
        "sign-gradient-is-0", lambda g, x: g.sign(x), [[-1.0, 0.0, 2.0]], [[0, 0, 0]], [1.0] * 3
    ),
    # Ties split the upstream gradient evenly between maximum's / minimum's operands.
    _exact(
        "maximum-ties",
        lambda g, x, y: g.maximum(x, y),
        [[1.0, 2.0, 3.0], [1.0, 0.0, 3.0]],
        [[1, 2, 1], [1, 0, 1]],
        [2.0, 2.0, 2.0],
    ),
    _exact(
        "minimum-ties",
        lambda g, x, y: g.minimum(x, y),
        [[1.0, 2.0, 3.0], [1.0, 5.0, 3.0]],
        [[1, 2, 1], [1, 0, 1]],
        [2.0, 2.0, 2.0],
    ),
    _exact(
        "maximum-ties-broadcast-scalar",
        lambda g, x, y: g.maximum(x, y),
        [[1.0, 2.0, 3.0], 2.0],
        [[0, 0.5, 1], 1.5],
        [1.0, 1.0, 1.0],
    ),
    _exact(
        "minimum-ties-broadcast-column",
        lambda g, x, y: g.minimum(x, y),
        [[[1.0, 2.0], [3.0, 4.0]], [[2.0], [3.0]]],
        [[[1, 0.5], [0.5, 0]], [[0.5], [1.5]]],
        [[1.0, 1.0], [1.0, 1.0]],
    ),
    _exact("maximum(x,x)", lambda g, x: g.maximum(x, x), [[1.0, -2.0]], [[3, 4]], [3.0, 4.0]),
    # Tied maxima of a reduction share the gradient evenly.
    _exact(
        "max-ties-axis=1",
        lambda g, x: g.max(x, axis=1),
        [[[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]],
        [[[0, 3, 3], [1, 1, 1]]],
        [6.0, 3.0],
    ),
    _exact(
        "max-ties-axis=0-keepdims",
        lambda g, x: g.max(x, axis=0, keepdims=True),
        [[[1.0, 2.0], [1.0, 0.0]]],
        [[[2, 6], [2, 0]]],
        [[4.0, 6.0]],
    ),
    _exact(
        "max-ties-all-axes",
        lambda g, x: g.max(x),
        [[3.0, 1.0, 3.0, 3.0]],
        [[1 / 3, 0, 1 / 3, 1 / 3]],
    ),
    _exact(
        "max-all-equal-2x2",
        lambda g, x: g.max(x),
        [[[5.0, 5.0], [5.0, 5.0]]],
        [[[0.25, 0.25], [0.25, 0.25]]],
    ),
    _exact("max-of-scalar", lambda g, x: g.max(x), [5.0], [1.0]),
    # 0 ** 0: d/dx is taken as 0 (not 0 * 0 ** -1 = nan), d/dy as 0 (the limit, as JAX).
    _exact("pow-0**0", lambda g, x, y: g.pow(x, y), [0.0, 0.0], [0.0, 0.0]),
    _exact("pow-0**1", lambda g, x, y: g.pow(x, y), [0.0, 1.0], [1.0, 0.0]),
    _exact("pow-0**2", lambda g, x, y: g.pow(x, y), [0.0, 2.0], [0.0, 0.0]),
    _exact(
        "pow-x**0-vector",
        lambda g, x, y: g.pow(x, y),
        [[0.0, 2.0, 0.5], 0.0],
        [[0, 0, 0], -np.log(2.0)],
        [1.0, 1.0, 2.0],
    ),
    _exact(
        "pow-x**0-constant-exponent",
        lambda g, x: g.pow(x, 0.0),
        [[-3.0, 0.0, 2.0]],
        [[0, 0, 0]],
        [1.0, 1.0, 1.0],
    ),
    # A constant integer exponent: negative bases are fine (the log branch is not needed).
    _exact(
        "pow-negative-base-constant-exponent",
        lambda g, x: g.pow(x, 3.0),
        [[-2.0, -0.5, 0.0, 1.5]],
        [[12, 0.75, 0, 6.75]],
        [1.0] * 4,
    ),
    # The edges of sqrt and log: an infinite slope, as numpy, PyTorch and JAX give.
    _exact("sqrt-at-0-and-4", lambda g, x: g.sqrt(x), [[0.0, 4.0]], [[np.inf, 0.25]], [1.0, 1.0]),
    _exact(
        "log-at-0-1-4", lambda g, x: g.log(x), [[0.0, 1.0, 4.0]], [[np.inf, 1, 0.25]], [1.0] * 3
    ),
    _exact("exp-at-0", lambda g, x: g.exp(x), [0.0], [1.0]),
    # Saturation: finite (0), never nan, at logits of +-1000.
    _exact(
        "sigmoid-at-0-and-1000",
        lambda g, x: g.sigmoid(x),
        [[-1000.0, 0.0, 1000.0]],
        [[0, 0.25, 0]],
        [1.0] * 3,
    ),
    _exact(
        "tanh-at-0-and-1000",
        lambda g, x: g.tanh(x),
        [[-1000.0, 0.0, 1000.0]],
        [[0, 1, 0]],
        [1.0] * 3,
    ),
    _exact(
        "softplus-at-0-and-1000",
        lambda g, x: g.softplus(x),
        [[-1000.0, 0.0, 1000.0]],
        [[0, 0.5, 1]],
        [1.0] * 3,
    ),
    _exact(
        "logsumexp-at-1000",
        lambda g, x: g.op("logsumexp", x, axis=-1),
        [[[1000.0, 1000.0], [-1000.0, 0.0]]],
        [[[0.5, 0.5], [0.0, 1.0]]],
        [1.0, 1.0],
    ),
    _exact(
        "softmax-at-1000",
        lambda g, x: g.op("softmax", x),
        [[1000.0, -1000.0, 1000.0]],
        [[0.25, 0.0, -0.25]],
        [1.0, 0.0, 0.0],
    ),
    _exact(
        "log_softmax-at-1000",
        lambda g, x: g.op("log_softmax", x),
        [[1000.0, -1000.0]],
        [[-1.0, 1.0]],
        [0.0, 1.0],
    ),
    _exact(
        "cross_entropy-at-1000",
        lambda g, x: g.op("cross_entropy", x, g.constant(np.array([1, 0])), reduction="sum"),
        [[[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]]],
        [[[1.0, -1.0, 0.0], [-2 / 3, 1 / 3, 1 / 3]]],
    ),
    # leaky_relu'(0) = alpha (its declared convention); clip passes the gradient at its bounds.
    _exact(
        "leaky_relu-at-0",
        lambda g, x: g.op("leaky_relu", x, alpha=0.25),
        [[-1.0, 0.0, 2.0]],
        [[0.25, 0.25, 1.0]],
        [1.0] * 3,
    ),
    _exact(
        "clip-at-bounds",
        lambda g, x: g.op("clip", x, min=-0.5, max=0.5),
        [[-1.0, -0.5, 0.0, 0.5, 1.0]],
        [[0, 1, 1, 1, 0]],
        [1.0] * 5,
    ),
    # prod at zeros: one zero gets the product of the others, the others 0; two zeros, all 0.
    _exact("prod-one-zero", lambda g, x: g.op("prod", x), [[2.0, 0.0, 3.0]], [[0, 6, 0]]),
    _exact("prod-two-zeros", lambda g, x: g.op("prod", x), [[0.0, 0.0, 3.0]], [[0, 0, 0]]),
    _exact(
        "prod-zeros-axis=1",
        lambda g, x: g.op("prod", x, axis=1),
        [[[2.0, 0.0, 3.0], [1.0, 2.0, 4.0], [0.0, 5.0, 0.0]]],
        [[[0, 6, 0], [8, 4, 2], [0, 0, 0]]],
        [1.0, 1.0, 1.0],
    ),
    _exact("norm-at-origin", lambda g, x: g.op("norm", x), [[0.0, 0.0, 0.0]], [[0, 0, 0]]),
    _exact(
        "norm-at-origin-axis=1",
        lambda g, x: g.op("norm", x, axis=1),
        [[[0.0, 0.0], [3.0, 4.0]]],
        [[[0, 0], [0.6, 0.8]]],
        [1.0, 1.0],
    ),
    _exact(
        "min-ties-axis=1",
        lambda g, x: g.op("min", x, axis=1),
        [[[1.0, 1.0, 3.0], [2.0, 0.0, 2.0]]],
        [[[1, 1, 0], [0, 2, 0]]],
        [2.0, 2.0],
    ),
    _exact(
        "max_pool2d-ties",
        lambda g, x: g.op("max_pool2d", x, kernel=[2]),
        [np.array([[[[1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 2.0]]]])],
        [np.array([[[[4 / 3, 4 / 3, 0.0, 4.0], [4 / 3, 0.0, 4.0, 4.0]]]])],
        np.array([[[[4.0, 12.0]]]]),
    ),
    _exact(
        "take-repeated-indices",
        lambda g, x: g.op("take", x, g.constant(np.array([0, 0, -1]))),
        [[10.0, 20.0, 30.0]],
        [[3, 0, 3]],
        [1.0, 2.0, 3.0],
    ),
    _exact(
        "where-routes-by-cond",
        lambda g, x, y: g.where(g.constant(np.array([True, False, True])), x, y),
        [[1.0, 2.0, 3.0], 7.0],
        [[2, 0, 4], 3],
        [2.0, 3.0, 4.0],
    ),
    # An integer cast makes the function piecewise constant: its gradient is 0 (the int node
    # is not differentiable), never the seed truncated to an integer.
    _exact(
        "cast-through-int64",
        lambda g, x: g.cast(g.cast(x, "int64"), "float64"),
        [[1.3, 2.6, -0.4]],
        [[0, 0, 0]],
        [2.7, 1.0, -3.5],
    ),
    _exact(
        "cast-through-bool",
        lambda g, x: g.cast(g.cast(x, "bool"), "float64"),
        [[1.3, 2.6, -0.4]],
        [[0, 0, 0]],
        [2.7, 1.0, -3.5],
    ),
    _exact(
        "neg-of-int64",
        lambda g, x: g.cast(g.neg(g.cast(x, "int64")), "float64"),
        [[1.3, 2.6, -0.4]],
        [[0, 0, 0]],
        [2.7, 1.0, -3.5],
    ),
    _exact(
        "sum-of-int64",
        lambda g, x: g.cast(g.sum(g.cast(x, "int64")), "float64"),
        [[1.3, 2.6, -0.4]],
        [[0, 0, 0]],
        2.5,
    ),
    _exact(
        "cast-through-int32-times-x",
        lambda g, x: g.mul(g.cast(g.cast(x, "int32"), "float64"), x),
        [[1.3, 2.6, -0.4]],
        [[1, 2, 0]],
        [1.0, 1.0, 1.0],
    ),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the divisions by 0 of sqrt'(0), log'(0)
@pytest.mark.parametrize(("build", "inputs", "seed", "gradients"), EXACT_CASES)
def test_exact_gradient(client, build, inputs, seed, gradients):
    g = Graph()
    operands = [g.input(f"x{i}") for i in range(len(inputs))]
    out = build(g, *operands)
    feeds = {
        node.name: np.asarray(v, dtype=np.float64) for node, v in zip(operands, inputs, strict=True)
    }
    seed = None if seed is None else np.asarray(seed, dtype=np.float64)

    result = client.gradient(g, output=out, inputs=feeds, wrt=list(feeds), seed=seed)

    for name, expected in zip(feeds, gradients, strict=True):
        gradient = result.gradients[name]
        assert gradient.shape == feeds[name].shape, name
        assert gradient.dtype == np.float64, name
        np.testing.assert_allclose(
            gradient, np.asarray(expected, np.float64), rtol=1e-12, atol=0, err_msg=name
        )


# ---------------------------------------------------------------------------------------------
# Casts and float32


@pytest.mark.parametrize("shape", [(), (2, 3)], ids=_shape_id)
@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("float64", "float32"),
        ("float32", "float64"),
        ("float32", "float32"),
        ("float64", "float64"),
    ],
    ids=lambda dtype: dtype,
)
def test_cast_gradient_is_the_seed_cast_back(client, source, target, shape):
    rng = rng_for(f"cast-{source}-{target}-{shape}")
    x_value = rng.standard_normal(shape).astype(source)
    seed = np.asarray(rng.standard_normal(shape), dtype=target)
    g = Graph()
    x = g.input("x")
    out = g.cast(x, target, name="out")

    result = client.gradient(g, output=out, inputs={"x": x_value}, wrt=[x], seed=seed)

    value = result.values["out"]
    assert value.dtype == np.dtype(target)
    np.testing.assert_array_equal(value, x_value.astype(target))
    gradient = result.gradients["x"]
    assert gradient.shape == tuple(shape)
    assert gradient.dtype == np.dtype(source)
    np.testing.assert_array_equal(gradient, seed.astype(source))


FLOAT32_ROWS: list[Row] = [
    op_row("exp", [(2, 3)]),
    op_row("log", [(2, 3)], positive),
    op_row("sqrt", [(3,)], positive),
    op_row("tanh", [(2, 3)]),
    op_row("sigmoid", [(2, 3)]),
    op_row("relu", [(2, 3)], nonzero),
    op_row("mul", [(2, 3), (3,)]),
    op_row("div", [(2, 3), (1, 3)], (real, nonzero)),
    op_row("pow", [(2, 3), (3,)], (positive, real)),
    op_row("maximum", [(4, 1), (1, 3)], (distinct, distinct_shifted)),
    op_row("where", [(2, 3), (3,), ()], (boolean, real, real)),
    op_row("matmul", [(5, 2, 3), (3, 4)]),
    op_row("matmul", [(3,), (3, 4)]),
    op_row("sum", [(2, 3, 4)], axis=[0, 1]),
    op_row("mean", [(2, 3, 4)], axis=-1, keepdims=True),
    op_row("max", [(2, 3, 4)], distinct, axis=0),
    op_row("transpose", [(2, 3, 4)], axes=[2, 0, 1]),
    op_row("broadcast_to", [(3,)], shape=[2, 3]),
    op_row("sum_to_shape", [(4, 2, 3)], shape=[1, 3]),
    graph_row("log_softmax", [(2, 3)], _log_softmax),
    graph_row("mul(x,2.0)-weak-scalar", [(2, 3)], lambda g, x: g.mul(x, 2.0)),
    op_row("softplus", [(2, 3)]),
    op_row("logsumexp", [(2, 3)], axis=-1),
    op_row("var", [(2, 3)], axis=0),
    op_row("norm", [(2, 3)], axis=1),
    op_row("softmax", [(2, 3)]),
    op_row("log_softmax", [(2, 3)]),
    op_row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3))),
    op_row("cross_entropy", [(4, 3), (4, 3)], (real, probabilities), label_smoothing=0.1),
    op_row("take", [(4, 3), (5,)], (real, integers(-4, 4))),
    op_row("concat", [(2, 1), (2, 3)], axis=1),
    op_row("conv2d", [(1, 2, 5, 5), (3, 2, 3, 3)], stride=[2], padding=[1]),
    op_row("max_pool2d", [(1, 2, 4, 4)], distinct, kernel=[2]),
    op_row("avg_pool2d", [(1, 2, 4, 4)], kernel=[2]),
]


@pytest.mark.parametrize("row", FLOAT32_ROWS, ids=lambda row: row.id)
def test_float32_graph_stays_float32(client, engine, row):
    rng = rng_for("float32-" + row.id)
    g = Graph()
    operands = [g.input(f"x{i}") for i in range(len(row.shapes))]
    out = row.build(g, *operands)
    drawn = [domain(rng, shape) for domain, shape in zip(row.domains, row.shapes, strict=True)]
    # The same values in both precisions: float32 first, then widened exactly.
    feeds32 = {
        n.name: v.astype(np.float32) if v.dtype == np.float64 else v
        for n, v in zip(operands, drawn, strict=True)
    }
    feeds64 = {n: v.astype(np.float64) if v.dtype == np.float32 else v for n, v in feeds32.items()}
    float_names = [n for n, v in feeds32.items() if v.dtype == np.float32]
    graph = engine.load_graph(g.to_proto())
    out_shape = engine.forward(graph, feeds64, fetch=[out.name])[out.name].shape
    seed32 = np.asarray(rng.standard_normal(out_shape), dtype=np.float32)

    r32 = client.gradient(g, output=out, inputs=feeds32, wrt=float_names, seed=seed32)
    r64 = client.gradient(
        g, output=out, inputs=feeds64, wrt=float_names, seed=seed32.astype(np.float64)
    )

    # Constants keep their own dtype (a weak Python float is a float64 constant).
    constants = {node.name for node in g.nodes if node.op == "constant"}
    for name, value64 in r64.values.items():
        if value64.dtype == np.float64 and name not in constants:
            assert r32.values[name].dtype == np.float32, f"value of {name}"
    np.testing.assert_allclose(r32.values[out.name], r64.values[out.name], rtol=1e-5, atol=1e-6)
    for name in float_names:
        gradient = r32.gradients[name]
        assert gradient.dtype == np.float32, name
        assert gradient.shape == feeds32[name].shape, name
        np.testing.assert_allclose(
            gradient, r64.gradients[name], rtol=1e-4, atol=1e-5, err_msg=f"gradient of {name}"
        )


def test_mixed_precision_promotes_and_casts_gradients_back(client):
    # float32 * float64 computes in float64; each gradient comes back in its operand's dtype.
    rng = rng_for("mixed-precision")
    x = rng.standard_normal((2, 3)).astype(np.float32)
    y = rng.standard_normal((3,))
    seed = rng.standard_normal((2, 3))
    g = Graph()
    out = g.mul(g.input("x"), g.input("y"), name="out")

    result = client.gradient(g, output=out, inputs={"x": x, "y": y}, wrt=["x", "y"], seed=seed)

    assert result.values["out"].dtype == np.float64
    np.testing.assert_array_equal(result.values["out"], x.astype(np.float64) * y)
    assert result.gradients["x"].dtype == np.float32
    np.testing.assert_array_equal(result.gradients["x"], (seed * y).astype(np.float32))
    assert result.gradients["y"].dtype == np.float64
    np.testing.assert_allclose(
        result.gradients["y"], (seed * x.astype(np.float64)).sum(axis=0), rtol=1e-15, atol=0
    )


# ---------------------------------------------------------------------------------------------
# Ops without gradients, and coverage

"""Ops with no gradient test row, and why."""

COMPARISONS: dict[str, Callable[..., np.ndarray]] = {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
}


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "x_dtype"),
    [
        ((), (3,), "float64"),
        ((2, 3), (1, 3), "float64"),
        ((4, 1), (1, 3), "float64"),
        ((2, 3), (2, 3), "float32"),
        ((2, 3), (3,), "int64"),
    ],
    ids=lambda v: _shape_id(v) if isinstance(v, tuple) else v,
)
@pytest.mark.parametrize("op", list(COMPARISONS))
def test_comparison_values_match_numpy(client, op, x_shape, y_shape, x_dtype):
    rng = rng_for(f"{op}-{x_shape}-{y_shape}-{x_dtype}")
    # Small integers (halves for y) so that ties are frequent.
    x = rng.integers(-1, 2, x_shape).astype(x_dtype)
    y = rng.integers(-2, 3, y_shape) / 2.0
    g = Graph()
    out = g.op(op, g.input("x"), g.input("y"), name="out")

    value = client.forward(g, inputs={"x": x, "y": y}, fetch=[out]).values["out"]

    expected = COMPARISONS[op](x, y)
    assert value.dtype == np.bool_
    assert value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)


@pytest.mark.parametrize("op", list(COMPARISONS))
def test_float_input_feeding_only_a_comparison_gets_zero_gradient(client, op):
    rng = rng_for(f"zero-gradient-{op}")
    x = rng.integers(-1, 2, (2, 3)).astype(np.float64)
    y = rng.integers(-1, 2, (3,)).astype(np.float64)
    z = rng.standard_normal((2, 3))
    seed = rng.standard_normal((2, 3))
    g = Graph()
    mask = g.cast(g.op(op, g.input("x"), g.input("y"), name="mask"), "float64")
    out = g.mul(mask, g.input("z"), name="out")

    result = client.gradient(g, output=out, inputs={"x": x, "y": y, "z": z}, seed=seed)

    # The output is piecewise constant in x and y: their gradient is exactly 0.
    for name, value in (("x", x), ("y", y)):
        assert result.gradients[name].shape == value.shape
        assert result.gradients[name].dtype == np.float64
        np.testing.assert_array_equal(result.gradients[name], np.zeros_like(value))
    np.testing.assert_array_equal(result.gradients["z"], seed * COMPARISONS[op](x, y))
    assert "mask" not in result.gradients
    assert "bool" in result.skipped["mask"]


LOGIC: dict[str, Callable[..., np.ndarray]] = {
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
}


@pytest.mark.parametrize(
    ("x_shape", "y_shape"),
    [((), (3,)), ((2, 3), (1, 3)), ((4, 1), (1, 3))],
    ids=lambda shape: _shape_id(shape),
)
@pytest.mark.parametrize("op", list(LOGIC))
def test_logic_values_match_numpy(client, op, x_shape, y_shape):
    rng = rng_for(f"{op}-{x_shape}-{y_shape}")
    x, y = boolean(rng, x_shape), boolean(rng, y_shape)
    g = Graph()
    out = g.op(op, g.input("x"), g.input("y"), name="out")
    g.op("logical_not", out, name="negated")

    values = client.forward(g, inputs={"x": x, "y": y}).values

    expected = LOGIC[op](x, y)
    assert values["out"].dtype == np.bool_
    np.testing.assert_array_equal(values["out"], expected)
    np.testing.assert_array_equal(values["negated"], np.logical_not(expected))


@pytest.mark.parametrize(
    "attrs",
    [{}, {"axis": 0}, {"axis": -1}, {"axis": 1, "keepdims": True}, {"keepdims": True}],
    ids=lambda attrs: "-".join(_attr_id(k, v) for k, v in attrs.items()) or "flat",
)
@pytest.mark.parametrize("op", ["argmax", "argmin"])
def test_arg_reductions_match_numpy_and_pass_no_gradient(client, op, attrs):
    rng = rng_for(f"{op}-{attrs}")
    # Small integers: ties are frequent, and the first extremum wins as in numpy.
    x = rng.integers(-2, 3, (3, 4)).astype(np.float64)
    g = Graph()
    index = g.op(op, g.input("x"), name="index", **attrs)
    out = g.mul(g.cast(index, "float64"), g.input("z"), name="out")
    expected = getattr(np, op)(x, axis=attrs.get("axis"), keepdims=attrs.get("keepdims", False))
    z = rng.standard_normal(expected.shape)
    seed = rng.standard_normal(expected.shape)

    result = client.gradient(g, output=out, inputs={"x": x, "z": z}, wrt=["x", "z"], seed=seed)

    assert result.values["index"].dtype == np.int64
    np.testing.assert_array_equal(result.values["index"], expected)
    np.testing.assert_array_equal(result.gradients["x"], np.zeros_like(x))
    np.testing.assert_array_equal(result.gradients["z"], seed * expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_hot_values_match_numpy(client, dtype):
    indices = integers(-4, 4)(rng_for(f"one_hot-{dtype}"), (2, 3))
    g = Graph()
    g.op("one_hot", g.input("i"), name="out", depth=4, dtype=dtype)

    value = client.forward(g, inputs={"i": indices}).values["out"]

    assert value.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(value, np.eye(4, dtype=dtype)[indices])


def test_a_comparison_output_cannot_be_differentiated(client):
    g = Graph()
    out = g.greater(g.input("x"), 0.0, name="out")
    with pytest.raises(GradientError) as caught:
        client.gradient(g, output=out, inputs={"x": np.array([1.0, -1.0])}, seed=np.ones(2))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "out" in caught.value.details and "bool" in caught.value.details


def test_input_gradient_of_itself_is_the_seed(client):
    seed = rng_for("input-seed").standard_normal((2, 3))
    g = Graph()
    x = g.input("x")
    result = client.gradient(g, output=x, inputs={"x": np.ones((2, 3))}, wrt=[x], seed=seed)
    np.testing.assert_array_equal(result.gradients["x"], seed)


def test_constant_value_and_gradient(client):
    rng = rng_for("constant")
    c_value, x_value, seed = (rng.standard_normal((2, 3)) for _ in range(3))
    g = Graph()
    c = g.constant(c_value, name="c")
    out = g.mul(g.input("x"), c, name="out")

    result = client.gradient(g, output=out, inputs={"x": x_value}, wrt=["x", c], seed=seed)

    np.testing.assert_array_equal(result.values["c"], c_value)
    np.testing.assert_array_equal(result.gradients["c"], seed * x_value)
    np.testing.assert_array_equal(result.gradients["x"], seed * c_value)


def test_zeros_value_and_gradient(client):
    rng = rng_for("zeros")
    x_value = rng.standard_normal((2, 3)).astype(np.float32)
    seed = rng.standard_normal((2, 3)).astype(np.float32)
    g = Graph()
    z = g.zeros((1, 3), "float32", name="z")
    out = g.add(g.input("x"), z, name="out")

    result = client.gradient(g, output=out, inputs={"x": x_value}, wrt=["x", z], seed=seed)

    assert result.values["z"].dtype == np.float32
    np.testing.assert_array_equal(result.values["z"], np.zeros((1, 3), np.float32))
    np.testing.assert_array_equal(result.gradients["x"], seed)
    assert result.gradients["z"].dtype == np.float32
    np.testing.assert_array_equal(result.gradients["z"], seed.sum(axis=0, keepdims=True))


def test_every_op_has_a_gradient_row_or_a_reason():
    tested = {row.op for row in ROWS if row.op is not None}
    missing = sorted(set(OPS) - tested - set(NOT_DIFFERENTIABLE))
    assert not missing, (
        f"ops with neither a row in ROWS nor an entry in NOT_DIFFERENTIABLE: {missing}"
    )


def test_not_differentiable_entries_are_true():
    for name, reason in NOT_DIFFERENTIABLE.items():
        assert name in OPS, f"NOT_DIFFERENTIABLE names {name!r}, which is not an op"
        op = OPS[name]
        differentiable = [op.is_differentiable(i) for i in range(len(op.inputs))]
        assert not any(differentiable), f"{name} has differentiable operands, yet: {reason}"


def test_rows_check_every_differentiable_operand():
    for name, op in OPS.items():
        rows = [row for row in ROWS if row.op == name]
        for i in range(len(op.inputs)):
            if op.is_differentiable(i):
                assert any(row.domains[i] is not boolean for row in rows), (
                    f"no row checks the gradient of {name}'s operand {op.inputs[i]!r}"
                )


def test_norm_of_integers_computes_in_float64(client):
    g = Graph()
    g.norm(g.input("k"), name="out")
    for value, dtype in ((100_000, np.int32), (2**33, np.int64)):
        result = client.forward(g, {"k": np.array([value], dtype)}).values["out"]
        assert result.dtype == np.float64 and float(result) == float(value)
