"""The graph IR: decoding and validating a gradient.v1.Graph, ordering it, and typing it."""

from __future__ import annotations

import difflib
import heapq
import itertools
import operator
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from gradient.v1 import graph_pb2
from gradient_client import wire
from gradient_client.tensors import (
    TensorFormatError,
    dtype_from_name,
    from_proto,
    shape_problem,
    to_proto,
)

from .errors import GraphError, no_deadline
from .ops import OPS, AttrSpec, OpDef, ShapeError
from .ops.base import REQUIRED
from .tensor_type import TensorType

NODE_BYTES = 600
"""Memory a decoded node takes (its name, op, inputs and attributes), measured on chains."""

MAX_LIST_ATTR = 128
"""Values a list attribute may hold: its lists are per dimension (a shape, axes, strides, or
two pads per dimension), and numpy arrays have at most 64 dimensions. Checked before the list
is converted, so a request cannot make the server build a huge one."""

LIST_ITEM_BYTES = 40
"""Memory an item of an attribute list takes: a pointer and a Python number."""


class Node:
    """One node: its name, op, operand names and decoded attributes (every declared one).

    Nodes are never changed once built (a graph shares them with the graphs derived from it).
    A plain class with slots rather than a frozen dataclass: big graphs build millions of
    them, and this one is three times cheaper to build.
    """

    __slots__ = ("name", "op", "inputs", "attrs")

    def __init__(self, name: str, op: str, inputs: tuple[str, ...], attrs: Mapping[str, Any]):
        self.name = name
        self.op = op
        self.inputs = inputs
        self.attrs = attrs

    @property
    def opdef(self) -> OpDef:
        return OPS[self.op]

    def describe(self) -> str:
        """How error messages name the node."""
        return f"node {self.name!r} (op {self.op})"

    def _fields(self) -> tuple[str, str, tuple[str, ...], Mapping[str, Any]]:
        return (self.name, self.op, self.inputs, self.attrs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # equal by value, and its attrs are a mapping

    def __repr__(self) -> str:
        return (
            f"Node(name={self.name!r}, op={self.op!r}, inputs={self.inputs!r}, "
            f"attrs={self.attrs!r})"
        )


class Graph:
    """A validated graph whose nodes are in a topological order.

    The order is canonical (it does not depend on the order of the nodes in the message), so
    a graph gives bit-identical results however its message lists the nodes.
    """

    def __init__(self, nodes: Iterable[Node]):
        self.nodes: dict[str, Node] = {node.name: node for node in nodes}
        self.digest = ""
        self._sizes: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def constant_bytes(self) -> int:
        """The bytes of the constants' arrays."""
        return self._measure()[0]

    @property
    def extra_bytes(self) -> int:
        """What the nodes hold beyond NODE_BYTES each: long names and attribute lists."""
        return self._measure()[1]

    @property
    def held_bytes(self) -> int:
        """About how much memory the graph holds: its constants, its nodes, their names and
        attribute lists."""
        constant_bytes, extra_bytes = self._measure()
        return constant_bytes + extra_bytes + NODE_BYTES * len(self.nodes)

    def _measure(self) -> tuple[int, int]:
        # Measured once, when first asked (the nodes never change).
        if self._sizes is None:
            constant_bytes = extra_bytes = 0
            for node in self.nodes.values():
                extra_bytes += len(node.name) + len(node.op) + sum(map(len, node.inputs))
                if node.attrs:
                    for value in node.attrs.values():
                        if isinstance(value, np.ndarray):
                            constant_bytes += value.nbytes
                        elif isinstance(value, tuple):
                            extra_bytes += LIST_ITEM_BYTES * len(value)
            self._sizes = (constant_bytes, extra_bytes)
        return self._sizes

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def ancestors(self, roots: Iterable[str]) -> set[str]:
        """The roots and every node they depend on."""
        nodes = self.nodes
        seen = set(roots)
        stack = list(seen)
        while stack:
            for source in nodes[stack.pop()].inputs:
                if source not in seen:
                    seen.add(source)
                    stack.append(source)
        return seen


MAX_SUGGESTION_CANDIDATES = 10_000
"""Names a "did you mean" looks through at most (the comparison is quadratic per name)."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" naming the known names closest to `name`, or ""."""
    candidates = list(itertools.islice(known, MAX_SUGGESTION_CANDIDATES + 1))
    if len(candidates) > MAX_SUGGESTION_CANDIDATES or len(name) > 200:
        return ""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def node_error(node: Node, message: str, types: Iterable[TensorType] = ()) -> GraphError:
    """A GraphError naming the node, its op and (when given) its operand types."""
    operands = ", ".join(str(t) for t in types)
    suffix = f" (operands: {operands})" if operands else ""
    return GraphError(f"{node.describe()}: {message}{suffix}", node=node.name, op=node.op)


# ---------------------------------------------------------------------------------------------
# Decoding


def graph_digest(message: graph_pb2.Graph) -> str:
    """A content hash of a graph message, the key of the compiled-graph caches: the digest of
    its deterministic serialization, which is what the SDK sends."""
    return wire.graph_digest(message.SerializeToString(deterministic=True))


def _decode_attr(node_name: str, op: str, spec: AttrSpec, value: graph_pb2.AttrValue) -> Any:
    field = value.WhichOneof("value")
    kind = spec.kind
    where = f"node {node_name!r} (op {op}): attribute {spec.name!r}"
    if kind == "int" and field == "i":
        return int(value.i)
    if kind == "float" and field in ("f", "i"):
        return float(getattr(value, field))
    if kind == "string" and field == "s":
        return value.s
    if kind == "bool" and field == "b":
        return bool(value.b)
    if field in ("ints", "floats"):
        count = len(getattr(value, field).values)
        if count > MAX_LIST_ATTR:
            raise GraphError(
                f"{where} lists {count} values; at most {MAX_LIST_ATTR} (one or two per dimension)"
            )
    if kind in ("ints", "axes") and field in ("ints", "i"):
        return tuple(int(v) for v in value.ints.values) if field == "ints" else (int(value.i),)
    if kind == "floats" and field in ("floats", "f"):
        return tuple(value.floats.values) if field == "floats" else (value.f,)
    if kind == "tensor" and field == "tensor":
        try:
            return from_proto(value.tensor)
        except TensorFormatError as e:
            raise GraphError(f"{where}: {e}") from None
    if kind == "dtype" and field == "s":
        try:
            return dtype_from_name(value.s)
        except TensorFormatError as e:
            raise GraphError(f"{where}: {e}") from None
    expected = {"axes": "an int or ints", "dtype": "a dtype name in s"}.get(kind, kind)
    raise GraphError(f"{where} must be {expected}, got {field or 'nothing'}")


NO_ATTRS: Mapping[str, Any] = MappingProxyType({})
"""The attributes of a node whose op declares none, shared by every such node."""

_DEFAULT_ATTRS: dict[str, tuple[tuple[AttrSpec, ...], Mapping[str, Any] | None]] = {}
"""By op name: the op's attribute declarations and default_attrs' answer for them."""


def default_attrs(opdef: OpDef) -> Mapping[str, Any] | None:
    """The attributes of a node of this op given none: each declared one at its default, in
    decoded form; None when the op has a required attribute.

    Computed once per op and shared by every such node (the values are immutable).
    """
    cached = _DEFAULT_ATTRS.get(opdef.name)
    # An op replaced in OPS under the same name (tests do) is recomputed if its attributes differ.
    if cached is not None and cached[0] is opdef.attrs:
        return cached[1]
    defaults: Mapping[str, Any] | None
    if not opdef.attrs:
        defaults = NO_ATTRS
    elif any(spec.default is REQUIRED for spec in opdef.attrs):
        defaults = None
    else:
        defaults = MappingProxyType(
            {
                spec.name: None if spec.default is None else canonical_attr(spec.kind, spec.default)
                for spec in opdef.attrs
            }
        )
    _DEFAULT_ATTRS[opdef.name] = (opdef.attrs, defaults)
    return defaults


def make_node(name: str, op: str, inputs: Iterable[str], attrs: Mapping[str, Any]) -> Node:
    """A node built in the server (by a gradient rule), its attributes given as Python values.

    Values are brought to the same forms as decoded attributes; omitted ones take defaults.
    """
    opdef = OPS[op]
    if not attrs:
        defaults = default_attrs(opdef)
        if defaults is not None:
            return Node(name, op, tuple(inputs), defaults)
    full: dict[str, Any] = {}
    for spec in opdef.attrs:
        value = attrs.get(spec.name, spec.default)
        assert value is not REQUIRED, f"{op} needs attribute {spec.name}"
        full[spec.name] = None if value is None else canonical_attr(spec.kind, value)
    assert set(attrs) <= set(full), f"{op} has no attributes {set(attrs) - set(full)}"
    return Node(name, op, tuple(inputs), MappingProxyType(full))


def canonical_attr(kind: str, value: Any) -> Any:
    """An attribute value of `kind` in the form decoded attributes take."""
    if kind in ("ints", "axes"):
        return tuple(int(v) for v in (value if isinstance(value, Iterable) else [value]))
    if kind == "floats":
        return tuple(float(v) for v in value)
    if kind == "dtype":
        return dtype_from_name(value) if isinstance(value, str) else np.dtype(value)
    if kind == "tensor":
        return np.asarray(value)
    return {"int": int, "float": float, "string": str, "bool": bool}[kind](value)


def _decode_node(message: graph_pb2.Node) -> Node:
    # Slicing the repeated field is faster than iterating it.
    name, op, inputs = message.name, message.op, tuple(message.inputs[:])
    if not name:
        raise GraphError(f"a node (op {op or '?'}) has an empty name")
    opdef = OPS.get(op)
    if opdef is None:
        hint = did_you_mean(op, OPS) or " (ListOps lists the known ops)"
        raise GraphError(f"node {name!r}: unknown op {op!r}{hint}")
    count = len(inputs)
    arity = len(opdef.inputs)
    if (count < arity) if opdef.variadic else (count != arity):
        wanted = f"at least {arity}" if opdef.variadic else str(arity)
        raise GraphError(
            f"node {name!r} (op {op}): takes {wanted} inputs "
            f"({', '.join(opdef.inputs) or 'none'}), got {count}"
        )
    attr_messages = message.attrs
    if not attr_messages:
        defaults = default_attrs(opdef)
        if defaults is not None:
            return Node(name, op, inputs, defaults)
    return Node(name, op, inputs, _decode_attrs(name, op, opdef, attr_messages))


def _decode_attrs(
    name: str, op: str, opdef: OpDef, messages: Mapping[str, graph_pb2.AttrValue]
) -> Mapping[str, Any]:
    attrs: dict[str, Any] = {}
    for key in messages:
        if opdef.attr_spec(key) is None:
            known = ", ".join(a.name for a in opdef.attrs) or "none"
            hint = did_you_mean(key, (a.name for a in opdef.attrs))
            raise GraphError(
                f"node {name!r} (op {op}): unknown attribute {key!r}{hint} (known: {known})"
            )
    for spec in opdef.attrs:
        if spec.name in messages:
            attrs[spec.name] = _decode_attr(name, op, spec, messages[spec.name])
        elif spec.default is REQUIRED:
            raise GraphError(f"node {name!r} (op {op}): missing attribute {spec.name!r}")
        else:
            attrs[spec.name] = (
                None if spec.default is None else canonical_attr(spec.kind, spec.default)
            )
    return MappingProxyType(attrs)


CHECK_EVERY = 4096
"""Long loops over nodes call their check_deadline callback once per this many nodes."""


def decode_graph(
    message: graph_pb2.Graph,
    check_deadline: Callable[[], None] = no_deadline,
    digest: str | None = None,
) -> Graph:
    """Decode and validate a Graph message: names, ops, arity, attributes, references, cycles.

    `digest` is the message's content digest when the caller has it (from the bytes received).
    """
    nodes: list[Node] = []
    messages = message.nodes
    for start in range(0, len(messages), CHECK_EVERY):
        check_deadline()
        chunk = messages[start : start + CHECK_EVERY]
        try:
            # map, rather than a loop of our own: a big graph spends most of its decoding here.
            nodes.extend(map(_decode_node, chunk))
        except GraphError as e:
            failed = chunk[len(nodes) - start]
            e.node, e.op = e.node or failed.name or None, e.op or failed.op or None
            error = e
        else:
            continue
        _check_unique(nodes)  # a duplicate before the node at fault is reported first
        raise error
    positions = dict(zip(map(_NAME, nodes), range(len(nodes)), strict=True))
    if len(positions) < len(nodes):
        _check_unique(nodes)
    graph = Graph(_canonical_order(nodes, positions))
    graph.digest = digest or graph_digest(message)
    return graph


_NAME = operator.attrgetter("name")


def _check_unique(nodes: list[Node]) -> None:
    """GraphError naming the first node whose name an earlier node has."""
    seen: set[str] = set()
    for node in nodes:
        if node.name in seen:
            raise GraphError(f"node {node.name!r}: duplicate node name", node=node.name, op=node.op)
        seen.add(node.name)


def topological_order(nodes: Mapping[str, Node]) -> list[Node]:
    """Kahn's algorithm, iterative, taking ready nodes by name so the order is canonical.

    GraphError when an input is not one of `nodes` (the first such, in the nodes' order) or
    when the nodes have a cycle.
    """
    return _canonical_order(list(nodes.values()), {name: i for i, name in enumerate(nodes)})


def _canonical_order(nodes: list[Node], positions: Mapping[str, int]) -> list[Node]:
    # topological_order on the nodes' positions in `nodes` (`positions` maps names to them):
    # lists indexed by position are much cheaper than dicts keyed by name on big graphs. An
    # input taken twice counts twice, in `pending` and in `users` alike.
    pending = list(map(len, map(_INPUTS, nodes)))  # of each node: inputs not yet in the order
    users: list[list[int]] = [[] for _ in nodes]  # of each node: who takes it
    try:
        for position, node in enumerate(nodes):
            for source in node.inputs:
                users[positions[source]].append(position)
    except KeyError:
        raise _missing_input(nodes, positions) from None
    sources = itertools.compress(range(len(nodes)), map(operator.not_, pending))
    ready = [(nodes[position].name, position) for position in sources]  # a heap
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, position = heapq.heappop(ready)
        order.append(nodes[position])
        for user in users[position]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, (nodes[user].name, user))
    if len(order) < len(nodes):
        stuck = {node.name for node, count in zip(nodes, pending, strict=True) if count > 0}
        raise GraphError(_describe_cycle({node.name: node for node in nodes}, stuck))
    return order


def _missing_input(nodes: list[Node], positions: Mapping[str, int]) -> GraphError:
    """The error naming the first input (in the nodes' order) that is not a node."""
    for node in nodes:
        for source in node.inputs:
            if source not in positions:
                return node_error(node, f"input {source!r} is not a node of the graph")
    raise AssertionError("every input is a node")


_INPUTS = operator.attrgetter("inputs")


def _describe_cycle(nodes: Mapping[str, Node], stuck: set[str]) -> str:
    # Every stuck node has a stuck input, so walking inputs from any of them must revisit a
    # node; the walk from that node back to itself is a cycle.
    path: list[str] = []
    position: dict[str, int] = {}
    name = min(stuck)
    while name not in position:
        position[name] = len(path)
        path.append(name)
        name = next(s for s in nodes[name].inputs if s in stuck)
    cycle = path[position[name] :]
    loop = " <- ".join(repr(n) for n in [*cycle, cycle[0]])
    return f"node {cycle[0]!r} (op {nodes[cycle[0]].op}) is on a cycle: {loop}"


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_attr(kind: str, value: Any) -> graph_pb2.AttrValue:
    """The wire form of an attribute value of `kind` (in its decoded form)."""
    if kind in ("ints", "axes"):
        return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=list(value)))
    if kind == "floats":
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=list(value)))
    if kind == "tensor":
        return graph_pb2.AttrValue(tensor=to_proto(value))
    if kind == "dtype":
        return graph_pb2.AttrValue(s=value.name)
    field = {"int": "i", "float": "f", "string": "s", "bool": "b"}[kind]
    return graph_pb2.AttrValue(**{field: value})


def encode_graph(graph: Graph) -> graph_pb2.Graph:
    """The graph as a message (attributes that are unset or at their default are omitted)."""
    message = graph_pb2.Graph()
    for node in graph.nodes.values():
        entry = message.nodes.add(name=node.name, op=node.op, inputs=node.inputs)
        for spec in node.opdef.attrs:
            value = node.attrs[spec.name]
            if value is None:
                continue
            default = spec.default
            if default is not REQUIRED and default is not None and spec.kind != "tensor":
                if value == canonical_attr(spec.kind, default):
                    continue
            entry.attrs[spec.name].CopyFrom(encode_attr(spec.kind, value))
    return message


# ---------------------------------------------------------------------------------------------
# Typing


def infer_node_type(node: Node, input_types: tuple[TensorType, ...]) -> TensorType:
    """Apply the op's shape/dtype rule, turning its complaint into a GraphError naming the node."""
    try:
        result = node.opdef.infer(node.attrs, *input_types)
    except ShapeError as e:
        raise node_error(node, str(e), input_types) from None
    problem = shape_problem(result.shape)
    if problem is not None:
        raise node_error(node, f"its result's {problem}", input_types)
    return result


class TypeMemo:
    """Types nodes by their ops' rules, running a rule once per distinct operation.

    A big graph repeats a few operations many times (a chain of the same ops on the same
    types), and a rule's result depends only on the op, the attributes and the operand types.
    Results are remembered by the op, the identity of the node's attribute mapping (shared by
    every node of an op with all attributes at their defaults) and the identities of the
    operand types, and are interned, so that equal results are one object and later lookups
    hit. The memo holds every object whose identity is in a key, so none is reused while it
    lives. Only successes are remembered: a failing node raises its own error.
    """

    def __init__(self) -> None:
        self._interned: dict[TensorType, TensorType] = {}
        self._results: dict[tuple[Any, ...], tuple[TensorType, object, object]] = {}

    def intern(self, tensor_type: TensorType) -> TensorType:
        """The one object of the types equal to `tensor_type` that the memo has seen."""
        return self._interned.setdefault(tensor_type, tensor_type)

    def infer(self, node: Node, input_types: tuple[TensorType, ...]) -> TensorType:
        """infer_node_type(node, input_types), remembered."""
        key = (node.op, id(node.attrs), tuple(map(id, input_types)))
        known = self._results.get(key)
        if known is not None:
            return known[0]
        result = self.intern(infer_node_type(node, input_types))
        self._results[key] = (result, node.attrs, input_types)
        return result


def infer_types(
    graph: Graph,
    feed_types: Mapping[str, TensorType],
    needed: set[str],
    check_deadline: Callable[[], None] = no_deadline,
) -> dict[str, TensorType]:
    """The type of every needed node, in topological order; inputs are typed by their feeds."""
    memo = TypeMemo()
    types: dict[str, TensorType] = {}
    type_of = types.__getitem__
    for index, (name, node) in enumerate(graph.nodes.items()):
        if index % CHECK_EVERY == 0:
            check_deadline()
        if name not in needed:
            continue
        if node.op == "input":
            types[name] = memo.intern(_input_type(node, feed_types))
        else:
            types[name] = memo.infer(node, tuple(map(type_of, node.inputs)))
    return types


def _input_type(node: Node, feed_types: Mapping[str, TensorType]) -> TensorType:
    feed = feed_types.get(node.name)
    if feed is None:
        raise node_error(node, "no tensor was fed for this input")
    declared_dtype, declared_shape = node.attrs["dtype"], node.attrs["shape"]
    if declared_dtype is not None and feed.dtype != declared_dtype:
        raise node_error(node, f"declared {declared_dtype.name}, fed {feed.dtype.name}")
    if declared_shape is not None and tuple(declared_shape) != feed.shape:
        raise node_error(node, f"declared shape {list(declared_shape)}, fed {list(feed.shape)}")
    return feed
