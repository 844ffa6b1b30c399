"""Resource limits: work is charged before it runs, and caches stay within their budget."""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import pytest

from gradient_client import GradientClient, GradientError, Graph
from gradient_server.engine import Engine, Limits
from gradient_server.service import create_server


@pytest.fixture
def limited():
    """A client on a server with small limits."""
    limits = Limits(max_bytes=10 << 20, max_check_evaluations=100)
    server, port = create_server("127.0.0.1:0", limits=limits)
    server.start()
    with GradientClient(f"127.0.0.1:{port}", timeout=30) as client:
        yield client
    server.stop(0)


def _exhausted(call) -> str:
    with pytest.raises(GradientError) as info:
        call()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details
    return info.value.details


def test_convolution_windows_are_charged_before_running(limited):
    # The input is 320 KB, but unfolding it into 50x50 windows would take about 450 MB.
    g = Graph()
    g.conv2d(g.input("x"), g.input("w"), name="out")
    feeds = {"x": np.zeros((1, 1, 200, 200)), "w": np.zeros((1, 1, 50, 50))}
    assert "max_bytes" in _exhausted(lambda: limited.forward(g, feeds))
    small = {"x": np.ones((1, 1, 20, 20)), "w": np.ones((1, 1, 3, 3))}
    assert float(limited.forward(g, small).values["out"][0, 0, 0, 0]) == 9.0


def test_gradient_checks_are_charged_before_running(limited):
    g = Graph()
    f = g.sum(g.square(g.input("x")))
    x = np.linspace(-1, 1, 100)
    assert "max_check_evaluations" in _exhausted(lambda: limited.check_gradient(g, f, {"x": x}))
    report = limited.check_gradient(g, f, {"x": x}, max_elements=10)
    assert report.passed and report.nodes["x"].checked == 10


def test_caches_stay_within_their_byte_budget():
    engine = Engine(cache_bytes=12 << 20)  # a quarter, 3 MiB, for the graphs
    graphs = []
    for i in range(5):
        g = Graph()
        g.add(g.input("x"), g.constant(np.full(1 << 17, float(i))), name="out")  # 1 MiB each
        graphs.append(g)
    for i, g in enumerate(graphs):
        compiled = engine.load_graph(g.to_proto())
        out = engine.forward(compiled, {"x": np.zeros(1 << 17)}, ["out"])["out"]
        assert out[0] == i
    cached = sum(weight for _, weight in engine._graphs._items.values())
    assert 0 < cached <= 3 << 20


def _chain(length: int, salt: float = 0.0) -> Graph:
    """x through `length` alternating scale and tanh nodes, summed (salt makes it distinct)."""
    g = Graph()
    h = g.input("x")
    for i in range(length):
        h = g.tanh(h) if i % 2 else h * (1.5 + salt)
    g.sum(h, name="f")
    return g


def test_the_caches_weigh_entries_by_what_they_hold():
    """The estimate of a cached graph and its gradient plan is within a factor of two of the
    memory they really take (measured with tracemalloc)."""
    engine = Engine()
    message = _chain(4000).message()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        graph = engine.load_graph(message)
        engine.gradient(graph, {"x": np.ones(3)}, "f")
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert real / 2 <= engine.cached_bytes <= real * 2, (engine.cached_bytes, real)


def test_many_distinct_graphs_stay_within_the_cache_budget():
    engine = Engine(cache_bytes=32 << 20)
    for salt in range(10):  # each graph and its plans weigh about 9 MiB: some are evicted
        graph = engine.load_graph(_chain(2000, salt).message())
        result = engine.gradient(graph, {"x": np.ones(3)}, "f")
        assert np.isfinite(result.gradients["x"]).all()
        assert engine.cached_bytes <= 32 << 20


def test_a_graph_heavier_than_the_graph_cache_is_served_but_not_cached():
    engine = Engine(cache_bytes=16 << 20)  # 4 MiB for graphs: a 20,000-node chain is more
    server, port = create_server("127.0.0.1:0", engine=engine)
    server.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=60) as client:
            heavy = _chain(20_000)
            for _ in range(2):  # sent whole both times: the server never holds it
                result = client.forward(heavy, {"x": np.zeros(2)}, fetch=["f"])
                assert float(result.values["f"]) == 0.0
            assert engine.cached_bytes <= 16 << 20
    finally:
        server.stop(0)


def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once_not_queued():
    server, port = create_server("127.0.0.1:0", threads=2, max_concurrent_rpcs=2)
    server.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=30) as client:
            g = _chain(2)
            with client.session(g, "f") as first, client.session(g, "f") as second:
                for session in (first, second):  # two calls now in flight
                    assert float(session.forward({"x": np.zeros(2)}).values["f"]) == 0.0
                details = _exhausted(lambda: client.forward(g, {"x": np.zeros(2)}))
                assert "concurrent" in details.lower()
            result = client.forward(g, {"x": np.zeros(2)}, fetch=["f"])  # the slots are free
            assert float(result.values["f"]) == 0.0
    finally:
        server.stop(0)
