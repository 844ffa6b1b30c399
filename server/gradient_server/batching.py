"""The batching transform behind per-example gradients (what ``jax.vmap`` does to a function).

``batch_graph`` rewrites a graph typed for one example into one whose nodes carry a leading
batch axis of B examples, with a batching rule per op: elementwise ops (with broadcasting)
keep their node, reductions and axis-taking ops shift their axes by one, matmul lifts its
operands so that numpy's batched matmul contracts each example on its own, reshape-like ops
reshape to B + the example's shape, and cross_entropy takes its per-example losses and reduces
them over the example's own axes.

Every float node of the batched graph carries the batch axis: float inputs not batched by the
request (the weights) are fed tiled B times, and float nodes that depend on no batched input
(constants) are broadcast, so that differentiating the sum of the B outputs gives each example
its own gradient of every node, weights included (the gradient of the tiled copy an example
used), as ``jax.vmap(jax.grad(f), in_axes=(None, 0))`` does. Integer and bool nodes that depend
on no batched input stay unbatched (the same for every example).

A graph with an op without a rule is not batched (``BatchedGraph.graph`` is None, and its
``missing`` names the node): the engine then runs the examples one by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .ir import Graph, Node, make_node
from .ops.base import normalize_axis
from .tensor_type import TensorType


class NoBatchingRule(Exception):
    """A node whose op (or whose operands' form) has no batching rule."""


@dataclass(frozen=True)
class BatchedGraph:
    """The batched graph (None when a node has no rule), which of its nodes carry the batch
    axis, and the node without a rule ("" when there is none)."""

    graph: Graph | None
    batched: frozenset[str]
    missing: str = ""

    @property
    def held_bytes(self) -> int:
        """What the cached entry holds: the batched graph's nodes and constants."""
        return self.graph.held_bytes if self.graph is not None else 0


class _Builder:
    """Collects the batched graph's nodes; helper nodes get names under a prefix no node of
    the original graph uses."""

    def __init__(self, rows: int, prefix: str, types: Mapping[str, TensorType]):
        self.rows = rows
        self.prefix = prefix
        self.types = types
        self.nodes: list[Node] = []
        self.batched: set[str] = set()
        self._count = 0

    def emit(self, name: str, op: str, inputs: tuple[str, ...] | list[str], **attrs: Any) -> str:
        """Add a node named `name` carrying the batch axis."""
        self.nodes.append(make_node(name, op, tuple(inputs), attrs))
        self.batched.add(name)
        return name

    def helper(self, base: str, op: str, inputs: tuple[str, ...] | list[str], **attrs: Any) -> str:
        """Add a batched helper node (a generated name) and return its name."""
        self._count += 1
        return self.emit(f"{self.prefix}{base}/{self._count}", op, inputs, **attrs)

    def shape(self, name: str) -> tuple[int, ...]:
        """The per-example shape of an original node."""
        return self.types[name].shape

    def lift(self, base: str, source: str, rank: int) -> str:
        """`source` ready to broadcast against batched operands of per-example rank `rank`:
        a batched one gets size-1 axes after its batch axis; an unbatched one (integer or
        bool, the same for every example) broadcasts from the right as it is."""
        if source not in self.batched:
            return source
        shape = self.shape(source)
        if len(shape) >= rank:
            return source
        padded = (self.rows, *([1] * (rank - len(shape))), *shape)
        return self.helper(base, "reshape", [source], shape=padded)

    def tiled(self, base: str, source: str) -> str:
        """`source` with the batch axis, broadcast if it has none."""
        if source in self.batched:
            return source
        return self.helper(base, "broadcast_to", [source], shape=(self.rows, *self.shape(source)))


Rule = Callable[[_Builder, Node], None]


def _elementwise(b: _Builder, node: Node) -> None:
    rank = len(b.shape(node.name))
    inputs = (
        [b.lift(node.name, s, rank) for s in node.inputs] if len(node.inputs) > 1 else node.inputs
    )
    b.emit(node.name, node.op, inputs, **node.attrs)


def _matmul(b: _Builder, node: Node) -> None:
    x, y = node.inputs
    xs, ys = b.shape(x), b.shape(y)
    xm = xs if len(xs) > 1 else (1, *xs)
    ym = ys if len(ys) > 1 else (*ys, 1)
    depth = max(len(xm), len(ym)) - 2

    def lifted(source: str, shape: tuple[int, ...], matrix: tuple[int, ...]) -> str:
        if source in b.batched:
            target = (b.rows, *([1] * (depth + 2 - len(matrix))), *matrix)
        elif len(shape) == 1:
            target = matrix
        else:
            return source
        if target == (b.rows, *shape) and source in b.batched:
            return source
        return b.helper(node.name, "reshape", [source], shape=target)

    product = b.helper(node.name, "matmul", [lifted(x, xs, xm), lifted(y, ys, ym)])
    b.emit(node.name, "reshape", [product], shape=(b.rows, *b.shape(node.name)))


def _shifted_axes(axis: Any, rank: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(1, rank + 1))
    return tuple(normalize_axis(a, rank) + 1 for a in axis)


def _reduction(b: _Builder, node: Node) -> None:
    (x,) = node.inputs
    rank = len(b.shape(x))
    attrs = dict(node.attrs)
    if rank == 0:  # one element: reduce a size-1 axis (axis=() could mean all axes)
        x = b.helper(node.name, "reshape", [x], shape=(b.rows, 1))
        attrs.update(axis=(1,), keepdims=False)
    else:
        attrs["axis"] = _shifted_axes(attrs["axis"], rank)
    b.emit(node.name, node.op, [x], **attrs)


def _arg_reduction(b: _Builder, node: Node) -> None:
    (x,) = node.inputs
    shape = b.shape(x)
    if node.attrs["axis"] is None:  # the index into the flattened example
        size = 1
        for n in shape:
            size *= n
        flat = b.helper(node.name, "reshape", [x], shape=(b.rows, size))
        index = b.helper(node.name, node.op, [flat], axis=1, keepdims=False)
        b.emit(node.name, "reshape", [index], shape=(b.rows, *b.shape(node.name)))
        return
    axis = normalize_axis(node.attrs["axis"], len(shape)) + 1
    b.emit(node.name, node.op, [x], **{**node.attrs, "axis": axis})


def _axis_op(b: _Builder, node: Node) -> None:
    (x,) = node.inputs
    axis = normalize_axis(node.attrs["axis"], len(b.shape(x))) + 1
    b.emit(node.name, node.op, [x], **{**node.attrs, "axis": axis})


def _reshape(b: _Builder, node: Node) -> None:
    b.emit(node.name, "reshape", [node.inputs[0]], shape=(b.rows, *b.shape(node.name)))


def _transpose(b: _Builder, node: Node) -> None:
    (x,) = node.inputs
    rank = len(b.shape(x))
    axes = node.attrs["axes"]
    order = tuple(reversed(range(rank))) if axes is None else axes
    shifted = (0, *(normalize_axis(a, rank) + 1 for a in order))
    b.emit(node.name, "transpose", [x], axes=shifted)


def _broadcast_to(b: _Builder, node: Node) -> None:
    shape = b.shape(node.name)
    x = b.lift(node.name, node.inputs[0], len(shape))
    b.emit(node.name, "broadcast_to", [x], shape=(b.rows, *shape))


def _cross_entropy(b: _Builder, node: Node) -> None:
    logits, labels = (b.tiled(node.name, s) for s in node.inputs)
    reduction = node.attrs["reduction"]
    smoothing = node.attrs["label_smoothing"]
    rank = len(b.shape(node.inputs[0])) - 1  # of an example's losses
    if reduction == "none" or rank == 0:  # the mean or sum of one loss is that loss
        b.emit(
            node.name,
            "cross_entropy",
            [logits, labels],
            reduction="none",
            label_smoothing=smoothing,
        )
        return
    losses = b.helper(
        node.name, "cross_entropy", [logits, labels], reduction="none", label_smoothing=smoothing
    )
    b.emit(node.name, reduction, [losses], axis=tuple(range(1, rank + 1)), keepdims=False)


def _pool(b: _Builder, node: Node) -> None:
    (x,) = node.inputs
    shape = b.shape(x)
    merged = b.helper(node.name, "reshape", [x], shape=(b.rows * shape[0], *shape[1:]))
    pooled = b.helper(node.name, node.op, [merged], **node.attrs)
    b.emit(node.name, "reshape", [pooled], shape=(b.rows, *b.shape(node.name)))


def _slice_like(b: _Builder, node: Node) -> None:
    (x,) = node.inputs
    rank = len(b.shape(x))
    attrs = dict(node.attrs)
    axes = attrs["axes"] if attrs["axes"] is not None else tuple(range(len(attrs["starts"])))
    if len(axes) != len(attrs["starts"]):
        raise NoBatchingRule("axes and starts differ in length")
    attrs["axes"] = tuple(normalize_axis(a, rank) + 1 for a in axes)
    if node.op == "unslice":
        attrs["shape"] = (b.rows, *attrs["shape"])
    b.emit(node.name, node.op, [x], **attrs)


def _pad(b: _Builder, node: Node) -> None:
    b.emit(
        node.name, "pad", [node.inputs[0]], **{**node.attrs, "pads": (0, 0, *node.attrs["pads"])}
    )


def _join(b: _Builder, node: Node) -> None:
    operands = [b.tiled(node.name, s) for s in node.inputs]
    rank = len(b.shape(node.inputs[0])) + (node.op == "stack")
    axis = normalize_axis(node.attrs["axis"], rank) + 1
    b.emit(node.name, node.op, operands, axis=axis)


def _take(b: _Builder, node: Node) -> None:
    x, indices = node.inputs
    if indices in b.batched:
        # Gathering each example's own indices would need offsets into the flattened batch,
        # which would turn an out-of-range index into another example's row, not an error.
        raise NoBatchingRule("per-example indices")
    axis = normalize_axis(node.attrs["axis"], len(b.shape(x))) + 1
    b.emit(node.name, "take", [x, indices], axis=axis)


MAX_CONV_KERNEL_AREA = 64
"""Most kernel positions conv2d's rule unfolds into slices (one node each); a larger kernel
keeps the loop."""


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _conv2d(b: _Builder, node: Node) -> None:
    """Each example convolves with its own weight (the weights carry the batch axis), so the
    rule unfolds the windows (one strided slice per kernel position, as im2col does) and
    contracts them with each example's weight in one batched matmul."""
    x, w = (b.tiled(node.name, s) for s in node.inputs)
    n, c = b.shape(node.inputs[0])[:2]
    out_channels, _, kh, kw = b.shape(node.inputs[1])
    _, _, ho, wo = b.shape(node.name)
    if kh * kw > MAX_CONV_KERNEL_AREA:
        raise NoBatchingRule(f"a kernel of more than {MAX_CONV_KERNEL_AREA} positions")
    sh, sw = _pair(node.attrs["stride"])
    ph, pw = _pair(node.attrs["padding"])
    dh, dw = _pair(node.attrs["dilation"])
    if ph or pw:
        x = b.helper(node.name, "pad", [x], pads=(0, 0, 0, 0, 0, 0, ph, ph, pw, pw))
    windows = [
        b.helper(
            node.name,
            "slice",
            [x],
            starts=(i * dh, j * dw),
            stops=(i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1),
            steps=(sh, sw),
            axes=(3, 4),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    # (B, N, C, kh*kw, Ho, Wo) -> (B, N, C*kh*kw, Ho*Wo), C major as in the weight's layout
    unfolded = windows[0] if len(windows) == 1 else b.helper(node.name, "stack", windows, axis=3)
    patches = b.helper(node.name, "reshape", [unfolded], shape=(b.rows, n, c * kh * kw, ho * wo))
    weight = b.helper(node.name, "reshape", [w], shape=(b.rows, 1, out_channels, c * kh * kw))
    product = b.helper(node.name, "matmul", [weight, patches])
    b.emit(node.name, "reshape", [product], shape=(b.rows, n, out_channels, ho, wo))


_ELEMENTWISE = (
    "abs cos exp expm1 log log1p neg reciprocal relu sigmoid sign sin softplus sqrt square "
    "tanh leaky_relu clip cast logical_not add sub mul div pow maximum minimum equal not_equal "
    "greater greater_equal less less_equal logical_and logical_or where one_hot"
).split()

RULES: dict[str, Rule] = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys("sum mean max min prod norm logsumexp var".split(), _reduction),
    "argmax": _arg_reduction,
    "argmin": _arg_reduction,
    **dict.fromkeys("softmax log_softmax prod_others".split(), _axis_op),
    **dict.fromkeys("reshape flatten expand_dims squeeze".split(), _reshape),
    "transpose": _transpose,
    "broadcast_to": _broadcast_to,
    "matmul": _matmul,
    "cross_entropy": _cross_entropy,
    "max_pool2d": _pool,
    "avg_pool2d": _pool,
    "slice": _slice_like,
    "unslice": _slice_like,
    "pad": _pad,
    "concat": _join,
    "stack": _join,
    "take": _take,
    "conv2d": _conv2d,
}
"""The batching rule of each op that has one (ListOps reports them as `batchable`). `take`
has one for shared indices only: a graph taking per-example indices runs as the loop."""


def batchable(op: str) -> bool:
    """Whether `op` has a batching rule."""
    return op in RULES


def batch_graph(
    graph: Graph,
    types: Mapping[str, TensorType],
    batched_inputs: set[str],
    rows: int,
    roots: Sequence[str] = (),
) -> BatchedGraph:
    """The graph carrying a leading batch axis of `rows` examples (see the module's doc).

    `types` types the nodes of `graph` to batch for one example (the others are left out);
    `batched_inputs` names the inputs fed one slice per example. Float inputs not among them
    are to be fed tiled `rows` times. `roots` (the nodes the caller asks for) goes into the
    batched graph's digest.
    """
    prefix = "batch/"
    while any(name.startswith(prefix) for name in graph.nodes):
        prefix = "_" + prefix
    b = _Builder(rows, prefix, types)
    for name, node in graph.nodes.items():
        if name not in types:
            continue
        is_float = types[name].is_float
        if node.op == "input":
            if name in batched_inputs or is_float:
                shape = None if node.attrs["shape"] is None else (rows, *types[name].shape)
                b.emit(name, "input", (), dtype=node.attrs["dtype"], shape=shape)
            else:
                b.nodes.append(node)
            continue
        if all(s not in b.batched for s in node.inputs):
            if not is_float:
                b.nodes.append(node)
                continue
            copy = Node(f"{prefix}{name}/unbatched", node.op, node.inputs, node.attrs)
            b.nodes.append(copy)
            b.emit(name, "broadcast_to", [copy.name], shape=(rows, *types[name].shape))
            continue
        rule = RULES.get(node.op)
        if rule is None:
            return BatchedGraph(None, frozenset(), node.describe())
        try:
            rule(b, node)
        except NoBatchingRule as e:
            return BatchedGraph(None, frozenset(), f"{node.describe()} ({e})")
    batched = Graph(b.nodes)
    identity = repr((sorted(batched_inputs), list(roots))).encode()
    batched.digest = f"{graph.digest}/batched:{rows}:{hashlib.sha256(identity).hexdigest()}"
    return BatchedGraph(batched, frozenset(b.batched))
