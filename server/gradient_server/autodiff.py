"""Reverse mode as a graph-to-graph transform.

gradient_graph() extends a typed graph with the nodes of its backward pass, emitted by each
op's gradient rule from the same op table, so the backward pass is itself a graph that can be
executed, returned, drawn and differentiated again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .errors import GraphError, no_deadline
from .ir import CHECK_EVERY, Graph, Node, infer_node_type, make_node
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
    """Emits typed nodes under fresh names (the Emitter that gradient rules see)."""

    def __init__(self, taken: Iterable[str], types: dict[str, TensorType], stem: str = "grad"):
        taken = set(taken)
        prefix = stem
        while any(name.startswith(prefix + "/") for name in taken):
            prefix += "_"
        self.prefix = prefix
        self.types = types
        self.nodes: list[Node] = []
        self._count = 0
        self._constants: dict[tuple[str, Any], Ref] = {}

    def fresh_name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}/{stem}_{self._count}"

    def emit(self, node: Node) -> Ref:
        try:
            node_type = infer_node_type(node, tuple(self.types[s] for s in node.inputs))
        except GraphError as e:
            raise RuntimeError(f"a gradient rule built an invalid node: {e}") from None
        self.nodes.append(node)
        self.types[node.name] = node_type
        return Ref(node.name, node_type)

    def input(self, stem: str, dtype: np.dtype, shape: tuple[int, ...]) -> Ref:
        """A new input node declaring its (strong) dtype and shape."""
        attrs = {"dtype": dtype, "shape": shape}
        node = make_node(self.fresh_name(stem), "input", (), attrs)
        self.nodes.append(node)
        self.types[node.name] = TensorType(dtype, shape)
        return Ref(node.name, self.types[node.name])

    def op(self, op: str, *inputs: Ref | float, **attrs: Any) -> Ref:
        names = [self._operand(x).name for x in inputs]
        return self.emit(make_node(self.fresh_name(op), op, names, attrs))

    def __getattr__(self, op: str):
        if op in OPS:
            return partial(self.op, op)
        raise AttributeError(op)

    def _operand(self, value: Ref | float) -> Ref:
        if isinstance(value, Ref):
            return value
        # A Python number: a weakly typed scalar constant, shared by every use.
        array = np.asarray(value)
        key = (array.dtype.str, array.item())
        if key not in self._constants:
            node = make_node(
                self.fresh_name("const"), "constant", (), {"value": array, "weak": True}
            )
            self._constants[key] = self.emit(node)
        return self._constants[key]


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
    all_types = dict(types)
    builder = _Builder(graph.nodes, all_types)
    out_type = types[output]
    seed = builder.input("seed", out_type.dtype, out_type.shape)

    forward = [node for name, node in graph.nodes.items() if name in types]
    upstream = graph.ancestors([output])
    wanted = {name for name in wrt if types[name].is_float}
    # Gradients flow only through float nodes: a path through an integer or bool value is
    # piecewise constant, so it contributes zero.
    active: set[str] = set()
    for node in forward:
        if (
            node.name in upstream
            and types[node.name].is_float
            and (node.name in wanted or any(s in active for s in node.inputs))
        ):
            active.add(node.name)

    pending: dict[str, list[Ref]] = {output: [seed]} if output in active else {}
    gradients: dict[str, Ref] = {}
    for index, node in enumerate(reversed(forward)):
        if index % CHECK_EVERY == 0:
            check_deadline()
        contributions = pending.pop(node.name, None)
        if contributions is None:
            continue
        g = contributions[0]
        for extra in contributions[1:]:
            g = builder.op("add", g, extra)
        gradients[node.name] = g
        opdef = node.opdef
        needs = [
            opdef.is_differentiable(i) and source in active for i, source in enumerate(node.inputs)
        ]
        if not any(needs):
            continue
        call = GradCall(
            node.attrs,
            tuple(Ref(s, all_types[s]) for s in node.inputs),
            Ref(node.name, all_types[node.name]),
        )
        results = tuple(opdef.backward(builder, call, g))
        if len(results) != len(node.inputs):
            raise RuntimeError(
                f"gradient rule of {node.op} returned {len(results)} gradients "
                f"for {len(node.inputs)} inputs"
            )
        for source, need, result in zip(node.inputs, needs, results, strict=True):
            if need and result is not None:
                pending.setdefault(source, []).append(_fit(builder, result, all_types[source]))

    result_names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in wrt:
        node_type = all_types[name]
        if not node_type.is_float:
            skipped[name] = f"{node_type.dtype.name} is not differentiable"
        elif name in gradients:
            result_names[name] = gradients[name].name
        else:
            zeros = {"shape": node_type.shape, "dtype": node_type.dtype}
            result_names[name] = builder.emit(
                make_node(builder.fresh_name("zeros"), "zeros", (), zeros)
            ).name

    keep = Graph([*forward, *builder.nodes]).ancestors(result_names.values())
    backward = [node for node in builder.nodes if node.name in keep or node.name == seed.name]
    combined = Graph([*forward, *backward])
    # The combined graph is determined by the forward graph, the request and the sources' types.
    sources = sorted((n, str(t)) for n, t in types.items() if graph[n].op == "input")
    identity = repr((graph.digest, output, wrt, sources)).encode()
    combined.digest = hashlib.sha256(identity).hexdigest()
    kept_types = {name: all_types[name] for name in combined.nodes}
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
    types = dict(combined.types)
    builder = _Builder(combined.graph.nodes, types, stem="hvp")
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
    return DirectionalGraph(graph, types, total.name, vectors)
