"""Gradient checking: analytic gradients against central finite differences, in float64."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from .engine import Engine, check_output
from .errors import GraphError, LimitExceeded, no_deadline
from .ir import Graph, Node

FLOAT64 = np.dtype("float64")


@dataclass(frozen=True)
class CheckSettings:
    """Step, tolerances and sampling of a check (defaults as torch.autograd.gradcheck)."""

    eps: float = 1e-6
    atol: float = 1e-5
    rtol: float = 1e-3
    max_elements: int = 0
    directions: int = 0
    random_seed: int = 0


@dataclass(frozen=True)
class NodeCheck:
    """The result of checking one node's gradient."""

    max_abs_error: float
    max_rel_error: float
    passed: bool
    checked: int


@dataclass(frozen=True)
class CheckReport:
    """The result of a gradient check: per node, and overall."""

    nodes: dict[str, NodeCheck]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.nodes.values())


def _widened(node: Node) -> Node:
    """The node with float32 dtype attributes and tensors made float64."""
    attrs = dict(node.attrs)
    for spec in node.opdef.attrs:
        value = attrs.get(spec.name)
        if spec.kind == "dtype" and value == np.dtype("float32"):
            attrs[spec.name] = FLOAT64
        elif spec.kind == "tensor" and value is not None and value.dtype == np.dtype("float32"):
            attrs[spec.name] = value.astype(FLOAT64)
    return Node(node.name, node.op, node.inputs, MappingProxyType(attrs))


def in_float64(graph: Graph) -> Graph:
    """The graph computing in float64 wherever it computed in float32."""
    widened = Graph(_widened(node) for node in graph.nodes.values())
    widened.digest = f"{graph.digest}/float64"
    return widened


def with_input(graph: Graph, name: str) -> Graph:
    """The graph with node `name` turned into an input, so its value can be perturbed."""
    source = Node(name, "input", (), MappingProxyType({"dtype": None, "shape": None}))
    replaced = Graph(source if n == name else node for n, node in graph.nodes.items())
    replaced.digest = f"{graph.digest}/input:{name}"
    return replaced


def check_gradient(
    engine: Engine,
    graph: Graph,
    feeds: Mapping[str, np.ndarray],
    output: str,
    seed: np.ndarray | None = None,
    wrt: Sequence[str] = (),
    settings: CheckSettings = CheckSettings(),
    check_deadline: Callable[[], None] = no_deadline,
) -> CheckReport:
    """Compare d(sum(seed * output))/d(node) with central differences for each node of `wrt`.

    Default `wrt`: every input fed a float tensor. A non-scalar output without a seed gets a
    random normal seed.
    """
    check_output(graph, output)
    if not (math.isfinite(settings.eps) and settings.eps > 0):
        raise GraphError(f"eps must be a positive finite number, got {settings.eps}", field="eps")
    for name in ("atol", "rtol"):
        tolerance = getattr(settings, name)
        if not tolerance >= 0:  # NaN is not
            raise GraphError(
                f"{name} must be a number of at least 0 (inf accepts any error), got {tolerance}",
                field=name,
            )
    rng = np.random.default_rng(settings.random_seed)
    graph64 = in_float64(graph)
    feeds64 = {
        name: value.astype(FLOAT64) if value.dtype.kind == "f" else value
        for name, value in feeds.items()
    }
    names = list(wrt) or [
        name
        for name, value in feeds64.items()
        if value.dtype.kind == "f" and graph.nodes.get(name) is not None
    ]
    out_value = engine.forward(graph64, feeds64, [output], check_deadline)[output]
    if seed is None:
        seed = np.ones(()) if out_value.size == 1 else rng.standard_normal(out_value.shape)
    seed = np.broadcast_to(np.asarray(seed, FLOAT64), out_value.shape) if seed.ndim == 0 else seed
    analytic = engine.gradient(
        graph64, feeds64, output, seed.astype(FLOAT64), names, names, check_deadline
    )

    # Each finite difference runs the forward pass, or less of it (a node made an input).
    forward = engine.forward_plan(graph64, feeds64, [output], check_deadline)
    _charge(engine, analytic.gradients, settings, forward.estimated_flops)
    nodes: dict[str, NodeCheck] = {}
    for name in names:
        if name not in analytic.gradients:
            continue
        perturbable = graph64 if graph64[name].op == "input" else with_input(graph64, name)

        def objective(value: np.ndarray, name: str = name, target: Graph = perturbable) -> float:
            values = engine.forward(target, {**feeds64, name: value}, [output], check_deadline)
            return float(np.sum(seed * values[output]))

        with np.errstate(all="ignore"):  # inf and nan are results to report, not warnings
            nodes[name] = _check_node(
                objective, analytic.values[name], analytic.gradients[name], settings, rng
            )
    return CheckReport(nodes, dict(analytic.skipped))


def _charge(
    engine: Engine,
    gradients: Mapping[str, np.ndarray],
    settings: CheckSettings,
    forward_flops: int,
) -> None:
    """LimitExceeded if the check would run more forward passes than the server allows, or
    forward passes of more flops in all (max_flops)."""
    per_node = [
        settings.directions
        if settings.directions > 0
        else min(g.size, settings.max_elements or g.size)
        for g in gradients.values()
    ]
    evaluations = 2 * sum(per_node)
    limit = engine.limits.max_check_evaluations
    if evaluations > limit:
        raise LimitExceeded(
            f"the check needs {evaluations} forward passes; the limit (max_check_evaluations) is "
            f"{limit}: set max_elements or directions to check a sample",
            limit="max_check_evaluations",
        )
    work = evaluations * forward_flops
    if work > engine.limits.max_flops:
        raise LimitExceeded(
            f"the check needs {evaluations} forward passes of about {forward_flops:.3g} flops, "
            f"{work:.3g} in all; the limit (max_flops) is {engine.limits.max_flops:.3g}: set "
            "max_elements or directions to check a sample",
            limit="max_flops",
        )


def _check_node(
    objective: Callable[[np.ndarray], float],
    point: np.ndarray,
    gradient: np.ndarray,
    settings: CheckSettings,
    rng: np.random.Generator,
) -> NodeCheck:
    eps = settings.eps
    point = np.asarray(point, FLOAT64)
    analytic, numeric = [], []
    if settings.directions > 0:
        for _ in range(settings.directions):
            direction = rng.standard_normal(point.shape)
            upper, lower = objective(point + eps * direction), objective(point - eps * direction)
            numeric.append((upper - lower) / (2 * eps))
            analytic.append(float(np.sum(gradient * direction)))
    else:
        count = point.size
        chosen = np.arange(count)
        if 0 < settings.max_elements < count:
            chosen = np.sort(rng.choice(count, settings.max_elements, replace=False))
        flat_gradient = gradient.reshape(-1)
        for index in chosen:
            step = np.zeros(count)
            step[index] = eps
            step = step.reshape(point.shape)
            numeric.append((objective(point + step) - objective(point - step)) / (2 * eps))
            analytic.append(float(flat_gradient[index]))
    a, n = np.asarray(analytic), np.asarray(numeric)
    error = np.abs(a - n)
    scale = np.maximum(np.abs(a), np.abs(n))
    relative = np.divide(error, scale, out=np.zeros_like(error), where=scale > 0)
    passed = bool(np.all(error <= settings.atol + settings.rtol * np.abs(n)))
    return NodeCheck(
        max_abs_error=float(error.max(initial=0.0)),
        max_rel_error=float(relative.max(initial=0.0)),
        passed=passed,
        checked=len(a),
    )
