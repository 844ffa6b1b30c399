"""Every kind of bad request gets the right status code and a message naming the culprit,
and the same server then answers a good request normally (DESIGN.md section 5)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient.v1 import graph_pb2, tensor_pb2
from gradient_client import GradientClient, GradientError, Graph, to_proto
from gradient_server.calls import bounded
from gradient_server.engine import Limits
from gradient_server.service import create_server

BIG_MESSAGES = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def stub(server_address) -> Iterator[service_grpc.GradientServiceStub]:
    """The raw generated stub on the session's server, for hand-made messages."""
    with grpc.insecure_channel(server_address, BIG_MESSAGES) as channel:
        yield service_grpc.GradientServiceStub(channel)


def lecture_graph() -> Graph:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    g.mul(g.add(x, y, name="q"), z, name="f")
    return g


def assert_serves(client: GradientClient) -> None:
    """The server answers a good Gradient request with the lecture's exact numbers."""
    r = client.gradient(lecture_graph(), output="f", inputs={"x": -2.0, "y": 5.0, "z": -4.0})
    assert float(r.values["f"]) == -12.0
    assert float(r.values["q"]) == 3.0
    assert {n: float(v) for n, v in r.gradients.items()} == {
        "f": 1.0,
        "q": -4.0,
        "z": 3.0,
        "x": -4.0,
        "y": -4.0,
    }


def assert_clean(code: grpc.StatusCode, details: str) -> None:
    assert code != grpc.StatusCode.UNKNOWN, details
    assert "Traceback" not in details
    assert 'File "' not in details
    assert details.strip(), "an error must say what went wrong"


def expect_error(
    client: GradientClient,
    call: Callable[[], object],
    *fragments: str,
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
) -> str:
    """`call` fails with `code` and a message holding every fragment; the server still serves."""
    with pytest.raises(GradientError) as info:
        call()
    error = info.value
    assert_clean(error.code, error.details)
    assert error.code == code, error.details
    for fragment in fragments:
        assert fragment in error.details, (fragment, error.details)
    assert_serves(client)
    return error.details


def expect_raw_error(
    client: GradientClient,
    call: Callable[[], object],
    *fragments: str,
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
) -> str:
    """As expect_error, for a call on the raw generated stub."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert_clean(error.code(), error.details() or "")
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details(), (fragment, error.details())
    assert_serves(client)
    return error.details()


def node(name: str, op: str, *inputs: str, **attrs: graph_pb2.AttrValue) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op=op, inputs=list(inputs), attrs=attrs)


def graph_of(*nodes: graph_pb2.Node) -> graph_pb2.Graph:
    return graph_pb2.Graph(nodes=list(nodes))


def f64(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)


# ---------------------------------------------------------------------------------------------
# INVALID_ARGUMENT: the graph


def test_unknown_op(client):
    g = Graph()
    x = g.input("x")
    g.op("frobnicate", x, name="weird")
    expect_error(client, lambda: client.forward(g, {"x": 1.0}), "'weird'", "frobnicate")


def test_unknown_op_in_gradient(client):
    g = Graph()
    x = g.input("x")
    g.op("frobnicate", x, name="weird")
    expect_error(client, lambda: client.gradient(g, "weird", {"x": 1.0}), "'weird'", "frobnicate")


def test_input_naming_a_missing_node(client):
    message = graph_of(node("x", "input"), node("n", "add", "x", "ghost"))
    details = expect_error(client, lambda: client.forward(message, {"x": 1.0}), "'n'", "ghost")
    assert "add" in details


def test_cycle_names_a_node_on_it(client):
    # x feeds a; a <- c <- b <- a is a cycle; d hangs off it.
    message = graph_of(
        node("x", "input"),
        node("a", "add", "x", "c"),
        node("b", "neg", "a"),
        node("c", "neg", "b"),
        node("d", "neg", "c"),
    )
    details = expect_error(client, lambda: client.forward(message, {"x": 1.0}), "cycle")
    on_cycle = [n for n in ("a", "b", "c") if f"'{n}'" in details]
    assert on_cycle, details
    assert "'x'" not in details and "'d'" not in details, details


def test_cycle_is_rejected_in_gradient_too(client):
    message = graph_of(node("x", "input"), node("a", "add", "x", "b"), node("b", "neg", "a"))
    details = expect_error(client, lambda: client.gradient(message, "a", {"x": 1.0}), "cycle")
    assert "'a'" in details or "'b'" in details


def test_self_loop(client):
    message = graph_of(node("x", "input"), node("loop", "add", "x", "loop"))
    expect_error(client, lambda: client.forward(message, {"x": 1.0}), "'loop'", "cycle")


def test_duplicate_node_name(client):
    message = graph_of(node("x", "input"), node("y", "neg", "x"), node("y", "exp", "x"))
    expect_error(client, lambda: client.forward(message, {"x": 1.0}), "'y'", "duplicate")


def test_sdk_refuses_duplicate_names_itself():
    g = Graph()
    g.input("x")
    with pytest.raises(ValueError, match="'x'"):
        g.input("x")


def test_shape_mismatch_names_node_op_and_both_shapes(client):
    g = Graph()
    a, b = g.input("a"), g.input("b")
    g.add(a, b, name="bad_add")
    details = expect_error(
        client,
        lambda: client.forward(g, {"a": f64(2, 3), "b": f64(4)}),
        "'bad_add'",
        "add",
        "[2, 3]",
        "[4]",
    )
    assert details.index("[2, 3]") < details.index("[4]"), details


def test_matmul_shape_mismatch(client):
    g = Graph()
    g.matmul(g.input("a"), g.input("b"), name="mm")
    expect_error(
        client,
        lambda: client.gradient(g, "mm", {"a": f64(2, 3), "b": f64(2, 3)}, seed=f64(2, 3)),
        "'mm'",
        "matmul",
        "[2, 3]",
    )


def test_unknown_attribute(client):
    g = Graph()
    g.op("neg", g.input("x"), name="n", bogus=3)
    expect_error(client, lambda: client.forward(g, {"x": 1.0}), "'n'", "neg", "bogus")


def test_missing_required_attribute(client):
    g = Graph()
    g.op("reshape", g.input("x"), name="r")
    expect_error(client, lambda: client.forward(g, {"x": f64(2, 3)}), "'r'", "reshape", "shape")


def test_attribute_of_the_wrong_kind(client):
    g = Graph()
    g.op("reshape", g.input("x"), name="r", shape="six")
    expect_error(client, lambda: client.forward(g, {"x": f64(6)}), "'r'", "shape")


def test_bad_reshape(client):
    g = Graph()
    g.reshape(g.input("x"), (4, 2), name="r")
    expect_error(
        client, lambda: client.forward(g, {"x": f64(2, 3)}), "'r'", "reshape", "[2, 3]", "[4, 2]"
    )


def test_reshape_with_two_unknown_dimensions(client):
    g = Graph()
    g.reshape(g.input("x"), (-1, -1), name="r")
    expect_error(client, lambda: client.forward(g, {"x": f64(2, 3)}), "'r'", "reshape")


def test_bad_constant_payload_names_the_node(client):
    bad = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3], data=b"\0" * 8)
    message = graph_of(
        node("c", "constant", value=graph_pb2.AttrValue(tensor=bad)),
        node("n", "neg", "c"),
    )
    expect_error(client, lambda: client.forward(message), "'c'", "value")


def test_unknown_dtype_name_in_an_attribute(client):
    g = Graph()
    g.op("cast", g.input("x"), name="c", dtype="float16")
    expect_error(client, lambda: client.forward(g, {"x": 1.0}), "'c'", "float16")


def test_wrong_number_of_operands(client):
    message = graph_of(node("x", "input"), node("s", "add", "x"))
    expect_error(client, lambda: client.forward(message, {"x": 1.0}), "'s'", "add")


def test_node_with_empty_name(client):
    message = graph_of(node("x", "input"), node("", "neg", "x"))
    expect_error(client, lambda: client.forward(message, {"x": 1.0}), "empty name")


# ---------------------------------------------------------------------------------------------
# INVALID_ARGUMENT: tensors and feeds


def raw_forward(stub, tensor: tensor_pb2.Tensor):
    """Forward of a one-input graph `x -> neg`, feeding `tensor` as x."""
    request = service_pb2.ForwardRequest(
        graph=graph_of(node("x", "input"), node("n", "neg", "x")), inputs={"x": tensor}
    )
    return stub.Forward(request, timeout=30)


def test_raw_tensor_with_wrong_payload_length(client, stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2, 3], data=b"\0" * 40)
    details = expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "40")
    assert "48" in details, details


def test_raw_tensor_with_a_partial_element(client, stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2], data=b"\0" * 7)
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'")


def test_raw_tensor_claiming_a_huge_shape_is_rejected_before_allocating(client, stub):
    # 2**40 float64 elements would be 8 TiB: the payload check must fail first.
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 20, 1 << 20])
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'")


def test_list_form_of_the_wrong_count(client, stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3], float_values=[1.0, 2.0])
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "float_values")


def test_list_form_of_the_wrong_kind(client, stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2], int_values=[1, 2])
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "float_values")


def test_two_payload_forms_at_once(client, stub):
    tensor = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT64,
        shape=[2],
        data=np.array([1.0, 2.0]).tobytes(),
        float_values=[1.0, 2.0],
    )
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "data", "float_values")


def test_tensor_without_dtype(client, stub):
    tensor = tensor_pb2.Tensor(shape=[1], float_values=[1.0])
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "dtype")


def test_tensor_with_a_negative_dimension(client, stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[-1])
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "negative")


def test_nonzero_tensor_without_payload(client, stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2])
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "'x'", "payload")


def test_missing_feed_names_the_input(client):
    g = Graph()
    g.add(g.input("x"), g.input("forgotten"), name="s")
    expect_error(client, lambda: client.forward(g, {"x": 1.0}), "'forgotten'", "input")


def test_missing_feed_in_gradient(client):
    g = Graph()
    g.add(g.input("x"), g.input("forgotten"), name="s")
    expect_error(client, lambda: client.gradient(g, "s", {"x": 1.0}), "'forgotten'")


def test_feed_for_a_name_that_is_not_a_node(client):
    g = Graph()
    g.neg(g.input("x"), name="n")
    expect_error(client, lambda: client.forward(g, {"x": 1.0, "stranger": 2.0}), "'stranger'")


def test_feed_for_a_node_that_is_not_an_input(client):
    g = Graph()
    g.neg(g.input("x"), name="n")
    expect_error(client, lambda: client.forward(g, {"x": 1.0, "n": 2.0}), "'n'", "neg")


def test_feed_against_declared_dtype_and_shape(client, stub):
    g = Graph()
    g.neg(g.input("x", dtype="float32", shape=(2,)), name="n")
    message = g.to_proto()
    wrong_dtype = service_pb2.ForwardRequest(graph=message, inputs={"x": to_proto(np.zeros(2))})
    expect_raw_error(
        client, lambda: stub.Forward(wrong_dtype, timeout=30), "'x'", "float32", "float64"
    )
    wrong_shape = service_pb2.ForwardRequest(
        graph=message, inputs={"x": to_proto(np.zeros(3, np.float32))}
    )
    expect_raw_error(client, lambda: stub.Forward(wrong_shape, timeout=30), "'x'", "[2]", "[3]")


# ---------------------------------------------------------------------------------------------
# INVALID_ARGUMENT: the request


def test_non_scalar_output_without_seed(client):
    g = Graph()
    g.mul(g.input("x"), 2.0, name="v")
    expect_error(client, lambda: client.gradient(g, "v", {"x": f64(3)}), "'v'", "[3]", "seed")


def test_seed_of_the_wrong_shape(client):
    g = Graph()
    g.mul(g.input("x"), 2.0, name="v")
    expect_error(
        client,
        lambda: client.gradient(g, "v", {"x": f64(3)}, seed=np.ones(4)),
        "'v'",
        "[3]",
        "[4]",
        "seed",
    )


def test_seed_for_a_scalar_output_must_be_scalar(client):
    g = Graph()
    g.sum(g.input("x"), name="s")
    expect_error(
        client, lambda: client.gradient(g, "s", {"x": f64(3)}, seed=np.ones(3)), "'s'", "seed"
    )


def test_seed_with_a_bad_payload(client, stub):
    g = Graph()
    g.sum(g.input("x"), name="s")
    request = service_pb2.GradientRequest(
        graph=g.to_proto(),
        inputs={"x": to_proto(f64(3))},
        output="s",
        seed=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, data=b"\0" * 4),
    )
    expect_raw_error(client, lambda: stub.Gradient(request, timeout=30), "seed")


def test_output_naming_an_unknown_node(client):
    g = Graph()
    g.sum(g.input("x"), name="s")
    expect_error(client, lambda: client.gradient(g, "nowhere", {"x": f64(3)}), "'nowhere'")


def test_output_not_given(client):
    g = Graph()
    g.sum(g.input("x"), name="s")
    expect_error(client, lambda: client.gradient(g, "", {"x": f64(3)}), "output")


def test_int_output_for_gradient(client):
    g = Graph()
    g.sum(g.input("k"), name="total")
    expect_error(
        client,
        lambda: client.gradient(g, "total", {"k": np.arange(3, dtype=np.int64)}),
        "'total'",
        "int64",
    )


def test_bool_output_for_gradient(client):
    g = Graph()
    g.greater(g.input("x"), 0.0, name="positive")
    expect_error(
        client,
        lambda: client.gradient(g, "positive", {"x": 1.0}),
        "'positive'",
        "bool",
    )


def test_wrt_and_fetch_naming_unknown_nodes(client):
    g = Graph()
    g.sum(g.input("x"), name="s")
    expect_error(client, lambda: client.gradient(g, "s", {"x": f64(3)}, wrt=["ghost"]), "'ghost'")
    expect_error(
        client, lambda: client.gradient(g, "s", {"x": f64(3)}, fetch=["phantom"]), "'phantom'"
    )
    expect_error(client, lambda: client.forward(g, {"x": f64(3)}, fetch=["phantom"]), "'phantom'")


# ---------------------------------------------------------------------------------------------
# RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def limited() -> Iterator[GradientClient]:
    """A client on a server with tight limits."""
    server, port = create_server(
        "127.0.0.1:0", limits=Limits(max_nodes=10, max_tensor_elements=100, max_bytes=4000)
    )
    server.start()
    with GradientClient(f"127.0.0.1:{port}", timeout=30) as connected:
        yield connected
    server.stop(0)


def square_chain(length: int) -> tuple[graph_pb2.Graph, str]:
    """x -> square -> square -> ... : `length` nodes in all (no simplification shortens it)."""
    message = graph_pb2.Graph()
    message.nodes.add(name="x", op="input")
    previous = "x"
    for i in range(length - 1):
        name = f"n{i}"
        message.nodes.add(name=name, op="square", inputs=[previous])
        previous = name
    return message, previous


def test_node_limit(limited):
    fits, last = square_chain(10)
    assert float(limited.forward(fits, {"x": 1.0}, fetch=[last])[last]) == 1.0
    too_many, last = square_chain(11)
    details = expect_error(
        limited,
        lambda: limited.forward(too_many, {"x": 2.5}, fetch=[last]),
        "max_nodes",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "11" in details and "10" in details
    expect_error(
        limited,
        lambda: limited.gradient(too_many, last, {"x": 2.5}),
        "max_nodes",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def test_element_limit_on_a_feed(limited):
    g = Graph()
    g.sum(g.input("x"), name="s")
    assert float(limited.forward(g, {"x": np.ones(100)})["s"]) == 100.0
    expect_error(
        limited,
        lambda: limited.forward(g, {"x": np.ones(101)}),
        "max_tensor_elements",
        "'x'",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def test_element_limit_on_a_computed_node(limited):
    # Two 10-element feeds are fine, their 10 x 10 = 100 outer product too, 11 x 11 is not.
    g = Graph()
    g.sum(g.matmul(g.input("a"), g.input("b"), name="outer"), name="s")
    ok = limited.forward(g, {"a": np.ones((10, 1)), "b": np.ones((1, 10))})
    assert float(ok["s"]) == 100.0
    expect_error(
        limited,
        lambda: limited.forward(g, {"a": np.ones((11, 1)), "b": np.ones((1, 11))}),
        "max_tensor_elements",
        "'outer'",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def test_element_limit_on_a_constant(limited):
    g = Graph()
    g.sum(g.constant(np.ones(1000), name="big"), name="s")
    expect_error(
        limited,
        lambda: limited.forward(g),
        "max_tensor_elements",
        "'big'",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


@pytest.mark.parametrize(
    "shape",
    [(2**32, 2**32), (3, 2**62), (2**31, 2**31, 4), (2**32 + 1, 2**32)],
    ids=["2^64", "3*2^62", "2^31*2^31*4", "2^64+2^32"],
)
def test_element_limit_on_a_shape_whose_size_overflows_int64(client, shape):
    """A zeros node claiming more than 2**63 elements is over max_tensor_elements; its
    element count must not wrap around (to 0, negative or small) and slip past the limit."""
    g = Graph()
    g.zeros(shape, name="z")
    details = expect_error(
        client,
        lambda: client.forward(g),
        "'z'",
        "max_tensor_elements",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert str(int(np.prod(shape, dtype=object))) in details, details


def test_broadcast_of_a_scalar_to_a_huge_shape_is_refused_cleanly(client):
    g = Graph()
    g.broadcast_to(g.input("x"), (2**32, 2**32), name="b")
    with pytest.raises(GradientError) as info:
        client.forward(g, {"x": 1.0})
    assert_clean(info.value.code, info.value.details)
    assert info.value.code in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "'b'" in info.value.details
    assert_serves(client)


def test_byte_limit(limited):
    # Each node holds 100 float64 = 800 bytes; the limit is 4000 bytes. Values are charged
    # while they are alive: a chain fetching only its end holds the input, the value before
    # and the one being computed (2400 bytes) however long it is (up to max_nodes, 10).
    long_chain, last = square_chain(9)
    value = limited.forward(long_chain, {"x": np.ones(100)}, fetch=[last])[last]
    assert np.array_equal(value, np.ones(100))  # eight squares: 7200 bytes computed in all
    # Fetching every node keeps every value alive: 5 of them fit (4000 bytes), 6 do not.
    fits, _ = square_chain(5)  # x and four squares
    assert len(limited.forward(fits, {"x": np.ones(100)}).values) == 5
    over, last = square_chain(6)
    details = expect_error(
        limited,
        lambda: limited.forward(over, {"x": np.ones(100)}),
        "max_bytes",
        "4800 bytes",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert f"at node {last!r}" in details  # where the peak is


# ---------------------------------------------------------------------------------------------
# DEADLINE_EXCEEDED


def test_deadline_on_a_long_chain(client):
    message, last = square_chain(30_000)
    started = time.monotonic()
    details = expect_error(
        client,
        lambda: client.forward(message, {"x": 1.0}, fetch=[last], timeout=0.05),
        code=grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert "deadline" in details.lower()
    assert time.monotonic() - started < 30


def test_deadline_stops_the_work_between_ops():
    """With one worker thread, the next call is served soon after the deadline: the heavy
    call's remaining ops (about 10 s of matmuls) were not run."""
    server, port = create_server("127.0.0.1:0", threads=1)
    server.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=30) as one:
            size, count = 400, 2000
            g = Graph()
            w_node = h = g.input("w")
            for _ in range(count):
                h = g.matmul(h, w_node)
            w = np.eye(size)
            # Time one matmul to size the test: the full call must take far longer than 3 s.
            tick = time.perf_counter()
            for _ in range(5):
                w @ w
            per_op = (time.perf_counter() - tick) / 5
            if per_op * count < 6.0:  # a fast machine: make the matrices bigger
                size = int(size * (6.0 / (per_op * count)) ** (1 / 3)) + 1
                w = np.eye(size)
            with pytest.raises(GradientError) as info:
                one.forward(g, {"w": w}, fetch=[h], timeout=0.3)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            started = time.monotonic()
            assert_serves(one)
            assert time.monotonic() - started < 3.0
    finally:
        server.stop(0)


def test_concurrent_bad_and_good_requests(client, server_address):
    """Errors on some threads never disturb good calls on others."""
    failures: list[BaseException] = []

    def good():
        try:
            for _ in range(5):
                assert_serves(client)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    def bad():
        try:
            for _ in range(5):
                g = Graph()
                g.op("nope", g.input("x"), name="bad")
                with pytest.raises(GradientError) as info:
                    client.forward(g, {"x": 1.0})
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        except BaseException as e:  # noqa: BLE001
            failures.append(e)

    threads = [threading.Thread(target=f) for f in (good, bad, good, bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# INVALID_ARGUMENT: odd attributes and shapes that numpy itself would refuse


def _odd_graphs():
    def build(op, feed_shape, **attrs):
        g = Graph()
        x = g.input("x")
        extra = [g.constant(np.array([0, 1]))] if op == "scatter_add" else []
        g.op(op, x, *extra, name="bad", **attrs)
        return g, {"x": np.zeros(feed_shape)}

    return {
        "reshape-rank-65": build("reshape", (1,), shape=[1] * 65),
        "expand_dims-70-axes": build("expand_dims", (1,), axis=list(range(70))),
        "scatter_add-negative-shape": build("scatter_add", (2,), shape=[-3]),
        "unslice-negative-shape": build("unslice", (0,), shape=[-1], starts=[0], stops=[1]),
        "var-ddof-too-large": build("var", (3,), ddof=3),
        "var-negative-ddof": build("var", (3,), ddof=-1),
    }


@pytest.mark.parametrize("case", list(_odd_graphs()))
def test_odd_attributes_are_invalid_arguments(client, case):
    graph, feeds = _odd_graphs()[case]
    expect_error(client, lambda: client.forward(graph, feeds), "'bad'")
    if case.startswith("var"):
        expect_error(client, lambda: client.gradient(graph, "bad", feeds), "'bad'")


def test_int_pad_with_nan_is_an_invalid_argument(client):
    g = Graph()
    g.pad(g.input("k"), [1, 1], value=float("nan"), name="bad")
    expect_error(client, lambda: client.forward(g, {"k": np.array([1, 2])}), "'bad'", "int64")


@pytest.mark.parametrize("shape", [[1] * 65, [0, 2**62 + 1]])
def test_tensor_shapes_numpy_cannot_hold(client, stub, shape):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=shape)
    if 0 not in shape:
        tensor.data = bytes(8)
    expect_raw_error(client, lambda: raw_forward(stub, tensor), "input 'x'")


def test_softmax_over_an_empty_axis(client):
    g = Graph()
    out = g.softmax(g.input("x"), name="out")
    result = client.gradient(g, out, {"x": np.zeros((2, 0))}, seed=np.zeros((2, 0)))
    assert result.values["out"].shape == (2, 0) and result.gradients["x"].shape == (2, 0)


def test_kernels_with_too_many_positions_are_invalid_arguments(client):
    g = Graph()
    g.avg_pool2d_grad(
        g.input("g"),
        name="bad",
        input_shape=[1, 1, 1, 1],
        kernel=[2800, 2800],
        padding=[1400, 1400],
    )
    expect_error(
        client, lambda: client.forward(g, {"g": np.ones((1, 1, 1, 1))}), "'bad'", "positions"
    )


# ---------------------------------------------------------------------------------------------
# Status messages stay bounded: gRPC clients drop a status message near 16 KiB (and report
# RESOURCE_EXHAUSTED instead of the server's code), so whatever a request echoes is cut


def _cycle(length: int) -> graph_pb2.Graph:
    return graph_of(*(node(f"n{i}", "neg", f"n{(i + 1) % length}") for i in range(length)))


def _long_list_reshape(values: list[int]) -> graph_pb2.Graph:
    reshape = node("r", "reshape", "x")
    reshape.attrs["shape"].ints.values.extend(values)
    return graph_of(node("x", "input"), reshape)


@pytest.mark.parametrize(
    "graph, fragments",
    [
        (_cycle(2000), ["node 'n0' (op neg) is on a cycle", "characters cut"]),
        (graph_of(node("x" * 100_000, "neg", "missing")), ["(op neg)", "'missing'"]),
        (graph_of(node("a", "o" * 100_000)), ["node 'a': unknown op 'ooo"]),
        (
            _long_list_reshape([1] * 1_000_000),
            ["node 'r' (op reshape): attribute 'shape' lists 1000000 values; at most 128"],
        ),
        (
            _long_list_reshape([10**18] * 128),
            ["node 'r' (op reshape): cannot reshape [3]", "characters cut"],
        ),
    ],
    ids=[
        "cycle of 2000 nodes",
        "100 KB node name",
        "100 KB op name",
        "1M-long attribute",
        "128 huge dimensions",
    ],
)
def test_status_messages_are_bounded_yet_name_the_node(client, stub, graph, fragments):
    request = service_pb2.ForwardRequest(graph=graph, inputs={"x": to_proto(np.zeros(3))})
    details = expect_raw_error(client, lambda: stub.Forward(request, timeout=60), *fragments)
    assert len(details.encode()) <= 1024


@pytest.mark.parametrize("size", [1, 1023, 1024, 1025, 5000, 100_000])
@pytest.mark.parametrize("character", ["x", "é", "☃"])
def test_bounded_keeps_short_messages_and_cuts_long_ones_to_1_KiB(size, character):
    text = "start " + character * size + " end"
    cut = bounded(text)
    if len(text.encode()) <= 1024:
        assert cut == text
    else:
        assert len(cut.encode()) <= 1024
        assert cut.startswith("start ") and cut.endswith(" end") and "characters cut]" in cut
