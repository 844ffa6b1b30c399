"""Property-based and oracle tests of the whole differentiation pipeline.

A hypothesis strategy builds random float64 graphs (1-3 broadcast-compatible inputs, 1-8 random
elementwise ops, reductions and softmaxes with natural fan-out, a scalar output); a variant
mixes in shape, indexing and selection ops (reshape, transpose, expand_dims, squeeze, slice,
pad, concat, stack, take, matmul, clip, where, broadcast_to). Each graph is kept in a small
op-list form (`Case`) with two interpreters: one builds the gradient.v1.Graph the service runs,
the other evaluates the same computation with HIPS autograd, an independent reverse-mode
implementation. Properties:

- analytic gradients (over gRPC) agree with central finite differences (Richardson-extrapolated,
  computed here with the in-process Engine's forward pass), for every input and every
  intermediate node;
- values and the gradient of *every* node match autograd to 1e-10, and Hessian-vector products
  match autograd's (reverse over reverse) to 1e-9;
- a graph sent twice, or with its nodes listed in another order, gives bit-identical results,
  and so does running the GradientGraph it returns through Forward;
- the server's CheckGradient passes on these graphs.

Plus fixed oracles (an MLP with softmax cross-entropy, conv2d, max/avg pooling against loop
implementations differentiated by autograd) and checks that CheckGradient does fail when its
tolerance settings are wrong.

Keeping the random graphs smooth: the generator evaluates each node as it builds it and guards
the operands of domain-restricted ops (log, sqrt, reciprocal, log1p, div, pow get
softplus(x) + 0.5; exp, square, prod get a rescaled operand; results above 10 in magnitude are
rescaled by a constant). Kinked ops (relu, abs, leaky_relu, maximum, minimum, max, min, norm,
clip, and the comparison feeding a where) are only kept where every operand value is either
exactly at the kink (a structural tie such as sub(a, a), relu of a negative value or two copies
of one element, which stays put when an input is perturbed) or at least MARGIN away from it;
otherwise a smooth op takes their place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradient.v1 import graph_pb2
from gradient_client import Graph
from gradient_server.engine import Engine

F64 = np.float64

LIMIT = 10.0
"""Values of random graphs are kept within [-LIMIT, LIMIT] by rescaling with a constant."""

MARGIN = 1e-2
"""Minimum distance of an operand value from a kink (0 for relu/abs, a tie for max)."""

FD_STEP = 2e-5
"""Step of the finite differences: 2 * FD_STEP times any derivative stays well under MARGIN."""

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ENGINE = Engine()


# ---------------------------------------------------------------------------------------------
# The oracle: each op written with autograd.numpy (independent of the server's op table)


def _axes(axis: list[int] | None) -> tuple[int, ...] | None:
    return None if axis is None else tuple(axis)


def _reduction(fn):
    def apply(x, axis=None, keepdims=False, **extra):
        return fn(x, axis=_axes(axis), keepdims=keepdims, **extra)

    return apply


def _relu(x):
    # where(x > 0, ...) rather than maximum(x, 0): relu'(0) = 0, the service's convention.
    return anp.where(x > 0, x, 0.0)


def _leaky_relu(x, alpha):
    return anp.where(x > 0, x, alpha * x)


def _sigmoid(x):
    return 1.0 / (1.0 + anp.exp(-x))


def _softplus(x):
    return anp.logaddexp(0.0, x)


def _prod(x, axis=None, keepdims=False):
    # An explicit product of slices (autograd's own prod gradient divides by x, nan at 0).
    shape = anp.shape(x)
    rank = len(shape)
    axes = tuple(range(rank)) if axis is None else tuple(sorted(a % rank for a in axis))
    kept = [a for a in range(rank) if a not in axes]
    moved = anp.transpose(x, kept + list(axes)) if rank else x
    flat = anp.reshape(moved, [shape[a] for a in kept] + [-1])
    out = flat[..., 0]
    for k in range(1, anp.shape(flat)[-1]):
        out = out * flat[..., k]
    if keepdims:
        out = anp.reshape(out, [1 if a in axes else d for a, d in enumerate(shape)])
    return out


def anp_logsumexp(x, axis=None, keepdims=False):
    """log(sum(exp(x))) shifted by the maximum. autograd differentiates through the shift too;
    those contributions cancel, as the result does not depend on the shift."""
    shift = anp.max(x, axis=axis, keepdims=True)
    out = anp.log(anp.sum(anp.exp(x - shift), axis=axis, keepdims=True)) + shift
    if keepdims:
        return out
    rank = anp.ndim(x)
    axes = range(rank) if axis is None else [a % rank for a in np.atleast_1d(axis)]
    return anp.reshape(out, [d for i, d in enumerate(anp.shape(x)) if i not in axes])


def _norm(x, axis=None, keepdims=False):
    # sqrt(sum(x^2)) with the subgradient 0 at the origin (double-where keeps nan out).
    total = anp.sum(x * x, axis=_axes(axis), keepdims=keepdims)
    nonzero = total > 0
    return anp.where(nonzero, anp.sqrt(anp.where(nonzero, total, 1.0)), 0.0)


def _softmax(x, axis):
    e = anp.exp(x - anp.max(x, axis=axis, keepdims=True))
    return e / anp.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    return x - anp_logsumexp(x, axis=axis, keepdims=True)


def _expand_dims(x, axis):
    rank = anp.ndim(x) + len(axis)
    positions = {a % rank for a in axis}
    dims = iter(anp.shape(x))
    return anp.reshape(x, [1 if i in positions else next(dims) for i in range(rank)])


def _squeeze(x, axis=None):
    shape = anp.shape(x)
    if axis is None:
        drop = {i for i, d in enumerate(shape) if d == 1}
    else:
        drop = {a % len(shape) for a in axis}
    return anp.reshape(x, [d for i, d in enumerate(shape) if i not in drop])


def _slice(x, starts, stops, steps, axes):
    index = [slice(None)] * anp.ndim(x)
    for axis, start, stop, step in zip(axes, starts, stops, steps, strict=True):
        index[axis] = slice(start, stop, step)
    return x[tuple(index)]


def _pad(x, pads, value=0.0):
    widths = [(pads[2 * i], pads[2 * i + 1]) for i in range(anp.ndim(x))]
    return anp.pad(x, widths, "constant", constant_values=value)


def _take(x, indices, axis=0):
    return x[(slice(None),) * (axis % anp.ndim(x)) + (np.asarray(indices),)]


def _clip(x, min=None, max=None):  # noqa: A002 (the op's attribute names)
    if min is not None:
        x = anp.where(x < min, min, x)
    if max is not None:
        x = anp.where(x > max, max, x)
    return x


def _where(condition, x, y):
    # Broadcast first: autograd's where gradient does not sum back to the operand shapes.
    zeros = np.zeros(np.broadcast_shapes(np.shape(condition), anp.shape(x), anp.shape(y)))
    return anp.where(condition, x + zeros, y + zeros)


ORACLE = {
    "neg": anp.negative,
    "exp": anp.exp,
    "log": anp.log,
    "sqrt": anp.sqrt,
    "square": anp.square,
    "abs": anp.abs,
    "tanh": anp.tanh,
    "sigmoid": _sigmoid,
    "relu": _relu,
    "sin": anp.sin,
    "cos": anp.cos,
    "log1p": anp.log1p,
    "expm1": anp.expm1,
    "softplus": _softplus,
    "reciprocal": lambda x: 1.0 / x,
    "leaky_relu": _leaky_relu,
    "add": anp.add,
    "sub": anp.subtract,
    "mul": anp.multiply,
    "div": anp.true_divide,
    "pow": anp.power,
    "maximum": anp.maximum,
    "minimum": anp.minimum,
    "sum": _reduction(anp.sum),
    "mean": _reduction(anp.mean),
    "max": _reduction(anp.max),
    "min": _reduction(anp.min),
    "prod": _prod,
    "logsumexp": _reduction(anp_logsumexp),
    "var": _reduction(anp.var),
    "norm": _norm,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "transpose": anp.transpose,
    "reshape": anp.reshape,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "slice": _slice,
    "pad": _pad,
    "concat": lambda *xs, axis: anp.concatenate(list(xs), axis=axis),
    "stack": lambda *xs, axis: anp.stack(list(xs), axis=axis),
    "take": _take,
    "matmul": anp.matmul,
    "clip": _clip,
    "greater": lambda x, y: x > y,
    "where": _where,
    "broadcast_to": lambda x, shape: x + anp.zeros(shape),  # (autograd's needs equal ranks)
}

UNARY = [
    "neg",
    "exp",
    "log",
    "sqrt",
    "square",
    "abs",
    "tanh",
    "sigmoid",
    "relu",
    "sin",
    "cos",
    "log1p",
    "expm1",
    "softplus",
    "reciprocal",
    "leaky_relu",
]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum"]
REDUCTIONS = ["sum", "mean", "max", "min", "prod", "logsumexp", "var", "norm"]
ALONG_AXIS = ["softmax", "log_softmax"]
SHAPE_OPS = [
    "transpose",
    "reshape",
    "expand_dims",
    "squeeze",
    "slice",
    "pad",
    "concat",
    "stack",
    "take",
    "matmul",
    "clip",
    "where",
    "broadcast_to",
]


# ---------------------------------------------------------------------------------------------
# Random graphs


@dataclass(frozen=True)
class Step:
    """One node: `name = op(*args, **attrs)`; op "constant" holds attrs["value"]."""

    name: str
    op: str
    args: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        if self.op == "constant":
            return f"{self.name} = {self.attrs['value']!r}"
        attrs = "".join(f", {k}={v!r}" for k, v in self.attrs.items())
        return f"{self.name} = {self.op}({', '.join(self.args)}{attrs})"


@dataclass(frozen=True)
class Case:
    """A random graph: float64 input values, the steps, and the scalar output's name."""

    inputs: dict[str, np.ndarray]
    steps: tuple[Step, ...]
    discrete: frozenset[str] = frozenset()
    """Nodes with int or bool values (index constants, comparisons): not differentiable."""
    output: str = "out"

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a failing case
        printer.text(repr(self))

    def __repr__(self) -> str:
        lines = [
            f"{n} = np.array({v.tolist()!r})  # {list(v.shape)}" for n, v in self.inputs.items()
        ]
        lines += [repr(s) for s in self.steps]
        return "Case(\n  " + "\n  ".join(lines) + "\n)"

    @property
    def names(self) -> list[str]:
        return [*self.inputs, *(s.name for s in self.steps)]

    @property
    def floats(self) -> list[str]:
        """The differentiable nodes."""
        return [n for n in self.names if n not in self.discrete]

    @property
    def intermediates(self) -> list[str]:
        """The differentiable nodes that are computed (neither inputs nor constants)."""
        return [s.name for s in self.steps if s.op != "constant" and s.name not in self.discrete]


def evaluate(case: Case, deltas: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every node's value, computed by the autograd.numpy oracle.

    With `deltas`, each float node's value is shifted by deltas[name] (all zeros), so that the
    gradient with respect to deltas[name] is the gradient with respect to that node.
    """
    deltas = deltas or {}
    env: dict[str, Any] = {}
    for name, value in case.inputs.items():
        env[name] = value + deltas[name] if name in deltas else value
    for step in case.steps:
        if step.op == "constant":
            value = step.attrs["value"]
        else:
            value = ORACLE[step.op](*(env[a] for a in step.args), **step.attrs)
        env[step.name] = value + deltas[step.name] if step.name in deltas else value
    return env


def oracle_gradients(case: Case) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Values of every node, and gradients of the output with respect to every float node."""
    values = {n: np.asarray(v) for n, v in evaluate(case).items()}
    deltas = {n: np.zeros(values[n].shape) for n in case.floats}
    gradients = grad(lambda d: evaluate(case, d)[case.output])(deltas)
    return values, {n: np.asarray(g, F64) for n, g in gradients.items()}


def to_graph(case: Case, as_input: frozenset[str] = frozenset()) -> Graph:
    """The case as an SDK graph; nodes named in `as_input` become inputs instead."""
    g = Graph()
    for name in case.inputs:
        g.input(name)
    for step in case.steps:
        if step.name in as_input:
            g.input(step.name)
        elif step.op == "constant":
            value = step.attrs["value"]
            g.constant(value, name=step.name, weak=isinstance(value, float))
        else:
            g.op(step.op, *(g[a] for a in step.args), name=step.name, **step.attrs)
    return g


class _Builder:
    """Appends steps, evaluating each one (with the oracle) so guards can see the values."""

    def __init__(self, inputs: dict[str, np.ndarray]):
        self.inputs = inputs
        self.values: dict[str, np.ndarray] = dict(inputs)
        self.steps: list[Step] = []
        self.consumed: set[str] = set()
        self.discrete: set[str] = set()

    def emit(self, op: str, *args: str, name: str | None = None, **attrs: Any) -> str:
        name = name or f"{'c' if op == 'constant' else 'n'}{len(self.steps)}"
        if op == "constant":
            value = attrs["value"]
        else:
            value = ORACLE[op](*(self.values[a] for a in args), **attrs)
        self.steps.append(Step(name, op, args, attrs))
        self.consumed.update(args)
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(F64)
        else:
            self.discrete.add(name)
        self.values[name] = value
        return name

    def constant(self, value: float) -> str:
        return self.emit("constant", value=float(value))

    def scaled(self, x: str, limit: float) -> str:
        """x, multiplied by a constant if needed so that |x| <= limit."""
        peak = float(np.max(np.abs(self.values[x])))
        return x if peak <= limit else self.emit("mul", x, self.constant(limit / peak))

    def positive(self, x: str) -> str:
        """x if it lies in [0.5, LIMIT], else softplus(x) + 0.5 (so in [0.5, LIMIT + 1])."""
        value = self.values[x]
        if value.min() >= 0.5 and value.max() <= LIMIT:
            return x
        return self.emit("add", self.emit("softplus", self.scaled(x, LIMIT)), self.constant(0.5))


KINKED = {
    "relu",
    "abs",
    "leaky_relu",
    "maximum",
    "minimum",
    "max",
    "min",
    "norm",
    "clip",
    "greater",
}


def kink_distance(op: str, operands: list[np.ndarray], attrs: Mapping[str, Any]) -> np.ndarray:
    """How far a kinked op's operands are from its kink (0 at the kink), elementwise."""
    x = np.asarray(operands[0], F64)
    if op in ("relu", "abs", "leaky_relu"):
        return np.abs(x)
    if op in ("maximum", "minimum", "greater"):
        return np.abs(x - np.asarray(operands[1], F64))
    if op == "clip":
        bounds = [attrs[k] for k in ("min", "max") if attrs.get(k) is not None]
        return np.min([np.abs(x - bound) for bound in bounds], axis=0, initial=np.inf)
    if op in ("max", "min"):
        return np.abs(x - ORACLE[op](x, axis=attrs.get("axis"), keepdims=True))
    assert op == "norm"
    return np.asarray(ORACLE["norm"](x, axis=attrs.get("axis")))


def _clear_of_kink(distance: np.ndarray) -> bool:
    """Every distance from a kink is exactly 0 (structural) or at least MARGIN."""
    return bool(np.all((distance == 0) | (distance >= MARGIN)))


def _kink_profile(case: Case, env: Mapping[str, Any]) -> list[np.ndarray]:
    return [
        kink_distance(s.op, [env[a] for a in s.args], s.attrs) for s in case.steps if s.op in KINKED
    ]


def moves_off_a_kink(case: Case, name: str) -> bool:
    """Whether perturbing node `name` alone moves some operand that sits exactly on a kink.

    Perturbing an input keeps structural ties (sub(a, a) stays 0; exp(a) and exp(a) stay
    equal), but perturbing one of two tied intermediate nodes breaks the tie: a one-sided
    kink, where central differences are only first-order accurate.
    """
    values = evaluate(case)
    deltas = {n: np.zeros(np.shape(values[n])) for n in case.floats}
    rng = np.random.default_rng(0)
    deltas[name] = 2 * FD_STEP * rng.standard_normal(np.shape(values[name]))
    moved = evaluate(case, deltas)
    return any(
        np.any((before == 0) & (after != 0))
        for before, after in zip(
            _kink_profile(case, values), _kink_profile(case, moved), strict=True
        )
    )


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(a, b)
    except ValueError:
        return False
    return True


def _fitting(b: _Builder, pool: list[str], shape: tuple[int, ...]) -> list[str]:
    """The nodes of the pool that broadcast against `shape`."""
    return [n for n in pool if _broadcasts(shape, b.values[n].shape)]


@st.composite
def _axis(draw, rank: int) -> list[int] | None:
    kind = draw(st.sampled_from(["all", "one", "several"])) if rank else "all"
    if kind == "all":
        return None
    if kind == "one":
        return [draw(st.integers(-rank, rank - 1))]
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return [a - rank if draw(st.booleans()) else a for a in axes]  # some counted from the end


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return np.matmul(np.zeros(a), np.zeros(b)).shape
    except ValueError:
        return None


def _shape_op(draw, b: _Builder, pool: list[str], x: str) -> str | None:
    """A random shape, indexing or selection op on x; None if the drawn one does not fit x."""
    value = b.values[x]
    shape, rank = value.shape, value.ndim
    small = value.size <= 16 and rank <= 3  # for the ops that make bigger tensors
    op = draw(st.sampled_from(SHAPE_OPS))
    if op == "transpose" and rank >= 2:
        return b.emit(op, x, axes=list(draw(st.permutations(range(rank)))))
    if op == "reshape":
        targets = [[-1], list(reversed(shape)), [*shape, 1], [1, *shape]]
        return b.emit(op, x, shape=draw(st.sampled_from([t for t in targets if len(t) <= 4])))
    if op == "expand_dims" and rank <= 3:
        new_rank = rank + draw(st.integers(1, 4 - rank))
        k = new_rank - rank
        axis = draw(st.lists(st.integers(0, new_rank - 1), min_size=k, max_size=k, unique=True))
        return b.emit(op, x, axis=[a - new_rank if draw(st.booleans()) else a for a in axis])
    if op == "squeeze" and 1 in shape:
        ones = [i for i, d in enumerate(shape) if d == 1]
        axis = draw(st.none() | st.lists(st.sampled_from(ones), min_size=1, unique=True))
        return b.emit(op, x) if axis is None else b.emit(op, x, axis=axis)
    if op == "slice" and rank >= 1:
        axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
        starts, stops, steps = [], [], []
        for axis in axes:
            size = shape[axis]
            step = draw(st.sampled_from([1, 2, -1, -2]))
            # Out-of-range starts and stops are clamped, as in Python.
            start, stop = draw(st.integers(-size - 1, size)), draw(st.integers(-size - 1, size + 1))
            if not range(*slice(start, stop, step).indices(size)):
                start, stop = (0, size) if step > 0 else (size - 1, -size - 1)
            starts.append(start), stops.append(stop), steps.append(step)
        return b.emit(op, x, starts=starts, stops=stops, steps=steps, axes=axes)
    if op == "pad" and rank >= 1 and small:
        pads = [draw(st.integers(0, 1)) for _ in range(2 * rank)]
        return b.emit(op, x, pads=pads, value=draw(st.sampled_from([0.0, 0.5, -1.5])))
    if op == "concat" and rank >= 1 and small:
        axis = draw(st.integers(-rank, rank - 1))

        def joinable(other: tuple[int, ...]) -> bool:  # equal but along the axis
            return len(other) == rank and all(
                d == e or i == axis % rank
                for i, (d, e) in enumerate(zip(other, shape, strict=True))
            )

        others = [n for n in pool if joinable(b.values[n].shape)]
        more = draw(st.lists(st.sampled_from(others), min_size=1, max_size=2))
        return b.emit(op, x, *more, axis=axis)
    if op == "stack" and rank <= 3 and small:
        others = [n for n in pool if b.values[n].shape == shape]
        more = draw(st.lists(st.sampled_from(others), min_size=1, max_size=2))
        return b.emit(op, x, *more, axis=draw(st.integers(-rank - 1, rank)))
    if op == "take" and rank >= 1 and small:
        axis = draw(st.integers(-rank, rank - 1))
        index_shape = draw(st.sampled_from([(), (2,), (3,), (2, 2)][: 5 - rank]))
        size = shape[axis]
        count = math.prod(index_shape)
        flat = draw(st.lists(st.integers(-size, size - 1), min_size=count, max_size=count))
        indices = b.emit("constant", value=np.array(flat, np.int64).reshape(index_shape))
        return b.emit(op, x, indices, axis=axis)
    if op == "matmul" and rank >= 1:
        others = [n for n in pool if _matmul_shape(shape, b.values[n].shape) is not None]
        if rank >= 2:
            swapped = [*range(rank - 2), rank - 1, rank - 2]
            others.append(b.emit("transpose", x, axes=swapped))
        return b.emit(op, x, draw(st.sampled_from(others))) if others else None
    if op == "clip":
        bounds = {
            "min": draw(st.sampled_from([None, -1.0, -0.3])),
            "max": draw(st.sampled_from([None, 0.4, 1.2])),
        }
        bounds = {k: v for k, v in bounds.items() if v is not None}
        if not _clear_of_kink(kink_distance(op, [value], bounds)):
            return None
        return b.emit(op, x, **bounds)
    if op == "where":
        y = draw(st.sampled_from(_fitting(b, pool, shape)))
        if not _clear_of_kink(kink_distance("greater", [value, b.values[y]], {})):
            return None
        condition = b.emit("greater", x, y)
        so_far = b.values[condition].shape
        first = draw(st.sampled_from(_fitting(b, pool, so_far)))
        so_far = np.broadcast_shapes(so_far, b.values[first].shape)
        second = draw(st.sampled_from(_fitting(b, pool, so_far)))
        return b.emit(op, condition, first, second)
    if op == "broadcast_to" and small:
        target = [draw(st.integers(1, 3)) if d == 1 else d for d in shape]
        if rank <= 2 and draw(st.booleans()):
            target = [draw(st.integers(1, 3)), *target]
        return b.emit(op, x, shape=target)
    return None


@st.composite
def cases(draw, max_ops: int = 8, shape_ops: bool = False) -> Case:
    """A random graph and input values (see the module docstring).

    shape_ops=True adds shape, indexing and selection ops to the mix.
    """
    # sampled_from draws uniformly (bare integers lean hard on their bounds), and shrinks
    # towards the first choice (rank 2: small, yet with room for broadcasting).
    rank = draw(st.sampled_from([2, 3, 1, 0]))
    full = [draw(st.sampled_from([1, 2, 3, 4])) for _ in range(rank)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inputs = {}
    for i in range(draw(st.integers(1, 3))):
        full_rank = draw(st.sampled_from([True, True, False]))
        own_rank = rank if full_rank else draw(st.sampled_from(range(rank + 1)))
        dims = full[rank - own_rank :]
        # Some dims become 1 (they broadcast against the others).
        shape = tuple(d if draw(st.sampled_from([True, True, False])) else 1 for d in dims)
        magnitude = rng.uniform(0.2, 2.0, shape)
        inputs[f"x{i}"] = np.asarray(magnitude * rng.choice([-1.0, 1.0], shape), F64)

    b = _Builder(inputs)
    pool = list(inputs)  # nodes later ops may use (with repeats, so fan-out happens)
    derived: list[str] = []
    for _ in range(draw(st.integers(1, max_ops))):
        kinds = ["unary", "binary", "reduction", "along_axis", *(["shape"] * 3 * shape_ops)]
        kind = draw(st.sampled_from(kinds))
        x = draw(st.sampled_from(pool))
        x_rank = b.values[x].ndim
        if kind == "unary":
            op = draw(st.sampled_from(UNARY))
            attrs: dict[str, Any] = {}
            if op in ("exp", "expm1"):
                x = b.scaled(x, 2.0)
            elif op == "square":
                x = b.scaled(x, 3.0)
            elif op in ("log", "sqrt", "reciprocal", "log1p"):
                x = b.positive(x)
            elif op in KINKED and not _clear_of_kink(kink_distance(op, [b.values[x]], {})):
                op = "tanh"
            if op == "leaky_relu":
                attrs["alpha"] = draw(st.sampled_from([0.01, 0.2, 0.5]))
            node = b.emit(op, x, **attrs)
        elif kind == "binary":
            op = draw(st.sampled_from(BINARY))
            shape = b.values[x].shape
            y = draw(st.sampled_from(_fitting(b, pool, shape)))
            if op == "div":
                y = b.positive(y)
            elif op == "pow":
                x, y = b.positive(x), b.scaled(y, 1.5)
            elif op in ("maximum", "minimum"):
                if not _clear_of_kink(kink_distance(op, [b.values[x], b.values[y]], {})):
                    op = "add"
            node = b.emit(op, x, y)
        elif kind == "reduction":
            op = draw(st.sampled_from(REDUCTIONS))
            axis = draw(_axis(x_rank))
            attrs = {"axis": axis, "keepdims": draw(st.booleans())}
            reduced = range(x_rank) if axis is None else axis
            count = math.prod(b.values[x].shape[a] for a in reduced)
            if op == "prod":
                # One axis (at most 4 factors) of values in [-2, 2] keeps the product tame.
                attrs["axis"] = None if x_rank == 0 else [draw(st.integers(0, x_rank - 1))]
                x = b.scaled(x, 2.0)
            elif op == "var":
                attrs["ddof"] = draw(st.sampled_from([0, 1])) if count >= 2 else 0
            elif op in KINKED and not _clear_of_kink(kink_distance(op, [b.values[x]], attrs)):
                op = "mean"
            node = b.emit(op, x, **{k: v for k, v in attrs.items() if v is not None})
        elif kind == "along_axis" and x_rank > 0:
            op = draw(st.sampled_from(ALONG_AXIS))
            node = b.emit(op, x, axis=draw(st.integers(-x_rank, x_rank - 1)))
        else:
            node = (_shape_op(draw, b, pool, x) if kind == "shape" else None) or b.emit("tanh", x)
        node = b.scaled(node, LIMIT)
        pool.append(node)
        derived.append(node)

    # The output: the sum of the sums of the derived nodes nothing else uses, so every node
    # reaches it, except (sometimes) one left out to check that dead nodes get zeros.
    last = derived[-1]
    terms = [n for n in dict.fromkeys(derived) if n not in b.consumed and n != last]
    dead = draw(st.lists(st.sampled_from(terms), max_size=1)) if terms else []
    terms = [last, *(n for n in terms if n not in dead)]
    if len(terms) == 1:
        b.emit("sum", last, name="out")
    else:
        total = b.emit("sum", terms[0])
        for i, term in enumerate(terms[1:], start=2):
            name = "out" if i == len(terms) else None
            total = b.emit("add", total, b.emit("sum", term), name=name)
    return Case(inputs, tuple(b.steps), frozenset(b.discrete))


# ---------------------------------------------------------------------------------------------
# Helpers


def numeric_gradient(
    message: graph_pb2.Graph, feeds: dict[str, np.ndarray], wrt: str, output: str
) -> np.ndarray:
    """d output / d feeds[wrt] by 4-point central differences (Richardson), in float64."""
    graph = ENGINE.load_graph(message)
    point = feeds[wrt]
    result = np.zeros(point.shape, F64)

    def f(index: tuple[int, ...], step: float) -> float:
        moved = point.copy()
        moved[index] += step
        return float(ENGINE.forward(graph, {**feeds, wrt: moved}, [output])[output])

    h = FD_STEP
    for index in np.ndindex(point.shape):
        near = f(index, h) - f(index, -h)
        far = f(index, 2 * h) - f(index, -2 * h)
        result[index] = (8 * near - far) / (12 * h)
    return result


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    """Same shape; float arrays equal to rtol relative to the larger of 1 and the array's
    scale, others (bool, int) equal."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.dtype.kind != "f":
        assert actual.dtype == expected.dtype, what
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        return
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def fingerprint(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple, bytes]]:
    """Each array's dtype, shape and raw bytes: equal fingerprints are bit-identical arrays."""
    return {n: (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()) for n, a in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Properties of random graphs


def check_finite_differences(client, case: Case) -> None:
    """The service's gradients against finite differences, for every differentiable node."""
    result = client.gradient(to_graph(case), case.output, inputs=case.inputs)
    assert set(result.gradients) == set(case.floats)
    message = to_graph(case).to_proto()
    for name in case.inputs:
        # The generator keeps operands off kinks, but some ties are structural (log_softmax
        # of log_softmax equals it): central differences do not hold there; autograd's do.
        assume(not moves_off_a_kink(case, name))
        numeric = numeric_gradient(message, case.inputs, name, case.output)
        np.testing.assert_allclose(
            result.gradients[name], numeric, rtol=1e-5, atol=1e-7, err_msg=f"d out / d {name}"
        )
    # Every intermediate node, perturbed by feeding it as an input instead of computing it
    # (except where that breaks an exact tie: the autograd oracle covers those conventions).
    for name in case.intermediates:
        if moves_off_a_kink(case, name):
            continue
        replaced = to_graph(case, as_input=frozenset([name])).to_proto()
        feeds = {**case.inputs, name: result.values[name]}
        numeric = numeric_gradient(replaced, feeds, name, case.output)
        np.testing.assert_allclose(
            result.gradients[name], numeric, rtol=1e-5, atol=1e-7, err_msg=f"d out / d {name}"
        )


def check_against_autograd(client, case: Case) -> None:
    """Every node's value and gradient against autograd, to 1e-10."""
    values, gradients = oracle_gradients(case)
    result = client.gradient(to_graph(case), case.output, inputs=case.inputs)
    assert set(result.values) == set(case.names)
    assert set(result.gradients) == set(case.floats)
    assert set(result.skipped) == set(case.discrete)
    for name in case.names:
        assert_close(result.values[name], values[name], 1e-10, f"value of {name}")
    for name in case.floats:
        assert_close(result.gradients[name], gradients[name], 1e-10, f"gradient of {name}")


@SETTINGS
@given(case=cases())
def test_gradients_match_finite_differences(client, case):
    check_finite_differences(client, case)


@SETTINGS
@given(case=cases(shape_ops=True))
def test_gradients_match_finite_differences_with_shape_ops(client, case):
    check_finite_differences(client, case)


@settings(SETTINGS, max_examples=60)
@given(case=cases())
def test_random_graphs_match_autograd(client, case):
    check_against_autograd(client, case)


@settings(SETTINGS, max_examples=60)
@given(case=cases(shape_ops=True))
def test_random_graphs_with_shape_ops_match_autograd(client, case):
    check_against_autograd(client, case)


ANY_CASE = st.one_of(cases(), cases(shape_ops=True))


@SETTINGS
@given(case=ANY_CASE)
def test_repeated_request_is_bit_identical(client, case):
    message = to_graph(case).to_proto()
    first = client.gradient(message, case.output, inputs=case.inputs)
    second = client.gradient(message, case.output, inputs=case.inputs)  # the server's caches
    assert set(first.values) == set(case.names)
    assert fingerprint(first.values) == fingerprint(second.values)
    assert fingerprint(first.gradients) == fingerprint(second.gradients)
    # A cold engine in this process computes the very same bits.
    cold = Engine()
    local = cold.gradient(cold.load_graph(message), case.inputs, case.output)
    assert fingerprint(local.values) == fingerprint(first.values)
    assert fingerprint(local.gradients) == fingerprint(first.gradients)


@SETTINGS
@given(case=ANY_CASE, data=st.data())
def test_node_order_does_not_change_results(client, case, data):
    message = to_graph(case).to_proto()
    expected = client.gradient(message, case.output, inputs=case.inputs)
    order = data.draw(st.permutations(range(len(message.nodes))), label="order")
    for nodes in ([message.nodes[i] for i in order], list(reversed(message.nodes))):
        shuffled = graph_pb2.Graph(nodes=nodes)
        actual = client.gradient(shuffled, case.output, inputs=case.inputs)
        assert fingerprint(actual.values) == fingerprint(expected.values)
        assert fingerprint(actual.gradients) == fingerprint(expected.gradients)


@SETTINGS
@given(case=ANY_CASE)
def test_server_check_gradient_passes(client, case):
    # By default CheckGradient checks every float input.
    report = client.check_gradient(to_graph(case), case.output, inputs=case.inputs)
    assert set(report.nodes) == set(case.inputs)
    for name, node in report.nodes.items():
        assert node.checked == case.inputs[name].size
        assert node.passed, f"{name}: {node}"
    assert report.passed

    # Intermediate nodes too, when asked (those whose perturbation breaks no exact tie).
    wrt = [n for n in case.intermediates if not moves_off_a_kink(case, n)]
    report = client.check_gradient(to_graph(case), case.output, inputs=case.inputs, wrt=wrt)
    assert set(report.nodes) == set(wrt)
    assert report.passed, report.nodes


@SETTINGS
@given(case=ANY_CASE)
def test_gradient_graph_run_forward_equals_gradient(client, case):
    # GradientGraph's contract: Forward on the returned graph, seed fed with ones, gives the
    # gradients of Gradient bit for bit.
    backward = client.gradient_graph(to_graph(case), case.output, inputs=case.inputs)
    assert set(backward.gradients) == set(case.floats)
    assert set(backward.skipped) == set(case.discrete)
    feeds = {**case.inputs, backward.seed: np.ones(())}
    values = client.forward(backward.graph, feeds, fetch=list(backward.gradients.values())).values
    via_graph = {name: values[node] for name, node in backward.gradients.items()}
    expected = client.gradient(to_graph(case), case.output, inputs=case.inputs).gradients
    assert fingerprint(via_graph) == fingerprint(expected)


@pytest.mark.filterwarnings("ignore:Output seems independent of input")  # (autograd, H = 0)
@SETTINGS
@given(case=ANY_CASE, data=st.data())
def test_hessian_vector_products_match_autograd(client, case, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="vector seed"))
    # A random direction in some of the inputs (the others count as zero).
    chosen = data.draw(st.lists(st.sampled_from(list(case.inputs)), min_size=1, unique=True))
    vector = {name: rng.standard_normal(case.inputs[name].shape) for name in chosen}
    products = client.hvp(to_graph(case), case.output, case.inputs, vector)

    def output(shifts):  # the output at the inputs shifted by `shifts`
        return evaluate(case, shifts)[case.output]

    def directional(shifts):  # <d output / d inputs, v>
        gradient = grad(output)(shifts)
        return sum(anp.sum(gradient[name] * v) for name, v in vector.items())

    expected = grad(directional)({n: np.zeros(v.shape) for n, v in case.inputs.items()})
    assert set(products) == set(case.inputs)
    for name in case.inputs:
        assert_close(products[name], expected[name], 1e-9, f"(H v) of {name}")


# ---------------------------------------------------------------------------------------------
# Fixed graphs against autograd


def test_mlp_softmax_cross_entropy_matches_autograd(client):
    rng = np.random.default_rng(7)
    params = {
        "x": rng.standard_normal((6, 4)),
        "w1": rng.standard_normal((4, 5)) * 0.7,
        "b1": rng.standard_normal(5) * 0.1,
        "w2": rng.standard_normal((5, 3)) * 0.7,
        "b2": rng.standard_normal(3) * 0.1,
    }
    labels = np.array([0, 2, 1, 1, 0, 2], dtype=np.int64)

    g = Graph()
    x, w1, b1, w2, b2 = (g.input(n) for n in params)
    hidden = g.relu(g.add(g.matmul(x, w1), b1, name="z1"), name="h")
    logits = g.add(g.matmul(hidden, w2), b2, name="logits")
    g.cross_entropy(logits, g.input("labels"), name="loss")
    result = client.gradient(g, "loss", inputs={**params, "labels": labels})

    one_hot = np.eye(3)[labels]

    def network(p):
        z1 = anp.dot(p["x"], p["w1"]) + p["b1"]
        h = anp.where(z1 > 0, z1, 0.0)
        out = anp.dot(h, p["w2"]) + p["b2"]
        return out, z1

    def loss(p):
        out, _ = network(p)
        log_p = out - anp_logsumexp(out, axis=1, keepdims=True)
        return -anp.mean(anp.sum(one_hot * log_p, axis=1))

    expected = grad(loss)(params)
    out, z1 = network(params)
    assert np.all(np.abs(z1) > 1e-3)  # no relu kinks: the comparison is of smooth points
    assert_close(result.values["loss"], loss(params), 1e-12, "loss")
    assert_close(result.values["logits"], out, 1e-12, "logits")
    for name in params:
        assert_close(result.gradients[name], expected[name], 1e-10, f"gradient of {name}")
    # d loss / d logits = (softmax - one_hot) / batch, in closed form.
    softmax = np.exp(out - out.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    assert_close(result.gradients["logits"], (softmax - one_hot) / 6, 1e-12, "d loss / d logits")


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d_loops(x, w, stride, padding, dilation):
    """NCHW x OIHW cross-correlation, one output pixel and kernel tap at a time."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    xp = anp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), "constant")
    _, _, height, width = anp.shape(xp)
    _, _, kh, kw = anp.shape(w)
    rows = []
    for i in range((height - dh * (kh - 1) - 1) // sh + 1):
        columns = []
        for j in range((width - dw * (kw - 1) - 1) // sw + 1):
            pixel = 0.0
            for p in range(kh):
                for q in range(kw):
                    patch = xp[:, :, i * sh + p * dh, j * sw + q * dw]  # (N, C)
                    pixel = pixel + anp.dot(patch, anp.transpose(w[:, :, p, q]))  # (N, O)
            columns.append(pixel)
        rows.append(anp.stack(columns, axis=-1))  # (N, O, Wo)
    return anp.stack(rows, axis=-2)  # (N, O, Ho, Wo)


def pool2d_loops(x, kernel, stride, padding, kind):
    """max or avg (padding counted as zeros) over windows, one output pixel at a time."""
    (kh, kw) = _pair(kernel)
    (sh, sw), (ph, pw) = _pair(stride or kernel), _pair(padding)
    fill = -np.inf if kind == "max" else 0.0
    xp = anp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), "constant", constant_values=fill)
    _, _, height, width = anp.shape(xp)
    rows = []
    for i in range((height - kh) // sh + 1):
        columns = []
        for j in range((width - kw) // sw + 1):
            window = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            if kind == "max":
                columns.append(anp.max(window, axis=(2, 3)))
            else:
                columns.append(anp.sum(window, axis=(2, 3)) / (kh * kw))
        rows.append(anp.stack(columns, axis=-1))
    return anp.stack(rows, axis=-2)


@pytest.mark.parametrize(
    "geometry",
    [
        {"stride": 1, "padding": 0, "dilation": 1},
        {"stride": 2, "padding": 1, "dilation": 1},
        {"stride": (1, 2), "padding": (2, 0), "dilation": (2, 1)},
    ],
)
def test_conv2d_matches_autograd_loops(client, geometry):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 6, 7))
    w = rng.standard_normal((4, 3, 3, 2))
    expected_y = conv2d_loops(x, w, **geometry)
    seed = rng.standard_normal(expected_y.shape)

    g = Graph()
    g.conv2d(g.input("x"), g.input("w"), **geometry, name="y")
    result = client.gradient(g, "y", inputs={"x": x, "w": w}, seed=seed)

    def objective(xw):
        return anp.sum(conv2d_loops(xw[0], xw[1], **geometry) * seed)

    dx, dw = grad(objective)((x, w))
    assert_close(result.values["y"], expected_y, 1e-12, "y")
    assert_close(result.gradients["x"], dx, 1e-12, "d / dx")
    assert_close(result.gradients["w"], dw, 1e-12, "d / dw")


POOLS = [
    {"kernel": 2, "stride": None, "padding": 0},
    {"kernel": 3, "stride": 1, "padding": 1},
    {"kernel": (2, 3), "stride": (1, 2), "padding": (1, 1)},
]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("geometry", POOLS)
def test_pool2d_matches_autograd_loops(client, kind, geometry):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 2, 5, 6))  # continuous values: no tied maxima
    expected_y = pool2d_loops(x, kind=kind, **geometry)
    seed = rng.standard_normal(expected_y.shape)

    g = Graph()
    getattr(g, f"{kind}_pool2d")(g.input("x"), **geometry, name="y")
    result = client.gradient(g, "y", inputs={"x": x}, seed=seed)

    dx = grad(lambda v: anp.sum(pool2d_loops(v, kind=kind, **geometry) * seed))(x)
    assert_close(result.values["y"], expected_y, 1e-12, "y")
    assert_close(result.gradients["x"], dx, 1e-12, "d / dx")


# ---------------------------------------------------------------------------------------------
# CheckGradient must fail when its settings are wrong


def _nonlinear() -> tuple[Graph, dict[str, np.ndarray]]:
    g = Graph()
    x, y = g.input("x"), g.input("y")
    g.sum(g.mul(g.exp(x), g.sin(y)), name="out")
    return g, {"x": np.array([0.3, -0.7, 1.1]), "y": np.array([0.4, 1.3, -0.2])}


def test_check_gradient_passes_with_default_settings(client):
    g, inputs = _nonlinear()
    report = client.check_gradient(g, "out", inputs)
    assert report.passed
    assert set(report.nodes) == {"x", "y"}
    for node in report.nodes.values():
        assert node.passed and node.checked == 3
        assert node.max_abs_error < 1e-7


def test_check_gradient_zero_tolerance_fails(client):
    # Central differences always carry some truncation and rounding error.
    g, inputs = _nonlinear()
    report = client.check_gradient(g, "out", inputs, atol=0.0, rtol=0.0)
    assert report.atol == 0.0 and report.rtol == 0.0
    assert not report.passed
    assert any(not node.passed for node in report.nodes.values())
    for node in report.nodes.values():
        assert 0.0 < node.max_abs_error < 1e-6
        assert node.passed == (node.max_abs_error == 0.0)


@pytest.mark.parametrize(
    "sampling", [{}, {"max_elements": 1}, {"directions": 2}], ids=["all", "sampled", "directions"]
)
def test_check_gradient_huge_eps_fails(client, sampling):
    # With eps = 1 the central difference of exp is e^x sinh(1), off by (sinh(1) - 1) e^x.
    g = Graph()
    g.sum(g.exp(g.input("x")), name="out")
    x = np.array([0.5, 1.0])
    report = client.check_gradient(g, "out", {"x": x}, eps=1.0, **sampling)
    assert report.eps == 1.0
    assert not report.passed
    node = report.nodes["x"]
    assert not node.passed
    assert node.max_abs_error > 1e-5  # beyond the default atol alone
    if not sampling:
        assert node.max_abs_error == pytest.approx((math.sinh(1) - 1) * math.exp(1.0), rel=1e-9)
        assert node.max_rel_error == pytest.approx(1 - 1 / math.sinh(1), rel=1e-9)
