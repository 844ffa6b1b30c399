"""Elementwise fusion: a tree of elementwise ops over one large shape runs as one numexpr kernel.

Unfused, each op of a chain reads and writes a whole array; fused, numexpr evaluates the
whole expression block by block in cache, on every core. A node joins its consumer's kernel
when it is fusible (its op has a form below, it is float32 or float64, and it is at least
FUSE_MIN_ELEMENTS large), its one use is in that consumer, and nobody fetches it. Operands
must have the result's shape, or be scalars (0-d), of the result's dtype (constants are cast
when the plan is built).

The kernels' expressions are written here from FUSED_FORMS and numbered variables; nothing of
a request (names, attributes, values) is ever part of one. Values agree with unfused numpy to
rounding (numexpr's transcendental functions are libm's, numpy's its own): within 1e-12
relative in float64 on every op here (tests/test_fusion.py).

Without numexpr installed, nothing fuses and numpy runs every op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .ir import Node
from .tensor_type import TensorType

try:
    import numexpr
    from numexpr.necompiler import NumExpr
except ImportError:  # pragma: no cover - numexpr is a dependency; numpy is the fallback
    numexpr = None

FUSE_MIN_ELEMENTS = 1 << 16
"""Results at least this large fuse: below it an array fits in cache and numpy's passes are as
fast as a kernel's call."""

MAX_KERNEL_OPS = 32
"""Ops in one kernel at most, so its expression stays small to compile."""

FUSED_FORMS: dict[str, str] = {
    "add": "({0} + {1})",
    "sub": "({0} - {1})",
    "mul": "({0} * {1})",
    "div": "({0} / {1})",
    "neg": "(-{0})",
    "square": "({0} * {0})",
    "exp": "exp({0})",
    "expm1": "expm1({0})",
    "log": "log({0})",
    "log1p": "log1p({0})",
    "sqrt": "sqrt({0})",
    "tanh": "tanh({0})",
    "sin": "sin({0})",
    "cos": "cos({0})",
    "abs": "abs({0})",
}
"""The ops that fuse, as numexpr expressions of their operands. An operand used twice in a
form (square's) is never itself a fused subexpression: it would be computed twice."""

_REPEATS_OPERAND = {op for op, form in FUSED_FORMS.items() if form.count("{0}") > 1}
_NUMEXPR_TYPES = {np.dtype("float64"): np.float64, np.dtype("float32"): float}


def available() -> bool:
    """Whether fusion is on (numexpr is installed)."""
    return numexpr is not None


@dataclass(frozen=True)
class Kernel:
    """A fused tree of ops: `root` is the node it computes; `members` every node it holds
    (root first); `sources` its operands from outside, in call order."""

    root: Node
    members: tuple[Node, ...]
    sources: tuple[str, ...]
    expression: str
    function: Callable[..., np.ndarray]


def fusible(node: Node, types: Mapping[str, TensorType], cast_constants: set[str]) -> bool:
    """Whether the node can be part of a kernel (see the module's docstring)."""
    result = types[node.name]
    if node.op not in FUSED_FORMS or result.dtype not in _NUMEXPR_TYPES:
        return False
    if result.size < FUSE_MIN_ELEMENTS:
        return False
    for source in node.inputs:
        operand = types[source]
        if operand.shape not in (result.shape, ()):
            return False
        if operand.dtype != result.dtype and source not in cast_constants:
            return False
    return True


def find_kernels(
    nodes: Sequence[Node],
    types: Mapping[str, TensorType],
    fetch: frozenset[str],
    constants: Mapping[str, np.ndarray],
) -> dict[str, Kernel]:
    """The kernels of a plan's computed nodes (in order), by root name. Nodes absorbed into a
    kernel are not roots; a fusible node nothing joins stays an ordinary step."""
    if numexpr is None:
        return {}
    cast_constants = set(constants)
    can_fuse = {node.name for node in nodes if fusible(node, types, cast_constants)}
    uses: dict[str, int] = {}
    consumer: dict[str, Node] = {}
    for node in nodes:
        for source in node.inputs:
            uses[source] = uses.get(source, 0) + 1
            consumer[source] = node
    # A fusible node joins its consumer when that is its one use and the consumer fuses too.
    joins = {
        name
        for name in can_fuse
        if name not in fetch
        and uses.get(name) == 1
        and consumer[name].name in can_fuse
        and consumer[name].op not in _REPEATS_OPERAND
    }
    by_name = {node.name: node for node in nodes}
    kernels: dict[str, Kernel] = {}
    absorbed: set[str] = set()
    # Consumers come after their operands: going backwards, a joining node is either in its
    # consumer's kernel by now, or (the kernel was full) the root of its own.
    for node in reversed(nodes):
        if node.name in can_fuse and node.name not in absorbed:
            kernel = _kernel(node, by_name, joins, types)
            if kernel is not None:
                kernels[node.name] = kernel
                absorbed.update(member.name for member in kernel.members)
    return kernels


def _kernel(
    root: Node, by_name: Mapping[str, Node], joins: set[str], types: Mapping[str, TensorType]
) -> Kernel | None:
    """The kernel rooted at `root`, absorbing joining operands up to MAX_KERNEL_OPS (so the
    expression nests that deep at most), or None when nothing joins it."""
    # Members are taken breadth first, so a long chain's side branches join with it.
    members = [root]
    taken = {root.name}
    for node in members:  # grows as it goes
        for source in node.inputs:
            if source in joins and source not in taken and len(members) < MAX_KERNEL_OPS:
                members.append(by_name[source])
                taken.add(source)
    if len(members) == 1:
        return None
    sources: list[str] = []

    def expression(node: Node) -> str:
        operands = []
        for source in node.inputs:
            if source in taken:
                operands.append(expression(by_name[source]))
            else:
                if source not in sources:
                    sources.append(source)
                operands.append(f"v{sources.index(source)}")
        return FUSED_FORMS[node.op].format(*operands)

    text = expression(root)
    dtype = types[root.name].dtype
    signature = [(f"v{i}", _NUMEXPR_TYPES[dtype]) for i in range(len(sources))]
    compiled = NumExpr(text, signature=signature)
    return Kernel(root, tuple(members), tuple(sources), text, _runner(compiled))


def _runner(compiled) -> Callable[..., np.ndarray]:
    def run(*operands: np.ndarray) -> np.ndarray:
        return compiled(*operands)

    return run
