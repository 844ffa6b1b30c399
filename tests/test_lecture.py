"""The backpropagation lecture's numbers, exactly (DESIGN.md section 7)."""

from __future__ import annotations

import numpy as np
import pytest

from gradient_client import Graph

EXACT = 1e-12


def test_scalar_example_every_node(client):
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    q = g.add(x, y, name="q")
    f = g.mul(q, z, name="f")
    r = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})
    expected_values = {"x": -2.0, "y": 5.0, "z": -4.0, "q": 3.0, "f": -12.0}
    expected_gradients = {"f": 1.0, "q": -4.0, "z": 3.0, "x": -4.0, "y": -4.0}
    assert set(r.values) == set(expected_values)
    assert set(r.gradients) == set(expected_gradients)
    for name, value in expected_values.items():
        assert r.values[name].shape == ()
        assert r.values[name] == pytest.approx(value, abs=EXACT)
    for name, value in expected_gradients.items():
        assert r.gradients[name].dtype == np.float64
        assert r.gradients[name] == pytest.approx(value, abs=EXACT)


def test_operator_overloads_build_the_same_graph(client):
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = (x + y) * z
    r = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0}, wrt=[x, y, z])
    assert [float(r.gradients[n]) for n in "xyz"] == [-4.0, -4.0, 3.0]


@pytest.mark.parametrize(
    ("gate", "a", "b", "grad_a", "grad_b"),
    [
        # add distributes the upstream gradient unchanged to both inputs
        ("add", 3.0, -1.5, 2.0, 2.0),
        # max routes all of it to the larger input
        ("maximum", 3.0, -1.5, 2.0, 0.0),
        ("maximum", -4.0, 7.0, 0.0, 2.0),
        # ... and a tie splits it evenly (the PyTorch / JAX convention)
        ("maximum", 2.5, 2.5, 1.0, 1.0),
        # mul swaps: each input gets the upstream gradient times the other input
        ("mul", 3.0, -1.5, 2.0 * -1.5, 2.0 * 3.0),
    ],
)
def test_gates(client, gate, a, b, grad_a, grad_b):
    g = Graph()
    x, y = g.input("a"), g.input("b")
    out = g.op(gate, x, y, name="out")
    r = client.gradient(g, output=out, inputs={"a": a, "b": b}, seed=np.float64(2.0))
    assert float(r.gradients["a"]) == pytest.approx(grad_a, abs=EXACT)
    assert float(r.gradients["b"]) == pytest.approx(grad_b, abs=EXACT)


def test_vectorized_example(client):
    g = Graph()
    W, x = g.input("W"), g.input("x")
    q = g.matmul(W, x, name="q")
    f = g.sum(g.square(q), name="f")
    W_value = np.array([[0.1, 0.5], [-0.3, 0.8]])
    x_value = np.array([0.2, 0.4])
    r = client.gradient(g, output=f, inputs={"W": W_value, "x": x_value})
    np.testing.assert_allclose(r.values["q"], [0.22, 0.26], rtol=0, atol=EXACT)
    assert float(r.values["f"]) == pytest.approx(0.116, abs=EXACT)
    np.testing.assert_allclose(r.gradients["q"], [0.44, 0.52], rtol=0, atol=EXACT)
    # dF/dW_ij = 2 q_i x_j (the lecture's figure shows this transposed)
    np.testing.assert_allclose(
        r.gradients["W"], [[0.088, 0.176], [0.104, 0.208]], rtol=0, atol=EXACT
    )
    np.testing.assert_allclose(r.gradients["x"], [-0.112, 0.636], rtol=0, atol=EXACT)
