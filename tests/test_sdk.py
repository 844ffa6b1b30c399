"""The SDK's graph builder: one method per op, operators, constants, names."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradient_client import GradientError, Graph
from gradient_server.ops import OPS


def test_every_server_op_has_a_builder_method_with_a_docstring():
    for name in OPS:
        method = getattr(Graph, name, None)
        assert callable(method), f"Graph has no method for op {name!r}"
        assert inspect.getdoc(method), f"Graph.{name} has no docstring"


def test_operators_match_numpy(client):
    g = Graph()
    a, b = g.input("a"), g.input("b")
    nodes = {
        "add": a + b,
        "radd": 2.0 + a,
        "sub": a - b,
        "rsub": 1.0 - a,
        "mul": a * b,
        "rmul": 3 * a,
        "div": a / b,
        "rdiv": 1.0 / b,
        "pow": a**2,
        "rpow": 2.0**a,
        "neg": -a,
        "matmul": a @ b,
        "rmatmul": np.eye(2) @ a,
    }
    a_value, b_value = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.5, -1.0], [2.0, 0.25]])
    values = client.forward(g, {"a": a_value, "b": b_value}).values
    expected = {
        "add": a_value + b_value,
        "radd": 2.0 + a_value,
        "sub": a_value - b_value,
        "rsub": 1.0 - a_value,
        "mul": a_value * b_value,
        "rmul": 3 * a_value,
        "div": a_value / b_value,
        "rdiv": 1.0 / b_value,
        "pow": a_value**2,
        "rpow": 2.0**a_value,
        "neg": -a_value,
        "matmul": a_value @ b_value,
        "rmatmul": a_value,
    }
    for key, node in nodes.items():
        np.testing.assert_allclose(values[node.name], expected[key], rtol=1e-15, err_msg=key)


def test_python_numbers_are_weak_and_arrays_are_strong(client):
    g = Graph()
    x = g.input("x", dtype="float32")
    weak = x * 2.5
    strong = x * np.float64(2.5)
    values = client.forward(g, {"x": [1.0, 2.0]}).values
    assert values[weak.name].dtype == np.float32
    assert values[strong.name].dtype == np.float64


def test_generated_names_are_unique_and_given_names_are_kept():
    g = Graph()
    x = g.input("x")
    y = g.exp(x)
    z = g.exp(y, name="z")
    assert len({x.name, y.name, z.name}) == 3 and z.name == "z" and g["z"] is z
    with pytest.raises(ValueError, match="already has a node named 'z'"):
        g.exp(x, name="z")


def test_nodes_of_another_graph_are_refused():
    a, b = Graph(), Graph()
    with pytest.raises(ValueError, match="another graph"):
        a.exp(b.input("x"))


def test_from_proto_round_trip():
    g = Graph()
    x = g.input("x")
    g.sum(g.exp(x), axis=0, keepdims=True, name="s")
    again = Graph.from_proto(g.to_proto())
    assert again.to_proto() == g.to_proto()
    assert [n.name for n in again.nodes] == [n.name for n in g.nodes]


def test_errors_carry_code_and_details(client):
    g = Graph()
    g.op("no_such_op", g.input("x"), name="bad")
    with pytest.raises(GradientError) as caught:
        client.forward(g, {"x": 1.0})
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert "'bad'" in caught.value.details and "no_such_op" in caught.value.details


def test_sdk_type_checks_with_mypy():
    root = Path(__file__).resolve().parent.parent
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml")],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_sdk_imports_only_grpc_protobuf_and_numpy():
    # grpc itself imports its companions (health, reflection...) when they are installed, so
    # the baseline is what `import grpc, numpy, google.protobuf` brings; the SDK adds nothing
    # beyond its own packages and the standard library.
    code = (
        "import sys\n"
        "import grpc, numpy, google.protobuf\n"
        "before = set(sys.modules)\n"
        "import gradient_client, gradient_client.cli, gradient_client.drawing\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "allowed = {'gradient', 'gradient_client', 'google', 'grpc', 'numpy'}\n"
        "print(sorted(added - allowed - set(sys.stdlib_module_names)))\n"
    )
    imported = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "[]", imported.stdout


@pytest.mark.parametrize(
    "value", [["a", "b"], np.array([1, 2], np.uint8), np.float16(1.0), [[1.0], [2.0, 3.0]], 1j]
)
def test_inputs_the_wire_cannot_carry_raise_gradient_error(client, value):
    g = Graph()
    g.neg(g.input("x"))
    with pytest.raises(GradientError) as caught:
        client.forward(g, {"x": value})
    assert caught.value.code.name == "INVALID_ARGUMENT" and "'x'" in caught.value.details


def test_hessian_of_an_input_that_is_not_fed_raises_gradient_error(client):
    g = Graph()
    f = g.sum(g.square(g.input("x")))
    with pytest.raises(GradientError, match="wrt names"):
        client.hessian(g, f, {"x": [1.0, 2.0]}, wrt=["y"])


def test_single_attribute_methods_take_the_attribute_by_name(client):
    g = Graph()
    x = g.input("x")
    nodes = [
        g.reshape(x, shape=[3, 2]),
        g.transpose(g.reshape(x, [2, 3]), axes=[1, 0]),
        g.cast(x, dtype="float32"),
        g.expand_dims(x, axis=np.int64(0)),
        g.squeeze(g.reshape(x, [1, 6]), axis=0),
        g.broadcast_to(x, shape=[2, 6]),
        g.sum_to_shape(x, shape=[1]),
        g.sum(x, axis=np.int64(0)),
    ]
    values = client.forward(g, {"x": np.arange(6.0)}).values
    shapes = [values[n.name].shape for n in nodes]
    assert shapes == [(3, 2), (3, 2), (6,), (1, 6), (6,), (2, 6), (1,), ()]
    assert values[nodes[2].name].dtype == np.float32
