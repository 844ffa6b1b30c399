"""Bounded work: every op's cost is estimated from shapes, and a request over the flop limits
(max_flops in all, max_op_flops for any one op) is RESOURCE_EXHAUSTED before anything runs."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from gradient_client import GradientClient, GradientError, Graph
from gradient_server.engine import Engine, Limits
from gradient_server.errors import LimitExceeded
from gradient_server.gradcheck import CheckSettings, check_gradient
from gradient_server.ir import make_node
from gradient_server.ops import OPS, Call
from gradient_server.ops.base import (
    ELEMENT,
    GATHER,
    INT_MULTIPLY_ADD,
    MULTIPLY_ADD,
    TRANSCENDENTAL,
    strided_cost,
)
from gradient_server.service import create_server
from gradient_server.tensor_type import TensorType

F64 = np.dtype("float64")

DEFAULT_COST_IS_RIGHT = {
    # Elementwise without transcendental functions: one pass over the operands and result
    # (within a factor of two of the measured time; calibrate_costs.py).
    *("add", "sub", "mul", "div", "maximum", "minimum", "where"),
    *("neg", "abs", "sign", "square", "reciprocal", "relu", "clip"),
    # Comparisons and logic: an upper bound (bool results are small and fast).
    *("equal", "not_equal", "greater", "greater_equal", "less", "less_equal"),
    *("logical_and", "logical_or", "logical_not"),
    # Reductions: a pass over the input.
    *("sum", "mean", "max", "min", "sum_to_shape"),
    # A conversion, and zeros (an upper bound: fresh pages are paid for by their first writer).
    *("cast", "zeros"),
}
"""Ops that declare no cost, because the default rule (ops.base.default_cost) is right for
them. Every other op declares its own: a new op must do one or the other."""


def call_of(op: str, types: list[TensorType], **attrs) -> Call:
    """The call of a node of `op` on operands of these types (attributes defaulted)."""
    node = make_node("n", op, [f"x{i}" for i in range(len(types))], attrs)
    return Call(node.attrs, tuple(types), OPS[op].infer(node.attrs, *types))


def cost(op: str, *shapes: tuple[int, ...], dtype: str = "float64", **attrs) -> int:
    types = [TensorType(np.dtype(dtype), shape) for shape in shapes]
    return OPS[op].estimated_cost(call_of(op, types, **attrs))


# ---------------------------------------------------------------------------------------------
# The table


def test_every_op_declares_a_cost_or_is_listed_as_right_by_default():
    undeclared = {name for name, op in OPS.items() if op.cost is None}
    assert undeclared == DEFAULT_COST_IS_RIGHT, (
        "a new op must declare cost= (its forward's work, ops/base.py) or, if default_cost "
        "fits it, be listed in DEFAULT_COST_IS_RIGHT: "
        f"{sorted(undeclared ^ DEFAULT_COST_IS_RIGHT)}"
    )


# ---------------------------------------------------------------------------------------------
# The formulas


def test_matmul_costs_two_flops_per_multiply_add():
    # (64, 128) @ (128, 32): 64 * 32 results, each a dot product of 128 multiply-adds.
    reading = 64 * 128 + 128 * 32
    assert cost("matmul", (64, 128), (128, 32)) == (
        MULTIPLY_ADD * 64 * 32 * 128 + ELEMENT * (reading + 6 * 64 * 32)
    )
    # A broadcast batch, a vector on the left, integers (numpy has no BLAS for them).
    assert cost("matmul", (8, 64, 128), (128, 32)) == (
        MULTIPLY_ADD * 8 * 64 * 32 * 128 + ELEMENT * (8 * 64 * 128 + 128 * 32 + 6 * 8 * 64 * 32)
    )
    assert cost("matmul", (128,), (128, 32)) == (
        MULTIPLY_ADD * 32 * 128 + ELEMENT * (128 + 128 * 32 + 6 * 32)
    )
    assert cost("matmul", (64, 128), (128, 32), dtype="int64") == (
        INT_MULTIPLY_ADD * 64 * 32 * 128 + ELEMENT * (reading + 6 * 64 * 32)
    )


def test_conv2d_costs_its_multiply_adds_and_its_windows():
    # x (2, 3, 10, 10), w (4, 3, 3, 3), padding 1: a (2, 4, 10, 10) result, each element the
    # sum of 3 * 3 * 3 products; the windows hold 2 * 3 * 10 * 10 * 9 elements, read in runs
    # of a kernel row (3); the padded copy of x is (2, 3, 12, 12).
    out, windows, padded = 2 * 4 * 10 * 10, 2 * 3 * 10 * 10 * 9, 2 * 3 * 12 * 12
    multiply_adds = out * 3 * 3 * 3
    assert cost("conv2d", (2, 3, 10, 10), (4, 3, 3, 3), padding=[1]) == (
        MULTIPLY_ADD * multiply_adds
        + strided_cost(windows, 3)
        + GATHER * out
        + ELEMENT * (2 * 3 * 10 * 10 + 4 * 3 * 3 * 3 + 2 * padded)
    )
    # Its adjoints do the same multiply-adds, and more data movement.
    geometry = {"padding": [1]}
    input_grad = cost(
        "conv2d_input_grad", (2, 4, 10, 10), (4, 3, 3, 3), input_shape=[2, 3, 10, 10], **geometry
    )
    weight_grad = cost(
        "conv2d_weight_grad", (2, 3, 10, 10), (2, 4, 10, 10), weight_shape=[4, 3, 3, 3], **geometry
    )
    for adjoint in (input_grad, weight_grad):
        assert (
            MULTIPLY_ADD * multiply_adds
            < adjoint
            < 10 * cost("conv2d", (2, 3, 10, 10), (4, 3, 3, 3), **geometry)
        )


def test_elementwise_ops_cost_their_elements():
    # Two operands read, the result written (twice a read).
    assert cost("add", (1000,), (1000,)) == ELEMENT * (1000 + 1000 + 2 * 1000)
    # A broadcast operand counts its own size.
    assert cost("mul", (10, 100), (100,)) == ELEMENT * (1000 + 100 + 2 * 1000)
    # An operand of another dtype is converted first.
    mixed = call_of("add", [TensorType(np.dtype("float32"), (1000,)), TensorType(F64, (1000,))])
    assert OPS["add"].estimated_cost(mixed) == ELEMENT * (3 * 1000 + 1000 + 2 * 1000)
    # Transcendental functions add their evaluations.
    assert cost("exp", (1000,)) == ELEMENT * 3 * 1000 + TRANSCENDENTAL * 1000
    assert cost("relu", (1000,)) == ELEMENT * 3 * 1000


def test_reductions_cost_their_input_elements():
    assert cost("sum", (100, 50), axis=[1]) == ELEMENT * (100 * 50 + 2 * 100)
    assert cost("max", (100, 50)) == ELEMENT * (100 * 50 + 2)
    # logsumexp: a max, a subtraction, an exp and a sum: five passes and an exp an element.
    assert cost("logsumexp", (100, 50), axis=[1]) == 5 * ELEMENT * (5000 + 200) + (
        TRANSCENDENTAL * 5000
    )


def test_sources_and_views_cost_nothing():
    assert cost("transpose", (1000, 1000)) == 0
    assert cost("broadcast_to", (1000,), shape=[1000, 1000]) == 0
    assert cost("constant", value=np.zeros(10**6)) == 0


def test_a_plan_sums_its_ops_and_names_the_costliest():
    g = Graph()
    x, w = g.input("x"), g.input("w")
    g.sum(g.tanh(g.matmul(x, w, name="product")), name="f")
    engine = Engine()
    graph = engine.load_graph(g.to_proto())
    plan = engine.forward_plan(graph, {"x": np.ones((50, 1000)), "w": np.ones((1000, 30))})
    costs = {step.node.name: step.node.opdef.estimated_cost(step.call) for step in plan.steps}
    assert costs["product"] == cost("matmul", (50, 1000), (1000, 30))
    assert plan.estimated_flops == sum(costs.values())
    assert plan.largest_op is not None and plan.largest_op.name == "product"
    assert plan.largest_op_flops == costs["product"]


# ---------------------------------------------------------------------------------------------
# Refused before anything runs


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of every op's forward (each op replaced by a counting copy)."""
    calls: list[str] = []
    for name, op in list(OPS.items()):

        def forward(call, *arrays, _op=op, _name=name):
            calls.append(_name)
            return _op.forward(call, *arrays)

        monkeypatch.setitem(OPS, name, dataclasses.replace(op, forward=forward, bind=None))
    return calls


def huge_product() -> Graph:
    """zeros @ zeros of 6000 x 6000: 2.2e11 multiply-adds, some 7 s of BLAS on 2 cores."""
    g = Graph()
    a = g.op("zeros", shape=[6000, 6000], dtype="float64", name="a")
    b = g.op("zeros", shape=[6000, 6000], dtype="float64", name="b")
    g.sum(g.matmul(a, b, name="huge"), name="f")
    return g


def test_one_huge_op_is_refused_before_anything_runs(counted):
    engine = Engine()  # the default limits
    graph = engine.load_graph(huge_product().to_proto())
    with pytest.raises(LimitExceeded) as info:
        engine.forward(graph, {}, ["f"])
    message = str(info.value)
    assert "max_op_flops" in message and "'huge'" in message and "matmul" in message
    expected = cost("matmul", (6000, 6000), (6000, 6000))  # 4.3e11 multiply-adds and more
    assert "float64[6000, 6000]" in message and f"about {expected:.3g} flops" in message
    assert counted == []  # not even the zeros were made
    # Within the limit the same graph runs, and the counter sees it.
    small = Graph()
    small.sum(small.matmul(small.op("zeros", shape=[60, 60], dtype="float64"), small.input("b")))
    engine.forward(engine.load_graph(small.to_proto()), {"b": np.ones((60, 60))})
    assert "matmul" in counted


def test_many_ops_over_max_flops_are_refused_before_anything_runs(counted):
    g = Graph()
    h = g.input("x")
    for _ in range(10):
        h = g.exp(h)
    g.sum(h, name="f")
    x = np.ones(1000)
    per_exp = cost("exp", (1000,))
    engine = Engine(Limits(max_flops=8 * per_exp, max_op_flops=per_exp))
    graph = engine.load_graph(g.to_proto())
    with pytest.raises(LimitExceeded) as info:
        engine.forward(graph, {"x": x}, ["f"])
    assert "max_flops" in str(info.value) and "(op exp)" in str(info.value)
    assert counted == []
    # Each op within max_op_flops, all of them within max_flops: it runs.
    roomy = Engine(Limits(max_flops=20 * per_exp, max_op_flops=per_exp))
    roomy.forward(roomy.load_graph(g.to_proto()), {"x": x}, ["f"])
    assert counted.count("exp") == 10


def test_backward_plans_are_charged_too(counted):
    """Gradient, GradientGraph and HVP compile plans of their own (the backward pass is a
    graph): each is checked, and refused before anything runs."""
    g = Graph()
    x, w = g.input("x"), g.input("w")
    g.sum(g.square(g.matmul(x, w)), name="f")
    feeds = {"x": np.ones((200, 100)), "w": np.ones((100, 50))}
    measuring = Engine()
    forward = measuring.forward_plan(measuring.load_graph(g.to_proto()), feeds, ["f"])
    # The forward pass fits; with its gradient (two more products) the request does not.
    engine = Engine(Limits(max_flops=2 * forward.estimated_flops))
    graph = engine.load_graph(g.to_proto())
    engine.forward(graph, feeds, ["f"])
    counted.clear()
    for call in (
        lambda: engine.gradient(graph, feeds, "f"),
        lambda: engine.gradient_graph(graph, feeds, "f"),
        lambda: engine.hvp(graph, feeds, "f", {"w": np.ones((100, 50))}),
    ):
        with pytest.raises(LimitExceeded, match="max_flops"):
            call()
    assert counted == []


def test_a_second_order_plan_alone_over_the_limit_is_refused():
    g = Graph()
    x = g.input("x")
    g.sum(g.tanh(g.matmul(x, x)), name="f")
    feeds = {"x": np.full((60, 60), 0.01)}
    engine = Engine()
    graph = engine.load_graph(g.to_proto())
    first = engine._compile_gradient(graph, engine._feed_types(graph, feeds), "f", ["x"], ())
    # Room for the gradient, not for the Hessian-vector product's reverse over reverse.
    tight = Engine(Limits(max_flops=first.plan.estimated_flops + 1))
    graph = tight.load_graph(g.to_proto())
    tight.gradient_graph(graph, feeds, "f", wrt=["x"])  # the first order: the same plan
    with pytest.raises(LimitExceeded, match="max_flops"):
        tight.hvp(graph, feeds, "f", {"x": np.ones((60, 60))})


def test_gradient_checks_charge_all_their_forward_passes():
    g = Graph()
    x = g.input("x")
    g.sum(g.exp(x), name="f")
    feeds = {"x": np.linspace(-1, 1, 100)}
    engine = Engine()
    forward = engine.forward_plan(engine.load_graph(g.to_proto()), feeds, ["f"]).estimated_flops
    # 200 forward passes (two per element) for the whole check; 20 for a sample of ten.
    limits = Limits(max_flops=50 * forward)
    checker = Engine(limits)
    graph = checker.load_graph(g.to_proto())
    with pytest.raises(LimitExceeded) as info:
        check_gradient(checker, graph, feeds, "f")
    assert "max_flops" in str(info.value) and "200 forward passes" in str(info.value)
    report = check_gradient(checker, graph, feeds, "f", settings=CheckSettings(max_elements=10))
    assert report.passed


# ---------------------------------------------------------------------------------------------
# Over gRPC


@pytest.fixture(scope="module")
def served():
    """A client on a server with the default limits."""
    server, port = create_server("127.0.0.1:0", engine=Engine(Limits()))
    server.start()
    with GradientClient(f"127.0.0.1:{port}", timeout=30) as client:
        yield client
    server.stop(0)


def _exhausted(call) -> str:
    with pytest.raises(GradientError) as info:
        call()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details
    return info.value.details


def test_a_huge_op_is_resource_exhausted_at_once_not_a_deadline(served):
    # Run, the product would outlast the call's 5 s deadline; refused, the call returns at once.
    details = _exhausted(lambda: served.forward(huge_product(), {}, fetch=["f"], timeout=5))
    assert "'huge'" in details and "(op matmul)" in details and "max_op_flops" in details
    details = _exhausted(lambda: served.gradient(huge_product(), output="f", timeout=5))
    assert "'huge'" in details and "max_op_flops" in details
    # The server then answers a good request normally.
    g = Graph()
    g.sum(g.matmul(g.input("a"), g.input("b")), name="f")
    result = served.forward(g, {"a": np.ones((3, 4)), "b": np.ones((4, 5))}, fetch=["f"])
    assert float(result.values["f"]) == 60.0


def test_a_session_step_over_the_limit_is_resource_exhausted(served):
    g = Graph()
    g.sum(g.matmul(g.input("a"), g.input("b"), name="product"), name="f")
    big = np.zeros((3000, 1))  # (3000, 1) @ (1, 3000) is cheap: an outer product
    with served.session(g, "f") as session:
        assert float(session.forward({"a": big, "b": big.T}).values["f"]) == 0.0
        wide = np.zeros((2000, 2000))  # (2000, 2000) @ (2000, 2000): 1.6e10 flops
        details = _exhausted(lambda: session.forward({"a": wide, "b": wide}))
        assert "'product'" in details and "max_op_flops" in details
