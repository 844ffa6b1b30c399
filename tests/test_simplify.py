"""Graph simplification (server/gradient_server/simplify.py) and the plan's own economies
(executor.py): one test per rule, each checking what the rule removed and that every value is
unchanged (bit for bit, but where the rule says it rounds differently), and that simplifying
twice changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from gradient_client import Graph
from gradient_server.autodiff import gradient_graph
from gradient_server.engine import Engine
from gradient_server.executor import REUSE_MIN_ELEMENTS, Plan
from gradient_server.ir import Graph as IrGraph
from gradient_server.ir import decode_graph, encode_graph, infer_types
from gradient_server.simplify import FOLD_MAX_ELEMENTS, simplify
from gradient_server.tensor_type import TensorType


def typed(g: Graph, feeds: dict[str, np.ndarray]):
    graph = decode_graph(g.to_proto())
    feed_types = {name: TensorType(v.dtype, v.shape) for name, v in feeds.items()}
    return graph, infer_types(graph, feed_types, set(graph.nodes))


def run(graph: IrGraph, types, feeds, fetch, aliases=None) -> dict[str, np.ndarray]:
    return Plan(graph, types, set(fetch), aliases).run(feeds, lambda: None)


def simplified_values(g: Graph, feeds, roots):
    """The roots' values from the original graph and from the simplified one, and the latter."""
    graph, types = typed(g, feeds)
    expected = run(graph, types, feeds, roots)
    simple = simplify(graph, types, roots)
    got = run(simple.graph, simple.types, feeds, roots, simple.renamed)
    return expected, got, simple


def assert_same_bits(expected, got):
    assert set(expected) == set(got)
    for name in expected:
        assert expected[name].dtype == got[name].dtype, name
        assert expected[name].shape == got[name].shape, name
        assert expected[name].tobytes() == got[name].tobytes(), name


def ops_of(graph: IrGraph) -> list[str]:
    return [node.op for node in graph.nodes.values()]


X = np.random.default_rng(0).standard_normal((3, 4))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda g, x: x * 1.0, id="x*1"),
        pytest.param(lambda g, x: 1.0 * x, id="1*x"),
        pytest.param(lambda g, x: x / 1.0, id="x/1"),
        pytest.param(lambda g, x: x - 0.0, id="x-0"),
        pytest.param(lambda g, x: x + g.constant(np.full((3, 4), -0.0)), id="x+negative-zeros"),
        pytest.param(lambda g, x: g.neg(g.neg(x)), id="neg-neg"),
        pytest.param(lambda g, x: g.reshape(x, [3, 4]), id="reshape-same"),
        pytest.param(lambda g, x: g.broadcast_to(x, [3, 4]), id="broadcast-same"),
        pytest.param(lambda g, x: g.cast(x, "float64"), id="cast-same"),
        pytest.param(lambda g, x: g.transpose(g.transpose(x)), id="transpose-twice"),
        pytest.param(lambda g, x: g.sum(g.reshape(x, [3, 1, 4]), axis=1) * 1.0, id="sum-size-1"),
    ],
)
def test_identities_leave_the_operand(build):
    g = Graph()
    x = g.input("x")
    out = build(g, x)
    expected, got, simple = simplified_values(g, {"x": X}, [out.name])
    assert_same_bits(expected, got)
    # Everything but the input (and the reshape a size-1 sum becomes) is gone.
    assert set(ops_of(simple.graph)) <= {"input", "reshape"}
    assert len(simple.graph) <= 2


def test_adding_zero_is_an_identity_only_for_negative_zero():
    # x + 0.0 is 0.0 where x is -0.0 (1 / it is inf, not -inf): it stays; x + (-0.0) and
    # x - 0.0 are x for every x.
    g = Graph()
    x = g.input("x")
    kept = g.div(1.0, x + 0.0)
    gone = [g.div(1.0, x + g.constant(np.array(-0.0))), g.div(1.0, x - 0.0)]
    values = {"x": np.array([-0.0, 0.0, 1.5])}
    expected, got, simple = simplified_values(g, values, [kept.name, *(n.name for n in gone)])
    assert_same_bits(expected, got)
    assert ops_of(simple.graph).count("add") == 1 and "sub" not in ops_of(simple.graph)
    assert np.array_equal(got[gone[0].name], [-np.inf, np.inf, 1 / 1.5])
    assert np.array_equal(got[kept.name], [np.inf, np.inf, 1 / 1.5])


def test_identities_do_not_apply_when_they_would_change_the_type():
    g = Graph()
    x = g.input("x")
    widened = x * g.constant(np.ones((2, 3, 4)))  # broadcasts to a larger shape
    cast = x * g.constant(np.float64(1.0))  # a strong float64 one: float32 x becomes float64
    x32 = X.astype(np.float32)
    expected, got, simple = simplified_values(g, {"x": x32}, [widened.name, cast.name])
    assert_same_bits(expected, got)
    assert ops_of(simple.graph).count("mul") == 2


def test_constant_folding_computes_with_the_ops_own_forward():
    g = Graph()
    a = g.constant(np.arange(6.0).reshape(2, 3))
    folded = g.tanh(a * 2.0 + 1.0)
    out = g.input("x") * folded
    x = np.ones((2, 3))
    expected, got, simple = simplified_values(g, {"x": x}, [out.name])
    assert_same_bits(expected, got)
    assert sorted(ops_of(simple.graph)) == ["constant", "input", "mul"]


def test_constant_folding_stops_at_large_values_and_at_invalid_ones():
    g = Graph()
    big = g.zeros([FOLD_MAX_ELEMENTS + 1], "float64")
    bad = g.take(g.constant(np.arange(3.0)), g.constant(np.array([5])), axis=0)
    graph, types = typed(g, {})
    simple = simplify(graph, types, [big.name, bad.name])
    assert simple.graph[big.name].op == "zeros"  # not held by the plan
    assert simple.graph[bad.name].op == "take"  # its error is raised when it runs


def test_common_subexpressions_are_computed_once():
    g = Graph()
    x = g.input("x")
    first = g.tanh(x * 3.0)
    second = g.tanh(x * 3.0)  # the same computation, other nodes (and another constant node)
    out = first + second
    expected, got, simple = simplified_values(g, {"x": X}, [out.name, second.name])
    assert_same_bits(expected, got)
    assert ops_of(simple.graph).count("tanh") == 1
    assert ops_of(simple.graph).count("constant") == 1
    assert simple.name_of(second.name) == first.name


def test_constants_equal_but_for_the_sign_of_zero_stay_apart():
    g = Graph()
    x = g.input("x")
    out = g.pad(x, [1, 1], value=0.0) + g.pad(x, [1, 1], value=-0.0)
    graph, types = typed(g, {"x": np.zeros(2)})
    simple = simplify(graph, types, [out.name])
    assert ops_of(simple.graph).count("pad") == 2


def test_dead_nodes_are_removed_but_inputs_stay():
    g = Graph()
    x, unused = g.input("x"), g.input("unused")
    g.exp(x, name="dead")
    out = g.sin(x)
    graph, types = typed(g, {"x": X, "unused": X})
    simple = simplify(graph, types, [out.name])
    assert set(simple.graph.nodes) == {x.name, unused.name, out.name}


def test_broadcast_then_sum_back_is_one_product():
    g = Graph()
    x = g.input("x")
    out = g.sum_to_shape(g.broadcast_to(x, [5, 3, 4]), [3, 4])
    expected, got, simple = simplified_values(g, {"x": X}, [out.name])
    # Five equal terms summed against one product by 5: the same value up to rounding.
    np.testing.assert_allclose(got[out.name], expected[out.name], rtol=1e-15, atol=0)
    assert sorted(ops_of(simple.graph)) == ["constant", "input", "mul"]


def test_reshape_of_reshape_is_one_reshape():
    g = Graph()
    out = g.reshape(g.reshape(g.input("x"), [12]), [4, 3])
    expected, got, simple = simplified_values(g, {"x": X}, [out.name])
    assert_same_bits(expected, got)
    assert ops_of(simple.graph) == ["input", "reshape"]


def test_protected_nodes_are_kept_as_they_are():
    g = Graph()
    x = g.input("x")
    out = x * 1.0
    graph, types = typed(g, {"x": X})
    simple = simplify(graph, types, [out.name], protected={out.name})
    assert simple.graph[out.name].op == "mul"


def test_simplifying_twice_changes_nothing():
    g = Graph()
    x, w = g.input("x"), g.input("w")
    loss = g.sum(g.square(g.tanh(w @ x) * 1.0 + g.tanh(w @ x)))
    feeds = {"x": np.ones((4, 2)), "w": X}
    graph, types = typed(g, feeds)
    combined = gradient_graph(graph, types, loss.name, ["x", "w"])
    roots = list(combined.gradients.values())
    once = simplify(combined.graph, combined.types, roots)
    twice = simplify(once.graph, once.types, [once.name_of(r) for r in roots])
    assert encode_graph(twice.graph) == encode_graph(once.graph)
    assert twice.renamed == {}
    assert len(once.graph) < len(combined.graph)


def test_the_gradient_graph_is_simplified_and_runs_like_gradient():
    """The engine returns the simplified gradient graph; running it gives Gradient's bits."""
    engine = Engine()
    g = Graph()
    x, w = g.input("x"), g.input("w")
    y = w @ x
    loss = g.sum(y**2) + g.var(y) + g.sum(g.softmax(y) * g.log_softmax(y))
    graph = decode_graph(g.to_proto())
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, 3)), "w": rng.standard_normal((5, 4))}
    returned = engine.gradient_graph(graph, feeds, loss.name, ["x", "w"])
    unsimplified = gradient_graph(graph, typed(g, feeds)[1], loss.name, ["x", "w"])
    assert len(returned.graph) < len(unsimplified.graph)
    direct = engine.gradient(graph, feeds, loss.name, wrt=["x"]).gradients["x"]
    again = decode_graph(encode_graph(returned.graph))
    values = engine.forward(again, {**feeds, returned.seed: np.ones(())}, [returned.gradients["x"]])
    assert values[returned.gradients["x"]].tobytes() == direct.tobytes()


# ---------------------------------------------------------------------------------------------
# The plan


def chain(length: int, size: int) -> tuple[Graph, str]:
    g = Graph()
    h = g.input("x")
    for k in range(length):
        h = g.tanh(h) if k % 2 else h * 1.5
    return g, h.name


def test_large_elementwise_results_reuse_a_dying_operand_and_give_the_same_values():
    g, last = chain(6, REUSE_MIN_ELEMENTS)
    graph, types = typed(g, {"x": np.ones(REUSE_MIN_ELEMENTS)})
    plan = Plan(graph, types, {last})
    reusing = [step.node.op for step in plan.steps if step.reuses is not None]
    assert reusing and all(op in ("mul", "tanh") for op in reusing)
    x = np.random.default_rng(2).standard_normal(REUSE_MIN_ELEMENTS)
    original = x.copy()
    value = plan.run({"x": x}, lambda: None)[last]
    expected = x
    for k in range(6):
        expected = np.tanh(expected) if k % 2 else expected * 1.5
    assert value.tobytes() == expected.tobytes()
    assert x.tobytes() == original.tobytes()  # a feed is never written into


def test_no_reuse_of_a_buffer_a_view_still_shows():
    g = Graph()
    x = g.input("x")
    a = g.exp(x)
    view = g.reshape(a, [2, -1])  # a view of a's buffer, used after a dies
    b = g.tanh(a)
    out = g.sum(view) + g.sum(b)
    feeds = {"x": np.linspace(-1, 1, 2 * REUSE_MIN_ELEMENTS)}
    graph, types = typed(g, feeds)
    plan = Plan(graph, types, {out.name})
    assert all(step.reuses != a.name for step in plan.steps)
    value = plan.run(feeds, lambda: None)[out.name]
    x_value = feeds["x"]
    assert float(value) == pytest.approx(np.exp(x_value).sum() + np.tanh(np.exp(x_value)).sum())


def test_constants_are_values_cast_once_for_their_consumers():
    g = Graph()
    x = g.input("x")
    out = g.tanh(x * 1.5) + 0.25  # weak float64 constants meeting float32
    graph, types = typed(g, {"x": np.ones(3, np.float32)})
    plan = Plan(graph, types, {out.name})
    assert [step.node.op for step in plan.steps] == ["mul", "tanh", "add"]
    x = np.linspace(-2, 2, 3, dtype=np.float32)
    value = plan.run({"x": x}, lambda: None)[out.name]
    expected = np.tanh(x * np.float32(1.5)) + np.float32(0.25)
    assert value.dtype == np.float32 and value.tobytes() == expected.tobytes()


def test_deadlines_are_checked_after_enough_work():
    g, last = chain(200, 4)
    graph, types = typed(g, {"x": np.ones(4)})
    calls = []
    Plan(graph, types, {last}).run({"x": np.ones(4)}, lambda: calls.append(1))
    assert 1 <= len(calls) < 10  # 200 tiny steps: not one check each

    big = Graph()
    last = big.input("x")
    for _ in range(4):
        last = big.sigmoid(last)  # an op that does not fuse: four steps
    last = last.name
    graph, types = typed(big, {"x": np.ones(1 << 20)})
    calls.clear()
    Plan(graph, types, {last}).run({"x": np.ones(1 << 20)}, lambda: calls.append(1))
    assert len(calls) == 4  # each step is a lot of work: a check before each


def test_an_outer_product_by_matmul_is_a_broadcast_product():
    g = Graph()
    column, row = g.input("column"), g.input("row")
    out = column @ row  # (5, 1) @ (1, 4): one product per element, no sum
    feeds = {"column": np.linspace(-2, 2, 5).reshape(5, 1), "row": np.linspace(1, 3, 4)[None]}
    expected, got, simple = simplified_values(g, feeds, [out.name])
    assert_same_bits(expected, got)
    assert ops_of(simple.graph).count("mul") == 1 and "matmul" not in ops_of(simple.graph)
