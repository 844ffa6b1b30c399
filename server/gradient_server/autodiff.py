"""Reverse mode as a graph-to-graph transform.

gradient_graph() extends a typed graph with the nodes of its backward pass, emitted by each
op's gradient rule from the same op table, so the backward pass is itself a graph that can be
executed, returned, drawn and differentiated again.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GraphError, no_deadline
from .ir import CHECK_EVERY, Graph, Node, TypeMemo, make_node
from .ops import OPS, GradCall, Ref
from .tensor_type import TensorType


@dataclass(frozen=True)
class GradientGraph:
    """A graph holding a forward pass and its backward pass.

    `gradients` maps each requested differentiable node to the node holding
    d(output)/d(node); `skipped` maps each requested non-differentiable node to the reason;
    `seed` names the input node that takes the output's upstream gradient.
    """

    graph: Graph
    types: dict[str, TensorType]
    gradients: dict[str, str]
    skipped: dict[str, str]
    seed: str


class _Builder:
    """Emits typed nodes under fresh names (the Emitter that gradient rules see).

    The nodes it emits are `nodes`, their types `node_types`, in the order emitted.
    """

    def __init__(self, taken: Iterable[str], stem: str = "grad"):
        prefix = stem
        while any(name.startswith(prefix + "/") for name in taken):
            prefix += "_"
        self.prefix = prefix
        self.nodes: list[Node] = []
        self.node_types: list[TensorType] = []
        self._count = 0
        self._memo = TypeMemo()
        # By op, operand types and attributes: the attributes and type emitted (see _emitter).
        self._emitted: dict[tuple[Any, ...], tuple[Any, TensorType, Any]] = {}
        self._constants: dict[tuple[str, Any], Ref] = {}
        self._numbers: dict[tuple[type, Any], Ref] = {}  # _constants by the Python number

    def intern_types(self, types: list[TensorType]) -> None:
        """Make these the types that emitted nodes of equal types get."""
        for tensor_type in dict(zip(map(id, types), types, strict=True)).values():
            self._memo.intern(tensor_type)

    def fresh_name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}/{stem}_{self._count}"

    def emitted_types(self) -> dict[str, TensorType]:
        """The types of the emitted nodes by name."""
        return dict(zip([node.name for node in self.nodes], self.node_types, strict=True))

    def _emit(self, node: Node, input_types: tuple[TensorType, ...]) -> Ref:
        try:
            node_type = self._memo.infer(node, input_types)
        except GraphError as e:
            raise RuntimeError(f"a gradient rule built an invalid node: {e}") from None
        self.nodes.append(node)
        self.node_types.append(node_type)
        return Ref(node.name, node_type)

    def input(self, stem: str, dtype: np.dtype, shape: tuple[int, ...]) -> Ref:
        """A new input node declaring its (strong) dtype and shape."""
        attrs = {"dtype": dtype, "shape": shape}
        node = make_node(self.fresh_name(stem), "input", (), attrs)
        node_type = TensorType(dtype, shape)
        self.nodes.append(node)
        self.node_types.append(node_type)
        return Ref(node.name, node_type)

    def op(self, op: str, *inputs: Ref | float, **attrs: Any) -> Ref:
        """Emit a node of `op` taking `inputs` (Refs, or Python numbers for constants)."""
        return _emitter(op)(self, *inputs, **attrs)

    def __getattr__(self, op: str) -> Callable[..., Ref]:
        # b.mul(x, y) is b.op("mul", x, y). The op's method is added to the class when first
        # asked for, so that later calls find it at once (big gradients make millions).
        if op not in OPS:
            raise AttributeError(op)
        setattr(_Builder, op, _emitter(op))
        return getattr(self, op)

    def _constant(self, value: float) -> Ref:
        # A Python number: a weakly typed scalar constant, shared by every use. Plain numbers
        # are looked up as they are first, which is quicker than making an array of them.
        number = (type(value), value)
        plain = number[0] in (int, float, bool) and value == value  # NaN equals nothing
        known = self._numbers.get(number) if plain else None
        if known is not None:
            return known
        array = np.asarray(value)
        key = (array.dtype.str, array.item())
        if key not in self._constants:
            node = make_node(
                self.fresh_name("const"), "constant", (), {"value": array, "weak": True}
            )
            self._constants[key] = self._emit(node, ())
        if plain:
            self._numbers[number] = self._constants[key]
        return self._constants[key]


@functools.cache
def _emitter(op: str) -> Callable[..., Ref]:
    """The _Builder method that emits a node of `op` (one function, not two: the hot path).

    A node's attributes and type depend only on the op, the operand types and the attributes
    given, so they are remembered by these (the types by identity, as TypeMemo does, the entry
    holding them; the attributes by name, type and value): emitting the same operation again
    only names a new node. Not remembered: unhashable values, and tensor attributes, whose
    decoded form depends on more than equality ((1, 2) and (1.0, 2.0) give different arrays).
    """
    by_value = all(spec.kind != "tensor" for spec in OPS[op].attrs)

    def emit_op(builder: _Builder, *operands: Ref | float, **attrs: Any) -> Ref:
        names: list[str] = []
        input_types: list[TensorType] = []
        key: list[Any] = [op]
        for operand in operands:
            ref = operand if isinstance(operand, Ref) else builder._constant(operand)
            names.append(ref.name)
            input_types.append(ref.type)
            key.append(id(ref.type))
        if attrs:
            for attr, value in attrs.items():
                key += (attr, type(value), value)
        builder._count += 1
        name = f"{builder.prefix}/{op}_{builder._count}"  # fresh_name's, without its call
        remembered = tuple(key)
        try:
            known = builder._emitted.get(remembered) if by_value else None
        except TypeError:  # an unhashable attribute value
            known, remembered = None, ()
        if known is None:
            ref = builder._emit(make_node(name, op, names, attrs), tuple(input_types))
            if by_value and remembered:
                builder._emitted[remembered] = (builder.nodes[-1].attrs, ref.type, input_types)
            return ref
        node_attrs, node_type, _ = known
        builder.nodes.append(Node(name, op, tuple(names), node_attrs))
        builder.node_types.append(node_type)
        return Ref(name, node_type)

    return emit_op


def gradient_graph(
    graph: Graph,
    types: Mapping[str, TensorType],
    output: str,
    wrt: Iterable[str],
    check_deadline: Callable[[], None] = no_deadline,
) -> GradientGraph:
    """Append to `graph` (typed by `types`) the backward pass of `output` for the nodes `wrt`.

    Only typed nodes take part (the caller types those it needs). Gradients are accumulated
    by addition over fan-out; each is summed to its node's shape and cast to its node's dtype
    here, once, so no rule deals with broadcasting.
    """
    wrt = list(dict.fromkeys(wrt))
    builder = _Builder(graph.nodes)
    out_type = types[output]
    seed = builder.input("seed", out_type.dtype, out_type.shape)

    wanted = {name for name in wrt if types[name].is_float}
    forward: list[Node] = []
    forward_types: list[TensorType] = []
    # Gradients flow only through float nodes: a path through an integer or bool value is
    # piecewise constant, so it contributes zero. (Only nodes the output depends on receive
    # gradients, and their inputs too, so active nodes it does not depend on never count.)
    active: set[str] = set()
    for name, node in graph.nodes.items():
        node_type = types.get(name)
        if node_type is None:
            continue
        forward.append(node)
        forward_types.append(node_type)
        if (name in wanted or not active.isdisjoint(node.inputs)) and node_type.is_float:
            active.add(name)
    # Emitted types equal to forward ones are then those very objects: most gradients are
    # seen to fit their node at once, and more emitted types are remembered as one.
    builder.intern_types(forward_types)

    pending: dict[str, list[Ref]] = {output: [seed]} if output in active else {}
    gradients: dict[str, Ref] = {}
    for index, (node, node_type) in enumerate(
        zip(reversed(forward), reversed(forward_types), strict=True)
    ):
        if index % CHECK_EVERY == 0:
            check_deadline()
        contributions = pending.pop(node.name, None)
        if contributions is None:
            continue
        g = contributions[0]
        if len(contributions) > 1:
            for extra in contributions[1:]:
                g = builder.op("add", g, extra)
        if node.name in wanted:
            gradients[node.name] = g
        opdef = OPS[node.op]
        inputs = node.inputs
        flags = opdef.differentiable
        if flags and all(flags):  # every operand is differentiable (the usual case)
            needs = list(map(active.__contains__, inputs))
        else:
            needs = [s in active and opdef.is_differentiable(i) for i, s in enumerate(inputs)]
        if not any(needs):
            continue
        assert opdef.backward is not None  # an op without a rule differentiates no input
        input_refs = tuple(map(Ref, inputs, map(types.__getitem__, inputs)))
        call = GradCall(node.attrs, input_refs, Ref(node.name, node_type))
        results = tuple(opdef.backward(builder, call, g))
        if len(results) != len(node.inputs):
            raise RuntimeError(
                f"gradient rule of {node.op} returned {len(results)} gradients "
                f"for {len(node.inputs)} inputs"
            )
        for operand, need, result in zip(call.inputs, needs, results, strict=True):
            if need and result is not None:
                if result.type is not operand.type:
                    result = _fit(builder, result, operand.type)
                pending.setdefault(operand.name, []).append(result)

    result_names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in wrt:
        node_type = types[name]
        if not node_type.is_float:
            skipped[name] = f"{node_type.dtype.name} is not differentiable"
        elif name in gradients:
            result_names[name] = gradients[name].name
        else:
            zeros = {"shape": node_type.shape, "dtype": node_type.dtype}
            zeros_node = make_node(builder.fresh_name("zeros"), "zeros", (), zeros)
            result_names[name] = builder._emit(zeros_node, ()).name

    # What the results depend on: inputs are emitted before the nodes that take them.
    keep = {seed.name, *result_names.values()}
    backward: list[Node] = []
    backward_types: list[TensorType] = []
    for node, node_type in zip(reversed(builder.nodes), reversed(builder.node_types), strict=True):
        if node.name in keep:
            keep.update(node.inputs)
            backward.append(node)
            backward_types.append(node_type)
    backward.reverse()
    backward_types.reverse()
    combined = Graph([*forward, *backward])
    # The combined graph is determined by the forward graph, the request and the sources' types.
    sources = sorted((node.name, str(types[node.name])) for node in forward if node.op == "input")
    identity = repr((graph.digest, output, wrt, sources)).encode()
    combined.digest = hashlib.sha256(identity).hexdigest()
    kept_types = dict(zip(combined.nodes, [*forward_types, *backward_types], strict=True))
    return GradientGraph(combined, kept_types, result_names, skipped, seed.name)


def _fit(builder: _Builder, gradient: Ref, target: TensorType) -> Ref:
    """Sum a gradient to its node's shape (undoing broadcasting) and cast it to its dtype."""
    if gradient.shape != target.shape:
        gradient = builder.op("sum_to_shape", gradient, shape=target.shape)
    if gradient.dtype != target.dtype:
        gradient = builder.op("cast", gradient, dtype=target.dtype)
    return gradient


@dataclass(frozen=True)
class DirectionalGraph:
    """A gradient graph extended with sum_i <gradient_i, v_i> over direction inputs v_i.

    `vectors` maps each differentiated input to the input node taking its direction, and
    `output` names the scalar; its gradient is a Hessian-vector product.
    """

    graph: Graph
    types: dict[str, TensorType]
    output: str
    vectors: dict[str, str]


def directional_derivative(combined: GradientGraph, names: Iterable[str]) -> DirectionalGraph:
    """Extend a gradient graph with the dot product of the gradients of `names` with new inputs."""
    types = combined.types
    builder = _Builder(combined.graph.nodes, stem="hvp")
    vectors: dict[str, str] = {}
    total: Ref | None = None
    for name in names:
        gradient = Ref(combined.gradients[name], types[combined.gradients[name]])
        direction = builder.input(f"v_{name}", gradient.dtype, gradient.shape)
        vectors[name] = direction.name
        term = builder.op("sum", builder.op("mul", gradient, direction))
        total = term if total is None else builder.op("add", total, term)
    assert total is not None, "a directional derivative needs at least one direction"
    graph = Graph([*combined.graph.nodes.values(), *builder.nodes])
    graph.digest = f"{combined.graph.digest}/directional"
    return DirectionalGraph(graph, types | builder.emitted_types(), total.name, vectors)
