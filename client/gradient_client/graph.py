"""A numpy-like builder for gradient.v1.Graph messages."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import numpy as np

from gradient.v1 import graph_pb2

from .tensors import to_proto

__all__ = ["Graph", "Node", "Operand"]

Operand = Union["Node", np.ndarray, float, int, bool]
"""What builder methods accept as an operand: a Node, or a value that becomes a constant."""


class Node:
    """A node of a Graph. Supports + - * / ** @ and unary -, with nodes, arrays and numbers."""

    __slots__ = ("graph", "name", "op")

    def __init__(self, graph: Graph, name: str, op: str):
        self.graph = graph
        self.name = name
        self.op = op

    def __repr__(self) -> str:
        return f"Node({self.name!r}, op={self.op!r})"

    def __add__(self, other: Operand) -> Node:
        return self.graph.add(self, other)

    def __radd__(self, other: Operand) -> Node:
        return self.graph.add(other, self)

    def __sub__(self, other: Operand) -> Node:
        return self.graph.sub(self, other)

    def __rsub__(self, other: Operand) -> Node:
        return self.graph.sub(other, self)

    def __mul__(self, other: Operand) -> Node:
        return self.graph.mul(self, other)

    def __rmul__(self, other: Operand) -> Node:
        return self.graph.mul(other, self)

    def __truediv__(self, other: Operand) -> Node:
        return self.graph.div(self, other)

    def __rtruediv__(self, other: Operand) -> Node:
        return self.graph.div(other, self)

    def __pow__(self, other: Operand) -> Node:
        return self.graph.pow(self, other)

    def __rpow__(self, other: Operand) -> Node:
        return self.graph.pow(other, self)

    def __matmul__(self, other: Operand) -> Node:
        return self.graph.matmul(self, other)

    def __rmatmul__(self, other: Operand) -> Node:
        return self.graph.matmul(other, self)

    def __neg__(self) -> Node:
        return self.graph.neg(self)

    # numpy would otherwise try to treat a Node as an array element in `array + node`.
    __array_ufunc__ = None


def _attr_value(value: Any) -> graph_pb2.AttrValue:
    """Encode a Python attribute value: bool, int, float, str, list of ints or floats, array."""
    if isinstance(value, (bool, np.bool_)):
        return graph_pb2.AttrValue(b=bool(value))
    if isinstance(value, numbers.Integral):
        return graph_pb2.AttrValue(i=int(value))
    if isinstance(value, numbers.Real):
        return graph_pb2.AttrValue(f=float(value))
    if isinstance(value, str):
        return graph_pb2.AttrValue(s=value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return graph_pb2.AttrValue(s=np.dtype(value).name)
    if isinstance(value, np.ndarray):
        return graph_pb2.AttrValue(tensor=to_proto(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=[int(v) for v in value]))
        if all(isinstance(v, numbers.Real) for v in value):
            return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=[float(v) for v in value]))
    raise TypeError(f"cannot encode attribute value {value!r}")


def _unary(op: str, doc: str) -> Callable[..., Node]:
    def method(self: Graph, x: Operand, *, name: str | None = None) -> Node:
        return self.op(op, x, name=name)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc
    return method


def _binary(op: str, doc: str) -> Callable[..., Node]:
    def method(self: Graph, x: Operand, y: Operand, *, name: str | None = None) -> Node:
        return self.op(op, x, y, name=name)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc
    return method


def _reduction(op: str, doc: str) -> Callable[..., Node]:
    def method(
        self: Graph,
        x: Operand,
        axis: int | Iterable[int] | None = None,
        keepdims: bool = False,
        *,
        name: str | None = None,
    ) -> Node:
        axes = None if axis is None else ([axis] if isinstance(axis, int) else list(axis))
        return self.op(op, x, name=name, axis=axes, keepdims=keepdims or None)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc + " `axis`: int or ints (default all); `keepdims` keeps them as size 1."
    return method


def _with_attr(op: str, attr: str, doc: str) -> Callable[..., Node]:
    def method(self: Graph, x: Operand, value: Any = None, *, name: str | None = None) -> Node:
        if attr in ("shape", "axes") and value is not None:
            value = [int(v) for v in value]
        if attr == "dtype":
            value = np.dtype(value).name
        return self.op(op, x, name=name, **{attr: value})

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc
    return method


class Graph:
    """Builds a computation graph node by node.

    >>> g = Graph()
    >>> x, y, z = g.input("x"), g.input("y"), g.input("z")
    >>> f = (x + y) * z

    Every op the server knows has a method of the same name; `op()` reaches any op by name.
    Names are generated (``mul_3``) unless given. Python numbers used as operands become
    weakly typed scalar constants (a float32 tensor times 2.0 stays float32); numpy arrays
    become constants of their own dtype.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, graph_pb2.Node] = {}
        self._handles: dict[str, Node] = {}
        self._counter = 0

    # -- structure ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __getitem__(self, name: str) -> Node:
        """The node called `name`."""
        return self._handles[name]

    @property
    def nodes(self) -> list[Node]:
        """Every node, in the order they were added."""
        return list(self._handles.values())

    def to_proto(self) -> graph_pb2.Graph:
        """The graph as a gradient.v1.Graph message."""
        return graph_pb2.Graph(nodes=list(self._nodes.values()))

    @classmethod
    def from_proto(cls, message: graph_pb2.Graph) -> Graph:
        """A builder holding the nodes of a gradient.v1.Graph message (to extend or draw it)."""
        graph = cls()
        for node in message.nodes:
            copy = graph_pb2.Node()
            copy.CopyFrom(node)
            graph._insert(copy)
        return graph

    def _insert(self, message: graph_pb2.Node) -> Node:
        if message.name in self._nodes:
            raise ValueError(f"the graph already has a node named {message.name!r}")
        self._nodes[message.name] = message
        handle = Node(self, message.name, message.op)
        self._handles[message.name] = handle
        return handle

    def _fresh_name(self, stem: str) -> str:
        while True:
            self._counter += 1
            name = f"{stem}_{self._counter}"
            if name not in self._nodes:
                return name

    def _operand(self, value: Operand) -> Node:
        if isinstance(value, Node):
            if value.graph is not self:
                raise ValueError(f"node {value.name!r} belongs to another graph")
            return value
        if isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
            return self.constant(value, weak=True)
        return self.constant(value)

    # -- sources --------------------------------------------------------------------------

    def input(
        self, name: str, dtype: str | None = None, shape: Sequence[int] | None = None
    ) -> Node:
        """A tensor fed per request under `name`; `dtype` and `shape` are checked if given."""
        attrs = {}
        if dtype is not None:
            attrs["dtype"] = np.dtype(dtype).name
        if shape is not None:
            attrs["shape"] = list(shape)
        return self.op("input", name=name, **attrs)

    def constant(self, value: Any, name: str | None = None, *, weak: bool = False) -> Node:
        """A fixed tensor. weak=True makes a scalar take the dtype of what it meets."""
        array = np.asarray(value)
        return self.op("constant", name=name, value=array, **({"weak": True} if weak else {}))

    # -- any op ---------------------------------------------------------------------------

    def op(self, op: str, *inputs: Operand, name: str | None = None, **attrs: Any) -> Node:
        """Add a node of any op the server lists; attributes are Python values."""
        operands = [self._operand(x).name for x in inputs]
        message = graph_pb2.Node(
            name=name or self._fresh_name(op),
            op=op,
            inputs=operands,
            attrs={k: _attr_value(v) for k, v in attrs.items() if v is not None},
        )
        return self._insert(message)

    # -- one method per op ----------------------------------------------------------------

    neg = _unary("neg", "-x.")
    exp = _unary("exp", "e ** x.")
    log = _unary("log", "Natural logarithm.")
    sqrt = _unary("sqrt", "Square root.")
    square = _unary("square", "x * x.")
    abs = _unary("abs", "Absolute value (gradient 0 at 0).")
    sign = _unary("sign", "-1, 0 or 1 by the sign of x (gradient 0).")
    tanh = _unary("tanh", "Hyperbolic tangent.")
    sigmoid = _unary("sigmoid", "Logistic sigmoid, stable for large |x|.")
    relu = _unary("relu", "max(x, 0) (gradient 0 at 0).")

    add = _binary("add", "x + y, broadcasting.")
    sub = _binary("sub", "x - y, broadcasting.")
    mul = _binary("mul", "x * y, broadcasting.")
    div = _binary("div", "x / y (true division), broadcasting.")
    pow = _binary("pow", "x ** y in floating point, broadcasting.")
    maximum = _binary("maximum", "Elementwise maximum; ties split the gradient evenly.")
    minimum = _binary("minimum", "Elementwise minimum; ties split the gradient evenly.")
    matmul = _binary("matmul", "Matrix product with numpy.matmul semantics.")
    equal = _binary("equal", "x == y (bool), broadcasting.")
    not_equal = _binary("not_equal", "x != y (bool), broadcasting.")
    greater = _binary("greater", "x > y (bool), broadcasting.")
    greater_equal = _binary("greater_equal", "x >= y (bool), broadcasting.")
    less = _binary("less", "x < y (bool), broadcasting.")
    less_equal = _binary("less_equal", "x <= y (bool), broadcasting.")

    sum = _reduction("sum", "Sum over axes.")
    mean = _reduction("mean", "Mean over axes.")
    max = _reduction("max", "Maximum over axes; tied maxima share the gradient.")

    reshape = _with_attr("reshape", "shape", "x with a new shape (one entry may be -1).")
    transpose = _with_attr("transpose", "axes", "x with axes permuted (reversed by default).")
    broadcast_to = _with_attr("broadcast_to", "shape", "x broadcast to a shape.")
    sum_to_shape = _with_attr("sum_to_shape", "shape", "x summed down to a shape.")
    cast = _with_attr("cast", "dtype", "x converted to a dtype such as 'float32'.")

    def where(self, cond: Operand, x: Operand, y: Operand, *, name: str | None = None) -> Node:
        """x where cond is true, y elsewhere, broadcasting."""
        return self.op("where", cond, x, y, name=name)

    def zeros(
        self, shape: Sequence[int], dtype: str = "float64", *, name: str | None = None
    ) -> Node:
        """A tensor of zeros."""
        return self.op(
            "zeros", name=name, shape=[int(d) for d in shape], dtype=np.dtype(dtype).name
        )
