"""Second (and third) derivatives: the backward pass is a graph, so it can be differentiated.

- Exact values: d²/dx² x³ = 6x (through the returned gradient graph and through HVP), the
  lecture's f(x, W) = ||W·x||² (its Hessian in x, in W and the mixed blocks against the closed
  form), and a gradient penalty ||∇_x f||² differentiated with respect to the parameters.
- GradientGraph: forward on the returned graph gives the gradients of Gradient bit for bit
  (MLP with cross-entropy, conv2d + max_pool2d, broadcasting, fan-out, float32), names a
  gradient node for every requested node and lists the integer nodes as skipped.
- A table-driven row for every op of the op table (read at test time): the server's H·v of
  f = sum(seed * op(inputs)) and of f = sum(seed * op(inputs)²) against central differences
  of the in-process engine's gradient along v, in float64. The squared form makes the second
  derivative go through the op's own gradient rule (and, for the adjoint ops, through theirs).
  Ops with no row are in NO_SECOND_ORDER with the reason; a coverage test checks that.
- The edges of H·v: inputs off the float path, one-element outputs, mixed precision and
  casts between float dtypes, a 10,000-deep graph, prod at zeros (a polynomial: smooth there),
  finite second derivatives at logits of +-1000, and float32 graphs.
- Random compositions of smooth ops: H·v against central differences, and H symmetric.
- Third order: the gradient graph of a gradient graph, d³/dx³ of sum(x⁴) = 24x, and H·v of
  gradient penalties (conv2d, pooling, slicing, take) against central differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from gradcheck import (
    NOT_DIFFERENTIABLE,
    Domain,
    boolean,
    distinct,
    distinct_shifted,
    integers,
    nonzero,
    positive,
    real,
    rng_for,
)

from gradient_client import GradientError, Graph
from gradient_client.graph import Node
from gradient_server.engine import Engine
from gradient_server.ops import OPS

EPS = 1e-5
"""Step of the central differences of the gradient along v (float64)."""

RTOL = 1e-5
ATOL = 1e-5
"""H·v against central differences of the gradient."""

Shape = tuple[int, ...]


def fd_hvp(
    engine: Engine,
    graph: Graph,
    feeds: Mapping[str, np.ndarray],
    output: str | Node,
    vector: Mapping[str, np.ndarray],
    eps: float = EPS,
) -> dict[str, np.ndarray]:
    """Central differences of the engine's gradient of `output` along `vector`.

    (∇f(x + eps·v) - ∇f(x - eps·v)) / (2·eps), with ∇ over every float feed; inputs missing
    from `vector` are not moved.
    """
    loaded = engine.load_graph(graph.to_proto())
    output = getattr(output, "name", output)
    names = [n for n, v in feeds.items() if np.asarray(v).dtype.kind == "f"]
    plus = {**feeds, **{n: feeds[n] + eps * v for n, v in vector.items()}}
    minus = {**feeds, **{n: feeds[n] - eps * v for n, v in vector.items()}}
    g_plus = engine.gradient(loaded, plus, output, wrt=names).gradients
    g_minus = engine.gradient(loaded, minus, output, wrt=names).gradients
    return {n: (g_plus[n] - g_minus[n]) / (2 * eps) for n in names}


def assert_hvp_matches_fd(client, engine, graph, feeds, output, vector, rtol=RTOL, atol=ATOL):
    """The server's H·v equals central differences of the gradient, for every float input;
    returns H·v."""
    product = client.hvp(graph, output, inputs=feeds, vector=vector)
    expected = fd_hvp(engine, graph, feeds, output, vector)
    assert set(product) == set(expected)
    for name, part in product.items():
        assert part.shape == np.shape(feeds[name]), name
        assert part.dtype == np.float64, name
        np.testing.assert_allclose(
            part, expected[name], rtol=rtol, atol=atol, err_msg=f"(H·v) of {name}"
        )
    return product


# ---------------------------------------------------------------------------------------------
# 1. Exact values, and the edges of H·v


def test_second_derivative_of_cube_through_the_gradient_graph(client):
    x_value = np.array([-1.5, -0.2, 0.0, 0.7, 2.0])
    g = Graph()
    x = g.input("x")
    f = g.sum(x * x * x, name="f")

    gg = client.gradient_graph(g, f, inputs={"x": x_value}, wrt=[x])
    extended = Graph.from_proto(gg.graph)
    dx = extended[gg.gradients["x"]]
    # d/dx_i sum(3 x²) = 6 x_i: each x_i only meets itself.
    total = extended.sum(dx, name="total_dx")
    feeds = {"x": x_value, gg.seed: np.ones(())}
    result = client.gradient(extended, total, inputs=feeds, wrt=["x"], fetch=[dx, total])

    np.testing.assert_allclose(result.values[dx.name], 3 * x_value**2, rtol=1e-15, atol=0)
    np.testing.assert_allclose(result.gradients["x"], 6 * x_value, rtol=1e-15, atol=0)


def test_second_derivative_of_cube_by_hvp(client):
    x_value = np.array([-1.5, -0.2, 0.0, 0.7, 2.0])
    v = np.array([1.0, -2.0, 3.0, 0.5, -1.0])
    g = Graph()
    x = g.input("x")
    f = g.sum(g.pow(x, 3.0), name="f")

    product = client.hvp(g, f, inputs={"x": x_value}, vector={"x": v})
    ones = client.hvp(g, f, inputs={"x": x_value}, vector={"x": np.ones(5)})
    hessian = client.hessian(g, f, inputs={"x": x_value}, wrt=["x"])

    np.testing.assert_allclose(product["x"], 6 * x_value * v, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ones["x"], 6 * x_value, rtol=1e-14, atol=1e-15)
    assert hessian.shape == (5, 5)
    np.testing.assert_allclose(hessian, np.diag(6 * x_value), rtol=1e-14, atol=1e-15)


def test_lecture_gates_hessian_is_exact(client):
    # f = (x + y)·z is bilinear: ∂²f/∂x∂z = ∂²f/∂y∂z = 1, everything else 0.
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = g.mul(g.add(x, y), z, name="f")
    inputs = {"x": np.float64(-2.0), "y": np.float64(5.0), "z": np.float64(-4.0)}

    hessian = client.hessian(g, f, inputs=inputs, wrt=["x", "y", "z"])

    expected = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(hessian, expected)


W_LECTURE = np.array([[0.1, 0.5], [-0.3, 0.8]])
X_LECTURE = np.array([0.2, 0.4])


def _lecture_graph() -> tuple[Graph, Node]:
    g = Graph()
    w, x = g.input("W"), g.input("x")
    f = g.sum(g.square(g.matmul(w, x)), name="f")
    return g, f


def test_lecture_hessian_in_x_is_2_wt_w(client):
    g, f = _lecture_graph()
    inputs = {"W": W_LECTURE, "x": X_LECTURE}

    hessian = client.hessian(g, f, inputs=inputs, wrt=["x"])

    assert hessian.shape == (2, 2)
    expected = 2 * W_LECTURE.T @ W_LECTURE  # [[0.2, -0.38], [-0.38, 1.78]]
    np.testing.assert_allclose(expected, [[0.2, -0.38], [-0.38, 1.78]], rtol=1e-14)
    np.testing.assert_allclose(hessian, expected, rtol=1e-14, atol=1e-16)


def test_lecture_hessian_in_w_and_mixed_blocks(client):
    g, f = _lecture_graph()
    inputs = {"W": W_LECTURE, "x": X_LECTURE}
    q = W_LECTURE @ X_LECTURE
    eye = np.eye(2)
    # ∂f/∂W_ij = 2 q_i x_j, so ∂²f/∂W_ij∂W_kl = 2 δ_ik x_j x_l and
    # ∂²f/∂W_ij∂x_m = 2 W_im x_j + 2 q_i δ_jm; ∂²f/∂x∂x = 2 WᵀW.
    h_ww = 2 * np.einsum("ik,j,l->ijkl", eye, X_LECTURE, X_LECTURE)
    h_wx = 2 * np.einsum("im,j->ijm", W_LECTURE, X_LECTURE) + 2 * np.einsum("i,jm->ijm", q, eye)
    h_xx = 2 * W_LECTURE.T @ W_LECTURE

    hessian_w = client.hessian(g, f, inputs=inputs, wrt=["W"])
    full = client.hessian(g, f, inputs=inputs, wrt=["W", "x"])

    assert hessian_w.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(hessian_w, h_ww, rtol=1e-14, atol=1e-16)
    assert full.shape == (6, 6)
    np.testing.assert_allclose(full[:4, :4], h_ww.reshape(4, 4), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(full[:4, 4:], h_wx.reshape(4, 2), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(full[4:, :4], h_wx.reshape(4, 2).T, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(full[4:, 4:], h_xx, rtol=1e-14, atol=1e-16)
    # A single H·v in both inputs at once agrees with the assembled matrix.
    v = {"W": np.array([[1.0, -2.0], [0.5, 3.0]]), "x": np.array([-1.0, 2.0])}
    product = client.hvp(g, f, inputs=inputs, vector=v)
    flat = full @ np.concatenate([v["W"].reshape(-1), v["x"]])
    np.testing.assert_allclose(product["W"].reshape(-1), flat[:4], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(product["x"], flat[4:], rtol=1e-14, atol=1e-15)


def _tanh_layer(g: Graph) -> Node:
    # f(x; W, b) = sum(tanh(x @ W + b)): a one-layer network.
    x, w, b = g.input("x"), g.input("W"), g.input("b")
    return g.sum(g.tanh(g.add(g.matmul(x, w), b)), name="f")


def _penalty_graph() -> tuple[Graph, Node]:
    g = Graph()
    return g, _tanh_layer(g)


def test_gradient_penalty_matches_finite_differences(client, engine):
    rng = rng_for("gradient-penalty")
    inputs = {
        "x": rng.uniform(-1, 1, (4, 3)),
        "W": rng.uniform(-1, 1, (3, 2)),
        "b": rng.uniform(-1, 1, (2,)),
    }
    g, f = _penalty_graph()

    # P(W, b) = ||∇_x f||², built on the returned backward graph and differentiated again.
    gg = client.gradient_graph(g, f, inputs=inputs, wrt=["x"])
    extended = Graph.from_proto(gg.graph)
    grad_x = extended[gg.gradients["x"]]
    penalty = extended.sum(extended.square(grad_x), name="penalty")
    feeds = {**inputs, gg.seed: np.ones(())}
    result = client.gradient(extended, penalty, inputs=feeds, wrt=["W", "b"], fetch=[penalty])

    loaded = engine.load_graph(g.to_proto())

    def p(values: Mapping[str, np.ndarray]) -> float:
        gx = engine.gradient(loaded, values, f.name, wrt=["x"]).gradients["x"]
        return float(np.sum(gx * gx))

    assert result.values["penalty"] == pytest.approx(p(inputs), rel=1e-14)
    for name in ("W", "b"):
        expected = np.zeros_like(inputs[name])
        for index in np.ndindex(inputs[name].shape):
            plus, minus = inputs[name].copy(), inputs[name].copy()
            plus[index] += 1e-6
            minus[index] -= 1e-6
            expected[index] = (p({**inputs, name: plus}) - p({**inputs, name: minus})) / 2e-6
        assert result.gradients[name].shape == inputs[name].shape
        np.testing.assert_allclose(result.gradients[name], expected, rtol=1e-7, atol=1e-9)

    # The same thing as a mixed Hessian-vector product: ∇_θ P = 2 H_θx ∇_x f.
    grad_x_value = client.gradient(g, f, inputs=inputs, wrt=["x"]).gradients["x"]
    product = client.hvp(g, f, inputs=inputs, vector={"x": 2 * grad_x_value})
    for name in ("W", "b"):
        np.testing.assert_allclose(product[name], result.gradients[name], rtol=1e-12, atol=1e-14)


def test_vjp_of_a_gradient_node_is_a_hessian_vector_product(client):
    # Gradient on the returned graph with the gradient node itself as the output and a seed
    # v gives vᵀ·∂(∇_x f)/∂θ for every θ: the x row of the Hessian times v, i.e. H·(v on x).
    rng = rng_for("vjp-of-a-gradient-node")
    inputs = {
        "x": rng.uniform(-1, 1, (4, 3)),
        "W": rng.uniform(-1, 1, (3, 2)),
        "b": rng.uniform(-1, 1, (2,)),
    }
    v = rng.standard_normal((4, 3))
    g, f = _penalty_graph()
    gg = client.gradient_graph(g, f, inputs=inputs, wrt=["x"])

    result = client.gradient(
        gg.graph,
        gg.gradients["x"],
        inputs={**inputs, gg.seed: np.ones(())},
        wrt=["x", "W", "b"],
        seed=v,
    )
    product = client.hvp(g, f, inputs=inputs, vector={"x": v})

    for name in ("x", "W", "b"):
        np.testing.assert_allclose(
            result.gradients[name], product[name], rtol=1e-12, atol=1e-14, err_msg=name
        )


def test_hvp_is_zero_for_inputs_off_the_float_path(client):
    # f = sum(x³) + sum(float(int(t)) * x): t only reaches f through an integer (piecewise
    # constant), `unused` not at all, and k is an integer input (not in the Hessian).
    x_value = np.array([0.5, -1.25, 2.0])
    g = Graph()
    x, t, k = g.input("x"), g.input("t"), g.input("k")
    g.input("unused")
    through_int = g.cast(g.add(g.cast(t, "int64"), k), "float64")
    f = g.add(g.sum(g.pow(x, 3.0)), g.sum(g.mul(through_int, x)), name="f")
    inputs = {
        "x": x_value,
        "t": np.array([1.7, -0.3, 2.2]),
        "k": np.array([1, 2, 3]),
        "unused": np.array([[1.0, 2.0]]),
    }
    vector = {"x": np.array([1.0, 2.0, -1.0]), "t": np.ones(3), "unused": np.ones((1, 2))}

    product = client.hvp(g, f, inputs=inputs, vector=vector)

    assert set(product) == {"x", "t", "unused"}
    np.testing.assert_allclose(product["x"], 6 * x_value * vector["x"], rtol=1e-14)
    np.testing.assert_array_equal(product["t"], np.zeros(3))
    np.testing.assert_array_equal(product["unused"], np.zeros((1, 2)))


def test_hvp_of_a_one_element_output(client):
    # An output of shape (1, 1) holds one element: its H·v is that of the scalar.
    x_value = np.array([0.5, -1.25, 2.0])
    v = np.array([1.0, 2.0, -1.0])
    g = Graph()
    x = g.input("x")
    f = g.reshape(g.sum(g.pow(x, 3.0)), [1, 1], name="f")

    product = client.hvp(g, f, inputs={"x": x_value}, vector={"x": v})

    np.testing.assert_allclose(product["x"], 6 * x_value * v, rtol=1e-14)


@pytest.mark.parametrize("directions", [["x", "w"], ["x"], ["w"]], ids="+".join)
def test_hvp_with_mixed_precision_inputs(client, directions):
    # x is float32 and w float64: x * w computes in float64, and each part of H·v comes back
    # in its input's dtype, close to the all-float64 product on the same numbers.
    rng = rng_for("hvp-mixed-precision")
    x32 = rng.uniform(-1, 1, (2, 3)).astype(np.float32)
    w = rng.uniform(-1, 1, (3,))
    vector = {"x": rng.standard_normal((2, 3)), "w": rng.standard_normal(3)}
    vector = {name: vector[name] for name in directions}
    g = Graph()
    f = g.sum(g.square(g.tanh(g.mul(g.input("x"), g.input("w")))), name="f")

    mixed = client.hvp(g, f, inputs={"x": x32, "w": w}, vector=vector)
    wide = client.hvp(g, f, inputs={"x": x32.astype(np.float64), "w": w}, vector=vector)

    assert mixed["x"].dtype == np.float32
    assert mixed["w"].dtype == np.float64
    np.testing.assert_allclose(mixed["x"], wide["x"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed["w"], wide["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("source", "target"),
    [("float32", "float64"), ("float64", "float32")],
    ids=["float32-to-float64", "float64-to-float32"],
)
def test_hvp_through_a_cast_between_float_dtypes(client, source, target):
    # f = sum(cast(x)³): H = diag(6x), whatever the dtype of x and of the output.
    x_value = np.array([0.5, -1.0, 2.0], dtype=source)
    v = np.array([1.0, 2.0, -1.0])
    g = Graph()
    x = g.input("x")
    f = g.sum(g.pow(g.cast(x, target), 3.0), name="f")

    product = client.hvp(g, f, inputs={"x": x_value}, vector={"x": v})
    hessian = client.hessian(g, f, inputs={"x": x_value}, wrt=["x"])

    assert product["x"].dtype == np.dtype(source)
    np.testing.assert_allclose(product["x"], 6 * x_value * v, rtol=1e-6)
    np.testing.assert_allclose(hessian, np.diag(6 * x_value), rtol=1e-6, atol=1e-6)


def test_hvp_of_a_deep_graph(client):
    # 10,000 chained adds: no recursion anywhere in the two backward passes.
    depth = 10_000
    x_value = np.array([0.5, -1.0, 2.0])
    v = np.array([1.0, 2.0, -1.0])
    g = Graph()
    y = g.input("x")
    for _ in range(depth):
        y = g.add(y, 0.001)
    f = g.sum(g.mul(g.mul(y, y), y), name="f")

    product = client.hvp(g, f, inputs={"x": x_value}, vector={"x": v})

    np.testing.assert_allclose(product["x"], 6 * (x_value + 0.001 * depth) * v, rtol=1e-9)


def _prod_hessian(x: np.ndarray) -> np.ndarray:
    """∂²prod(x)/∂x_i∂x_j: the product of the other elements for i != j, 0 on the diagonal."""
    n = x.size
    hessian = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                hessian[i, j] = np.prod(np.delete(x, [i, j]))
    return hessian


@pytest.mark.parametrize(
    "x_value",
    [[2.0, 5.0, 3.0], [2.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, -1.5, 0.5, 2.0]],
    ids=lambda x: ",".join(f"{v:g}" for v in x),
)
def test_prod_hessian_is_exact_also_at_zeros(client, x_value):
    # prod is a polynomial, smooth everywhere: its Hessian at a zero is no special case.
    x_value = np.array(x_value)
    g = Graph()
    f = g.prod(g.input("x"), name="f")

    hessian = client.hessian(g, f, inputs={"x": x_value}, wrt=["x"])

    np.testing.assert_allclose(hessian, _prod_hessian(x_value), rtol=1e-14, atol=1e-15)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _logsumexp_hessian(x: np.ndarray) -> np.ndarray:
    """diag(p) - p pᵀ for p = softmax(x), per row of a matrix (rows are independent)."""
    rows = np.atleast_2d(x)
    hessian = np.zeros(rows.shape + rows.shape)
    for r, p in enumerate(_softmax(rows)):
        hessian[r, :, r, :] = np.diag(p) - np.outer(p, p)
    return hessian.reshape(x.shape + x.shape)


SATURATION = [
    # (id, f as a function of the input node, x, closed-form Hessian): finite at +-1000.
    (
        "softplus",
        lambda g, x: g.sum(g.softplus(x)),
        [-1000.0, 0.0, 1.0, 1000.0],
        lambda x: np.diag(_sigmoid(x) * (1 - _sigmoid(x))),
    ),
    (
        "sigmoid",
        lambda g, x: g.sum(g.sigmoid(x)),
        [-1000.0, 0.0, 1.0, 1000.0],
        lambda x: np.diag(_sigmoid(x) * (1 - _sigmoid(x)) * (1 - 2 * _sigmoid(x))),
    ),
    (
        "tanh",
        lambda g, x: g.sum(g.tanh(x)),
        [-1000.0, 0.5, 1000.0],
        lambda x: np.diag(-2 * np.tanh(x) * (1 - np.tanh(x) ** 2)),
    ),
    ("logsumexp", lambda g, x: g.logsumexp(x), [1000.0, 1000.0, -1000.0], _logsumexp_hessian),
    (
        # sum(c * log_softmax(x)) = c·x - sum(c)·logsumexp(x)
        "log_softmax",
        lambda g, x: g.sum(g.mul(g.log_softmax(x), np.array([1.0, 2.0, 3.0]))),
        [1000.0, 1000.0, -1000.0],
        lambda x: -6 * _logsumexp_hessian(x),
    ),
    (
        # Per row, logsumexp(logits) - logits[label]: the label term is linear.
        "cross_entropy",
        lambda g, x: g.cross_entropy(x, g.constant(np.array([2, 0, 1])), reduction="sum"),
        [[1000.0, 1000.0, -1000.0], [0.0, 0.0, 1000.0], [-1000.0, 0.0, 1000.0]],
        _logsumexp_hessian,
    ),
]


@pytest.mark.parametrize(
    ("build", "x_value", "expected"),
    [pytest.param(b, x, e, id=i) for i, b, x, e in SATURATION],
)
def test_second_derivatives_are_finite_at_saturation(client, build, x_value, expected):
    x_value = np.array(x_value)
    g = Graph()
    f = build(g, g.input("x"))

    hessian = client.hessian(g, f, inputs={"x": x_value}, wrt=["x"])

    assert np.all(np.isfinite(hessian))
    want = expected(x_value)
    assert hessian.shape == want.shape
    np.testing.assert_allclose(hessian, want, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# 2. GradientGraph: the backward pass as a graph


@dataclass(frozen=True)
class GraphCase:
    id: str
    build: Callable[[Graph], Node]
    """Builds the graph on a fresh builder and returns the output node."""
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    int_inputs: tuple[str, ...] = ()
    output_seed: bool = False
    """A non-scalar output: differentiate sum(seed * output) with a random seed."""


def _mlp(g: Graph) -> Node:
    x, w1, b1 = g.input("x"), g.input("W1"), g.input("b1")
    w2, b2, labels = g.input("W2"), g.input("b2"), g.input("labels")
    hidden = g.relu(g.add(g.matmul(x, w1), b1))
    logits = g.add(g.matmul(hidden, w2), b2)
    return g.cross_entropy(logits, labels, name="loss")


def _mlp_inputs(dtype: str) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    def draw(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "x": rng.standard_normal((8, 4)).astype(dtype),
            "W1": rng.standard_normal((4, 5)).astype(dtype),
            "b1": rng.standard_normal((5,)).astype(dtype),
            "W2": rng.standard_normal((5, 3)).astype(dtype),
            "b2": rng.standard_normal((3,)).astype(dtype),
            "labels": rng.integers(0, 3, (8,)),
        }

    return draw


def _convnet(g: Graph) -> Node:
    x, w, bias = g.input("x"), g.input("w"), g.input("bias")
    conv = g.add(g.conv2d(x, w, padding=1), bias)
    pooled = g.max_pool2d(g.relu(conv), kernel=2)
    return g.mean(g.square(pooled), name="loss")


def _convnet_inputs(dtype: str) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    def draw(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            # Distinct values: no ties in the pooling windows.
            "x": distinct(rng, (2, 1, 6, 6)).astype(dtype),
            "w": rng.standard_normal((2, 1, 3, 3)).astype(dtype),
            "bias": rng.standard_normal((1, 2, 1, 1)).astype(dtype),
        }

    return draw


def _broadcasting(g: Graph) -> Node:
    a, b, c, d = g.input("a"), g.input("b"), g.input("c"), g.input("d")
    # (4, 1) * (1, 3) + (3,) - () -> (4, 3); then divided by a (2, 4, 3) batch.
    outer = g.sub(g.add(g.mul(a, b), c), d)
    return g.div(outer, g.add(g.square(g.input("e")), 1.0), name="out")


def _broadcasting_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "a": rng.standard_normal((4, 1)),
        "b": rng.standard_normal((1, 3)),
        "c": rng.standard_normal((3,)),
        "d": rng.standard_normal(()),
        "e": rng.standard_normal((2, 4, 3)),
    }


def _fanout(g: Graph) -> Node:
    x, y = g.input("x"), g.input("y")
    # A dead end: its gradient (and that of `unused`) is zeros, never missing.
    g.exp(g.add(x, g.input("unused")), name="dead_end")
    e = g.exp(x)
    # x, e and y each feed several nodes; the gradients accumulate over the uses.
    mixed = g.add(g.mul(e, e), g.mul(x, g.sin(x)))
    gram = g.matmul(mixed, g.transpose(mixed))
    return g.add(g.sum(gram), g.sum(g.mul(g.matmul(x, y), g.tanh(g.matmul(x, y)))), name="out")


def _fanout_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x": rng.uniform(-1, 1, (2, 3)),
        "y": rng.uniform(-1, 1, (3, 2)),
        "unused": rng.uniform(-1, 1, (3,)),
    }


def _softmax_vector(g: Graph) -> Node:
    x = g.input("x")
    return g.softmax(g.mul(x, g.input("t")), axis=-1, name="out")


GRAPH_CASES = [
    GraphCase("mlp-cross-entropy", _mlp, _mlp_inputs("float64"), int_inputs=("labels",)),
    GraphCase("mlp-cross-entropy-float32", _mlp, _mlp_inputs("float32"), int_inputs=("labels",)),
    GraphCase("conv2d-max_pool2d", _convnet, _convnet_inputs("float64")),
    GraphCase("conv2d-max_pool2d-float32", _convnet, _convnet_inputs("float32")),
    GraphCase("broadcasting", _broadcasting, _broadcasting_inputs, output_seed=True),
    GraphCase("fan-out", _fanout, _fanout_inputs),
    GraphCase(
        "softmax-non-scalar-float32",
        _softmax_vector,
        lambda rng: {
            "x": rng.standard_normal((2, 3)).astype(np.float32),
            "t": np.float32(1.5),
        },
        output_seed=True,
    ),
]


def _ancestors(g: Graph, name: str) -> set[str]:
    """`name` and every node it depends on."""
    inputs = {node.name: list(node.inputs) for node in g.to_proto().nodes}
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(inputs[current])
    return seen


def _graph_case(case: GraphCase) -> tuple[Graph, Node, dict[str, np.ndarray]]:
    g = Graph()
    out = case.build(g)
    return g, out, case.inputs(rng_for(case.id))


def _seed_for(case: GraphCase, values: Mapping[str, np.ndarray], output: str) -> np.ndarray:
    ones = np.ones_like(values[output])
    if not case.output_seed:
        return ones
    return rng_for(case.id + "-seed").standard_normal(ones.shape).astype(ones.dtype)


@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda case: case.id)
def test_gradient_graph_forward_is_bit_identical_to_gradient(client, case):
    g, out, inputs = _graph_case(case)
    values = client.forward(g, inputs=inputs, fetch=[out]).values
    seed = _seed_for(case, values, out.name)
    float_inputs = [name for name, v in inputs.items() if v.dtype.kind == "f"]

    gg = client.gradient_graph(g, out, inputs=inputs, wrt=float_inputs)
    direct = client.gradient(g, out, inputs=inputs, wrt=float_inputs, seed=seed)

    assert set(gg.gradients) == set(float_inputs) and gg.skipped == {}
    if case.int_inputs:  # named in wrt, an integer input is refused, naming it
        with pytest.raises(GradientError) as refused:
            client.gradient_graph(g, out, inputs=inputs, wrt=list(inputs))
        assert refused.value.node in case.int_inputs and "int" in refused.value.details
    returned = Graph.from_proto(gg.graph)
    assert returned[gg.seed].op == "input"
    # The forward nodes the output depends on are all there, with their ops and operands
    # (attributes at their defaults may be left out).
    sent = {node.name: node for node in g.to_proto().nodes}
    kept = {node.name: node for node in gg.graph.nodes}
    for name in _ancestors(g, out.name):
        assert kept[name].op == sent[name].op, name
        assert list(kept[name].inputs) == list(sent[name].inputs), name
    fetched = client.forward(
        gg.graph, inputs={**inputs, gg.seed: seed}, fetch=list(gg.gradients.values())
    ).values
    for name in float_inputs:
        value = fetched[gg.gradients[name]]
        expected = direct.gradients[name]
        assert value.dtype == inputs[name].dtype == expected.dtype, name
        assert value.shape == inputs[name].shape, name
        assert value.tobytes() == expected.tobytes(), f"gradient of {name}"


@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda case: case.id)
def test_gradient_graph_names_every_node_by_default(client, case):
    g, out, inputs = _graph_case(case)
    values = client.forward(g, inputs=inputs).values
    seed = _seed_for(case, values, out.name)

    gg = client.gradient_graph(g, out, inputs=inputs)  # every node (the default)
    direct = client.gradient(g, out, inputs=inputs, seed=seed)

    non_float = {name for name, v in values.items() if v.dtype.kind != "f"}
    assert set(case.int_inputs) <= non_float
    assert set(gg.gradients) == {node.name for node in g.nodes} - non_float
    assert set(gg.skipped) == non_float == set(direct.skipped)
    returned = Graph.from_proto(gg.graph)
    for holder in gg.gradients.values():
        assert holder in returned, holder
    fetched = client.forward(
        gg.graph, inputs={**inputs, gg.seed: seed}, fetch=sorted(set(gg.gradients.values()))
    ).values
    assert set(direct.gradients) == set(gg.gradients)
    for name, holder in gg.gradients.items():
        value, expected = fetched[holder], direct.gradients[name]
        assert value.shape == values[name].shape, name
        assert value.dtype == values[name].dtype == expected.dtype, name
        assert value.tobytes() == expected.tobytes(), f"gradient of {name}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradient_graph_seed_can_be_fed_as_a_python_number(client, dtype):
    # As the README shows: forward(gg.graph, {..., gg.seed: 1.0}) on the returned message.
    x_value = np.array([0.5, -1.0, 2.0], dtype=dtype)
    g = Graph()
    f = g.sum(g.square(g.tanh(g.input("x"))), name="f")
    gg = client.gradient_graph(g, f, inputs={"x": x_value})

    fetched = client.forward(gg.graph, inputs={"x": x_value, gg.seed: 1.0}).values

    gradient = fetched[gg.gradients["x"]]
    assert gradient.dtype == np.dtype(dtype)
    expected = client.gradient(g, f, inputs={"x": x_value}, wrt=["x"]).gradients["x"]
    assert gradient.tobytes() == expected.tobytes()


def test_gradient_graph_of_float32_graph_stays_float32(client):
    case = next(case for case in GRAPH_CASES if case.id == "mlp-cross-entropy-float32")
    g, out, inputs = _graph_case(case)

    gg = client.gradient_graph(g, out, inputs=inputs)
    returned = Graph.from_proto(gg.graph)
    values = client.forward(gg.graph, inputs={**inputs, gg.seed: np.ones((), np.float32)}).values

    assert values[gg.seed].dtype == np.float32
    # Every float value of the forward and backward passes is float32, except the weak
    # Python-number constants (held as float64, they take their partner's dtype).
    floats = {name for name, value in values.items() if value.dtype.kind == "f"}
    constants = {name for name in floats if returned[name].op == "constant"}
    assert len(floats - constants) > len(g.nodes)  # the backward nodes are there
    for name in floats - constants:
        assert values[name].dtype == np.float32, name


# ---------------------------------------------------------------------------------------------
# 3. One second-order row for every op


@dataclass(frozen=True)
class Row:
    """One H·v check: `op` applied with `attrs` to operands of `shapes` drawn from `domains`."""

    op: str
    shapes: tuple[Shape, ...]
    domains: tuple[Domain, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def id(self) -> str:
        parts = [self.op, *("x".join(map(str, s)) if s else "scalar" for s in self.shapes)]
        for key, value in self.attrs.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            parts.append(f"{key}={value}")
        if self.note:
            parts.append(self.note)
        return "-".join(parts)


def row(
    op: str,
    shapes: Sequence[Shape],
    domains: Domain | Sequence[Domain] = real,
    note: str = "",
    **attrs: Any,
) -> Row:
    shapes = tuple(tuple(s) for s in shapes)
    if callable(domains):
        domains = (domains,) * len(shapes)
    return Row(op, shapes, tuple(domains), attrs, note)


def with_a_zero(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """`nonzero` values with one element set to exactly 0."""
    x = nonzero(rng, shape)
    x.flat[rng.integers(x.size)] = 0.0
    return x


def with_two_zeros(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """`nonzero` values with two elements (at random positions) set to exactly 0."""
    x = nonzero(rng, shape)
    x.flat[rng.choice(x.size, 2, replace=False)] = 0.0
    return x


SMOOTH_UNARY: dict[str, Domain] = {
    "neg": real,
    "exp": real,
    "log": positive,
    "sqrt": positive,
    "square": real,
    "tanh": real,
    "sigmoid": real,
    "sin": real,
    "cos": real,
    "log1p": positive,
    "expm1": real,
    "softplus": real,
    "reciprocal": nonzero,
}
# Piecewise linear or constant: away from their kinks (|x| >= 0.5, or 0.15 from a bound).
PIECEWISE_UNARY: dict[str, Domain] = {
    "abs": nonzero,
    "sign": nonzero,
    "relu": nonzero,
    "leaky_relu": nonzero,
}
BINARY: dict[str, tuple[Domain, Domain]] = {
    "add": (real, real),
    "sub": (real, real),
    "mul": (real, real),
    "div": (real, nonzero),
    "pow": (positive, real),
    # No ties between the operands: each pair differs by at least 0.15.
    "maximum": (distinct, distinct_shifted),
    "minimum": (distinct, distinct_shifted),
}
BINARY_SHAPES: list[tuple[Shape, Shape]] = [
    ((2, 3), (2, 3)),
    ((2, 3), (3,)),
    ((4, 1), (1, 3)),
    ((), (3,)),
]
REDUCTIONS: dict[str, Domain] = {
    "sum": real,
    "mean": real,
    "max": distinct,
    "min": distinct,
    "prod": nonzero,
    "logsumexp": real,
    "var": real,
    "norm": real,
}
REDUCTION_VARIANTS: list[tuple[Shape, dict[str, Any]]] = [
    ((2, 3), {}),
    ((2, 3), {"axis": [0]}),
    ((2, 3), {"axis": [-1], "keepdims": True}),
    ((2, 3, 4), {"axis": [0, 2]}),
]

OP_ROWS: list[Row] = [
    *(row(op, [shape], domain) for op, domain in SMOOTH_UNARY.items() for shape in [(), (2, 3)]),
    *(row(op, [(2, 3)], domain) for op, domain in PIECEWISE_UNARY.items()),
    row("leaky_relu", [(3,)], nonzero, alpha=0.2),
    row("clip", [(2, 3)], distinct_shifted, min=-0.3, max=0.6),
    row("clip", [(2, 3)], distinct_shifted, min=-0.3),
    row("clip", [(2, 3)], distinct_shifted, max=0.3),
    *(row(op, shapes, domains) for op, domains in BINARY.items() for shapes in BINARY_SHAPES),
    row("where", [(2, 3), (2, 3), (2, 3)], (boolean, real, real)),
    row("where", [(2, 3), (3,), ()], (boolean, real, real)),
    *(
        row(op, [shape], domain, **attrs)
        for op, domain in REDUCTIONS.items()
        for shape, attrs in REDUCTION_VARIANTS
    ),
    row("var", [(2, 3)], real, axis=[0], ddof=1),
    # prod is a polynomial: smooth at zeros too, where its gradient rule has special cases.
    row("prod", [(4,)], with_a_zero, note="a-zero"),
    row("prod", [(2, 3)], with_a_zero, note="a-zero", axis=[-1]),
    row("prod", [(4,)], with_two_zeros, note="two-zeros"),
    row("prod", [(2, 3, 4)], with_two_zeros, note="two-zeros", axis=[0, 2]),
    row("prod_others", [(4,)], with_a_zero, note="a-zero"),
    row("prod_others", [(2, 3, 4)], with_two_zeros, note="two-zeros", axis=1),
    row("matmul", [(3,), (3,)]),
    row("matmul", [(2, 3), (3,)]),
    row("matmul", [(3,), (3, 4)]),
    row("matmul", [(2, 3), (3, 4)]),
    row("matmul", [(5, 2, 3), (3, 4)]),
    row("matmul", [(1, 2, 3), (4, 3, 2)]),
    row("matmul", [(5, 2, 3), (3,)]),
    row("transpose", [(2, 3)]),
    row("transpose", [(2, 3, 4)], axes=[2, 0, 1]),
    row("reshape", [(2, 3, 4)], shape=[4, -1, 2]),
    row("reshape", [()], shape=[1, 1]),
    row("broadcast_to", [(3,)], shape=[2, 3]),
    row("broadcast_to", [(2, 1)], shape=[4, 2, 3]),
    row("sum_to_shape", [(2, 3)], shape=[3]),
    row("sum_to_shape", [(4, 2, 3)], shape=[2, 1]),
    row("sum_to_shape", [(2, 3)], shape=[]),
    row("cast", [(2, 3)], dtype="float64"),
    row("expand_dims", [(2, 3)], axis=[0, 2]),
    row("squeeze", [(1, 3, 1)]),
    row("squeeze", [(1, 3, 1)], axis=[-1]),
    row("flatten", [(2, 3, 4)], start_axis=1),
    row("slice", [(4, 5)], starts=[1, 0], stops=[3, 5], steps=[1, 2]),
    row("slice", [(2, 3, 4)], starts=[3, 0], stops=[0, 2], steps=[-1, 1], axes=[-1, 0]),
    row("unslice", [(2,)], shape=[5], starts=[1], stops=[5], steps=[2]),
    row("unslice", [(4, 2)], shape=[4, 5], starts=[4], stops=[0], steps=[-3], axes=[1]),
    row("pad", [(3,)], pads=[1, 2]),
    row("pad", [(2, 3)], pads=[0, 1, 2, 0], value=1.5),
    row("concat", [(2, 1), (2, 3), (2, 2)], axis=-1),
    row("concat", [(3,)]),
    row("stack", [(2, 3), (2, 3), (2, 3)], axis=-1),
    row("stack", [(), ()]),
    # Repeated indices: the contributions of a repeated element accumulate.
    row("take", [(4, 3), (5,)], (real, integers(-4, 4))),
    row("take", [(2, 3), (2, 2)], (real, integers(0, 3)), axis=1),
    row("scatter_add", [(5, 3), (5,)], (real, integers(0, 4)), shape=[4, 3]),
    row("scatter_add", [(2, 2, 2), (2,)], (real, integers(-3, 3)), shape=[2, 3, 2], axis=1),
    row("softmax", [(2, 3)]),
    row("softmax", [(2, 3, 4)], axis=1),
    row("log_softmax", [(2, 3)]),
    row("log_softmax", [(2, 3)], axis=0),
    row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3))),
    row("cross_entropy", [(4, 3), (4,)], (real, integers(0, 3)), reduction="sum"),
    row("cross_entropy", [(2, 3, 5), (2, 3)], (real, integers(0, 5)), reduction="none"),
    row("cross_entropy", [(4, 3), (4, 3)], reduction="sum", label_smoothing=0.2),
    row("conv2d", [(2, 2, 5, 5), (3, 2, 3, 3)]),
    row("conv2d", [(1, 2, 6, 5), (2, 2, 2, 3)], stride=[1, 2], padding=[1, 0], dilation=[2]),
    row("conv2d_input_grad", [(1, 3, 3, 3), (3, 2, 3, 3)], input_shape=[1, 2, 5, 5]),
    row(
        "conv2d_input_grad",
        [(1, 3, 3, 3), (3, 2, 3, 3)],
        input_shape=[1, 2, 5, 5],
        stride=[2],
        padding=[1],
    ),
    row("conv2d_weight_grad", [(1, 2, 5, 5), (1, 3, 3, 3)], weight_shape=[3, 2, 3, 3]),
    row(
        "conv2d_weight_grad",
        [(2, 2, 6, 5), (2, 2, 6, 1)],
        weight_shape=[2, 2, 2, 3],
        stride=[1, 2],
        padding=[1, 0],
        dilation=[2],
    ),
    row("avg_pool2d", [(2, 2, 4, 4)], kernel=[2]),
    row("avg_pool2d", [(1, 2, 5, 4)], kernel=[2, 3], stride=[2, 1], padding=[1]),
    row("avg_pool2d_grad", [(1, 2, 2, 2)], input_shape=[1, 2, 4, 4], kernel=[2]),
    row(
        "avg_pool2d_grad",
        [(1, 2, 4, 4)],
        input_shape=[1, 2, 4, 4],
        kernel=[3],
        stride=[1],
        padding=[1],
    ),
    # No ties inside a window: the routing is constant under the finite differences.
    row("max_pool2d", [(2, 2, 4, 4)], distinct, kernel=[2]),
    row("max_pool2d", [(1, 2, 4, 4)], distinct, kernel=[3], stride=[1], padding=[1]),
    # x only routes (piecewise constant in x); g and u enter linearly.
    row("max_pool2d_grad", [(1, 2, 4, 4), (1, 2, 2, 2)], (distinct, real), kernel=[2]),
    row(
        "max_pool2d_grad",
        [(1, 2, 4, 4), (1, 2, 4, 4)],
        (distinct, real),
        kernel=[3],
        stride=[1],
        padding=[1],
    ),
    row("max_pool2d_gather", [(1, 2, 4, 4), (1, 2, 4, 4)], (distinct, real), kernel=[2]),
    row(
        "max_pool2d_gather",
        [(1, 2, 4, 4), (1, 2, 4, 4)],
        (distinct, real),
        kernel=[3],
        stride=[1],
        padding=[1],
    ),
]

FORMS = ["plain", "squared"]
"""plain: f = sum(seed * op(...)). squared: f = sum(seed * op(...)²), so the second derivative
runs through the op's gradient rule with an upstream gradient that depends on the inputs."""

NO_SECOND_ORDER: dict[str, str] = dict(NOT_DIFFERENTIABLE)
"""Ops with no second-order row, and why."""


def _build_row(
    engine: Engine,
    r: Row,
    form: str,
    rng: np.random.Generator,
    dtype: str = "float64",
    rounded_to: str | None = None,
) -> tuple[Graph, Node, dict[str, np.ndarray]]:
    """f = sum(seed * op(x0, x1, ...)), or of op(...)² when form is "squared".

    The seed is a random constant. Float feeds and the seed have `dtype`, after rounding to
    `rounded_to` if given (float32 numbers held in float64). Returns the graph, f and feeds.
    """

    def draw(value: np.ndarray) -> np.ndarray:
        return value.astype(rounded_to or dtype).astype(dtype)

    g = Graph()
    operands = [g.input(f"x{i}") for i in range(len(r.shapes))]
    feeds = {
        node.name: domain(rng, shape)
        for node, domain, shape in zip(operands, r.domains, r.shapes, strict=True)
    }
    feeds = {n: draw(v) if v.dtype.kind == "f" else v for n, v in feeds.items()}
    out = g.op(r.op, *operands, name="out", **r.attrs)
    if form == "squared":
        out = g.square(out, name="out_squared")
    value = engine.forward(engine.load_graph(g.to_proto()), feeds, fetch=[out.name])[out.name]
    assert value.dtype == np.dtype(dtype)
    seed = g.constant(draw(rng.standard_normal(value.shape)), name="seed")
    f = g.sum(g.mul(out, seed), name="f")
    return g, f, feeds


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("r", OP_ROWS, ids=lambda r: r.id)
def test_hvp_matches_finite_differences(client, engine, r, form):
    rng = rng_for(f"{r.id}-{form}")
    g, f, feeds = _build_row(engine, r, form, rng)
    vector = {n: rng.standard_normal(v.shape) for n, v in feeds.items() if v.dtype.kind == "f"}

    assert_hvp_matches_fd(client, engine, g, feeds, f, vector)


BILINEAR = ("mul", "matmul", "conv2d", "conv2d_input_grad", "conv2d_weight_grad")


@pytest.mark.parametrize("operand", [0, 1])
@pytest.mark.parametrize("r", [r for r in OP_ROWS if r.op in BILINEAR], ids=lambda r: r.id)
def test_bilinear_ops_are_linear_in_each_operand(client, engine, r, operand):
    # v on one operand only: that operand's block of the Hessian is exactly 0, and the mixed
    # block moves the other operand's gradient (missing directions count as zero).
    rng = rng_for(f"{r.id}-operand-{operand}")
    g, f, feeds = _build_row(engine, r, "plain", rng)
    name = f"x{operand}"
    other = f"x{1 - operand}"
    vector = {name: rng.standard_normal(feeds[name].shape)}

    product = assert_hvp_matches_fd(client, engine, g, feeds, f, vector)

    np.testing.assert_array_equal(product[name], np.zeros_like(feeds[name]))
    assert np.max(np.abs(product[other])) > 1e-3


def test_every_op_has_a_second_order_row_or_a_reason():
    tested = {r.op for r in OP_ROWS}
    missing = sorted(set(OPS) - tested - set(NO_SECOND_ORDER))
    assert not missing, f"ops with neither a row in OP_ROWS nor a NO_SECOND_ORDER reason: {missing}"
    both = sorted(tested & set(NO_SECOND_ORDER))
    assert not both, f"ops both tested and excused: {both}"


def test_no_second_order_entries_are_true():
    for name, reason in NO_SECOND_ORDER.items():
        assert name in OPS, f"NO_SECOND_ORDER names {name!r}, which is not an op"
        op = OPS[name]
        assert not any(op.is_differentiable(i) for i in range(len(op.inputs))), (
            f"{name} has differentiable operands, yet: {reason}"
        )


def _perturbed(domain: Domain) -> bool:
    """Whether a row's operand drawn from `domain` is float, so H·v moves it."""
    return domain is not boolean and not domain.__name__.startswith("integers")


def test_rows_perturb_every_differentiable_operand():
    for name, op in OPS.items():
        rows = [r for r in OP_ROWS if r.op == name]
        for i in range(len(op.inputs)):
            if op.is_differentiable(i):
                assert any(i < len(r.domains) and _perturbed(r.domains[i]) for r in rows), (
                    f"no row perturbs {name}'s operand {op.inputs[i]!r}"
                )


FLOAT32_ROWS = [
    row("exp", [(2, 3)]),
    row("tanh", [(2, 3)]),
    row("div", [(2, 3), (3,)], (real, nonzero)),
    row("matmul", [(2, 3), (3, 4)]),
    row("softmax", [(2, 3)]),
    row("conv2d", [(1, 2, 5, 5), (3, 2, 3, 3)], stride=[2], padding=[1]),
]


@pytest.mark.parametrize("r", FLOAT32_ROWS, ids=lambda r: r.id)
def test_hvp_of_float32_graph_stays_float32(client, engine, r):
    key = f"float32-{r.id}"
    g32, f, feeds32 = _build_row(engine, r, "squared", rng_for(key), dtype="float32")
    # The same numbers in float64: float32 values and seed, widened exactly.
    g64, _, feeds64 = _build_row(
        engine, r, "squared", rng_for(key), dtype="float64", rounded_to="float32"
    )
    rng = rng_for(key + "-vector")
    vector = {n: rng.standard_normal(v.shape) for n, v in feeds32.items()}

    p32 = client.hvp(g32, f, inputs=feeds32, vector=vector)
    p64 = client.hvp(g64, f.name, inputs=feeds64, vector=vector)

    for name, value in feeds32.items():
        np.testing.assert_array_equal(value, feeds64[name])
        assert p32[name].dtype == np.float32, name
        assert p32[name].shape == value.shape, name
        scale = float(np.max(np.abs(p64[name]))) + 1.0
        np.testing.assert_allclose(p32[name], p64[name], rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# 4. Random compositions of smooth ops


RANDOM_INPUT_SHAPES: dict[str, Shape] = {
    "a": (2, 3),
    "b": (3,),
    "c": (2, 1),
    "d": (1, 3),
    "s": (),
    "M": (3, 3),
}


def _broadcast_shape(*shapes: Shape) -> Shape:
    return tuple(np.broadcast_shapes(*shapes))


def random_graph(seed: int, steps: int = 14) -> tuple[Graph, Node, dict[str, np.ndarray]]:
    """A random composition of smooth ops on the inputs of RANDOM_INPUT_SHAPES.

    Every intermediate value has a shape that broadcasts to (2, 3), so any two combine.
    Unbounded growth is kept in check by squashing functions (tanh, sin, sigmoid). The output
    sums every node that no other node uses, so every input reaches it.
    """
    rng = np.random.default_rng(seed)
    g = Graph()
    pool: list[tuple[Node, Shape]] = [
        (g.input(name), shape) for name, shape in RANDOM_INPUT_SHAPES.items() if name != "M"
    ]
    matrix = g.input("M")
    feeds = {name: rng.uniform(-1, 1, shape) for name, shape in RANDOM_INPUT_SHAPES.items()}
    used: set[int] = set()

    def pick() -> tuple[Node, Shape]:
        # Favour recent nodes so the graph gets deep, but reuse old ones (fan-out).
        index = len(pool) - 1 - min(int(rng.exponential(2.0)), len(pool) - 1)
        used.add(index)
        return pool[index]

    unary = ["tanh", "sin", "cos", "sigmoid", "softplus", "square", "exp_tanh", "log1p_square"]
    binary = ["add", "sub", "mul", "div_1p_square", "matmul_M", "matmul_M"]
    reducing = ["sum", "mean", "logsumexp", "softmax", "log_softmax"]
    sources = len(pool)
    for step in range(steps):
        kind = rng.choice(["unary", "binary", "binary", "reducing"])
        # The first steps start from each input in turn.
        if step < sources:
            used.add(step)
            x, xs = pool[step]
        else:
            x, xs = pick()
        if kind == "unary":
            op = str(rng.choice(unary))
            if op == "exp_tanh":
                node = g.exp(g.tanh(x))
            elif op == "log1p_square":
                node = g.log1p(g.square(x))
            else:
                node = g.op(op, x)
            shape = xs
        elif kind == "binary":
            op = str(rng.choice(binary))
            if op == "matmul_M":
                if xs and xs[-1] == 3:
                    node, shape = g.matmul(x, matrix), xs
                else:
                    node, shape = g.mul(g.tanh(x), g.sum(matrix)), xs
            else:
                y, ys = pick()
                if op == "div_1p_square":
                    node = g.div(x, g.add(g.square(y), 1.0))
                else:
                    node = g.op(op, x, y)
                shape = _broadcast_shape(xs, ys)
        else:
            op = str(rng.choice(reducing))
            if not xs:
                node, shape = g.sin(x), xs
            elif op in ("softmax", "log_softmax"):
                node, shape = g.op(op, x, axis=-1), xs
            else:
                node, shape = g.op(op, x, axis=[-1], keepdims=True), (*xs[:-1], 1)
        pool.append((node, shape))
    leaves = [node for index, (node, _) in enumerate(pool) if index not in used]
    total = g.sum(g.tanh(leaves[0]))
    for leaf in leaves[1:]:
        total = g.add(total, g.sum(g.sin(leaf)))
    out = g.mul(total, 1.0, name="out")
    return g, out, feeds


@pytest.mark.parametrize("seed", range(20))
def test_random_graph_hvp_matches_finite_differences(client, engine, seed):
    g, out, feeds = random_graph(seed)
    rng = np.random.default_rng(1000 + seed)
    u = {name: rng.standard_normal(v.shape) for name, v in feeds.items()}
    v = {name: rng.standard_normal(x.shape) for name, x in feeds.items()}

    hv = assert_hvp_matches_fd(client, engine, g, feeds, out, v)
    hu = client.hvp(g, out, inputs=feeds, vector=u)

    # The Hessian is symmetric: <u, H v> = <v, H u>.
    u_hv = sum(float(np.sum(u[n] * hv[n])) for n in feeds)
    v_hu = sum(float(np.sum(v[n] * hu[n])) for n in feeds)
    assert u_hv == pytest.approx(v_hu, rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. Third order


def test_third_derivative_through_a_gradient_graph_of_a_gradient_graph(client):
    x_value = np.array([-1.5, -0.5, 0.0, 0.25, 1.0, 2.0])
    g = Graph()
    x = g.input("x")
    f = g.sum(g.pow(x, 4.0), name="f")

    # First order: df/dx = 4x³, reduced to a scalar s1 = sum(4x³).
    first = client.gradient_graph(g, f, inputs={"x": x_value}, wrt=[x])
    g1 = Graph.from_proto(first.graph)
    s1 = g1.sum(g1[first.gradients["x"]], name="s1")
    feeds1 = {"x": x_value, first.seed: np.ones(())}

    # Second order: ds1/dx = 12x², reduced to s2 = sum(12x²).
    second = client.gradient_graph(g1, s1, inputs=feeds1, wrt=["x"])
    assert second.seed != first.seed
    g2 = Graph.from_proto(second.graph)
    d2 = g2[second.gradients["x"]]
    s2 = g2.sum(d2, name="s2")
    feeds2 = {**feeds1, second.seed: np.ones(())}

    # Third order: ds2/dx = 24x.
    result = client.gradient(g2, s2, inputs=feeds2, wrt=["x"], fetch=[d2, s1])

    np.testing.assert_allclose(result.values["s1"], np.sum(4 * x_value**3), rtol=1e-14)
    np.testing.assert_allclose(result.values[d2.name], 12 * x_value**2, rtol=1e-14, atol=0)
    np.testing.assert_allclose(result.gradients["x"], 24 * x_value, rtol=1e-14, atol=0)

    # H·v of the first gradient graph's s1 is a third derivative too: H_xx s1 = diag(24x),
    # and the mixed block with its seed is ∂²s1/∂seed∂x = 12x².
    v = np.linspace(-1.0, 1.0, x_value.size)
    product = client.hvp(g1, s1, inputs=feeds1, vector={"x": v})
    np.testing.assert_allclose(product["x"], 24 * x_value * v, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(
        product[first.seed], np.sum(12 * x_value**2 * v), rtol=1e-14, atol=1e-15
    )


def _conv_avg_pool(g: Graph) -> Node:
    x, w = g.input("x"), g.input("W")
    pooled = g.avg_pool2d(g.conv2d(x, w, padding=1), kernel=2)
    return g.sum(g.softplus(pooled), name="f")


def _conv_max_pool(g: Graph) -> Node:
    # x on a grid and W > 0: no ties in the pooling windows under small perturbations.
    x, w = g.input("x"), g.input("W")
    return g.sum(g.sin(g.max_pool2d(g.mul(x, w), kernel=2)), name="f")


def _indexing(g: Graph) -> Node:
    x, w = g.input("x"), g.input("W")
    picked = g.concat(g.slice(x, starts=[1], stops=[4]), g.take(x, g.constant(np.array([0, 0, 4]))))
    padded = g.pad(g.mul(picked, w), pads=[1, 1])
    return g.sum(g.mul(g.sin(padded), g.softplus(padded)), name="f")


THIRD_ORDER_NETWORKS = {
    "tanh-layer": (
        _tanh_layer,
        lambda rng: {
            "x": rng.uniform(-1, 1, (4, 3)),
            "W": rng.uniform(-1, 1, (3, 2)),
            "b": rng.uniform(-1, 1, (2,)),
        },
    ),
    "conv2d-avg_pool2d": (
        _conv_avg_pool,
        lambda rng: {"x": rng.uniform(-1, 1, (1, 1, 4, 4)), "W": rng.uniform(-1, 1, (2, 1, 3, 3))},
    ),
    "max_pool2d": (
        _conv_max_pool,
        lambda rng: {"x": distinct(rng, (1, 2, 4, 4)), "W": np.array(1.3)},
    ),
    "slice-take-concat-pad": (
        _indexing,
        lambda rng: {"x": rng.uniform(-1, 1, (5,)), "W": rng.uniform(-1, 1, (6,))},
    ),
}


@pytest.mark.parametrize("network", list(THIRD_ORDER_NETWORKS))
def test_third_order_of_a_network_matches_finite_differences(client, engine, network):
    # H·v of the gradient penalty P(W) = ||∇_x f||², a third derivative of f: the gradient
    # rules of the adjoint ops (and of their adjoints) are differentiated.
    build, draw = THIRD_ORDER_NETWORKS[network]
    rng = rng_for(f"third-order-{network}")
    inputs = draw(rng)
    g = Graph()
    f = build(g)
    gg = client.gradient_graph(g, f, inputs=inputs, wrt=["x"])
    extended = Graph.from_proto(gg.graph)
    penalty = extended.sum(extended.square(extended[gg.gradients["x"]]), name="penalty")
    feeds = {**inputs, gg.seed: np.ones(())}
    vector = {name: rng.standard_normal(np.shape(value)) for name, value in feeds.items()}

    product = assert_hvp_matches_fd(client, engine, extended, feeds, penalty, vector)
    assert any(np.any(np.abs(p) > 1e-3) for p in product.values())
