"""Elementwise fusion (server/gradient_server/fusion.py): every op that fuses agrees with
unfused numpy within 1e-12 relative in float64 (float32: within its rounding), kernels form
only where they may, and gradients through fused chains agree with the unfused ones."""

from __future__ import annotations

import numpy as np
import pytest

from gradient_client import Graph
from gradient_server import fusion
from gradient_server.engine import Engine
from gradient_server.executor import Plan
from gradient_server.fusion import FUSE_MIN_ELEMENTS, FUSED_FORMS
from gradient_server.ir import decode_graph, infer_types
from gradient_server.tensor_type import TensorType

pytestmark = pytest.mark.skipif(not fusion.available(), reason="numexpr is not installed")

SIZE = FUSE_MIN_ELEMENTS


def plan_of(g: Graph, feeds: dict[str, np.ndarray], fetch: list[str]) -> Plan:
    graph = decode_graph(g.to_proto())
    feed_types = {name: TensorType(v.dtype, v.shape) for name, v in feeds.items()}
    return Plan(graph, infer_types(graph, feed_types, set(graph.nodes)), set(fetch))


def unfused(g: Graph, feeds: dict[str, np.ndarray], fetch: list[str], monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(fusion, "numexpr", None)
        plan = plan_of(g, feeds, fetch)
        assert not any(step.kernel for step in plan.steps)
        return plan.run(feeds, lambda: None)


UNARY_DOMAIN = {"log": (0.1, 3.0), "sqrt": (0.0, 3.0), "log1p": (-0.5, 3.0)}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", sorted(FUSED_FORMS))
def test_each_fused_op_agrees_with_numpy(op, dtype, monkeypatch):
    rng = np.random.default_rng(abs(hash(op)) % 2**32)
    low, high = UNARY_DOMAIN.get(op, (-2.0, 2.0))
    x = rng.uniform(low, high, SIZE).astype(dtype)
    y = rng.uniform(0.5, 2.0, SIZE).astype(dtype)
    g = Graph()
    a, b = g.input("x"), g.input("y")
    # The op between two other fused ops, so it sits inside a kernel.
    inner = a * 0.5 + 0.25 if op in ("log", "sqrt", "log1p") else a * 0.5
    if op in ("add", "sub", "mul", "div"):
        out = g.op(op, inner, b * 1.5)
    else:
        out = g.op(op, inner)
    out = out * 1.25
    feeds = {"x": x, "y": y}
    plan = plan_of(g, feeds, [out.name])
    kernels = [step.kernel for step in plan.steps if step.kernel]
    assert len(kernels) == 1 and op in [m.op for m in kernels[0].members]
    got = plan.run(feeds, lambda: None)[out.name]
    expected = unfused(g, feeds, [out.name], monkeypatch)[out.name]
    assert got.dtype == expected.dtype == np.dtype(dtype)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=0)


def test_fetched_and_shared_values_are_not_fused_away():
    g = Graph()
    x = g.input("x")
    a = g.tanh(x * 2.0)  # used twice: materialized
    b = g.exp(a) + 1.0
    c = g.sin(a) * 3.0
    out = b + c
    feeds = {"x": np.linspace(-1, 1, SIZE)}
    plan = plan_of(g, feeds, [out.name, b.name])  # b is fetched: materialized
    roots = {step.node.name for step in plan.steps}
    assert {a.name, b.name, out.name} <= roots
    got = plan.run(feeds, lambda: None)
    xv = feeds["x"]
    av = np.tanh(xv * 2.0)
    np.testing.assert_allclose(got[b.name], np.exp(av) + 1.0, rtol=1e-12)
    # The sum crosses zero: an ulp of its terms (about 4) is compared absolutely there.
    expected = np.exp(av) + 1.0 + np.sin(av) * 3.0
    np.testing.assert_allclose(got[out.name], expected, rtol=1e-12, atol=1e-14)


def test_small_arrays_and_other_shapes_do_not_fuse():
    g = Graph()
    x, row = g.input("x"), g.input("row")
    small = g.tanh(g.input("s") * 2.0)
    broadcast = g.tanh(x * row)  # row broadcasts: not the result's shape, not a scalar
    feeds = {"x": np.ones((SIZE // 8, 8)), "row": np.ones(8), "s": np.ones(100)}
    plan = plan_of(g, feeds, [small.name, broadcast.name])
    assert not any(step.kernel for step in plan.steps)


def test_kernels_are_bounded_and_a_long_chain_is_computed_whole(monkeypatch):
    g = Graph()
    h = g.input("x")
    for k in range(300):
        h = g.tanh(h) if k % 3 == 2 else h * (1 + 0.01 * np.cos(k)) if k % 3 else h + 0.01
    feeds = {"x": np.linspace(-3, 3, SIZE)}
    plan = plan_of(g, feeds, [h.name])
    kernels = [step.kernel for step in plan.steps if step.kernel]
    assert all(len(k.members) <= fusion.MAX_KERNEL_OPS for k in kernels)
    assert sum(len(k.members) for k in kernels) == 300
    got = plan.run(feeds, lambda: None)[h.name]
    np.testing.assert_allclose(got, unfused(g, feeds, [h.name], monkeypatch)[h.name], rtol=1e-12)


def test_gradients_through_fused_chains_agree_with_unfused_ones(monkeypatch):
    """Workload C/D of issue 11 on a large array: the forward and the backward chains fuse."""
    g = Graph()
    x = g.input("x")
    h = x
    for k in range(60):
        if k % 3 == 0:
            h = h + 0.01 * np.sin(k)
        elif k % 3 == 1:
            h = h * (1 + 0.01 * np.cos(k))
        else:
            h = g.tanh(h)
    loss = g.sum(h)
    graph = decode_graph(g.to_proto())
    feeds = {"x": np.random.default_rng(3).standard_normal(SIZE)}
    fused = Engine().gradient(graph, feeds, loss.name, wrt=["x"])
    with monkeypatch.context() as patch:
        patch.setattr(fusion, "numexpr", None)
        plain = Engine().gradient(graph, feeds, loss.name, wrt=["x"])
    np.testing.assert_allclose(fused.gradients["x"], plain.gradients["x"], rtol=1e-12)
    # Truth independent of the engine: the chain rule written out in numpy.
    values, value = [], feeds["x"]
    for k in range(60):
        values.append(value)
        if k % 3 == 0:
            value = value + 0.01 * np.sin(k)
        elif k % 3 == 1:
            value = value * (1 + 0.01 * np.cos(k))
        else:
            value = np.tanh(value)
    gradient = np.ones(SIZE)
    for k in reversed(range(60)):
        if k % 3 == 1:
            gradient = gradient * (1 + 0.01 * np.cos(k))
        elif k % 3 == 2:
            gradient = gradient * (1 - np.tanh(values[k]) ** 2)
    np.testing.assert_allclose(fused.gradients["x"], gradient, rtol=1e-12)


def test_without_numexpr_nothing_fuses_and_values_are_numpys(monkeypatch):
    g = Graph()
    out = g.exp(g.input("x") * 2.0)
    feeds = {"x": np.linspace(0, 1, SIZE)}
    value = unfused(g, feeds, [out.name], monkeypatch)[out.name]
    assert value.tobytes() == np.exp(feeds["x"] * 2.0).tobytes()


def test_a_cached_fused_plan_serves_concurrent_calls():
    """Plans are shared by concurrent requests: their kernels too."""
    from concurrent.futures import ThreadPoolExecutor

    g = Graph()
    x = g.input("x")
    loss = g.sum(g.tanh(g.exp(x * 0.5) - 1.0) * 2.0)
    graph = decode_graph(g.to_proto())
    engine = Engine()
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal(SIZE)} for _ in range(8)]
    alone = [engine.gradient(graph, f, loss.name, wrt=["x"]).gradients["x"] for f in feeds]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda f: engine.gradient(graph, f, loss.name, wrt=["x"]).gradients["x"], feeds * 4
            )
        )
    for index, gradient in enumerate(together):
        assert gradient.tobytes() == alone[index % 8].tobytes()
