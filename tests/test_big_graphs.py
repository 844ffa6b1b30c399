"""Big graphs: long chains decode, type, differentiate and run to the numbers a numpy loop
gives, without recursion; the canonical order, the errors and the typing shortcuts that make
them fast agree with the plain definitions. (Their speed is measured by the benchmarks, not
asserted here.)"""

from __future__ import annotations

import heapq
import random
import sys

import numpy as np
import pytest

from gradient.v1 import graph_pb2
from gradient_client import Graph
from gradient_server import autodiff, ir
from gradient_server.engine import Engine
from gradient_server.errors import GraphError
from gradient_server.ir import CHECK_EVERY, decode_graph, infer_node_type, infer_types
from gradient_server.tensor_type import TensorType

SCALE = 1.0001
F64 = np.dtype("float64")


def _chain(length: int) -> Graph:
    """x, then `length` nodes alternating x * SCALE and tanh, summed into "loss"."""
    g = Graph()
    h = g.input("x")
    c = g.constant(SCALE)
    for i in range(length):
        h = g.tanh(h) if i % 2 else h * c
    g.sum(h, name="loss")
    return g


def _numpy_chain(x: np.ndarray, length: int) -> tuple[float, np.ndarray]:
    """The chain's loss and its gradient, by a numpy loop."""
    values = [x]
    for i in range(length):
        values.append(np.tanh(values[-1]) if i % 2 else values[-1] * SCALE)
    gradient = np.ones_like(x)
    for i in reversed(range(length)):
        gradient = gradient * (1 - values[i + 1] ** 2) if i % 2 else gradient * SCALE
    return float(values[-1].sum()), gradient


def test_a_long_chain_runs_forward_and_backward_as_a_numpy_loop():
    length = 20_000
    x = np.linspace(-2.0, 2.0, 7)
    loss, gradient = _numpy_chain(x, length)
    engine = Engine()
    graph = engine.load_graph(_chain(length).to_proto())
    assert len(graph) == length + 3
    forward = engine.forward(graph, {"x": x}, ["loss"])
    np.testing.assert_allclose(forward["loss"], loss, rtol=1e-12)
    result = engine.gradient(graph, {"x": x}, "loss")
    np.testing.assert_allclose(result.gradients["x"], gradient, rtol=1e-12)


def test_deep_graphs_are_decoded_typed_and_differentiated_without_recursion():
    message = graph_pb2.Graph.FromString(_chain(10_000).to_proto().SerializeToString())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)  # far less than the graph's depth
    try:
        graph = decode_graph(message)
        types = infer_types(graph, {"x": TensorType(F64, (3,))}, graph.ancestors(["loss"]))
        combined = autodiff.gradient_graph(graph, types, "loss", ["x"])
        held = combined.graph.held_bytes
    finally:
        sys.setrecursionlimit(limit)
    # The seed, the sum's gradient (a reshape and a broadcast), the constant 1 of tanh's rule,
    # then a node for each mul and three for each tanh (a mul's gradient for its constant is
    # pruned).
    assert len(combined.graph) == len(graph) + 4 + 5_000 * 4
    assert held > ir.NODE_BYTES * len(combined.graph)


def _kahn(nodes: dict[str, ir.Node]) -> list[str]:
    """The canonical order by its definition: Kahn's algorithm taking the smallest ready name."""
    pending = {name: len(set(node.inputs)) for name, node in nodes.items()}
    users: dict[str, list[str]] = {name: [] for name in nodes}
    for node in nodes.values():
        for source in set(node.inputs):
            users[source].append(node.name)
    ready = [name for name, count in pending.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for user in users[name]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, user)
    return order


def _branching(count: int, seed: int) -> graph_pb2.Graph:
    """A graph of `count` nodes with random fan-in and fan-out (some inputs taken twice)."""
    rng = random.Random(seed)
    g = Graph()
    pool = [g.input("x"), g.input("y")]
    for i in range(count):
        a, b = rng.choice(pool), rng.choice(pool[-20:])
        pool.append(g.add(a, a, name=f"n{rng.randrange(10**9)}_{i}") if i % 7 == 0 else a * b)
    g.sum(pool[-1], name="loss")
    return g.to_proto()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_canonical_order_is_kahns_by_name_whatever_the_message_order(seed):
    message = _branching(3 * CHECK_EVERY, seed)
    reference = _kahn(decode_graph(message).nodes)
    shuffled = graph_pb2.Graph()
    nodes = list(message.nodes)
    random.Random(seed).shuffle(nodes)
    shuffled.nodes.extend(nodes)
    for graph in (decode_graph(message), decode_graph(shuffled)):
        assert list(graph.nodes) == reference


def _message(nodes: list[tuple[str, str, list[str]]]) -> graph_pb2.Graph:
    message = graph_pb2.Graph()
    for name, op, inputs in nodes:
        message.nodes.add(name=name, op=op, inputs=inputs)
    return message


def _long(count: int) -> list[tuple[str, str, list[str]]]:
    return [("x", "input", [])] + [
        (f"n{i}", "neg", [f"n{i - 1}" if i else "x"]) for i in range(count)
    ]


def test_the_first_fault_in_message_order_is_reported_across_chunks():
    far = CHECK_EVERY + 10  # past the first chunk of decoded nodes
    nodes = _long(2 * CHECK_EVERY)
    duplicate_then_unknown = [*nodes[:far], ("n3", "neg", ["x"]), ("bad", "nope", ["x"])]
    with pytest.raises(GraphError, match="'n3': duplicate node name") as caught:
        decode_graph(_message(duplicate_then_unknown))
    assert (caught.value.node, caught.value.op) == ("n3", "neg")

    unknown_then_duplicate = [*nodes[:far], ("bad", "nope", ["x"]), ("n3", "neg", ["x"])]
    with pytest.raises(GraphError, match="unknown op 'nope'") as caught:
        decode_graph(_message(unknown_then_duplicate))
    assert (caught.value.node, caught.value.op) == ("bad", "nope")

    two_missing = [*nodes, ("late", "add", ["gone", "n5"]), ("later", "neg", ["lost"])]
    two_missing.insert(far, ("early", "add", ["n1", "missing"]))
    with pytest.raises(GraphError, match="input 'missing' is not a node") as caught:
        decode_graph(_message(two_missing))
    assert (caught.value.node, caught.value.op) == ("early", "add")


def test_a_cycle_in_a_long_graph_is_named_and_an_input_taken_twice_is_not_one():
    nodes = _long(2 * CHECK_EVERY)
    nodes[0] = ("x", "neg", [nodes[-1][0]])  # the last node feeds the first
    with pytest.raises(GraphError, match="is on a cycle"):
        decode_graph(_message(nodes))

    twice = [*_long(10), ("square", "mul", ["n9", "n9"]), ("sum", "add", ["square", "square"])]
    graph = decode_graph(_message(twice))
    assert list(graph.nodes)[-2:] == ["square", "sum"]


def test_remembered_types_are_each_nodes_own():
    """infer_types, which runs each op's rule once per distinct operation, gives every node the
    type its rule gives it alone: broadcasting, weak constants, promotion, attributes."""
    g = Graph()
    x, i = g.input("x"), g.input("i")
    h = x
    for step in range(60):
        kind = step % 6
        if kind == 0:
            h = h * 2.0
        elif kind == 1:
            h = g.tanh(h) + i
        elif kind == 2:
            h = g.sum(h, axis=0, keepdims=True) * h
        elif kind == 3:
            h = g.sum(h, axis=1, keepdims=True) - h
        elif kind == 4:
            h = g.cast(h, "float32") * x
        else:
            h = h / g.constant(np.float32(3))
    g.sum(h, name="loss")
    graph = decode_graph(g.to_proto())
    feeds = {"x": TensorType(F64, (3, 4)), "i": TensorType(np.dtype("int32"), (4,))}
    types = infer_types(graph, feeds, set(graph.nodes))
    for name, node in graph.nodes.items():
        if node.op != "input":
            own = infer_node_type(node, tuple(types[s] for s in node.inputs))
            assert types[name] == own, name
    assert types["loss"] == TensorType(F64, ())


def test_held_bytes_count_constants_names_and_attribute_lists():
    g = Graph()
    x = g.input("x", shape=(2, 3))
    big = g.constant(np.ones((5, 7)))
    h = g.reshape(g.transpose(x, axes=(1, 0)), shape=(2, 3)) + g.sum(big)
    g.sum(h, name="a_rather_long_output_name")
    graph = decode_graph(g.to_proto())
    nodes = graph.nodes.values()
    constants = sum(v.nbytes for n in nodes for v in n.attrs.values() if isinstance(v, np.ndarray))
    lists = sum(len(v) for n in nodes for v in n.attrs.values() if isinstance(v, tuple))
    names = sum(len(n.name) + len(n.op) + sum(len(s) for s in n.inputs) for n in nodes)
    assert graph.constant_bytes == constants == 5 * 7 * 8
    assert graph.extra_bytes == names + ir.LIST_ITEM_BYTES * lists
    assert graph.held_bytes == constants + graph.extra_bytes + ir.NODE_BYTES * len(graph)


def test_remembered_emissions_are_the_nodes_and_types_made_afresh():
    """The gradient builder remembers what it emitted by op, operand types and attributes;
    a remembered node has the attributes and type that building it anew gives."""
    builder = autodiff._Builder([])
    x = builder.input("x", F64, (2, 3))
    calls = [
        ("mul", (x, 2.0), {}),
        ("mul", (x, 2), {}),  # an int constant: another operand type
        ("sum_to_shape", (x,), {"shape": (1, 3)}),
        ("sum_to_shape", (x,), {"shape": [1, 3]}),  # unhashable: made afresh
        ("sum_to_shape", (x,), {"shape": (1.0, 3.0)}),
        ("cast", (x,), {"dtype": "float32"}),
        ("cast", (x,), {"dtype": np.dtype("float32")}),
        ("constant", (), {"value": (1, 2)}),
        ("constant", (), {"value": (1.0, 2.0)}),  # equal, but another array
    ]
    for op, operands, attrs in calls * 2:
        builder.op(op, *operands, **attrs)
        node, node_type = builder.nodes[-1], builder.node_types[-1]
        fresh = ir.make_node(node.name, op, node.inputs, attrs)
        assert list(node.attrs) == list(fresh.attrs)
        for name, value in fresh.attrs.items():
            if isinstance(value, np.ndarray):
                assert node.attrs[name].dtype == value.dtype
                np.testing.assert_array_equal(node.attrs[name], value)
            else:
                assert node.attrs[name] == value and type(node.attrs[name]) is type(value)
        input_types = tuple(dict(builder.emitted_types())[s] for s in node.inputs)
        assert node_type == infer_node_type(fresh, input_types), (op, attrs)
