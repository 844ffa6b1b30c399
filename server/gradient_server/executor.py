"""Runs a typed graph with numpy: a plan of ready-to-call steps, each value freed after its last
use.

Everything that depends only on types is settled when the plan is built, so running it is a
loop of calls: each step's function is bound to its node's attributes and types (numpy's own
function when no operand needs a cast), constants are values from the start (cast once to the
dtype their consumers compute in), results are wrapped as arrays only where an op can return a
numpy scalar (0-d results), deadlines are checked only after enough estimated work to matter,
and an elementwise step writes into the buffer of an operand that dies there when it can.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

import numpy as np

from . import fusion
from .fusion import Kernel
from .ir import Graph, Node, node_error
from .ops import OPS, Call, InvalidValue
from .tensor_type import TensorType

CHECK_RESULT_TYPES = os.environ.get("GRADIENT_CHECK_RESULT_TYPES") == "1"
"""Check every op's result against the type its rule promised (a debug mode: the test suite
turns it on; a mismatch is a bug in the op table and fails the call with INTERNAL)."""

STEP_BYTES = 400
"""Memory a plan's step takes (its bound call and its bookkeeping), measured on chains."""

CHECK_EVERY_FLOPS = 10_000_000
"""Estimated work between deadline checks (about 0.2 ms on the machine the costs were measured
on): a check costs about as much as a tiny op, so a chain of tiny ops checks only now and then,
and a request still stops within this much work (plus one op) of its deadline."""

REUSE_MIN_ELEMENTS = 1 << 12
"""Results at least this large are written into a dying operand's buffer when one fits: below
it, numpy's allocator recycles small blocks as fast."""


@dataclass(slots=True)
class _Step:
    """A node as the plan runs it: its call (attributes and types), its operands, the values
    no later step needs (freed after it), and whether its result is written into one of those
    or computed by a fused kernel."""

    node: Node
    call: Call
    sources: tuple[str, ...]  # the node's inputs, or its kernel's operands
    release: tuple[str, ...]
    cost: int  # estimated flops (ops/base.py), of every op of its kernel
    reuses: str | None = None  # the dying operand whose buffer takes the result
    kernel: Kernel | None = None  # the fused ops it runs as one, if any
    direct: Callable[..., np.ndarray] | None = None  # see _direct_function

    @property
    def op(self) -> str:
        """What it runs, as metrics name it."""
        return "fused_elementwise" if self.kernel is not None else self.node.op


_Instruction = tuple[Callable[..., np.ndarray], tuple[str, ...], str, tuple[str, ...], bool, _Step]
"""One step of the program: (function, sources, name, release, check_deadline, step):
`name = function(*sources)`, then free `release`."""


class Plan:
    """The steps that compute `fetch` from the feeds, built once per graph and request shape."""

    def __init__(
        self,
        graph: Graph,
        types: Mapping[str, TensorType],
        fetch: set[str],
        aliases: Mapping[str, str] | None = None,
        needed: Container[str] | None = None,
    ):
        """`fetch` names the values run() returns; `aliases` maps a fetched name to the node
        that computes its value, where another does (after simplification); `needed` holds
        the nodes the fetched ones depend on, when the caller knows them already."""
        aliases = aliases or {}
        self._fetch = tuple((name, aliases.get(name, name)) for name in sorted(fetch))
        self.fetch = frozenset(node for _, node in self._fetch)
        if needed is None:
            needed = graph.ancestors(self.fetch)
        inputs: list[str] = []
        self._constants: dict[str, np.ndarray] = {}  # values, read-only: no step writes them
        computed: list[Node] = []
        sizes: dict[str, int] = {}
        size_of: dict[int, int] = {}  # by the identity of a type (a big graph repeats a few)
        for node in graph.nodes.values():
            name = node.name
            if name not in needed:
                continue
            node_type = types[name]
            size = size_of.get(id(node_type))
            if size is None:
                size = size_of[id(node_type)] = node_type.size
            sizes[name] = size
            if node.op == "input":
                inputs.append(name)
            elif node.op == "constant":
                self._constants[name] = _read_only(np.asarray(node.attrs["value"]))
            else:
                computed.append(node)
        self._inputs = tuple(inputs)
        # The largest value the plan holds (the engine checks it against its element limit).
        largest_name = max(sizes, key=sizes.__getitem__, default=None)
        self.largest_value: Node | None = graph[largest_name] if largest_name else None
        kernels = (
            fusion.find_kernels(computed, types, self.fetch, self._constants)
            if any(size >= fusion.FUSE_MIN_ELEMENTS for size in sizes.values())
            else {}
        )
        self.steps = _schedule(computed, types, sizes, self.fetch, self._constants, kernels)
        self._program = tuple(self._instructions())
        self.held_bytes = STEP_BYTES * len(self.steps) + sum(
            value.nbytes for name, value in self._constants.items() if name not in graph.nodes
        )
        self._estimate_memory(types, sizes)
        # The work of every op, estimated from its call (the cost section of ops/base.py):
        # in all, and of the costliest op (its node is None when there are no steps).
        costs = [step.cost for step in self.steps]
        self.estimated_flops: int = sum(costs)
        self.largest_op_flops = max(costs, default=0)
        self.largest_op: Node | None = (
            self.steps[costs.index(self.largest_op_flops)].node if costs else None
        )

    # -- building ---------------------------------------------------------------------------

    def _instructions(self) -> list[_Instruction]:
        program = []
        since_check = CHECK_EVERY_FLOPS  # the first step checks
        for step in self.steps:
            function, sources = self._bind(step)
            check = since_check >= CHECK_EVERY_FLOPS
            since_check = step.cost if check else since_check + step.cost
            program.append((function, sources, step.node.name, step.release, check, step))
        return program

    def _bind(self, step: _Step) -> tuple[Callable[..., np.ndarray], tuple[str, ...]]:
        """The step's function taking only its operands, and the names of those operands."""
        node, call = step.node, step.call
        dtype = call.type.dtype
        if step.kernel is not None:
            return step.kernel.function, tuple(self._constant_as(s, dtype) for s in step.sources)
        sources = step.sources
        direct = step.direct
        if direct is not None:
            for operand in call.input_types:
                if operand.dtype != dtype:
                    sources = tuple(self._constant_as(s, dtype) for s in sources)
                    break
        function = direct or functools.partial(node.opdef.forward, call)
        if step.reuses is not None:
            function = _writing_into(function, sources.index(step.reuses))
        elif not call.type.shape:
            function = _as_array(function)  # numpy returns scalars for 0-d results
        return function, sources

    def _constant_as(self, name: str, dtype: np.dtype) -> str:
        """The name of the value of `name` in `dtype` (itself if it is not a constant or
        already has it), adding the cast value to the plan's constants."""
        value = self._constants.get(name)
        if value is None or value.dtype == dtype:
            return name
        cast_name = f"{name}\0{dtype.str}"  # NUL cannot appear in a node name from the wire
        if cast_name not in self._constants:
            self._constants[cast_name] = _read_only(value.astype(dtype))
        return cast_name

    def _estimate_memory(self, types: Mapping[str, TensorType], sizes: Mapping[str, int]) -> None:
        """The memory at the plan's peak: the values alive at each step under the release
        schedule (the request's inputs all along), plus the step's result (unless it goes into
        a dying operand's buffer) and scratch space. Constants belong to the cached graph."""
        itemsize_of: dict[int, int] = {}  # by the identity of a type, as sizes
        nbytes = {}
        for name, size in sizes.items():
            node_type = types[name]
            itemsize = itemsize_of.get(id(node_type))
            if itemsize is None:
                itemsize = itemsize_of[id(node_type)] = node_type.dtype.itemsize
            nbytes[name] = size * itemsize
        no_workspace = {name for name, op in OPS.items() if op.workspace is None}
        inputs = set(self._inputs)
        live = sum(nbytes[name] for name in inputs)
        self.estimated_bytes, self.peak_node = live, None
        owned = inputs | set(self._constants)
        peak = live
        for step in self.steps:
            node = step.node
            workspace = None if node.op in no_workspace else node.opdef.workspace
            scratch = workspace(step.call) if workspace is not None else 0
            result = 0 if step.reuses is not None else nbytes[node.name]
            if live + result + scratch > peak:
                peak = live + result + scratch
                self.peak_node = node
            live += result
            for name in step.release:
                if name not in owned and name != step.reuses:
                    live -= nbytes[name]
        self.estimated_bytes = peak
        # The fetched values are copied once more, into the response.
        self.fetched_bytes = sum(nbytes[node] for _, node in self._fetch)

    # -- running ----------------------------------------------------------------------------

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        check_deadline: Callable[[], None],
        op_times: OpTimes | None = None,
    ) -> dict[str, np.ndarray]:
        """Compute every fetched value. check_deadline is called between ops (after enough
        estimated work) and may raise; each op's time is added to `op_times`, if given."""
        values = dict(self._constants)
        for name in self._inputs:
            values[name] = feeds[name]
        with np.errstate(all="ignore"):  # inf and nan are the client's results, not warnings
            if op_times is not None:
                self._run_timed(values, check_deadline, op_times)
            elif CHECK_RESULT_TYPES:
                self._run_checked(values, check_deadline)
            else:
                self._run(values, check_deadline)
        return {name: values[node] for name, node in self._fetch}

    def _run(self, values: dict[str, np.ndarray], check_deadline: Callable[[], None]) -> None:
        step = None
        try:
            # `step` is read only when an op fails, to name its node.
            for function, sources, name, release, check, step in self._program:  # noqa: B007
                if check:
                    check_deadline()
                values[name] = function(*[values[s] for s in sources])
                for used in release:
                    del values[used]
        except InvalidValue as e:
            assert step is not None
            raise node_error(step.node, str(e)) from None

    def _run_checked(
        self, values: dict[str, np.ndarray], check_deadline: Callable[[], None]
    ) -> None:
        """_run, checking every result against the type its rule promised (debug mode)."""
        for function, sources, name, release, check, step in self._program:
            if check:
                check_deadline()
            try:
                value = function(*[values[s] for s in sources])
            except InvalidValue as e:
                raise node_error(step.node, str(e)) from None
            _check_type(step.node, value, step.call.type)
            values[name] = value
            for used in release:
                del values[used]

    def _run_timed(
        self,
        values: dict[str, np.ndarray],
        check_deadline: Callable[[], None],
        op_times: OpTimes,
    ) -> None:
        """_run, timing every op (for the metrics)."""
        timed: list[tuple[str, float]] = []
        try:
            for function, sources, name, release, check, step in self._program:
                if check:
                    check_deadline()
                began = time.perf_counter()
                try:
                    value = function(*[values[s] for s in sources])
                except InvalidValue as e:
                    raise node_error(step.node, str(e)) from None
                timed.append((step.op, time.perf_counter() - began))
                if CHECK_RESULT_TYPES:
                    _check_type(step.node, value, step.call.type)
                values[name] = value
                for used in release:
                    del values[used]
        finally:
            if timed:
                op_times.add(timed)


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


# ---------------------------------------------------------------------------------------------
# Scheduling


def _schedule(
    nodes: list[Node],
    types: Mapping[str, TensorType],
    sizes: Mapping[str, int],
    fetch: frozenset[str],
    constants: Mapping[str, np.ndarray],
    kernels: Mapping[str, Kernel],
) -> list[_Step]:
    """The computed nodes as steps (a kernel's root as one step running its kernel, its other
    members as none): each value is freed after its last use (unless fetched), and a large
    result of a ufunc is written into the buffer of an operand of its type that dies at its
    step, when that buffer is itself a ufunc's result seen only by ufuncs (so no view of it
    lives on)."""
    if kernels:
        absorbed = {m.name for k in kernels.values() for m in k.members if m is not k.root}
        nodes = [node for node in nodes if node.name not in absorbed]
    steps = []
    fresh: set[str] = set()  # results of ufuncs: new arrays
    seen_by_others: set[str] = set()  # values an op other than a ufunc takes (maybe a view)
    last_use: dict[str, int] = {}
    # What a step's op makes of its types, worked out once per op, attributes and types: a
    # big graph repeats a few operations many times. Keys hold identities of objects that
    # `types` and the nodes keep alive while the plan is built.
    known: dict[tuple, tuple[Call, int, Callable[..., np.ndarray] | None, bool]] = {}
    type_of = types.__getitem__
    for index, node in enumerate(nodes):
        name = node.name
        input_types = tuple(map(type_of, node.inputs))
        result = type_of(name)
        key = (node.op, id(node.attrs), id(result), *map(id, input_types))
        facts = known.get(key)
        if facts is None:
            call = Call(node.attrs, input_types, result)
            bound = node.opdef.bind(call) if node.opdef.bind is not None else None
            mixed = bound is None and node.opdef.bind is not None
            facts = known[key] = (call, node.opdef.estimated_cost(call), bound, mixed)
        call, cost, direct, mixed = facts
        if mixed:  # dtypes differ: direct if the odd operands are constants (cast once)
            direct = _direct_function(node, call, constants)
        kernel = kernels.get(name) if kernels else None
        if kernel is not None:
            sources = kernel.sources
            cost = sum(m.opdef.estimated_cost(_call_of(m, types)) for m in kernel.members)
        else:
            sources = node.inputs
            if result.shape and isinstance(direct, np.ufunc):
                fresh.add(name)
        if name not in fresh:
            seen_by_others.update(sources)
        for source in sources:
            last_use[source] = index
        steps.append(_Step(node, call, sources, (), cost, None, kernel, direct))
    for name, index in last_use.items():
        if name not in fetch:
            step = steps[index]
            step.release += (name,)  # mostly one value a step: a tuple each, no lists
    for step in steps:
        release = step.release
        result = step.call.type
        if release and step.node.name in fresh and sizes[step.node.name] >= REUSE_MIN_ELEMENTS:
            step.reuses = next(
                (
                    source
                    for source in release
                    if source in fresh
                    and source not in seen_by_others
                    and types[source].shape == result.shape
                    and types[source].dtype == result.dtype
                ),
                None,
            )
    return steps


def _call_of(node: Node, types: Mapping[str, TensorType]) -> Call:
    return Call(node.attrs, tuple(types[s] for s in node.inputs), types[node.name])


def _direct_function(
    node: Node, call: Call, constants: Mapping[str, np.ndarray]
) -> Callable[..., np.ndarray] | None:
    """The op's function of the operands alone (numpy's own, for an elementwise op), or None.

    An op with a bind rule computes in its result's dtype (its forward casts the operands to
    it), so an operand of another dtype is no obstacle when it is a constant: the plan casts
    it once."""
    bind = node.opdef.bind
    if bind is None:
        return None
    direct = bind(call)
    dtype = call.type.dtype
    if direct is None and all(
        t.dtype == dtype or s in constants
        for s, t in zip(node.inputs, call.input_types, strict=True)
    ):
        cast_types = tuple(TensorType(dtype, t.shape, t.weak) for t in call.input_types)
        direct = bind(Call(call.attrs, cast_types, call.type))
    return direct


def _writing_into(function: Callable[..., np.ndarray], position: int) -> Callable[..., np.ndarray]:
    """The ufunc `function`, writing its result into its operand at `position`."""
    assert isinstance(function, np.ufunc)
    if function.nin == 1:
        return lambda x: function(x, out=x)
    if position == 0:
        return lambda x, y: function(x, y, out=x)
    return lambda x, y: function(x, y, out=y)


def _as_array(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda *operands: np.asarray(function(*operands))


def _read_only(value: np.ndarray) -> np.ndarray:
    view = value.view()
    view.flags.writeable = False
    return view


def _check_type(node: Node, value: object, expected: TensorType) -> None:
    if not isinstance(value, np.ndarray):
        raise RuntimeError(f"{node.describe()} computed a {type(value).__name__}, not an array")
    if value.shape != expected.shape or value.dtype != expected.dtype:
        raise RuntimeError(
            f"{node.describe()} computed {value.dtype.name}{list(value.shape)} "
            f"but its rule promised {expected}"
        )
