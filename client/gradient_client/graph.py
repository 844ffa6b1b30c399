"""A numpy-like builder for gradient.v1.Graph messages."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import numpy as np

from gradient.v1 import graph_pb2

from .tensors import to_proto
from .wire import WireGraph

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


def _ints(value: int | Iterable[int] | None) -> list[int] | None:
    """An int or ints (numpy integers too) as a list of Python ints; None stays None."""
    if value is None:
        return None
    if isinstance(value, Iterable):
        return [int(v) for v in value]
    return [int(value)]


def _reduction(op: str, doc: str) -> Callable[..., Node]:
    def method(
        self: Graph,
        x: Operand,
        axis: int | Iterable[int] | None = None,
        keepdims: bool = False,
        *,
        name: str | None = None,
    ) -> Node:
        return self.op(op, x, name=name, axis=_ints(axis), keepdims=keepdims or None)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc + " `axis`: int or ints (default all); `keepdims` keeps them as size 1."
    return method


def _variadic(op: str, doc: str) -> Callable[..., Node]:
    def method(self: Graph, *xs: Operand, axis: int = 0, name: str | None = None) -> Node:
        return self.op(op, *xs, name=name, axis=axis)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc
    return method


def _pool(op: str, doc: str) -> Callable[..., Node]:
    def method(
        self: Graph,
        x: Operand,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        *,
        name: str | None = None,
    ) -> Node:
        return self.op(
            op, x, name=name, kernel=_ints(kernel), stride=_ints(stride), padding=_ints(padding)
        )

    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc
    return method


def _adjoint(op: str, doc: str) -> Callable[..., Node]:
    def method(self: Graph, *operands: Operand, name: str | None = None, **attrs: Any) -> Node:
        for key in ("kernel", "stride", "padding", "dilation"):
            if key in attrs:
                attrs[key] = _ints(attrs[key])
        return self.op(op, *operands, name=name, **attrs)

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
        self._message: graph_pb2.Graph | None = None
        self._wire: WireGraph | None = None

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
        """The graph as a gradient.v1.Graph message (a new one, free to modify)."""
        message = graph_pb2.Graph()
        message.CopyFrom(self.message())
        return message

    def message(self) -> graph_pb2.Graph:
        """The graph as a message, built once and shared until a node is added: don't modify it.

        The client sends this, so a graph used for many calls is encoded only once.
        """
        if self._message is None:
            self._message = graph_pb2.Graph(nodes=list(self._nodes.values()))
        return self._message

    def wire_form(self) -> WireGraph:
        """The graph as the client sends it (bytes, digest, declared input dtypes), built once
        and shared until a node is added."""
        if self._wire is None:
            self._wire = WireGraph.of(self.message())
        return self._wire

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
        self._message = None
        self._wire = None
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
        attrs: dict[str, Any] = {}
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
    sin = _unary("sin", "Sine.")
    cos = _unary("cos", "Cosine.")
    log1p = _unary("log1p", "log(1 + x), accurate near 0.")
    expm1 = _unary("expm1", "e ** x - 1, accurate near 0.")
    softplus = _unary("softplus", "log(1 + e ** x), stable for large |x|.")
    reciprocal = _unary("reciprocal", "1 / x.")
    logical_not = _unary("logical_not", "not x (bool).")

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
    logical_and = _binary("logical_and", "x and y (bool), broadcasting.")
    logical_or = _binary("logical_or", "x or y (bool), broadcasting.")

    sum = _reduction("sum", "Sum over axes.")
    mean = _reduction("mean", "Mean over axes.")
    max = _reduction("max", "Maximum over axes; tied maxima share the gradient.")
    min = _reduction("min", "Minimum over axes; tied minima share the gradient.")
    prod = _reduction("prod", "Product over axes.")
    logsumexp = _reduction("logsumexp", "log(sum(exp(x))) over axes, stable.")
    norm = _reduction("norm", "Euclidean (L2) norm over axes (gradient 0 at the origin).")

    def prod_others(self, x: Operand, axis: int = -1, *, name: str | None = None) -> Node:
        """For each element, the product of the others along an axis (prod's gradient)."""
        return self.op("prod_others", x, name=name, axis=axis)

    def var(
        self,
        x: Operand,
        axis: int | Iterable[int] | None = None,
        keepdims: bool = False,
        ddof: int = 0,
        *,
        name: str | None = None,
    ) -> Node:
        """Variance over axes, dividing by N - ddof."""
        return self.op("var", x, name=name, axis=_ints(axis), keepdims=keepdims or None, ddof=ddof)

    def argmax(
        self,
        x: Operand,
        axis: int | None = None,
        keepdims: bool = False,
        *,
        name: str | None = None,
    ) -> Node:
        """Index of the first maximum along an axis (default: of the flattened tensor); int64."""
        return self.op("argmax", x, name=name, axis=axis, keepdims=keepdims or None)

    def argmin(
        self,
        x: Operand,
        axis: int | None = None,
        keepdims: bool = False,
        *,
        name: str | None = None,
    ) -> Node:
        """Index of the first minimum along an axis (default: of the flattened tensor); int64."""
        return self.op("argmin", x, name=name, axis=axis, keepdims=keepdims or None)

    # -- shape and indexing ---------------------------------------------------------------

    def expand_dims(
        self, x: Operand, axis: int | Sequence[int], *, name: str | None = None
    ) -> Node:
        """x with new size-1 axes at the positions `axis` (of the result)."""
        return self.op("expand_dims", x, name=name, axis=_ints(axis))

    def squeeze(
        self, x: Operand, axis: int | Sequence[int] | None = None, *, name: str | None = None
    ) -> Node:
        """x without its size-1 axes (those in `axis`, or all)."""
        return self.op("squeeze", x, name=name, axis=_ints(axis))

    concat = _variadic("concat", "The inputs joined along an existing axis.")
    stack = _variadic("stack", "The inputs (of one shape) joined along a new axis.")

    def flatten(
        self, x: Operand, start_axis: int = 0, end_axis: int = -1, *, name: str | None = None
    ) -> Node:
        """x with axes start_axis..end_axis merged into one (as torch.flatten)."""
        return self.op("flatten", x, name=name, start_axis=start_axis, end_axis=end_axis)

    def slice(
        self,
        x: Operand,
        starts: Sequence[int],
        stops: Sequence[int],
        steps: Sequence[int] | None = None,
        axes: Sequence[int] | None = None,
        *,
        name: str | None = None,
    ) -> Node:
        """x[start:stop:step] along `axes` (default 0, 1, ...), numpy semantics."""
        return self.op(
            "slice",
            x,
            name=name,
            starts=_ints(starts),
            stops=_ints(stops),
            steps=_ints(steps),
            axes=_ints(axes),
        )

    def unslice(
        self,
        x: Operand,
        shape: Sequence[int],
        starts: Sequence[int],
        stops: Sequence[int],
        steps: Sequence[int] | None = None,
        axes: Sequence[int] | None = None,
        *,
        name: str | None = None,
    ) -> Node:
        """Zeros of `shape` with x written into the slice (the adjoint of slice)."""
        return self.op(
            "unslice",
            x,
            name=name,
            shape=_ints(shape),
            starts=_ints(starts),
            stops=_ints(stops),
            steps=_ints(steps),
            axes=_ints(axes),
        )

    def pad(
        self, x: Operand, pads: Sequence[int], value: float = 0.0, *, name: str | None = None
    ) -> Node:
        """x padded with `value`; pads holds (before, after) for each axis, flattened."""
        return self.op("pad", x, name=name, pads=list(pads), value=float(value))

    def take(self, x: Operand, indices: Operand, axis: int = 0, *, name: str | None = None) -> Node:
        """Elements of x at integer indices along an axis (numpy.take)."""
        return self.op("take", x, indices, name=name, axis=axis)

    def scatter_add(
        self,
        updates: Operand,
        indices: Operand,
        shape: Sequence[int],
        axis: int = 0,
        *,
        name: str | None = None,
    ) -> Node:
        """Zeros of `shape` with updates added at indices along an axis (the adjoint of take)."""
        return self.op("scatter_add", updates, indices, name=name, shape=list(shape), axis=axis)

    def one_hot(
        self, indices: Operand, depth: int, dtype: str = "float64", *, name: str | None = None
    ) -> Node:
        """A new last axis of size depth: 1 at each index, 0 elsewhere."""
        return self.op("one_hot", indices, name=name, depth=depth, dtype=np.dtype(dtype).name)

    # -- elementwise with parameters ------------------------------------------------------

    def leaky_relu(self, x: Operand, alpha: float = 0.01, *, name: str | None = None) -> Node:
        """x where x > 0, alpha * x elsewhere."""
        return self.op("leaky_relu", x, name=name, alpha=float(alpha))

    def clip(
        self,
        x: Operand,
        min: float | None = None,
        max: float | None = None,
        *,
        name: str | None = None,
    ) -> Node:
        """x limited to [min, max] (gradient 0 outside)."""
        return self.op(
            "clip",
            x,
            name=name,
            min=None if min is None else float(min),
            max=None if max is None else float(max),
        )

    # -- neural networks ------------------------------------------------------------------

    def softmax(self, x: Operand, axis: int = -1, *, name: str | None = None) -> Node:
        """Softmax along an axis, stable for large logits."""
        return self.op("softmax", x, name=name, axis=axis)

    def log_softmax(self, x: Operand, axis: int = -1, *, name: str | None = None) -> Node:
        """Log-softmax along an axis, stable for large logits."""
        return self.op("log_softmax", x, name=name, axis=axis)

    def cross_entropy(
        self, logits: Operand, labels: Operand, reduction: str = "mean", *, name: str | None = None
    ) -> Node:
        """Softmax cross-entropy of logits (..., classes) with int labels; mean, sum or none."""
        return self.op("cross_entropy", logits, labels, name=name, reduction=reduction)

    def conv2d(
        self,
        x: Operand,
        w: Operand,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        *,
        name: str | None = None,
    ) -> Node:
        """2-D cross-correlation of NCHW x with OIHW w (add a bias with +)."""
        return self.op(
            "conv2d",
            x,
            w,
            name=name,
            stride=_ints(stride),
            padding=_ints(padding),
            dilation=_ints(dilation),
        )

    # The adjoint ops that gradient rules are built from; attributes as ListOps lists them.
    conv2d_input_grad = _adjoint(
        "conv2d_input_grad", "Gradient of conv2d in its input: (g, w, input_shape=, stride=...)."
    )
    conv2d_weight_grad = _adjoint(
        "conv2d_weight_grad", "Gradient of conv2d in its weight: (x, g, weight_shape=, ...)."
    )
    avg_pool2d_grad = _adjoint(
        "avg_pool2d_grad", "Gradient of avg_pool2d in its input: (g, input_shape=, kernel=, ...)."
    )
    max_pool2d_grad = _adjoint(
        "max_pool2d_grad", "Gradient of max_pool2d in its input: (x, g, kernel=, ...)."
    )
    max_pool2d_gather = _adjoint(
        "max_pool2d_gather", "The adjoint of max_pool2d_grad in g: (x, u, kernel=, ...)."
    )

    max_pool2d = _pool("max_pool2d", "Maximum over 2-D windows of NCHW x (ties share).")
    avg_pool2d = _pool("avg_pool2d", "Average over 2-D windows of NCHW x (padding counts as 0).")

    def reshape(self, x: Operand, shape: Sequence[int], *, name: str | None = None) -> Node:
        """x with a new shape of the same size (one entry may be -1)."""
        return self.op("reshape", x, name=name, shape=_ints(shape))

    def transpose(
        self, x: Operand, axes: Sequence[int] | None = None, *, name: str | None = None
    ) -> Node:
        """x with its axes permuted (reversed when `axes` is None)."""
        return self.op("transpose", x, name=name, axes=_ints(axes))

    def broadcast_to(self, x: Operand, shape: Sequence[int], *, name: str | None = None) -> Node:
        """x broadcast to `shape`, as numpy.broadcast_to."""
        return self.op("broadcast_to", x, name=name, shape=_ints(shape))

    def sum_to_shape(self, x: Operand, shape: Sequence[int], *, name: str | None = None) -> Node:
        """x summed down to `shape` (which broadcasts to x's): the adjoint of broadcast_to."""
        return self.op("sum_to_shape", x, name=name, shape=_ints(shape))

    def cast(self, x: Operand, dtype: str | np.dtype | type, *, name: str | None = None) -> Node:
        """x converted to `dtype` ("float32", np.float64, ...)."""
        return self.op("cast", x, name=name, dtype=np.dtype(dtype).name)

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

    # -- drawing --------------------------------------------------------------------------

    def to_dot(self, result: Any = None) -> str:
        """Graphviz DOT text of the graph, with values and gradients of `result` if given."""
        from .drawing import to_dot

        return to_dot(self, result)

    def draw(self, path: Any, result: Any = None, format: str | None = None) -> Any:
        """Write an SVG, PNG or DOT drawing to `path` (format from the suffix); see to_dot."""
        from .drawing import draw

        return draw(self, path, result, format)
