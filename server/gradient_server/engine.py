"""The engine: compiles graphs (validate, type, differentiate, plan), caches and runs them."""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from gradient.v1 import graph_pb2
from gradient_client import wire

from .admission import MemoryBudget
from .autodiff import GradientGraph, directional_derivative, gradient_graph
from .batching import BatchedGraph, batch_graph
from .errors import GraphError, LimitExceeded, UnknownGraph, no_deadline
from .executor import OpTimes, Plan
from .forward_mode import jvp_graph
from .ir import Graph, decode_graph, did_you_mean, graph_digest, infer_types, make_node
from .simplify import simplify
from .tensor_type import TensorType

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; exceeding one is RESOURCE_EXHAUSTED."""

    max_nodes: int = 1_000_000
    """Nodes in a request's graph."""
    max_tensor_elements: int = 1 << 28
    """Elements of any one tensor, fed or computed."""
    max_bytes: int = 8 << 30
    """Estimated bytes a request holds at its peak: its inputs, the values alive at each step
    (each freed after its last use), and the step's result and scratch space."""
    max_check_evaluations: int = 20_000
    """Forward passes one CheckGradient request may run (two per element or direction)."""
    max_flops: int = 10**12
    """Estimated work of all the ops a request runs, in flops (the unit of the cost section
    of ops/base.py, about 60e9 a second on the machine the defaults were measured on: some
    17 seconds); for CheckGradient, of all its forward passes."""
    max_op_flops: int = 10**10
    """Estimated work of any one op, in flops. Deadlines and cancellation are checked between
    ops, so this bounds how long a request runs past them: about 0.17 s on that machine."""


@dataclass(frozen=True)
class CacheStats:
    """A cache's lookups answered and not, and what it holds."""

    name: str
    hits: int
    misses: int
    bytes: int
    entries: int


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters (for the metrics)."""

    caches: tuple[CacheStats, ...]
    compiles: int
    compile_seconds: float
    ops: dict[str, tuple[int, float]]  # op -> (runs, seconds), when ops are timed


class _LRU(Generic[K, V]):
    """A small thread-safe least-recently-used cache, bounded in entries and in bytes."""

    def __init__(self, size: int, max_bytes: int):
        self._size = size
        self._max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        """The entries' weight in all."""
        return self._bytes

    def stats(self, name: str) -> CacheStats:
        """Its counters now, under `name`."""
        with self._lock:
            return CacheStats(name, self.hits, self.misses, self._bytes, len(self._items))

    def get(self, key: K) -> V | None:
        """The cached value of `key`, or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return entry[0]

    def get_or_make(self, key: K, make: Callable[[], V], nbytes: Callable[[V], int]) -> V:
        """The cached value of `key`, or make() (cached unless it alone exceeds the budget)."""
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key][0]
            self.misses += 1
        value = make()
        weight = nbytes(value)
        if weight > self._max_bytes:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, weight)
                self._bytes += weight
            while len(self._items) > self._size or self._bytes > self._max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
        return value


_gc_pauses = 0
_gc_was_enabled = True
_gc_lock = threading.Lock()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while compiling. Compiling a large graph makes
    millions of small objects, none of them in cycles (reference counting frees them), and
    each of the collector's full passes walks all of them: on a 100,000-node gradient it took
    a third of the time. Nested and concurrent pauses share one switch."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        _gc_pauses += 1
        if _gc_pauses == 1:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


@dataclass(slots=True)
class GradientResult:
    """Values and gradients of a Gradient call, keyed by node name."""

    values: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Prepared:
    """A call ready to run for one request signature (graph, names, feeds' dtypes and
    shapes): its plan and the names its results are read from."""

    plan: Plan
    fetch: tuple[str, ...]
    gradients: tuple[tuple[str, str], ...] = ()  # (node, the node holding its gradient)
    seed: str = ""
    seed_type: TensorType | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    default_seed: np.ndarray | None = None  # ones, for an output of one element

    held_bytes = 0  # it shares its plan with a cached compiled entry


def _signature_of(feeds: Mapping[str, np.ndarray]) -> list:
    """What a prepared call depends on in the feeds: names (in order), dtypes and shapes."""
    signature: list = []
    for name, value in feeds.items():
        signature += (name, value.dtype, value.shape)
    return signature


def _held(value: object) -> int:
    """The bytes a cached value holds (it says so in its held_bytes)."""
    return value.held_bytes  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _GradientPlan:
    plan: Plan
    combined: GradientGraph
    output_type: TensorType

    @property
    def held_bytes(self) -> int:
        return self.plan.held_bytes + self.combined.graph.held_bytes


@dataclass(frozen=True)
class _HvpPlan:
    plan: Plan
    first_seed: str
    vectors: dict[str, str]  # input name -> node taking its direction
    second_seed: str
    second_seed_type: TensorType
    gradients: dict[str, str]
    graph: Graph  # the second-order graph the plan runs

    @property
    def held_bytes(self) -> int:
        return self.plan.held_bytes + self.graph.held_bytes


@dataclass(slots=True)
class JvpResult:
    """Values and tangents of a JacobianVectorProduct call, keyed by node name."""

    values: dict[str, np.ndarray]
    tangents: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class JacobianResult:
    """The Jacobian of a Jacobian call: one array per wrt input, the mode used ("reverse" or
    "forward") and how many products it took."""

    jacobians: dict[str, np.ndarray]
    mode: str
    products: int


@dataclass(frozen=True)
class _JvpPlan:
    plan: Plan
    graph: Graph  # the simplified forward-mode graph the plan runs
    types: dict[str, TensorType]
    aliases: dict[str, str]  # fetched name -> the node computing it
    fetched: frozenset[str]
    tangents: dict[str, str]  # node -> the node holding its tangent
    directions: dict[str, str]  # input -> the input node taking its tangent
    constant_feeds: tuple[tuple[str, np.ndarray], ...]  # the zero probes and the unit seeds
    skipped: dict[str, str]

    @property
    def held_bytes(self) -> int:
        return self.plan.held_bytes + self.graph.held_bytes


@dataclass(frozen=True)
class _BatchedPlan:
    """A plan split for K rows of some of its inputs (the batched ones): `once` computes what
    does not depend on them (the forward pass), and `per_row` what does, once per row, taking
    the `boundary` values from `once` as inputs. So K rows cost one forward pass."""

    once: Plan
    per_row: Plan | None
    boundary: tuple[str, ...]
    once_fetch: frozenset[str]
    row_types: dict[str, TensorType]  # fetched name -> type, of those computed per row
    graph: Graph | None  # the per-row graph

    @property
    def held_bytes(self) -> int:
        held = self.once.held_bytes
        if self.per_row is not None and self.graph is not None:
            held += self.per_row.held_bytes + self.graph.held_bytes
        return held


def _split_plan(
    graph: Graph,
    types: Mapping[str, TensorType],
    fetch: Sequence[str],
    aliases: Mapping[str, str],
    batched: set[str],
) -> _BatchedPlan:
    """Split the plan computing `fetch` into the part independent of the `batched` inputs
    and the part depending on them (see _BatchedPlan). Both run the graph's own nodes, so
    each row computes what the whole plan would, op for op."""
    resolved = {name: aliases.get(name, name) for name in fetch}
    dependent: set[str] = set()
    for node in graph.nodes.values():
        if node.name in batched or not dependent.isdisjoint(node.inputs):
            dependent.add(node.name)
    needed = graph.ancestors(resolved.values())
    row_nodes = [node for name, node in graph.nodes.items() if name in needed and name in dependent]
    outside = sorted({s for node in row_nodes for s in node.inputs if s not in dependent})
    boundary = tuple(s for s in outside if graph[s].op != "constant")
    once_names = {name for name, node in resolved.items() if node not in dependent}
    once = Plan(
        graph,
        types,
        once_names | set(boundary),
        {name: resolved[name] for name in once_names},
    )
    row_names = {name for name, node in resolved.items() if node in dependent}
    if not row_names:
        return _BatchedPlan(once, None, (), frozenset(once_names), {}, None)
    sources = [
        graph[s]
        if graph[s].op == "constant"
        else make_node(s, "input", (), {"dtype": types[s].dtype, "shape": types[s].shape})
        for s in outside
    ]
    row_graph = Graph([*sources, *row_nodes])
    row_graph.digest = f"{graph.digest}/per-row"
    row_types = {name: types[name] for name in row_graph.nodes}
    per_row = Plan(row_graph, row_types, row_names, {name: resolved[name] for name in row_names})
    return _BatchedPlan(
        once,
        per_row,
        boundary,
        frozenset(once_names),
        {name: types[resolved[name]] for name in row_names},
        row_graph,
    )


def _stacked(value: np.ndarray, rows: int) -> np.ndarray:
    """`value` repeated along a new leading axis of `rows` (a row that does not depend on the
    batched inputs is the same in every row)."""
    return np.repeat(np.asarray(value)[np.newaxis], rows, axis=0)


def _order(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))


def check_output(graph: Graph, output: str) -> None:
    """GraphError unless `output` names a node of the graph."""
    if not output:
        raise GraphError("no output was named: say which node to differentiate")
    _names(graph, [output], "output")


def _names(graph: Graph, names: Sequence[str], what: str) -> list[str]:
    """Validate requested node names; empty means every node of the graph."""
    for name in names:
        if name not in graph:
            hint = did_you_mean(name, graph.nodes)
            raise GraphError(
                f"{what} names {name!r}, which is not a node of the graph{hint}", field=what
            )
    return list(dict.fromkeys(names)) if names else list(graph.nodes)


def _require_differentiable(graph: Graph, combined: GradientGraph) -> None:
    """A node named in `wrt` that has no gradient (it is not float) is an error, as in JAX and
    PyTorch: a silent omission would hide a mistake such as feeding -2 for -2.0. (With no
    `wrt`, every node is asked for and the non-float ones are only reported as skipped.)"""
    for name in combined.skipped:
        node = graph[name]
        dtype = combined.types[name].dtype.name
        fix = (
            f"feed it a float value (e.g. -2.0, not -2), or declare it "
            f"g.input({name!r}, dtype='float64')"
            if node.op == "input"
            else "only float nodes have gradients"
        )
        raise GraphError(
            f"wrt names {node.describe()}, which is {dtype} and has no gradient: {fix}",
            node=name,
            op=node.op,
            field="wrt",
        )


class Engine:
    """Compiles and runs graphs. Everything that depends only on the graph and the feeds'
    types is cached, so a repeated graph with new input values skips straight to numpy."""

    def __init__(
        self,
        limits: Limits | None = None,
        cache_size: int = 512,
        cache_bytes: int = 1 << 30,
        budget: MemoryBudget | None = None,
    ):
        self.limits = limits or Limits()
        self.budget = budget
        """The process's memory budget, which admits each run (None: no admission control)."""
        # Entries are weighed by what they hold (constants, nodes, plan steps): a quarter of
        # the budget for decoded graphs, the rest for what is compiled from them. A graph
        # heavier than its share is served but not cached.
        self._graphs: _LRU[str, Graph] = _LRU(cache_size, cache_bytes // 4)
        self._plans: _LRU[Hashable, object] = _LRU(cache_size, cache_bytes - cache_bytes // 4)
        self._compiles = 0
        self._compile_seconds = 0.0
        self._compile_lock = threading.Lock()
        self.op_times: OpTimes | None = None
        """Where each op's time is added, if set (the metrics set it)."""

    @property
    def cached_bytes(self) -> int:
        """What the caches hold now, in bytes (by the entries' estimates)."""
        return self._graphs.bytes + self._plans.bytes

    def stats(self) -> EngineStats:
        """The caches' counters, plan compiles and (if timed) op times, now."""
        with self._compile_lock:
            compiles, seconds = self._compiles, self._compile_seconds
        return EngineStats(
            (self._graphs.stats("graphs"), self._plans.stats("plans")),
            compiles,
            seconds,
            self.op_times.snapshot() if self.op_times is not None else {},
        )

    def _run(
        self, plan: Plan, feeds: Mapping[str, np.ndarray], check_deadline: Callable[[], None]
    ) -> dict[str, np.ndarray]:
        """Run a plan once the memory budget admits it: its peak (Plan.estimated_bytes) and
        the copies of its results in the response."""
        if self.budget is None:
            return plan.run(feeds, check_deadline, self.op_times)
        with self.budget.admitted(plan.estimated_bytes + plan.fetched_bytes, check_deadline):
            return plan.run(feeds, check_deadline, self.op_times)

    def _compiled(self, key: Hashable, compile_plan: Callable[[], object]) -> object:
        """The plan cached under `key`, or compile_plan() timed (and cached)."""

        def timed() -> object:
            began = time.perf_counter()
            try:
                with _gc_paused():
                    return compile_plan()
            finally:
                elapsed = time.perf_counter() - began
                with self._compile_lock:
                    self._compiles += 1
                    self._compile_seconds += elapsed

        return self._plans.get_or_make(key, timed, _held)

    # -- graphs ---------------------------------------------------------------------------

    def load_graph(
        self, message: graph_pb2.Graph, check_deadline: Callable[[], None] = no_deadline
    ) -> Graph:
        """Decode and validate a Graph message, cached by its content."""
        digest = graph_digest(message)
        return self._graphs.get_or_make(
            digest, lambda: self._decode(message, check_deadline, digest), _held
        )

    def load_graph_bytes(
        self, data: bytes | memoryview, check_deadline: Callable[[], None] = no_deadline
    ) -> Graph:
        """Decode and validate a serialized Graph message, cached by the digest of its bytes
        (it is parsed only when not cached)."""
        digest = wire.graph_digest(data)

        def parse() -> Graph:
            try:
                message = graph_pb2.Graph.FromString(data)
            except DecodeError as e:
                raise GraphError(f"the graph does not parse: {e}") from None
            return self._decode(message, check_deadline, digest)

        return self._graphs.get_or_make(digest, parse, _held)

    def cached_graph(self, digest: str) -> Graph:
        """The graph with this digest, if this engine holds it; UnknownGraph otherwise."""
        graph = self._graphs.get(digest)
        if graph is None:
            raise UnknownGraph(
                f"graph digest {digest[:16]!r}... is not known to this server (it restarted, "
                "evicted the graph, or is another replica): send the graph itself",
                digest=digest,
            )
        return graph

    def _decode(
        self, message: graph_pb2.Graph, check_deadline: Callable[[], None], digest: str
    ) -> Graph:
        with _gc_paused():
            return self._decode_checked(message, check_deadline, digest)

    def _decode_checked(
        self, message: graph_pb2.Graph, check_deadline: Callable[[], None], digest: str
    ) -> Graph:
        if len(message.nodes) > self.limits.max_nodes:
            raise LimitExceeded(
                f"graph has {len(message.nodes)} nodes; the limit (max_nodes) is "
                f"{self.limits.max_nodes}",
                limit="max_nodes",
            )
        return decode_graph(message, check_deadline, digest)

    def _feed_types(self, graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, TensorType]:
        types = {}
        for name, value in feeds.items():
            node = graph.nodes.get(name)
            if node is None or node.op != "input":
                what = "no node" if node is None else f"a {node.op} node, not an input"
                inputs = (n for n, node in graph.nodes.items() if node.op == "input")
                hint = did_you_mean(name, inputs) if node is None else ""
                raise GraphError(
                    f"a tensor was fed for {name!r}, but the graph has {what} there{hint}",
                    field="inputs",
                )
            types[name] = self._checked_type(f"input {name!r}", value)
        return types

    def _checked_type(self, what: str, value: np.ndarray) -> TensorType:
        if value.size > self.limits.max_tensor_elements:
            raise LimitExceeded(
                f"{what} has {value.size} elements; the limit (max_tensor_elements) is "
                f"{self.limits.max_tensor_elements}",
                limit="max_tensor_elements",
            )
        return TensorType(value.dtype, value.shape)

    def _check_plan(self, plan: Plan, types: Mapping[str, TensorType]) -> Plan:
        largest = plan.largest_value
        if largest is not None and types[largest.name].size > self.limits.max_tensor_elements:
            raise LimitExceeded(
                f"node {largest.name!r} would hold {types[largest.name].size} elements; the "
                f"limit (max_tensor_elements) is {self.limits.max_tensor_elements}",
                limit="max_tensor_elements",
            )
        if plan.estimated_bytes > self.limits.max_bytes:
            where = f" (at its peak, at {plan.peak_node.describe()})" if plan.peak_node else ""
            raise LimitExceeded(
                f"the request would hold about {plan.estimated_bytes} bytes{where}; the limit "
                f"(max_bytes) is {self.limits.max_bytes}",
                limit="max_bytes",
            )
        self._check_flops(plan, types)
        return plan

    def _check_flops(self, plan: Plan, types: Mapping[str, TensorType]) -> None:
        """LimitExceeded if the plan's estimated work, or that of one of its ops, is over the
        limits (max_op_flops, max_flops)."""
        node = plan.largest_op
        if node is None:
            return
        operands = ", ".join(str(types[s]) for s in node.inputs) or "none"
        largest = (
            f"{node.describe()}, operands {operands}, would take about "
            f"{_flops(plan.largest_op_flops)} flops"
        )
        if plan.largest_op_flops > self.limits.max_op_flops:
            raise LimitExceeded(
                f"{largest}; the limit for one op (max_op_flops) is "
                f"{_flops(self.limits.max_op_flops)}",
                limit="max_op_flops",
            )
        if plan.estimated_flops > self.limits.max_flops:
            raise LimitExceeded(
                f"the request would take about {_flops(plan.estimated_flops)} flops (the "
                f"largest op: {largest}); the limit (max_flops) is "
                f"{_flops(self.limits.max_flops)}",
                limit="max_flops",
            )

    @staticmethod
    def _signature(feed_types: Mapping[str, TensorType]) -> tuple:
        return tuple(sorted((n, t.dtype.str, t.shape) for n, t in feed_types.items()))

    # -- Forward --------------------------------------------------------------------------

    def forward(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        fetch: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
    ) -> dict[str, np.ndarray]:
        """The values of the `fetch` nodes (every node when empty)."""
        prepared = self._prepare_forward(graph, feeds, fetch, check_deadline)
        values = self._run(prepared.plan, feeds, check_deadline)
        return {name: values[name] for name in prepared.fetch}

    def forward_plan(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        fetch: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
    ) -> Plan:
        """The plan forward() would run for these feeds' types: compiled (and cached) and
        checked against the limits, but not run."""
        return self._prepare_forward(graph, feeds, fetch, check_deadline).plan

    def _prepare_forward(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        fetch: Sequence[str],
        check_deadline: Callable[[], None],
    ) -> _Prepared:
        key = ("call:forward", graph.digest, tuple(fetch), *_signature_of(feeds))
        prepared = self._plans.get(key)
        if prepared is None:
            fetch_names = _names(graph, fetch, "fetch")
            feed_types = self._feed_types(graph, feeds)
            compiled_key = (
                "forward",
                graph.digest,
                self._signature(feed_types),
                tuple(fetch_names),
            )

            def compile_plan() -> Plan:
                needed = graph.ancestors(fetch_names)
                types = infer_types(graph, feed_types, needed, check_deadline)
                simple = simplify(graph, types, fetch_names, check_deadline)
                # What the fetched nodes need is the simplified graph, every node of it.
                plan = Plan(
                    simple.graph, simple.types, set(fetch_names), simple.renamed, simple.graph.nodes
                )
                return self._check_plan(plan, simple.types)

            plan = self._compiled(compiled_key, compile_plan)
            prepared = _Prepared(plan, tuple(fetch_names))
            self._plans.get_or_make(key, lambda: prepared, _held)
        assert isinstance(prepared, _Prepared)
        return prepared

    # -- Gradient -------------------------------------------------------------------------

    def _compile_gradient(
        self,
        graph: Graph,
        feed_types: Mapping[str, TensorType],
        output: str,
        wrt: Sequence[str],
        fetch: Sequence[str],
        check_deadline: Callable[[], None] = no_deadline,
    ) -> _GradientPlan:
        """The gradient graph of `output` and the plan computing it, cached."""
        check_output(graph, output)
        key = (
            "gradient",
            graph.digest,
            self._signature(feed_types),
            output,
            tuple(wrt),
            tuple(fetch),
        )

        def compile_plan() -> _GradientPlan:
            needed = graph.ancestors([output, *wrt, *fetch])
            types = infer_types(graph, feed_types, needed, check_deadline)
            out_type = types[output]
            if not out_type.is_float:
                raise GraphError(
                    f"output {graph[output].describe()} is {out_type.dtype.name}, which is not "
                    "differentiable; differentiate a float32 or float64 node"
                )
            combined = gradient_graph(graph, types, output, wrt, check_deadline)
            # The returned gradient graph computes the output and every gradient, its forward
            # nodes as the client sent them; the backward pass is simplified.
            roots = [output, *fetch, *combined.gradients.values()]
            simple = simplify(combined.graph, combined.types, roots, check_deadline, types)
            combined = GradientGraph(
                simple.graph,
                simple.types,
                {name: simple.name_of(node) for name, node in combined.gradients.items()},
                combined.skipped,
                combined.seed,
            )
            fetched = {*fetch, *combined.gradients.values()}
            plan = Plan(combined.graph, combined.types, fetched, simple.renamed)
            self._check_plan(plan, combined.types)
            return _GradientPlan(plan, combined, out_type)

        compiled = self._compiled(key, compile_plan)
        assert isinstance(compiled, _GradientPlan)
        return compiled

    def gradient(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        seed: np.ndarray | None = None,
        wrt: Sequence[str] = (),
        fetch: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
    ) -> GradientResult:
        """Values of `fetch` and gradients of `output` with respect to `wrt` (all when empty)."""
        names = (output, tuple(wrt), tuple(fetch))
        key = ("call:gradient", graph.digest, *names, *_signature_of(feeds))
        prepared = self._plans.get(key)
        if prepared is None:
            wrt_names = _names(graph, wrt, "wrt")
            fetch_names = _names(graph, fetch, "fetch")
            feed_types = self._feed_types(graph, feeds)
            compiled = self._compile_gradient(
                graph, feed_types, output, wrt_names, fetch_names, check_deadline
            )
            combined = compiled.combined
            if wrt:
                _require_differentiable(graph, combined)
            out_type = compiled.output_type
            prepared = _Prepared(
                compiled.plan,
                tuple(fetch_names),
                tuple(combined.gradients.items()),
                combined.seed,
                out_type,
                dict(combined.skipped),
                _ones(out_type) if out_type.size == 1 else None,
            )
            self._plans.get_or_make(key, lambda: prepared, _held)
        assert isinstance(prepared, _Prepared) and prepared.seed_type is not None
        if seed is None and prepared.default_seed is not None:
            seed_value = prepared.default_seed
        else:
            seed_value = self._seed_value(graph, output, prepared.seed_type, seed)
        values = self._run(prepared.plan, {**feeds, prepared.seed: seed_value}, check_deadline)
        return GradientResult(
            values={name: values[name] for name in prepared.fetch},
            gradients={name: values[grad] for name, grad in prepared.gradients},
            skipped=prepared.skipped,
        )

    def gradient_graph(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        wrt: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
    ) -> GradientGraph:
        """The forward-and-backward graph of `output` for `wrt`, typed by the feeds."""
        wrt_names = _names(graph, wrt, "wrt")
        feed_types = self._feed_types(graph, feeds)
        compiled = self._compile_gradient(graph, feed_types, output, wrt_names, (), check_deadline)
        if wrt:
            _require_differentiable(graph, compiled.combined)
        return compiled.combined

    # -- Hessian-vector products ----------------------------------------------------------

    def hvp(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        vector: Mapping[str, np.ndarray],
        check_deadline: Callable[[], None] = no_deadline,
    ) -> dict[str, np.ndarray]:
        """H·v for a scalar output, H the Hessian over the float inputs, by reverse over reverse.

        `vector` maps input names to arrays of their shapes (missing inputs count as zero).
        Returns H·v restricted to each float input.
        """
        feed_types = self._feed_types(graph, feeds)
        variables = sorted(name for name, t in feed_types.items() if t.is_float)
        for name, value in vector.items():
            if name not in variables:
                raise GraphError(f"vector names {name!r}, which is not a float input of the graph")
            if value.shape != feed_types[name].shape or value.dtype.kind != "f":
                raise GraphError(
                    f"vector for {name!r} must be a float tensor of shape "
                    f"{list(feed_types[name].shape)}, got {value.dtype.name}{list(value.shape)}"
                )
        directions = sorted(vector)
        first = self._compile_gradient(graph, feed_types, output, variables, (), check_deadline)
        if first.output_type.size != 1:
            raise GraphError(
                f"output {graph[output].describe()} has shape {list(first.output_type.shape)}; "
                "a Hessian-vector product needs an output with one element"
            )
        if not directions:
            return {
                name: np.zeros(t.shape, t.dtype) for name, t in feed_types.items() if t.is_float
            }
        key = ("hvp", graph.digest, self._signature(feed_types), output, tuple(directions))

        def compile_plan() -> _HvpPlan:
            combined = first.combined
            dotted = directional_derivative(combined, directions)
            second = gradient_graph(
                dotted.graph, dotted.types, dotted.output, variables, check_deadline
            )
            simple = simplify(second.graph, second.types, second.gradients.values(), check_deadline)
            gradients = {name: simple.name_of(node) for name, node in second.gradients.items()}
            plan = Plan(simple.graph, simple.types, set(gradients.values()))
            self._check_plan(plan, simple.types)
            second_seed_type = second.types[second.seed]
            return _HvpPlan(
                plan,
                combined.seed,
                dotted.vectors,
                second.seed,
                second_seed_type,
                gradients,
                simple.graph,
            )

        compiled = self._compiled(key, compile_plan)
        assert isinstance(compiled, _HvpPlan)
        out_type = first.output_type
        run_feeds = {
            **feeds,
            compiled.first_seed: np.ones(out_type.shape, out_type.dtype),
            compiled.second_seed: np.ones((), compiled.second_seed_type.dtype),
        }
        for name, node in compiled.vectors.items():
            run_feeds[node] = vector[name].astype(feed_types[name].dtype, copy=False)
        values = self._run(compiled.plan, run_feeds, check_deadline)
        return {name: values[grad] for name, grad in compiled.gradients.items()}

    # -- Several seeds or tangents in one call (one forward pass) -------------------------

    def _check_batched(
        self,
        split: _BatchedPlan,
        rows: int,
        batched_feeds: Mapping[str, np.ndarray],
        types: Mapping[str, TensorType],
        repeated: Sequence[TensorType] = (),
    ) -> None:
        """Charge K rows against the limits before anything runs: the forward pass once, the
        per-row part K times, and the K stacked results (and the stacked feeds) held at once.
        `repeated` are the types of results computed once but returned stacked K times (a
        gradient or tangent that does not depend on the batched seeds or tangents)."""
        self._check_plan(split.once, types)
        row_flops = row_bytes = largest = 0
        if split.per_row is not None:
            self._check_plan(split.per_row, types)
            row_flops = split.per_row.estimated_flops
            row_bytes = split.per_row.estimated_bytes
            largest = max((t.size for t in split.row_types.values()), default=0)
        largest = max([largest, *(t.size for t in repeated)])
        stacked = (
            sum(t.size * t.dtype.itemsize for t in [*split.row_types.values(), *repeated]) * rows
        )
        held = (
            split.once.estimated_bytes
            + row_bytes
            + stacked
            + sum(value.nbytes for value in batched_feeds.values())
        )
        if largest * rows > self.limits.max_tensor_elements:
            raise LimitExceeded(
                f"{rows} stacked results of {largest} elements would hold {largest * rows} "
                f"elements; the limit (max_tensor_elements) is {self.limits.max_tensor_elements}",
                limit="max_tensor_elements",
            )
        if held > self.limits.max_bytes:
            raise LimitExceeded(
                f"{rows} stacked products would hold about {held} bytes; the limit "
                f"(max_bytes) is {self.limits.max_bytes}",
                limit="max_bytes",
            )
        flops = split.once.estimated_flops + rows * row_flops
        if flops > self.limits.max_flops:
            raise LimitExceeded(
                f"{rows} products would take about {_flops(flops)} flops (the forward pass "
                f"{_flops(split.once.estimated_flops)} once, {_flops(row_flops)} per product); "
                f"the limit (max_flops) is {_flops(self.limits.max_flops)}",
                limit="max_flops",
            )

    def _run_batched(
        self,
        split: _BatchedPlan,
        feeds: Mapping[str, np.ndarray],
        batched_feeds: Mapping[str, np.ndarray],
        rows: int,
        check_deadline: Callable[[], None],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run the forward pass once and the per-row part once per row of `batched_feeds`
        (arrays with a leading axis of `rows`). Returns the values computed once and the
        stacked values computed per row."""
        once = self._run(split.once, feeds, check_deadline)
        stacked = {name: np.empty((rows, *t.shape), t.dtype) for name, t in split.row_types.items()}
        if split.per_row is not None:
            shared = {name: once[name] for name in split.boundary}
            for row in range(rows):
                check_deadline()
                row_feeds = dict(shared)
                for name, value in batched_feeds.items():
                    row_feeds[name] = value[row]
                values = self._run(split.per_row, row_feeds, check_deadline)
                for name, target in stacked.items():
                    target[row] = values[name]
        return {name: once[name] for name in split.once_fetch}, stacked

    def gradient_batched(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        seeds: np.ndarray,
        wrt: Sequence[str] = (),
        fetch: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
    ) -> GradientResult:
        """K vector-Jacobian products from one forward pass: `seeds` stacks K seeds along a
        new leading axis, and each gradient comes back stacked the same way, equal to K
        separate gradient() calls (values are not stacked)."""
        wrt_names = _names(graph, wrt, "wrt")
        fetch_names = _names(graph, fetch, "fetch")
        feed_types = self._feed_types(graph, feeds)
        compiled = self._compile_gradient(
            graph, feed_types, output, wrt_names, fetch_names, check_deadline
        )
        combined = compiled.combined
        if wrt:
            _require_differentiable(graph, combined)
        out_type = compiled.output_type
        rows = self._batched_rows(graph, output, out_type, seeds, "seed")
        seed_values = seeds.astype(out_type.dtype, copy=False)
        key = (
            "batched:gradient",
            graph.digest,
            self._signature(feed_types),
            output,
            tuple(wrt_names),
            tuple(fetch_names),
        )
        fetched = _order([*fetch_names, *combined.gradients.values()])
        split = self._compiled(
            key,
            lambda: _split_plan(combined.graph, combined.types, fetched, {}, {combined.seed}),
        )
        assert isinstance(split, _BatchedPlan)
        batched = {combined.seed: seed_values}
        repeated = [
            combined.types[node]
            for node in _order(list(combined.gradients.values()))
            if node not in split.row_types
        ]
        self._check_batched(split, rows, batched, combined.types, repeated)
        once, stacked = self._run_batched(split, feeds, batched, rows, check_deadline)

        def row_values(name: str) -> np.ndarray:
            return stacked[name] if name in stacked else _stacked(once[name], rows)

        return GradientResult(
            values={name: once[name] for name in fetch_names},
            gradients={name: row_values(node) for name, node in combined.gradients.items()},
            skipped=dict(combined.skipped),
        )

    def _batched_rows(
        self, graph: Graph, output: str, out_type: TensorType, seeds: np.ndarray, what: str
    ) -> int:
        """K, the leading axis of stacked seeds, once they are checked against the output."""
        self._checked_type(f"the batched {what}", seeds)
        if seeds.ndim < 1 or seeds.shape[1:] != out_type.shape:
            raise GraphError(
                f"batched {what} has shape {list(seeds.shape)}, but output "
                f"{graph[output].describe()} has shape {list(out_type.shape)}: a batched {what} "
                f"has shape [K] + {list(out_type.shape)}",
                field=what,
            )
        if seeds.dtype.kind != "f":
            raise GraphError(f"{what} must be a float tensor, got {seeds.dtype.name}", field=what)
        return int(seeds.shape[0])

    # -- Forward mode: Jacobian-vector products -------------------------------------------

    def jvp(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        tangents: Mapping[str, np.ndarray],
        tangents_of: Sequence[str] = (),
        all_tangents: bool = False,
        fetch: Sequence[str] = (),
        batched: bool = False,
        check_deadline: Callable[[], None] = no_deadline,
    ) -> JvpResult:
        """The tangents J·v of `output` (and of `tangents_of`, or of every node with
        `all_tangents`) along `tangents` (input name -> array of its shape; missing inputs
        count as zero), and the values of `output` and `fetch`.

        With `batched`, every tangent has a leading axis of K, and every tangent returned is
        stacked the same way: K products from one forward pass.
        """
        check_output(graph, output)
        feed_types = self._feed_types(graph, feeds)
        named = _order(
            [output, *_names(graph, tangents_of, "tangents_of")] if tangents_of else [output]
        )
        nodes = list(graph.nodes) if all_tangents else named
        fetch_names = _order([output, *(_names(graph, fetch, "fetch") if fetch else ())])
        directions = sorted(tangents)
        rows = self._check_tangents(graph, feed_types, tangents, batched)
        key = (
            "jvp",
            graph.digest,
            self._signature(feed_types),
            output,
            all_tangents,
            tuple(named),
            tuple(fetch_names),
            tuple(directions),
        )

        def compile_plan() -> _JvpPlan:
            # the inputs taking tangents too, those that reach no requested node included
            needed = graph.ancestors([*nodes, *fetch_names, *directions])
            types = infer_types(graph, feed_types, needed, check_deadline)
            for name in named:
                if not types[name].is_float:
                    what = "output" if name == output else "tangents_of names"
                    raise GraphError(
                        f"{what} {graph[name].describe()} is {types[name].dtype.name}, which "
                        "has no tangent; only float32 and float64 nodes do",
                        node=name,
                        op=graph[name].op,
                        field="output" if name == output else "tangents_of",
                    )
            forward = jvp_graph(graph, types, nodes, directions, check_deadline)
            roots = [*fetch_names, *forward.tangents.values()]
            simple = simplify(forward.graph, forward.types, roots, check_deadline)
            holders = {name: simple.name_of(node) for name, node in forward.tangents.items()}
            fetched = frozenset([*fetch_names, *holders.values()])
            plan = Plan(simple.graph, simple.types, set(fetched), simple.renamed)
            self._check_plan(plan, simple.types)
            constant_feeds = tuple(
                (name, _zeros(t) if name in forward.zeros else _ones(t))
                for name in (*forward.zeros, *forward.ones)
                for t in [forward.types[name]]
            )
            return _JvpPlan(
                plan,
                simple.graph,
                simple.types,
                dict(simple.renamed),
                fetched,
                holders,
                dict(forward.directions),
                constant_feeds,
                dict(forward.skipped),
            )

        compiled = self._compiled(key, compile_plan)
        assert isinstance(compiled, _JvpPlan)
        run_feeds = {**feeds, **dict(compiled.constant_feeds)}
        cast = {
            compiled.directions[name]: tangents[name].astype(feed_types[name].dtype, copy=False)
            for name in directions
        }
        if not batched:
            values = self._run(compiled.plan, {**run_feeds, **cast}, check_deadline)
            return JvpResult(
                values={name: values[name] for name in fetch_names},
                tangents={name: values[node] for name, node in compiled.tangents.items()},
                skipped=dict(compiled.skipped),
            )
        split_key = ("batched:jvp", *key[1:])
        split = self._compiled(
            split_key,
            lambda: _split_plan(
                compiled.graph,
                compiled.types,
                sorted(compiled.fetched),
                compiled.aliases,
                set(compiled.directions.values()),
            ),
        )
        assert isinstance(split, _BatchedPlan)
        repeated = [
            compiled.types[compiled.aliases.get(node, node)]
            for node in _order(list(compiled.tangents.values()))
            if node not in split.row_types
        ]
        self._check_batched(split, rows, cast, compiled.types, repeated)
        once, stacked = self._run_batched(split, run_feeds, cast, rows, check_deadline)

        def row_values(name: str) -> np.ndarray:
            return stacked[name] if name in stacked else _stacked(once[name], rows)

        return JvpResult(
            values={name: once[name] for name in fetch_names},
            tangents={name: row_values(node) for name, node in compiled.tangents.items()},
            skipped=dict(compiled.skipped),
        )

    def _check_tangents(
        self,
        graph: Graph,
        feed_types: Mapping[str, TensorType],
        tangents: Mapping[str, np.ndarray],
        batched: bool,
    ) -> int:
        """GraphError naming the input unless every tangent is a float tensor of its float
        input's shape (with a leading axis of K, the same for all, when batched); returns K
        (1 when not batched)."""
        rows: int | None = None
        first = ""
        for name, value in sorted(tangents.items()):
            node = graph.nodes.get(name)
            if name not in feed_types or node is None or node.op != "input":
                hint = did_you_mean(name, feed_types) if node is None else ""
                what = "no node" if node is None else f"{node.describe()}, which is not an input"
                raise GraphError(
                    f"tangents names {name!r}: the graph has {what} fed there{hint}; tangents "
                    "are given for float inputs",
                    node=name if node is not None else None,
                    field="tangents",
                )
            input_type = feed_types[name]
            if not input_type.is_float:
                raise GraphError(
                    f"tangent for input {name!r}: the input is {input_type.dtype.name}, which is "
                    "not differentiable (only float inputs take tangents)",
                    node=name,
                    op="input",
                    field="tangents",
                )
            self._checked_type(f"tangent {name!r}", value)
            shape = tuple(value.shape[1:]) if batched else tuple(value.shape)
            if (batched and value.ndim < 1) or shape != input_type.shape:
                expected = ("[K] + " if batched else "") + str(list(input_type.shape))
                raise GraphError(
                    f"tangent for input {name!r} has shape {list(value.shape)}, but it must have "
                    f"shape {expected} (the input is {input_type})",
                    node=name,
                    op="input",
                    field="tangents",
                )
            if value.dtype.kind != "f":
                raise GraphError(
                    f"tangent for input {name!r} is {value.dtype.name}; a tangent must be a "
                    "float tensor",
                    node=name,
                    op="input",
                    field="tangents",
                )
            if batched:
                if rows is not None and value.shape[0] != rows:
                    raise GraphError(
                        f"batched tangents disagree on K: {rows} rows for input {first!r}, but "
                        f"{value.shape[0]} for input {name!r}",
                        node=name,
                        field="tangents",
                    )
                rows, first = int(value.shape[0]), first or name
        if batched and rows is None:
            raise GraphError(
                "batched tangents need at least one tangent (K is its leading axis)",
                field="tangents",
            )
        return 1 if rows is None else rows

    # -- Jacobians ------------------------------------------------------------------------

    def jacobian(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        wrt: Sequence[str] = (),
        mode: str = "auto",
        check_deadline: Callable[[], None] = no_deadline,
    ) -> JacobianResult:
        """d(output)/d(input) for each float input of `wrt` (every float input when empty),
        of shape output.shape + input.shape: by reverse mode (one VJP per output element) or
        forward mode (one JVP per input element), whichever runs fewer unless `mode` says
        ("reverse" or "forward"), all rows from one forward pass."""
        check_output(graph, output)
        feed_types = self._feed_types(graph, feeds)
        if wrt:
            names = _names(graph, wrt, "wrt")
            for name in names:
                node = graph[name]
                if node.op != "input" or name not in feed_types:
                    raise GraphError(
                        f"wrt names {node.describe()}: a Jacobian is taken with respect to "
                        "input nodes",
                        node=name,
                        op=node.op,
                        field="wrt",
                    )
                if not feed_types[name].is_float:
                    raise GraphError(
                        f"wrt names input {name!r}, which is {feed_types[name].dtype.name} and "
                        "has no derivative: feed it a float value",
                        node=name,
                        op="input",
                        field="wrt",
                    )
        else:
            names = [n for n in graph.nodes if n in feed_types and feed_types[n].is_float]
        types = infer_types(graph, feed_types, graph.ancestors([output]), check_deadline)
        out_type = types[output]
        if not out_type.is_float:
            raise GraphError(
                f"output {graph[output].describe()} is {out_type.dtype.name}, which is not "
                "differentiable; differentiate a float32 or float64 node",
                node=output,
                op=graph[output].op,
                field="output",
            )
        in_sizes = {name: feed_types[name].size for name in names}
        if mode == "auto":
            mode = "reverse" if out_type.size <= sum(in_sizes.values()) else "forward"
        jacobians: dict[str, np.ndarray] = {}
        if not names:
            return JacobianResult(jacobians, mode, 0)
        self._check_jacobian(graph, output, out_type, {n: feed_types[n] for n in names}, mode)
        if mode == "reverse":
            rows = out_type.size
            seeds = np.eye(rows, dtype=out_type.dtype).reshape((rows, *out_type.shape))
            result = self.gradient_batched(
                graph, feeds, output, seeds, names, [output], check_deadline
            )
            for name in names:
                in_type = feed_types[name]
                dtype = np.result_type(out_type.dtype, in_type.dtype)
                block = result.gradients[name].reshape(out_type.shape + in_type.shape)
                jacobians[name] = block.astype(dtype, copy=False)
            return JacobianResult(jacobians, mode, rows)
        rows = sum(in_sizes.values())
        tangents = {}
        offset = 0
        for name in names:
            in_type = feed_types[name]
            tangent = np.zeros((rows, in_type.size), in_type.dtype)
            tangent[offset : offset + in_type.size] = np.eye(in_type.size, dtype=in_type.dtype)
            tangents[name] = tangent.reshape((rows, *in_type.shape))
            offset += in_type.size
        forward = self.jvp(
            graph, feeds, output, tangents, batched=True, check_deadline=check_deadline
        )
        stacked = forward.tangents[output].reshape(rows, out_type.size)
        offset = 0
        for name in names:
            in_type = feed_types[name]
            block = stacked[offset : offset + in_type.size].T
            dtype = np.result_type(out_type.dtype, in_type.dtype)
            # np.array, not np.ascontiguousarray: that one turns a 0-d block (a scalar
            # output by a scalar input) into shape [1]
            jacobians[name] = np.array(
                block.reshape(out_type.shape + in_type.shape), dtype=dtype, order="C"
            )
            offset += in_type.size
        return JacobianResult(jacobians, mode, rows)

    def _check_jacobian(
        self,
        graph: Graph,
        output: str,
        out_type: TensorType,
        in_types: Mapping[str, TensorType],
        mode: str,
    ) -> None:
        """Charge a Jacobian against the limits before its seeds or tangents are made: each
        block (output's size x an input's size), the identity rows sent through the graph
        (reverse: output size x output size; forward: products x each input's size), and all
        of them held at once."""
        out_size = out_type.size
        in_total = sum(t.size for t in in_types.values())
        products = out_size if mode == "reverse" else in_total
        if mode == "reverse":
            rows = {"seeds": (out_size * out_size, out_type.dtype.itemsize)}
        else:
            rows = {
                f"tangents of {name!r}": (products * t.size, t.dtype.itemsize)
                for name, t in in_types.items()
            }
        blocks = {
            f"the block of {name!r}": (
                out_size * t.size,
                np.result_type(out_type.dtype, t.dtype).itemsize,
            )
            for name, t in in_types.items()
        }
        held = 0
        for what, (elements, itemsize) in {**rows, **blocks}.items():
            if elements > self.limits.max_tensor_elements:
                raise LimitExceeded(
                    f"the Jacobian of output {graph[output].describe()} ({out_size} elements) "
                    f"by {mode} mode takes {products} products: {what} would hold {elements} "
                    f"elements; the limit (max_tensor_elements) is "
                    f"{self.limits.max_tensor_elements}",
                    limit="max_tensor_elements",
                )
            held += elements * itemsize
        if held > self.limits.max_bytes:
            raise LimitExceeded(
                f"the Jacobian of output {graph[output].describe()} ({out_size} elements) by "
                f"{mode} mode ({products} products) would hold about {held} bytes; the limit "
                f"(max_bytes) is {self.limits.max_bytes}",
                limit="max_bytes",
            )

    # -- Per-example gradients (vmap of grad) ---------------------------------------------

    def gradient_per_example(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        output: str,
        batch: Mapping[str, int],
        seed: np.ndarray | None = None,
        wrt: Sequence[str] = (),
        fetch: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
        vectorize: bool = True,
    ) -> GradientResult:
        """Per-example values and gradients, as ``jax.vmap(jax.grad(f), in_axes)``: the graph
        is evaluated for each slice of the inputs named in `batch` along their axes (all of
        the same size B), the other inputs shared, and every value of `fetch` and gradient
        with respect to `wrt` comes back stacked along a new leading axis of B (unbatched
        inputs get one gradient per example too).

        The output must have one element per example (the seed is then 1), or `seed` stacks
        B seeds ([B] + the output's shape). With `vectorize`, a graph whose ops all have a
        batching rule (batching.RULES) runs as one batched graph; otherwise, and for other
        graphs, the examples run one by one through one compiled plan. Both give the same
        results (bit for bit for elementwise ops; matmul and reductions may sum in another
        order).
        """
        check_output(graph, output)
        axes, rows = self._batch_axes(graph, feeds, batch)
        examples = {name: np.moveaxis(feeds[name], axis, 0) for name, axis in axes.items()}
        first = {**feeds, **{name: _example(value, 0) for name, value in examples.items()}}
        wrt_names = _names(graph, wrt, "wrt")
        fetch_names = _names(graph, fetch, "fetch")
        feed_types = self._feed_types(graph, first)
        compiled = self._compile_gradient(
            graph, feed_types, output, wrt_names, fetch_names, check_deadline
        )
        if wrt:
            _require_differentiable(graph, compiled.combined)
        out_type = compiled.output_type
        seeds = self._per_example_seeds(graph, output, out_type, seed, rows)
        if vectorize:
            roots = _order([output, *wrt_names, *fetch_names])
            batched = self._batched_graph(graph, feed_types, set(axes), rows, roots, check_deadline)
            if batched.graph is not None:
                return self._gradient_vectorized(
                    batched,
                    feeds,
                    examples,
                    output,
                    out_type,
                    seeds,
                    rows,
                    list(compiled.combined.gradients),
                    fetch_names,
                    compiled.combined.skipped,
                    check_deadline,
                )
        self._check_examples(compiled.plan, rows)
        return self._gradient_loop(
            graph, feeds, examples, output, seeds, rows, wrt, fetch, check_deadline
        )

    def batched_graph_for(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        batch: Mapping[str, int],
        roots: Sequence[str] = (),
        check_deadline: Callable[[], None] = no_deadline,
    ) -> BatchedGraph:
        """The batched graph gradient_per_example would run for these feeds, computing the
        `roots` (the output, wrt and fetch nodes; every node when empty): its `graph` is None,
        and `missing` names the node, when it would loop over the examples."""
        axes, rows = self._batch_axes(graph, feeds, batch)
        first = {
            **feeds,
            **{name: _example(np.moveaxis(feeds[name], axis, 0), 0) for name, axis in axes.items()},
        }
        return self._batched_graph(
            graph,
            self._feed_types(graph, first),
            set(axes),
            rows,
            _names(graph, roots, "roots"),
            check_deadline,
        )

    def _batch_axes(
        self, graph: Graph, feeds: Mapping[str, np.ndarray], batch: Mapping[str, int]
    ) -> tuple[dict[str, int], int]:
        """The batch's axes (normalized) and B, once checked: each name is a fed input, each
        axis is one of its axes, and every batched input has the same size B >= 1 there."""
        if not batch:
            raise GraphError(
                "per-example gradients need at least one batched input", field="batch_axes"
            )
        axes: dict[str, int] = {}
        rows: int | None = None
        first = ""
        for name, axis in sorted(batch.items()):
            node = graph.nodes.get(name)
            if node is None or node.op != "input" or name not in feeds:
                if node is None:
                    inputs = (n for n, v in graph.nodes.items() if v.op == "input")
                    what = f"no node{did_you_mean(name, inputs)}"
                elif node.op != "input":
                    what = f"{node.describe()}, which is not an input"
                else:
                    what = "an input that was not fed"
                raise GraphError(
                    f"batch_axes names {name!r}: the graph has {what}; batch axes are given "
                    "for fed inputs",
                    node=name if node is not None else None,
                    field="batch_axes",
                )
            value = feeds[name]
            if not -value.ndim <= axis < value.ndim:
                raise GraphError(
                    f"batch axis {axis} of input {name!r} is out of range: the input has shape "
                    f"{list(value.shape)} ({value.ndim} axes)",
                    node=name,
                    op="input",
                    field="batch_axes",
                )
            axis = axis % value.ndim
            size = int(value.shape[axis])
            if rows is not None and size != rows:
                raise GraphError(
                    f"batched inputs disagree on the batch size: input {name!r} has {size} "
                    f"along axis {axis} (shape {list(value.shape)}), but input {first!r} has "
                    f"{rows}",
                    node=name,
                    op="input",
                    field="batch_axes",
                )
            if size == 0:
                raise GraphError(
                    f"input {name!r} has no examples along its batch axis {axis} (shape "
                    f"{list(value.shape)})",
                    node=name,
                    op="input",
                    field="batch_axes",
                )
            rows, first = size, first or name
            axes[name] = axis
        assert rows is not None
        return axes, rows

    def _per_example_seeds(
        self,
        graph: Graph,
        output: str,
        out_type: TensorType,
        seed: np.ndarray | None,
        rows: int,
    ) -> np.ndarray | None:
        """The B stacked seeds, checked (None: the output has one element per example)."""
        if seed is None:
            if out_type.size != 1:
                raise GraphError(
                    f"output {graph[output].describe()} has shape {list(out_type.shape)} per "
                    "example: per-example gradients need one element per example, or B seeds "
                    f"stacked in `seed` (shape [{rows}] + {list(out_type.shape)})",
                    node=output,
                    field="seed",
                )
            return None
        self._checked_type("the per-example seeds", seed)
        if seed.shape != (rows, *out_type.shape):
            raise GraphError(
                f"seed has shape {list(seed.shape)}, but per-example seeds stack one seed of "
                f"the output's shape per example: [{rows}] + {list(out_type.shape)}",
                field="seed",
            )
        if seed.dtype.kind != "f":
            raise GraphError(f"seed must be a float tensor, got {seed.dtype.name}", field="seed")
        return seed.astype(out_type.dtype, copy=False)

    def _check_examples(self, plan: Plan, rows: int) -> None:
        """Charge B runs of one example's plan against the limits before the first runs: B
        times its flops, and its peak plus the B stacked results held at once."""
        flops = plan.estimated_flops * rows
        if flops > self.limits.max_flops:
            raise LimitExceeded(
                f"{rows} examples would take about {_flops(flops)} flops "
                f"({_flops(plan.estimated_flops)} each); the limit (max_flops) is "
                f"{_flops(self.limits.max_flops)}",
                limit="max_flops",
            )
        held = plan.estimated_bytes + plan.fetched_bytes * rows
        if held > self.limits.max_bytes:
            raise LimitExceeded(
                f"{rows} examples' stacked results would hold about {held} bytes; the limit "
                f"(max_bytes) is {self.limits.max_bytes}",
                limit="max_bytes",
            )

    def _gradient_loop(
        self,
        graph: Graph,
        feeds: Mapping[str, np.ndarray],
        examples: Mapping[str, np.ndarray],
        output: str,
        seeds: np.ndarray | None,
        rows: int,
        wrt: Sequence[str],
        fetch: Sequence[str],
        check_deadline: Callable[[], None],
    ) -> GradientResult:
        """The reference semantics: each example through gradient() (one cached plan), the
        results stacked."""
        values: dict[str, np.ndarray] = {}
        gradients: dict[str, np.ndarray] = {}
        skipped: dict[str, str] = {}
        for row in range(rows):
            check_deadline()
            row_feeds = dict(feeds)
            for name, value in examples.items():
                row_feeds[name] = _example(value, row)
            result = self.gradient(
                graph,
                row_feeds,
                output,
                None if seeds is None else seeds[row],
                wrt,
                fetch,
                check_deadline,
            )
            for results, stacked in ((result.values, values), (result.gradients, gradients)):
                for name, value in results.items():
                    if row == 0:
                        stacked[name] = np.empty((rows, *np.shape(value)), np.asarray(value).dtype)
                    stacked[name][row] = value
            skipped = result.skipped
        return GradientResult(values, gradients, dict(skipped))

    def _batched_graph(
        self,
        graph: Graph,
        feed_types: Mapping[str, TensorType],
        batched_inputs: set[str],
        rows: int,
        roots: Sequence[str],
        check_deadline: Callable[[], None],
    ) -> BatchedGraph:
        """The batched graph of the nodes `roots` need (cached)."""
        key = (
            "batching",
            graph.digest,
            self._signature(feed_types),
            tuple(sorted(batched_inputs)),
            rows,
            tuple(roots),
        )

        def make() -> BatchedGraph:
            types = infer_types(graph, feed_types, graph.ancestors(roots), check_deadline)
            return batch_graph(graph, types, batched_inputs, rows, roots)

        batched = self._compiled(key, make)
        assert isinstance(batched, BatchedGraph)
        return batched

    def _gradient_vectorized(
        self,
        batched: BatchedGraph,
        feeds: Mapping[str, np.ndarray],
        examples: Mapping[str, np.ndarray],
        output: str,
        out_type: TensorType,
        seeds: np.ndarray | None,
        rows: int,
        wrt: list[str],
        fetch: list[str],
        skipped: Mapping[str, str],
        check_deadline: Callable[[], None],
    ) -> GradientResult:
        """The examples as one batched graph: batched inputs with their batch axis first,
        float inputs tiled, and the B seeds (ones by default) as one seed."""
        assert batched.graph is not None
        run_feeds: dict[str, np.ndarray] = {}
        for name, value in feeds.items():
            if name in examples:
                run_feeds[name] = np.ascontiguousarray(examples[name])
            elif name in batched.batched:
                if value.size * rows > self.limits.max_tensor_elements:
                    raise LimitExceeded(
                        f"input {name!r} ({value.size} elements) is shared by the {rows} "
                        f"examples, which get one gradient each: {value.size * rows} elements; "
                        f"the limit (max_tensor_elements) is {self.limits.max_tensor_elements}",
                        limit="max_tensor_elements",
                    )
                run_feeds[name] = np.broadcast_to(value[np.newaxis], (rows, *value.shape))
            else:
                run_feeds[name] = value
        if seeds is None:
            seeds = np.ones((rows, *out_type.shape), out_type.dtype)
        result = self.gradient(batched.graph, run_feeds, output, seeds, wrt, fetch, check_deadline)
        values = {
            name: value if name in batched.batched else _stacked(value, rows)
            for name, value in result.values.items()
        }
        return GradientResult(values, result.gradients, dict(skipped))

    @staticmethod
    def _seed_value(
        graph: Graph, output: str, out_type: TensorType, seed: np.ndarray | None
    ) -> np.ndarray:
        if seed is None:
            if out_type.size != 1:
                raise GraphError(
                    f"output {graph[output].describe()} has shape {list(out_type.shape)}: a "
                    "non-scalar output needs a seed of its shape (the vector of a "
                    "vector-Jacobian product)"
                )
            return _ones(out_type)
        if seed.shape != out_type.shape:
            raise GraphError(
                f"seed has shape {list(seed.shape)} but output {graph[output].describe()} has "
                f"shape {list(out_type.shape)}"
            )
        if seed.dtype.kind != "f":
            raise GraphError(f"seed must be a float tensor, got {seed.dtype.name}")
        return seed.astype(out_type.dtype, copy=False)


def _flops(count: int) -> str:
    """A count of flops as a person reads it: 3 significant digits."""
    return f"{count:.3g}"


def _example(stacked: np.ndarray, row: int) -> np.ndarray:
    """Example `row` of inputs stacked along their first axis, as an array (not a numpy
    scalar), C-contiguous as a decoded input is."""
    value = np.asarray(stacked[row])
    return value if value.flags.c_contiguous else value.copy()


def _zeros(tensor_type: TensorType) -> np.ndarray:
    """Read-only zeros of a type that hold one element (a zero-stride view): the probes of a
    forward-mode graph, whose values do not matter and which simplification usually drops."""
    return np.broadcast_to(np.zeros((), tensor_type.dtype), tensor_type.shape)


@functools.lru_cache(maxsize=256)
def _ones(tensor_type: TensorType) -> np.ndarray:
    """A read-only array of ones (the default seed): made once per type, shared by calls."""
    ones = np.ones(tensor_type.shape, tensor_type.dtype)
    ones.flags.writeable = False
    return ones
