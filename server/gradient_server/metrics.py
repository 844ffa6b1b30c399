"""Prometheus metrics: gRPC's usual server metrics and the engine's, served over HTTP.

The gRPC metrics have the names and labels gRPC users know from go-grpc-prometheus and
py-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
`grpc_server_handling_seconds`), for the methods of gradient.v1.GradientService. The engine's
(caches, plan compiles, time per op) are read from the engine when scraped, so they cost
nothing per call.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .calls import Call
from .engine import Engine
from .executor import OpTimes

HANDLING_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Upper bounds (seconds) of the call time histogram: a tiny call takes about half a
millisecond, a large network's step seconds."""


class Metrics:
    """The server's metrics in their own registry; `serve` exposes them over HTTP."""

    def __init__(self, engine: Engine, service: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.service = service
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self._started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            labels,
            registry=self.registry,
        )
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self._seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, in seconds.",
            labels,
            buckets=HANDLING_BUCKETS,
            registry=self.registry,
        )
        self._received = Counter(
            "gradient_received_bytes",
            "Bytes of request messages received.",
            ("grpc_method",),
            registry=self.registry,
        )
        self._sent = Counter(
            "gradient_sent_bytes",
            "Bytes of response messages sent.",
            ("grpc_method",),
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        if engine.op_times is None:
            engine.op_times = OpTimes()  # each op's time, summed per call (a list append each)
        # Each labelled child is looked up once: labels() takes a lock and hashes its values.
        self._children: dict[tuple, tuple] = {}
        self._handled_children: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._http: list = []

    def _of(self, method: str, kind: str) -> tuple:
        children = self._children.get((method, kind))
        if children is None:
            labels = (kind, self.service, method)
            children = (
                self._started.labels(*labels),
                self._seconds.labels(*labels),
                self._received.labels(method),
                self._sent.labels(method),
            )
            self._children[(method, kind)] = children
        return children

    def started(self, call: Call, kind: str = "UNARY") -> None:
        """Count a call that has begun (`kind`: UNARY or BIDI_STREAM)."""
        self._of(call.method, kind)[0].inc()

    def finished(self, call: Call, code: grpc.StatusCode, kind: str = "UNARY") -> None:
        """Count a call that has ended with `code`: its time and its bytes."""
        _, seconds, received, sent = self._of(call.method, kind)
        seconds.observe(call.seconds())
        if call.received:
            received.inc(call.received)
        if call.sent:
            sent.inc(call.sent)
        key = (call.method, code)
        handled = self._handled_children.get(key)
        if handled is None:
            handled = self._handled.labels(kind, self.service, call.method, code.name)
            self._handled_children[key] = handled
        handled.inc()

    def serve(self, host: str, port: int) -> int:
        """Serve the metrics in Prometheus text format at http://host:port/metrics; returns
        the bound port (port 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http.append((server, thread))
        return server.server_port

    def stop(self) -> None:
        """Stop serving the metrics."""
        for server, thread in self._http:
            server.shutdown()
            server.server_close()
            thread.join()
        self._http.clear()


class _EngineCollector(Collector):
    """The engine's counters, read at scrape time."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        """The engine's metrics now."""
        stats = self._engine.stats()
        hits = CounterMetricFamily(
            "gradient_cache_hits", "Lookups answered by a cache.", labels=("cache",)
        )
        misses = CounterMetricFamily(
            "gradient_cache_misses",
            "Lookups a cache could not answer (the entry was decoded or compiled).",
            labels=("cache",),
        )
        held = GaugeMetricFamily(
            "gradient_cache_bytes",
            "Estimated bytes held by a cache's entries.",
            labels=("cache",),
        )
        entries = GaugeMetricFamily(
            "gradient_cache_entries", "Entries in a cache.", labels=("cache",)
        )
        for cache in stats.caches:
            hits.add_metric((cache.name,), cache.hits)
            misses.add_metric((cache.name,), cache.misses)
            held.add_metric((cache.name,), cache.bytes)
            entries.add_metric((cache.name,), cache.entries)
        yield from (hits, misses, held, entries)
        compile_seconds = CounterMetricFamily(
            "gradient_plan_compile_seconds",
            "Seconds spent compiling plans (decoding, differentiating, scheduling).",
        )
        compile_seconds.add_metric((), stats.compile_seconds)
        compiles = CounterMetricFamily("gradient_plan_compiles", "Plans compiled.")
        compiles.add_metric((), stats.compiles)
        yield from (compile_seconds, compiles)
        op_seconds = CounterMetricFamily(
            "gradient_op_seconds", "Seconds spent running each op.", labels=("op",)
        )
        op_runs = CounterMetricFamily("gradient_op_runs", "Times each op ran.", labels=("op",))
        for op, (runs, seconds) in sorted(stats.ops.items()):
            op_seconds.add_metric((op,), seconds)
            op_runs.add_metric((op,), runs)
        yield from (op_seconds, op_runs)
