"""The op table's building blocks: op and attribute declarations, and the registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..tensor_type import TensorType

REQUIRED = object()
"""Default of an attribute that must be given."""

ATTR_KINDS = ("int", "float", "string", "bool", "ints", "floats", "tensor", "axes", "dtype")
"""Attribute kinds. "axes" is an int or a list of ints; "dtype" is a dtype name string."""


class ShapeError(ValueError):
    """An op's inputs or attributes do not fit its shape or dtype rule."""


class InvalidValue(ValueError):
    """An operand's values are invalid for the op (e.g. an index out of range)."""


def check_shape_attr(shape: tuple[int, ...]) -> None:
    """ShapeError if a shape attribute has a negative dimension."""
    if any(d < 0 for d in shape):
        raise ShapeError(f"shape {list(shape)} has a negative dimension")


def normalize_axis(axis: int, rank: int) -> int:
    """A non-negative axis for `rank` dimensions (negative counts from the end); ShapeError
    when out of range."""
    if not -rank <= axis < rank:
        raise ShapeError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank


@dataclass(frozen=True)
class AttrSpec:
    """One attribute of an op: its name, kind, default (or REQUIRED) and meaning."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""

    def __post_init__(self) -> None:
        assert self.kind in ATTR_KINDS, self.kind


class Ref:
    """A node of a graph under construction, as seen by a gradient rule: its name and type.

    Never changed once made. A plain class with slots rather than a frozen dataclass: a big
    gradient makes several per node, and this one is three times cheaper to make.
    """

    __slots__ = ("name", "type")

    def __init__(self, name: str, type: TensorType):
        self.name = name
        self.type = type

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ref):
            return NotImplemented
        return self.name == other.name and self.type == other.type

    def __hash__(self) -> int:
        return hash((self.name, self.type))

    def __repr__(self) -> str:
        return f"Ref(name={self.name!r}, type={self.type!r})"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> np.dtype:
        return self.type.dtype


@dataclass(frozen=True)
class Call:
    """What a forward function knows of its node: attributes, input types and output type."""

    attrs: Mapping[str, Any]
    input_types: tuple[TensorType, ...]
    type: TensorType


class GradCall:
    """What a gradient rule knows of its node: attributes, inputs and output as Refs.

    Never changed once made; a plain class with slots, as Ref, made once per node.
    """

    __slots__ = ("attrs", "inputs", "out")

    def __init__(self, attrs: Mapping[str, Any], inputs: tuple[Ref, ...], out: Ref):
        self.attrs = attrs
        self.inputs = inputs
        self.out = out

    def __repr__(self) -> str:
        return f"GradCall(attrs={self.attrs!r}, inputs={self.inputs!r}, out={self.out!r})"


class Emitter(Protocol):
    """Adds nodes to the gradient graph. `b.op("mul", x, y)` or, shorter, `b.mul(x, y)`.

    Operands are Refs or Python numbers (which become weakly typed scalar constants).
    """

    def op(self, op: str, *inputs: Ref | float, **attrs: Any) -> Ref: ...

    def __getattr__(self, op: str) -> Callable[..., Ref]: ...


InferFn = Callable[..., TensorType]
ForwardFn = Callable[..., np.ndarray]
BackwardFn = Callable[[Emitter, GradCall, Ref], Sequence[Ref | None]]


# ---------------------------------------------------------------------------------------------
# Costs
#
# An op's cost is the work of its forward in flops, estimated from its call (operand types,
# result type, attributes) before anything runs. The unit is the floating-point operation of a
# BLAS matrix product, where a multiply-add counts 2: a (m, k) @ (k, n) product costs 2*m*k*n.
# The rest of numpy's work goes element by element (memory-bound passes over arrays, libm
# calls, strided gathers, Python loops over kernel positions) and is far slower per operation
# than BLAS, so it is charged in the same unit by its time: the flops a matrix product does in
# that time on the calibration machine (2 cores, numpy 2.4 with OpenBLAS, float64 matmul about
# 60 GFLOP/s: 1 ns is about 60 flops). benchmarks/calibrate_costs.py measures every op against
# its estimate. A cost is thus a time estimate, and the engine's flop limits bound how long a
# request, and any one of its ops, can run: deadlines are checked between ops, not inside one.
#
# Estimates assume C-contiguous operands and an otherwise idle machine. A view whose elements
# lie apart in memory (a transpose's result) costs nothing where it is made, and a
# memory-bound op reading it beside a contiguous operand can take 3 to 4 times its estimate
# (reshape, which then copies, is charged for that).

MULTIPLY_ADD = 2
"""Flops of one multiply-add of a float matrix product (BLAS)."""

INT_MULTIPLY_ADD = 500
"""Flops charged for one multiply-add of an integer matrix product: numpy computes those
without BLAS, at 2 to 8 ns each (the larger the matrices, the slower)."""

ELEMENT = 50
"""Flops charged for each element an op reads in one pass over a contiguous array (0.8 ns);
writing an element to a new array counts twice."""

TRANSCENDENTAL = 700
"""Flops charged for each evaluation of a transcendental function (exp: 12 ns in float64)."""

GATHER = 1000
"""Flops charged for each element read or written where consecutive accesses lie far apart
in memory (through indices or a strided view), a cache miss each: about 15 ns."""

LOOP_STEP = 300_000
"""Flops charged for each step of a Python loop inside an op (over kernel positions): 5 us."""


def elements(*types: TensorType) -> int:
    """The number of elements of the given types together."""
    return sum(t.size for t in types)


def default_cost(call: Call) -> int:
    """One pass reading every operand and writing the result: ELEMENT flops for each element
    read, twice that for each one written, and an operand of another dtype than the result's
    is converted first (read and written once more).

    Right, within a factor of two, for elementwise ops without transcendental functions
    (broadcast operands count their own size), reductions (their input dominates), casts and
    copies; an upper bound for sources of zeros (fresh pages cost their first writer) and
    comparisons (whose bool results are small).
    """
    dtype = call.type.dtype
    read = sum(t.size * (1 if t.dtype == dtype else 3) for t in call.input_types)
    return ELEMENT * (read + 2 * call.type.size)


def pass_cost(passes: float = 1.0, transcendental: float = 0.0) -> Callable[[Call], int]:
    """A cost rule for an op making `passes` passes like default_cost's over its operands
    and result, and evaluating `transcendental` functions per element of its largest operand
    or result (softmax: a max, a subtraction, an exp, a sum and a division: passes=3,
    transcendental=1)."""

    def cost(call: Call) -> int:
        largest = max(t.size for t in (*call.input_types, call.type))
        return round(passes * default_cost(call) + transcendental * TRANSCENDENTAL * largest)

    return cost


def no_cost(call: Call) -> int:
    """The cost of an op that does no work proportional to its data when it runs: an input, a
    constant, or a view (transpose, slice, broadcast_to, expand_dims, squeeze)."""
    return 0


def strided_cost(count: int, run: int) -> int:
    """Flops of reading (or updating) `count` elements in runs of `run` consecutive ones, the
    runs far apart: two contiguous passes' worth, plus a cache miss per run (at most one per
    8 elements, a cache line of float64)."""
    return count * (2 * ELEMENT + (GATHER - 2 * ELEMENT) // min(max(run, 1), 8))


@dataclass(frozen=True)
class OpDef:
    """One op: its operands, attributes, shape/dtype rule, forward and gradient rule.

    infer(attrs, *input_types) -> TensorType raises ShapeError for bad operands.
    forward(call, *arrays) -> np.ndarray computes the value in numpy.
    workspace(call) -> int, if set, bounds the bytes forward allocates besides its result.
    cost(call) -> int, if set, estimates the flops forward takes (default_cost otherwise).
    backward(b, call, g) -> one Ref or None per operand: the gradient of the output with
    respect to that operand given the output's gradient g. It may return a gradient of a
    broadcast shape or of another float dtype: the engine sums it to the operand's shape and
    casts it to the operand's dtype. None means no gradient flows to that operand.
    """

    name: str
    doc: str
    inputs: tuple[str, ...]
    infer: InferFn
    forward: ForwardFn
    backward: BackwardFn | None = None
    differentiable: tuple[bool, ...] = ()
    attrs: tuple[AttrSpec, ...] = ()
    variadic: bool = False
    workspace: Callable[[Call], int] | None = None
    """Bytes the forward function allocates beyond its result (e.g. unfolded windows), so the
    engine can charge them against the request's memory limit before running."""
    cost: Callable[[Call], int] | None = None
    """Estimated floating-point operations of forward, in the unit of the module's cost
    section (a multiply-add of a matrix product is 2; numpy's passes over arrays and its
    transcendental functions are charged their time's worth), so the engine can charge them
    against the request's work limits before running. None: default_cost."""
    bind: Callable[[Call], Callable[..., np.ndarray] | None] | None = None
    """A function computing this call from the operands alone, chosen once when the plan is
    built (e.g. numpy's own, when no operand needs a cast), or None to use forward."""

    def __post_init__(self) -> None:
        if not self.differentiable:
            object.__setattr__(
                self, "differentiable", (self.backward is not None,) * len(self.inputs)
            )
        assert len(self.differentiable) == len(self.inputs), self.name

    def is_differentiable(self, index: int) -> bool:
        """Whether gradients flow to operand `index` (variadic operands repeat the last)."""
        if not self.differentiable:
            return False
        return self.differentiable[min(index, len(self.differentiable) - 1)]

    def estimated_cost(self, call: Call) -> int:
        """The flops forward takes for `call`, by the op's cost rule or default_cost."""
        return (self.cost or default_cost)(call)

    def attr_spec(self, name: str) -> AttrSpec | None:
        """The declaration of attribute `name`, or None."""
        return next((a for a in self.attrs if a.name == name), None)


OPS: dict[str, OpDef] = {}
"""The op table: every op the server knows, by name."""


def register(op: OpDef) -> OpDef:
    """Add an op to the table (once)."""
    assert op.name not in OPS, f"op {op.name} declared twice"
    OPS[op.name] = op
    return op
