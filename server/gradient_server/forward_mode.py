"""Forward mode as a graph-to-graph transform: Jacobian-vector products by transposing the
reverse pass.

The reverse pass of a graph computes, for a cotangent u of the nodes it differentiates, the
vector-Jacobian product vjp(u) = Jᵀu, and it is linear in u. So for tangents v of the inputs,

    s(u) = <vjp(u), v> = <Jᵀu, v> = <u, J·v>,   hence   ds/du = J·v.

jvp_graph() builds exactly that out of the reverse-mode transform (autodiff.gradient_graph):
a probe L = sum_n <n, u_n> over the nodes n whose tangents are wanted (u_n new inputs), its
gradient graph with respect to the inputs that carry tangents, the scalar s = sum_i
<dL/dx_i, v_i> (autodiff.directional_derivative), and the gradient graph of s with respect to
every u_n: the node holding ds/du_n holds J_n·v, the tangent of n. The value of u does not
matter (s is linear in it): feed zeros; the two scalar seeds take ones. Simplification then
drops what the tangents do not need (the first backward pass's values are never needed, only
its structure), leaving the forward values and one linear pass over them.

The result is an ordinary graph, so it composes: a JVP of a gradient graph is a
Hessian-vector product (forward over reverse), and a gradient graph of a JVP graph works too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .autodiff import directional_derivative, gradient_graph
from .errors import no_deadline
from .ir import Graph, Node, TypeMemo, make_node
from .tensor_type import TensorType


@dataclass(frozen=True)
class JvpGraph:
    """A graph computing the tangents of some nodes along tangents of some inputs.

    `tangents` maps each requested float node to the node holding its tangent J·v (the
    node's shape and dtype); `directions` maps each input carrying a tangent to the input node
    taking it; `zeros` names inputs to feed zeros of their type, and `ones` inputs to feed ones
    (the scalar seeds of the two reverse passes); `skipped` maps each requested node that has
    no tangent (integer or bool) to the reason.
    """

    graph: Graph
    types: dict[str, TensorType]
    tangents: dict[str, str]
    directions: dict[str, str]
    zeros: tuple[str, ...]
    ones: tuple[str, ...]
    skipped: dict[str, str]


def _free_prefix(taken: Iterable[str], stem: str) -> str:
    prefix = stem
    taken = list(taken)
    while any(name.startswith(prefix + "/") for name in taken):
        prefix += "_"
    return prefix


def jvp_graph(
    graph: Graph,
    types: Mapping[str, TensorType],
    nodes: Iterable[str],
    directions: Iterable[str],
    check_deadline: Callable[[], None] = no_deadline,
) -> JvpGraph:
    """Extend `graph` (typed by `types`) with the tangents of `nodes` along tangents of the
    float inputs `directions`.

    Only typed nodes take part. `directions` must name float input nodes (the caller checks);
    it may be empty, and then every tangent is zeros.
    """
    nodes = list(dict.fromkeys(nodes))
    directions = list(dict.fromkeys(directions))
    all_types = dict(types)
    skipped = {
        name: f"{all_types[name].dtype.name} is not differentiable"
        for name in nodes
        if not all_types[name].is_float
    }
    wanted = [name for name in nodes if name not in skipped]
    forward = [node for name, node in graph.nodes.items() if name in types]
    prefix = _free_prefix(graph.nodes, "jvp")
    memo = TypeMemo()
    added: list[Node] = []

    def emit(name: str, op: str, inputs: tuple[str, ...], **attrs: object) -> str:
        node = make_node(f"{prefix}/{name}", op, inputs, attrs)
        if op == "input":
            all_types[node.name] = TensorType(attrs["dtype"], attrs["shape"])  # type: ignore[arg-type]
        else:
            all_types[node.name] = memo.infer(node, tuple(all_types[s] for s in inputs))
        added.append(node)
        return node.name

    if not wanted:
        empty = Graph(forward)
        empty.digest = graph.digest
        return JvpGraph(
            empty, {n.name: all_types[n.name] for n in forward}, {}, {}, (), (), skipped
        )

    # The probe L = sum_n sum(n * u_n): its reverse pass is sum_n J_nᵀ u_n.
    probes: dict[str, str] = {}
    total = ""
    for index, name in enumerate(wanted):
        node_type = all_types[name]
        probe = emit(f"u_{index}", "input", (), dtype=node_type.dtype, shape=node_type.shape)
        probes[name] = probe
        term = emit(f"dot_{index}", "sum", (emit(f"mul_{index}", "mul", (name, probe)),))
        total = term if not total else emit(f"add_{index}", "add", (total, term))
    probed = Graph([*forward, *added])
    sources = sorted((n.name, str(all_types[n.name])) for n in forward if n.op == "input")
    identity = repr((graph.digest, wanted, directions, sources)).encode()
    probed.digest = hashlib.sha256(identity).hexdigest()
    probed_types = {name: all_types[name] for name in probed.nodes}

    if not directions:
        # No tangent anywhere: every tangent is zeros.
        zeros: dict[str, str] = {}
        for index, name in enumerate(wanted):
            node_type = all_types[name]
            zeros[name] = emit(
                f"zeros_{index}", "zeros", (), shape=node_type.shape, dtype=node_type.dtype
            )
        result = Graph([*forward, *added])
        result.digest = probed.digest
        kept = {name: all_types[name] for name in result.nodes}
        return JvpGraph(result, kept, zeros, {}, tuple(probes.values()), (), skipped)

    first = gradient_graph(probed, probed_types, total, directions, check_deadline)
    dotted = directional_derivative(first, directions)
    second = gradient_graph(
        dotted.graph, dotted.types, dotted.output, list(probes.values()), check_deadline
    )
    tangents = {name: second.gradients[probe] for name, probe in probes.items()}
    return JvpGraph(
        second.graph,
        second.types,
        tangents,
        dict(dotted.vectors),
        tuple(probes.values()),
        (first.seed, second.seed),
        skipped,
    )
