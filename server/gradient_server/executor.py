"""Runs a typed graph with numpy, one op at a time, freeing each value after its last use."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .ir import Graph, Node, node_error
from .ops import Call, InvalidValue
from .tensor_type import TensorType


@dataclass(frozen=True)
class _Step:
    node: Node
    call: Call
    release: tuple[str, ...]  # values no later step needs (and nobody fetched)


class Plan:
    """The steps that compute `fetch` from the feeds, built once per graph and request shape."""

    def __init__(self, graph: Graph, types: Mapping[str, TensorType], fetch: set[str]):
        needed = graph.ancestors(fetch)
        nodes = [node for name, node in graph.nodes.items() if name in needed]
        last_use: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for source in node.inputs:
                last_use[source] = index
        releases: dict[int, list[str]] = {}
        for name, index in last_use.items():
            if name not in fetch:
                releases.setdefault(index, []).append(name)
        self.fetch = frozenset(fetch)
        self.steps = [
            _Step(
                node,
                Call(node.attrs, tuple(types[s] for s in node.inputs), types[node.name]),
                tuple(releases.get(index, ())),
            )
            for index, node in enumerate(nodes)
        ]
        # Every value as if none were freed, plus the largest scratch space of any one op.
        self.estimated_bytes = sum(
            types[node.name].size * types[node.name].dtype.itemsize for node in nodes
        ) + max(
            (
                step.node.opdef.workspace(step.call)
                for step in self.steps
                if step.node.opdef.workspace
            ),
            default=0,
        )

    def run(
        self, feeds: Mapping[str, np.ndarray], check_deadline: Callable[[], None]
    ) -> dict[str, np.ndarray]:
        """Compute every fetched value. check_deadline is called between ops and may raise."""
        values: dict[str, np.ndarray] = {}
        with np.errstate(all="ignore"):
            for step in self.steps:
                check_deadline()
                node = step.node
                if node.op == "input":
                    value = feeds[node.name]
                else:
                    args = [values[s] for s in node.inputs]
                    try:
                        value = np.asarray(node.opdef.forward(step.call, *args))
                    except InvalidValue as e:
                        raise node_error(node, str(e)) from None
                    _check_type(node, value, step.call.type)
                values[node.name] = value
                for name in step.release:
                    del values[name]
        return {name: values[name] for name in self.fetch}


def _check_type(node: Node, value: np.ndarray, expected: TensorType) -> None:
    if value.shape != expected.shape or value.dtype != expected.dtype:
        raise RuntimeError(
            f"{node.describe()} computed {value.dtype.name}{list(value.shape)} "
            f"but its rule promised {expected}"
        )
