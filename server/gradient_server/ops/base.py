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


@dataclass(frozen=True)
class Ref:
    """A node of a graph under construction, as seen by a gradient rule: its name and type."""

    name: str
    type: TensorType

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


@dataclass(frozen=True)
class GradCall:
    """What a gradient rule knows of its node: attributes, inputs and output as Refs."""

    attrs: Mapping[str, Any]
    inputs: tuple[Ref, ...]
    out: Ref


class Emitter(Protocol):
    """Adds nodes to the gradient graph. `b.op("mul", x, y)` or, shorter, `b.mul(x, y)`.

    Operands are Refs or Python numbers (which become weakly typed scalar constants).
    """

    def op(self, op: str, *inputs: Ref | float, **attrs: Any) -> Ref: ...

    def __getattr__(self, op: str) -> Callable[..., Ref]: ...


InferFn = Callable[..., TensorType]
ForwardFn = Callable[..., np.ndarray]
BackwardFn = Callable[[Emitter, GradCall, Ref], Sequence[Ref | None]]


@dataclass(frozen=True)
class OpDef:
    """One op: its operands, attributes, shape/dtype rule, forward and gradient rule.

    infer(attrs, *input_types) -> TensorType raises ShapeError for bad operands.
    forward(call, *arrays) -> np.ndarray computes the value in numpy.
    workspace(call) -> int, if set, bounds the bytes forward allocates besides its result.
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
