"""Runs a typed graph with numpy, one op at a time, freeing each value after its last use."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .ir import Graph, Node, node_error
from .ops import Call, InvalidValue
from .tensor_type import TensorType

CHECK_RESULT_TYPES = os.environ.get("GRADIENT_CHECK_RESULT_TYPES") == "1"
"""Check every op's result against the type its rule promised (a debug mode: the test suite
turns it on; a mismatch is a bug in the op table and fails the call with INTERNAL)."""


STEP_BYTES = 400
"""Memory a plan's step takes (its bound call and its bookkeeping), measured on chains."""


@dataclass(frozen=True)
class _Step:
    node: Node
    call: Call
    release: tuple[str, ...]  # values no later step needs (and nobody fetched)


class Plan:
    """The steps that compute `fetch` from the feeds, built once per graph and request shape.

    Each step is ready to call: its forward function bound to its node's attributes and
    types, its operands named, the values to free after it listed.
    """

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
        # Inputs are values from the start, not steps; each op is ready to call.
        self._inputs = tuple(s.node.name for s in self.steps if s.node.op == "input")
        self._program = tuple(
            (step.node.name, _bound(step), step.node.inputs, step.release, step)
            for step in self.steps
            if step.node.op != "input"
        )
        self.held_bytes = STEP_BYTES * len(self.steps)
        # The memory at the plan's peak: the values alive at each step under the release
        # schedule (the request's inputs all along), plus the step's result and scratch space.
        nbytes = {
            node.name: types[node.name].size * types[node.name].dtype.itemsize for node in nodes
        }
        inputs = set(self._inputs)
        live = sum(nbytes[name] for name in inputs)
        self.estimated_bytes, self.peak_node = live, None
        for step in self.steps:
            if step.node.name in inputs:
                continue
            opdef = step.node.opdef
            scratch = opdef.workspace(step.call) if opdef.workspace else 0
            if live + nbytes[step.node.name] + scratch > self.estimated_bytes:
                self.estimated_bytes = live + nbytes[step.node.name] + scratch
                self.peak_node = step.node
            live += nbytes[step.node.name]
            live -= sum(nbytes[name] for name in step.release if name not in inputs)
        # The fetched values are copied once more, into the response.
        self.fetched_bytes = sum(
            types[name].size * types[name].dtype.itemsize for name in fetch if name in types
        )
        # The work of every op, estimated from its call (the cost section of ops/base.py):
        # in all, and of the costliest op (its node is None when there are no steps).
        costs = [(step.node.opdef.estimated_cost(step.call), step.node) for step in self.steps]
        self.estimated_flops: int = sum(cost for cost, _ in costs)
        largest: tuple[int, Node | None] = max(costs, key=lambda c: c[0], default=(0, None))
        self.largest_op_flops, self.largest_op = largest

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        check_deadline: Callable[[], None],
        op_times: OpTimes | None = None,
    ) -> dict[str, np.ndarray]:
        """Compute every fetched value. check_deadline is called between ops and may raise;
        each op's time is added to `op_times`, if given."""
        timed: list[tuple[str, float]] | None = None if op_times is None else []
        with np.errstate(all="ignore"):  # inf and nan are the client's results, not warnings
            try:
                return self._run(feeds, check_deadline, timed)
            finally:
                if op_times is not None and timed:
                    op_times.add(timed)

    def _run(
        self,
        feeds: Mapping[str, np.ndarray],
        check_deadline: Callable[[], None],
        timed: list[tuple[str, float]] | None,
    ) -> dict[str, np.ndarray]:
        values = {name: feeds[name] for name in self._inputs}
        began = 0.0
        for name, forward, sources, release, step in self._program:
            check_deadline()
            if timed is not None:
                began = time.perf_counter()
            try:
                value = np.asarray(forward(*[values[s] for s in sources]))
            except InvalidValue as e:
                raise node_error(step.node, str(e)) from None
            if timed is not None:
                timed.append((step.node.op, time.perf_counter() - began))
            if CHECK_RESULT_TYPES:
                _check_type(step.node, value, step.call.type)
            values[name] = value
            for used in release:
                del values[used]
        return {name: values[name] for name in self.fetch}


class OpTimes:
    """Runs and seconds of each op, summed over the plans run with it (for the metrics)."""

    def __init__(self) -> None:
        self._totals: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def add(self, timed: list[tuple[str, float]]) -> None:
        """Add one run's (op, seconds) pairs."""
        with self._lock:
            totals = self._totals
            for op, seconds in timed:
                runs, total = totals.get(op, (0, 0.0))
                totals[op] = (runs + 1, total + seconds)

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """(runs, seconds) by op, now."""
        with self._lock:
            return dict(self._totals)


def _bound(step: _Step) -> Callable[..., np.ndarray]:
    """The step's forward function, taking only the operands."""
    opdef = step.node.opdef
    direct = opdef.bind(step.call) if opdef.bind is not None else None
    return direct or functools.partial(opdef.forward, step.call)


def _check_type(node: Node, value: np.ndarray, expected: TensorType) -> None:
    if value.shape != expected.shape or value.dtype != expected.dtype:
        raise RuntimeError(
            f"{node.describe()} computed {value.dtype.name}{list(value.shape)} "
            f"but its rule promised {expected}"
        )
