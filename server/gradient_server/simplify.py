"""Graph simplification before planning: constant folding, common subexpressions, algebraic
identities (most of them left by gradient rules) and dead nodes.

simplify() rewrites a typed graph in one sweep in topological order, so each node sees its
operands already simplified and one sweep reaches a fixed point. Each rule is a small function
of one node; none changes a value by more than rounding (the one that rounds differently is
named), so the simplified graph computes what the original did, and simplifying it again
changes nothing. A node that is replaced keeps being reachable under its name through
`Simplified.renamed`.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import GraphError, no_deadline
from .ir import CHECK_EVERY, Graph, Node, infer_node_type, make_node
from .ops import Call, InvalidValue
from .tensor_type import TensorType

FOLD_MAX_ELEMENTS = 1 << 16
"""Results of at most this many elements are folded into constants: a folded value is held by
the cached plan, so a large one would cost memory for as long as the plan is cached."""

FOLD_MAX_FLOPS = 10_000_000
"""Estimated work of an op folded at plan time, at most (about 0.2 ms)."""

KEY_MAX_ELEMENTS = 1 << 16
"""Constants of at most this many elements are compared by value to find duplicates."""


@dataclass(frozen=True)
class Simplified:
    """A simplified graph, its types, and where each replaced root's value now is."""

    graph: Graph
    types: dict[str, TensorType]
    renamed: dict[str, str]  # a root that was replaced -> the node holding its value

    def name_of(self, name: str) -> str:
        """The node holding the value of the original node `name`."""
        return self.renamed.get(name, name)


class _Rewriter:
    """The state of one sweep: the nodes kept so far, their types, and replacements."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.types: dict[str, TensorType] = {}
        self.nodes: list[Node] = []
        self.kept: dict[str, Node] = {}
        self.replaced: dict[str, str] = {}
        self.by_key: dict[tuple, str] = {}
        self.changed = False  # whether any node was rewritten or folded
        self._constant_kinds: dict[str, str | None] = {}
        self._taken: set[str] | None = None

    def constant_value(self, name: str) -> np.ndarray | None:
        node = self.kept.get(name)
        return node.attrs["value"] if node is not None and node.op == "constant" else None

    def constant_kind(self, name: str) -> str | None:
        """ "one", "zero" (0 or 0.0) or "negative zero" (-0.0) when `name` is a constant
        holding only that value (the identities' neutral elements), else None; worked out
        once per constant."""
        if name in self._constant_kinds:
            return self._constant_kinds[name]
        value = self.constant_value(name)
        kind = None
        if value is not None and value.size and value.dtype.kind in "iuf":
            if np.all(value == 1):
                kind = "one"
            elif np.all(value == 0):
                signs = np.signbit(value)
                kind = "negative zero" if np.all(signs) else None if np.any(signs) else "zero"
        self._constant_kinds[name] = kind
        return kind

    def add(self, node: Node, node_type: TensorType | None = None) -> str:
        """Keep `node` (typed by its rule unless `node_type` is given); returns its name."""
        if node_type is None:
            node_type = infer_node_type(node, tuple(self.types[s] for s in node.inputs))
        self.nodes.append(node)
        self.kept[node.name] = node
        self.types[node.name] = node_type
        return node.name

    def fresh_name(self, stem: str) -> str:
        if self._taken is None:
            self._taken = set(self.graph.nodes)
        name, count = stem, 0
        while name in self._taken:
            count += 1
            name = f"{stem}_{count}"
        self._taken.add(name)
        return name


def simplify(
    graph: Graph,
    types: Mapping[str, TensorType],
    roots: Iterable[str],
    check_deadline: Callable[[], None] = no_deadline,
    protected: Container[str] = frozenset(),
) -> Simplified:
    """The typed part of `graph` (the nodes in `types`) simplified, keeping what `roots` need
    and every input (so it takes the same feeds).

    A protected node is kept as it is, under its name, if it is needed (a gradient graph keeps
    its forward nodes so, as the client built them); its operands may still be simplified."""
    roots = list(roots)
    rewriter = _Rewriter(graph)
    replaced = rewriter.replaced
    for index, node in enumerate(graph.nodes.values()):
        if index % CHECK_EVERY == 0:
            check_deadline()
        name = node.name
        node_type = types.get(name)
        if node_type is None:
            continue
        if replaced and any(source in replaced for source in node.inputs):
            inputs = tuple(replaced.get(s, s) for s in node.inputs)
            node = Node(name, node.op, inputs, node.attrs)
            rewriter.changed = True
        if name in protected:
            rewriter.add(node, node_type)
            continue
        replacement = _simplified(rewriter, node, node_type)
        if replacement is not None:
            replaced[name] = replacement
    renamed = {root: replaced[root] for root in roots if root in replaced}
    kept = remove_dead(rewriter.nodes, [renamed.get(root, root) for root in roots])
    if not rewriter.changed and not replaced and len(kept) == len(graph):
        return Simplified(graph, dict(types), {})  # nothing to simplify
    simplified = Graph(kept)
    simplified.digest = graph.digest
    return Simplified(simplified, {n.name: rewriter.types[n.name] for n in kept}, renamed)


def _simplified(rewriter: _Rewriter, node: Node, node_type: TensorType) -> str | None:
    """Keep the node, or a rewrite of it, and return None; or return the name of an earlier
    node holding the same value."""
    if node.op == "input":
        rewriter.add(node, node_type)
        return None
    while True:  # a rewrite may enable an identity or another rewrite
        same = identity(rewriter, node, node_type)
        if same is not None:
            return same
        rewritten = rewrite(rewriter, node, node_type)
        if rewritten is None:
            break
        node = rewritten
        rewriter.changed = True
    folded = fold_constant(rewriter, node, node_type)
    if folded is not None:
        node = folded
        rewriter.changed = True
    key = common_key(node)
    if key is not None:
        earlier = rewriter.by_key.get(key)
        if earlier is not None and rewriter.types[earlier] == node_type:
            return earlier
        rewriter.by_key[key] = node.name
    rewriter.add(node, node_type)
    return None


# ---------------------------------------------------------------------------------------------
# The rules


def identity(rewriter: _Rewriter, node: Node, node_type: TensorType) -> str | None:
    """The operand whose value the node merely repeats, or None: x * 1, 1 * x, x / 1, x + 0,
    0 + x, x - 0, neg(neg(x)), a reshape, broadcast_to, sum_to_shape or cast to x's own type,
    a transpose undoing a transpose, a sum over axes of size 1 to x's own shape. Exact."""
    rule = _IDENTITIES.get(node.op)
    if rule is None:
        return None
    same = rule(rewriter, node)
    if same is None or rewriter.types[same] != node_type:
        return None
    return same


def _neutral(kind: str, positions: tuple[int, ...]) -> Callable[[_Rewriter, Node], str | None]:
    """x op c == x when the constant c at one of `positions` holds only `kind` (see
    _Rewriter.constant_kind).

    The sign of a zero counts: x + (-0.0) is x for every x, x + 0.0 is not (it is 0.0 where x
    is -0.0, and 1 / that is inf, not -inf); x - 0.0 is x, and so is x - 0."""

    def rule(rewriter: _Rewriter, node: Node) -> str | None:
        for position in positions:
            if rewriter.constant_kind(node.inputs[position]) == kind:
                return node.inputs[1 - position]
        return None

    return rule


def _double(op: str) -> Callable[[_Rewriter, Node], str | None]:
    """f(f(x)) == x for an involution f."""

    def rule(rewriter: _Rewriter, node: Node) -> str | None:
        inner = rewriter.kept.get(node.inputs[0])
        return inner.inputs[0] if inner is not None and inner.op == op else None

    return rule


def _same_type(rewriter: _Rewriter, node: Node) -> str | None:
    """A shape or dtype op whose operand already has the result's type (identity() compares)."""
    return node.inputs[0]


def _transpose_twice(rewriter: _Rewriter, node: Node) -> str | None:
    inner = rewriter.kept.get(node.inputs[0])
    if inner is None or inner.op != "transpose":
        return None
    rank = len(rewriter.types[inner.inputs[0]].shape)
    first = inner.attrs["axes"] or tuple(reversed(range(rank)))
    second = node.attrs["axes"] or tuple(reversed(range(rank)))
    composed = [first[a % rank] for a in second]
    return inner.inputs[0] if composed == list(range(rank)) else None


def _sum_of_ones(rewriter: _Rewriter, node: Node) -> str | None:
    """A sum over axes of size 1 only, keeping the dimensions, is x itself."""
    x = rewriter.types[node.inputs[0]]
    return node.inputs[0] if node.attrs["keepdims"] and _sums_only_ones(node, x) else None


def _sums_only_ones(node: Node, x: TensorType) -> bool:
    axis = node.attrs["axis"]
    axes = range(len(x.shape)) if axis is None else axis
    try:
        return all(x.shape[a] == 1 for a in axes)
    except IndexError:
        return False


_IDENTITIES: dict[str, Callable[[_Rewriter, Node], str | None]] = {
    "mul": _neutral("one", (0, 1)),
    "div": _neutral("one", (1,)),
    "add": _neutral("negative zero", (0, 1)),
    "sub": _neutral("zero", (1,)),
    "neg": _double("neg"),
    "reshape": _same_type,
    "broadcast_to": _same_type,
    "sum_to_shape": _same_type,
    "cast": _same_type,
    "transpose": _transpose_twice,
    "sum": _sum_of_ones,
}


def rewrite(rewriter: _Rewriter, node: Node, node_type: TensorType) -> Node | None:
    """A cheaper node computing the same value under the same name, or None:
    a sum over axes of size 1 becomes a reshape; a reshape of a reshape one reshape; a matrix
    product contracting a dimension of size 1 (an outer product) a broadcast product, each
    element the same single product; a sum_to_shape of x broadcast to a larger shape becomes
    x times the number of copies summed (the one rule that rounds differently: one product
    instead of a sum of equal terms)."""
    if node.op == "sum" and node_type.dtype == rewriter.types[node.inputs[0]].dtype:
        if _sums_only_ones(node, rewriter.types[node.inputs[0]]):
            return _emit(rewriter, node, node_type, "reshape", node.inputs, shape=node_type.shape)
    if node.op == "reshape":
        inner = rewriter.kept.get(node.inputs[0])
        if inner is not None and inner.op == "reshape":
            return _emit(rewriter, node, node_type, "reshape", inner.inputs, shape=node_type.shape)
    if node.op == "matmul":
        a, b = (rewriter.types[s] for s in node.inputs)
        outer = len(a.shape) == len(b.shape) == 2 and a.shape[1] == 1 == b.shape[0]
        if outer and a.dtype == b.dtype == node_type.dtype:
            return _emit(rewriter, node, node_type, "mul", node.inputs)
    if node.op == "sum_to_shape":
        inner = rewriter.kept.get(node.inputs[0])
        if inner is not None and inner.op == "broadcast_to":
            source = inner.inputs[0]
            if rewriter.types[source].shape == node_type.shape:
                copies = rewriter.types[inner.name].size // max(node_type.size, 1)
                count = np.asarray(float(copies) if node_type.is_float else copies)
                constant = make_node(
                    rewriter.fresh_name(f"{node.name}/copies"),
                    "constant",
                    (),
                    {"value": count, "weak": True},
                )
                rewriter.add(constant)
                return _emit(rewriter, node, node_type, "mul", (source, constant.name))
    return None


def _emit(
    rewriter: _Rewriter, node: Node, node_type: TensorType, op: str, inputs: Iterable[str], **attrs
) -> Node:
    """The node `node.name` recomputed as `op`, of the same type."""
    new = make_node(node.name, op, inputs, attrs)
    new_type = infer_node_type(new, tuple(rewriter.types[s] for s in new.inputs))
    assert new_type == node_type, f"a rewrite of {node.describe()} changed its type"
    return new


def fold_constant(rewriter: _Rewriter, node: Node, node_type: TensorType) -> Node | None:
    """The node as a constant when its operands are all constants and its value is small and
    cheap to compute now (it is computed with the op's own forward, so the value is the same)."""
    values = []
    for source in node.inputs:
        value = rewriter.constant_value(source)
        if value is None:
            return None
        values.append(value)
    if node.op in ("constant", "input") or node_type.size > FOLD_MAX_ELEMENTS:
        return None
    opdef = node.opdef
    call = Call(node.attrs, tuple(rewriter.types[s] for s in node.inputs), node_type)
    if opdef.estimated_cost(call) > FOLD_MAX_FLOPS:
        return None
    try:
        with np.errstate(all="ignore"):
            value = np.asarray(opdef.forward(call, *values))
    except (InvalidValue, GraphError):
        return None  # the plan raises it when it runs, naming the node
    if value.shape != node_type.shape or value.dtype != node_type.dtype:
        return None
    value = np.array(value)  # its own copy (a view would keep its base alive)
    return make_node(node.name, "constant", (), {"value": value, "weak": node_type.weak})


def common_key(node: Node) -> tuple | None:
    """What two nodes computing the same value share: op, operands and attributes (constants
    by value, when small); None for nodes never merged (inputs, each its own feed)."""
    if node.op == "input":
        return None
    if not node.attrs:
        return (node.op, node.inputs)
    attrs = []
    for name, value in node.attrs.items():
        if isinstance(value, np.ndarray):
            if value.size > KEY_MAX_ELEMENTS:
                return None
            value = (value.dtype.str, value.shape, value.tobytes())
        elif isinstance(value, float):
            value = value.hex()  # tells -0.0 from 0.0 (which compare equal)
        attrs.append((name, value))
    return (node.op, node.inputs, tuple(attrs))


def remove_dead(nodes: list[Node], roots: Iterable[str]) -> list[Node]:
    """The nodes the roots need, and every input, in their order."""
    needed = set(roots)
    kept = []
    for node in reversed(nodes):
        if node.name in needed:
            needed.update(node.inputs)
            kept.append(node)
        elif node.op == "input":
            kept.append(node)
    kept.reverse()
    return kept
