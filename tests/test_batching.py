"""Per-example gradients (Gradient.batch_axes, client.gradient(batch=...)), issue 12 item 3.

- The reference semantics (a loop over the examples through one compiled plan) and the
  vectorized graph against jax.vmap(jax.grad(f)) on an MLP with cross_entropy (per-example
  weight gradients, float64 to 1e-12), against torch.func.vmap(torch.func.grad(f)) on a small
  CNN (conv2d, relu, max_pool2d, matmul, cross_entropy), and per-example seeds of a
  non-scalar output against jax.vjp.
- The batching transform against the loop, op by op for every op with a rule: values and
  gradients bit for bit for elementwise and reshape-like ops, within 1e-12 relative (float64)
  where numpy may sum in another order (matmul, reductions, softmax-like ops, cross_entropy).
- A graph with an op without a rule falls back to the loop (and says which node).
- Errors are INVALID_ARGUMENT naming the input; limits charge every example
  (RESOURCE_EXHAUSTED); the deadline is checked between examples; ListOps' `batchable`; the
  asyncio twin and gradient-client grad --batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gradcheck import rng_for

from gradient_client import AsyncGradientClient, GradientClient, GradientError, Graph
from gradient_client.cli import main
from gradient_server.batching import RULES
from gradient_server.engine import Engine, Limits
from gradient_server.errors import DeadlineExceeded, LimitExceeded
from gradient_server.service import create_server

ROOT = Path(__file__).resolve().parent.parent
B = 3


def _mlp() -> Graph:
    g = Graph()
    x, y = g.input("x"), g.input("y", dtype="int64")
    w1, b1, w2 = g.input("W1"), g.input("b1"), g.input("W2")
    hidden = g.tanh(g.add(g.matmul(x, w1), b1), name="hidden")
    g.cross_entropy(g.matmul(hidden, w2, name="logits"), y, name="loss")
    return g


def _mlp_inputs(rng: np.random.Generator, batch: int = 5) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((batch, 3)),
        "y": rng.integers(0, 4, batch),
        "W1": rng.standard_normal((3, 5)),
        "b1": rng.standard_normal(5),
        "W2": rng.standard_normal((5, 4)),
    }


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-12) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# 1. The semantics: against jax.vmap(jax.grad(...)) and torch.func.vmap(torch.func.grad(...))


def test_mlp_per_example_gradients_equal_jax_vmap_of_grad(client):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = rng_for("per-example-mlp")
    inputs = _mlp_inputs(rng)
    g = _mlp()

    vectorized = client.gradient(g, "loss", inputs, batch={"x": 0, "y": 0})
    loop = client.gradient(g, "loss", inputs, batch={"x": 0, "y": 0}, wrt=["x", "W1", "b1", "W2"])

    def loss(x: Any, y: Any, w1: Any, b1: Any, w2: Any) -> Any:
        logits = jnp.tanh(x @ w1 + b1) @ w2
        return -jax.nn.log_softmax(logits)[y]

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        per_example = jax.vmap(
            jax.grad(loss, argnums=(0, 2, 3, 4)), in_axes=(0, 0, None, None, None)
        )
        args = [jnp.asarray(inputs[n]) for n in ("x", "y", "W1", "b1", "W2")]
        expected = dict(
            zip(("x", "W1", "b1", "W2"), map(np.asarray, per_example(*args)), strict=True)
        )
        losses = np.asarray(jax.vmap(loss, in_axes=(0, 0, None, None, None))(*args))
    finally:
        jax.config.update("jax_enable_x64", before)

    for name, gradient in expected.items():
        assert vectorized.gradients[name].shape == (5, *inputs[name].shape[name == "x" :])
        _close(vectorized.gradients[name], gradient)
        _close(loop.gradients[name], gradient)
    _close(vectorized.values["loss"], losses)
    assert vectorized.values["W1"].shape == (5, 3, 5)  # an unbatched value, once per example
    np.testing.assert_array_equal(vectorized.values["y"], inputs["y"])
    assert dict(vectorized.skipped) == {"y": "int64 is not differentiable"}


def test_float32_keeps_its_dtype_and_equals_the_loop(engine):
    inputs = _mlp_inputs(rng_for("per-example-float32"), 7)
    inputs = {n: v.astype("float32") if v.dtype.kind == "f" else v for n, v in inputs.items()}
    loaded = engine.load_graph(_mlp().to_proto())
    vectorized = engine.gradient_per_example(loaded, inputs, "loss", {"x": 0, "y": 0})
    loop = engine.gradient_per_example(loaded, inputs, "loss", {"x": 0, "y": 0}, vectorize=False)
    for name, expected in loop.gradients.items():
        assert vectorized.gradients[name].dtype == expected.dtype == np.float32, name
        _close(vectorized.gradients[name], expected, rtol=1e-6)


def test_cnn_per_example_gradients_equal_torch_func(engine):
    torch = pytest.importorskip("torch")
    rng = rng_for("per-example-cnn")
    g = Graph()
    x, y = g.input("x"), g.input("y", dtype="int64")
    w, v = g.input("w"), g.input("V")
    features = g.max_pool2d(g.relu(g.conv2d(x, w, padding=1)), kernel=2)
    logits = g.matmul(g.reshape(features, [1, 8]), v, name="logits")
    g.cross_entropy(logits, y, name="loss")
    inputs = {
        "x": rng.standard_normal((4, 1, 1, 4, 4)),  # 4 examples of one 1x4x4 image
        "y": rng.integers(0, 3, (4, 1)),
        "w": rng.standard_normal((2, 1, 3, 3)),
        "V": rng.standard_normal((8, 3)),
    }
    loaded = engine.load_graph(g.to_proto())
    assert engine.batched_graph_for(loaded, inputs, {"x": 0, "y": 0}).graph is not None

    vectorized = engine.gradient_per_example(loaded, inputs, "loss", {"x": 0, "y": 0})
    loop = engine.gradient_per_example(loaded, inputs, "loss", {"x": 0, "y": 0}, vectorize=False)

    def loss(x: Any, y: Any, w: Any, v: Any) -> Any:
        h = torch.nn.functional.max_pool2d(
            torch.relu(torch.nn.functional.conv2d(x, w, padding=1)), 2
        )
        return torch.nn.functional.cross_entropy(h.reshape(1, 8) @ v, y)

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 2, 3)), in_dims=(0, 0, None, None))(
        *(torch.from_numpy(inputs[n]) for n in ("x", "y", "w", "V"))
    )
    for name, gradient in zip(("x", "w", "V"), grads, strict=True):
        _close(vectorized.gradients[name], gradient.numpy())
        _close(loop.gradients[name], gradient.numpy())


def test_per_example_seeds_of_a_non_scalar_output_equal_jax_vjp(engine):
    jax = pytest.importorskip("jax")
    rng = rng_for("per-example-seeds")
    g = Graph()
    x, w = g.input("x"), g.input("W")
    g.tanh(g.matmul(x, w), name="out")
    inputs = {"x": rng.standard_normal((4, 3, B)), "W": rng.standard_normal((3, 2))}
    seeds = rng.standard_normal((B, 4, 2))
    loaded = engine.load_graph(g.to_proto())

    result = engine.gradient_per_example(loaded, inputs, "out", {"x": -1}, seeds)

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        for row in range(B):
            example = inputs["x"][..., row]  # the per-example graph sees x[:, :, row]: (4, 3)
            _, vjp = jax.vjp(lambda a, b: jax.numpy.tanh(a @ b), example, inputs["W"])
            dx, dw = vjp(seeds[row])
            _close(result.gradients["x"][row], np.asarray(dx))
            _close(result.gradients["W"][row], np.asarray(dw))
    finally:
        jax.config.update("jax_enable_x64", before)


def test_batch_axis_other_than_zero_and_shared_inputs(engine):
    rng = rng_for("per-example-axis")
    g = Graph()
    x, w = g.input("x"), g.input("w")
    g.sum(g.square(g.mul(x, w)), name="f")
    inputs = {"x": rng.standard_normal((2, B)), "w": rng.standard_normal(2)}
    loaded = engine.load_graph(g.to_proto())
    result = engine.gradient_per_example(loaded, inputs, "f", {"x": 1})
    for row in range(B):
        single = engine.gradient(loaded, {"x": inputs["x"][:, row].copy(), "w": inputs["w"]}, "f")
        for name, gradient in single.gradients.items():
            assert result.gradients[name][row].tobytes() == gradient.tobytes(), name
    _close(result.gradients["w"], 2 * inputs["x"].T ** 2 * inputs["w"], rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# 2. The batching transform equals the loop, op by op

Build = Callable[[Graph, dict[str, Any]], Any]


def _unary(op: str) -> Build:
    return lambda g, n: g.op(op, n["x"])


def _compare(op: str) -> Build:
    return lambda g, n: g.op("where", g.op(op, n["x"], n["w"]), n["x"], n["w"])


def _reduce(op: str, attrs: dict[str, Any]) -> Build:
    return lambda g, n: g.op(op, n["x"], **attrs)


def _arg(op: str, attrs: dict[str, Any]) -> Build:
    return lambda g, n: g.mul(n["x"], g.op("cast", g.op(op, n["x"], **attrs), dtype="float64"))


def _cross_entropy(reduction: str) -> Build:
    return lambda g, n: g.cross_entropy(n["x"], n["k"], reduction)


# (id, per-example shapes of x (batched) and w (shared), how to build the output, exact?)
CASES: list[tuple[str, dict[str, tuple[int, ...]], Build, bool]] = [
    *[
        (op, {"x": (3, 4)}, _unary(op), True)
        for op in "abs cos exp expm1 log log1p neg reciprocal relu sigmoid sign sin softplus "
        "sqrt square tanh".split()
    ],
    ("leaky_relu", {"x": (3, 4)}, lambda g, n: g.op("leaky_relu", n["x"], alpha=0.2), True),
    ("clip", {"x": (3, 4)}, lambda g, n: g.op("clip", n["x"], min=0.6, max=1.5), True),
    ("cast", {"x": (3, 4)}, lambda g, n: g.op("cast", n["x"], dtype="float32"), True),
    ("add", {"x": (3, 4), "w": (4,)}, lambda g, n: g.add(n["x"], n["w"]), True),
    ("sub", {"x": (3, 4), "w": (2, 3, 4)}, lambda g, n: g.sub(n["w"], n["x"]), True),
    ("mul", {"x": (4,), "w": (3, 4)}, lambda g, n: g.mul(n["x"], n["w"]), True),
    ("div", {"x": (3, 1), "w": (4,)}, lambda g, n: g.div(n["x"], n["w"]), True),
    ("pow", {"x": (3, 4), "w": ()}, lambda g, n: g.op("pow", n["x"], n["w"]), True),
    ("maximum", {"x": (3, 4), "w": (4,)}, lambda g, n: g.op("maximum", n["x"], n["w"]), True),
    ("minimum", {"x": (4,), "w": (3, 4)}, lambda g, n: g.op("minimum", n["x"], n["w"]), True),
    ("constant", {"x": (2, 3)}, lambda g, n: g.mul(n["x"], g.constant(np.arange(3.0))), True),
    *[
        (
            cmp,
            {"x": (3, 4), "w": (4,)},
            _compare(cmp),
            True,
        )
        for cmp in "equal not_equal greater greater_equal less less_equal".split()
    ],
    (
        "logical_and_or_not",
        {"x": (3, 4), "w": (4,)},
        lambda g, n: g.op(
            "where",
            g.op(
                "logical_or",
                g.op("logical_and", g.op("greater", n["x"], 1.0), g.op("less", n["w"], 1.0)),
                g.op("logical_not", g.op("greater", n["x"], 0.8)),
            ),
            n["x"],
            n["w"],
        ),
        True,
    ),
    (
        "one_hot",
        {"x": (3, 4), "k": (3,)},
        lambda g, n: g.mul(n["x"], g.op("one_hot", n["k"], depth=4)),
        True,
    ),
    ("matmul", {"x": (3, 4), "w": (4, 5)}, lambda g, n: g.matmul(n["x"], n["w"]), False),
    ("matmul_vec_mat", {"x": (4,), "w": (4, 5)}, lambda g, n: g.matmul(n["x"], n["w"]), False),
    ("matmul_mat_vec", {"x": (4,), "w": (5, 4)}, lambda g, n: g.matmul(n["w"], n["x"]), False),
    ("matmul_dot", {"x": (4,), "w": (4,)}, lambda g, n: g.matmul(n["x"], n["w"]), False),
    ("matmul_stacked", {"x": (2, 3, 4), "w": (4, 5)}, lambda g, n: g.matmul(n["x"], n["w"]), False),
    ("matmul_wide", {"x": (3, 4), "w": (2, 5, 3)}, lambda g, n: g.matmul(n["w"], n["x"]), False),
    *[
        (
            f"{op}-{axis}",
            {"x": (3, 4)},
            _reduce(op, kw),
            False,
        )
        for op in "sum mean max min prod norm logsumexp var".split()
        for axis, kw in (
            ("all", {}),
            ("1", {"axis": 1}),
            ("-2-keep", {"axis": -2, "keepdims": True}),
        )
    ],
    ("sum-of-scalar", {"x": ()}, lambda g, n: g.op("sum", n["x"]), False),
    ("var-ddof", {"x": (3, 4)}, lambda g, n: g.op("var", n["x"], axis=0, ddof=1), False),
    *[
        (
            f"{op}-{axis}",
            {"x": (3, 4)},
            _arg(op, kw),
            True,
        )
        for op in ("argmax", "argmin")
        for axis, kw in (("all", {}), ("0-keep", {"axis": 0, "keepdims": True}))
    ],
    ("softmax", {"x": (3, 4)}, lambda g, n: g.softmax(n["x"], axis=0), False),
    ("log_softmax", {"x": (3, 4)}, lambda g, n: g.log_softmax(n["x"]), False),
    ("prod_others", {"x": (3, 4)}, lambda g, n: g.op("prod_others", n["x"], axis=-1), False),
    ("reshape", {"x": (3, 4)}, lambda g, n: g.reshape(g.exp(n["x"]), [2, -1]), True),
    ("flatten", {"x": (2, 3, 2)}, lambda g, n: g.op("flatten", g.exp(n["x"]), start_axis=1), True),
    ("expand_dims", {"x": (3, 4)}, lambda g, n: g.op("expand_dims", g.exp(n["x"]), axis=1), True),
    ("squeeze", {"x": (3, 1)}, lambda g, n: g.op("squeeze", g.exp(n["x"])), True),
    ("transpose", {"x": (2, 3, 4)}, lambda g, n: g.op("transpose", g.exp(n["x"])), True),
    (
        "transpose-axes",
        {"x": (2, 3, 4)},
        lambda g, n: g.op("transpose", g.exp(n["x"]), axes=[1, -1, 0]),
        True,
    ),
    (
        "broadcast_to",
        {"x": (4,)},
        lambda g, n: g.op("broadcast_to", g.exp(n["x"]), shape=[2, 3, 4]),
        True,
    ),
    (
        "cross_entropy-one",
        {"x": (4,), "k": ()},
        lambda g, n: g.cross_entropy(n["x"], n["k"]),
        False,
    ),
    *[
        (
            f"cross_entropy-{reduction}",
            {"x": (3, 4), "k": (3,)},
            _cross_entropy(reduction),
            False,
        )
        for reduction in ("mean", "sum", "none")
    ],
    (
        "cross_entropy-soft",
        {"x": (3, 4), "w": (3, 4)},
        lambda g, n: g.op("cross_entropy", n["x"], g.softmax(n["w"]), label_smoothing=0.1),
        False,
    ),
    ("slice", {"x": (3, 4)}, lambda g, n: g.op("slice", n["x"], starts=[1], stops=[3]), True),
    (
        "slice-axes-steps",
        {"x": (3, 5)},
        lambda g, n: g.op(
            "slice", n["x"], starts=[4, 0], stops=[0, 3], steps=[-2, 2], axes=[-1, 0]
        ),
        True,
    ),
    (
        "unslice",
        {"x": (2, 4)},
        lambda g, n: g.op("unslice", n["x"], shape=[3, 4], starts=[1], stops=[3], axes=[0]),
        True,
    ),
    ("pad", {"x": (2, 3)}, lambda g, n: g.op("pad", n["x"], pads=[1, 0, 0, 2], value=0.5), True),
    ("concat", {"x": (2, 3), "w": (1, 3)}, lambda g, n: g.op("concat", n["x"], n["w"]), True),
    (
        "concat-ints",
        {"x": (3,), "k": (2,)},
        lambda g, n: g.mul(
            g.op("concat", g.op("cast", n["x"], dtype="int64"), n["k"], g.constant(np.array([7]))),
            1.5,
        ),
        True,
    ),
    (
        "stack",
        {"x": (2, 3), "w": (2, 3)},
        lambda g, n: g.op("stack", n["x"], n["w"], axis=-1),
        True,
    ),
    (
        "take",
        {"x": (4, 3)},
        lambda g, n: g.op("take", n["x"], g.constant(np.array([[2, 0], [-1, 2]])), axis=0),
        True,
    ),
    (
        "conv2d",
        {"x": (2, 3, 5, 5), "w": (4, 3, 3, 3)},
        lambda g, n: g.conv2d(n["x"], n["w"]),
        False,
    ),
    (
        "conv2d-geometry",
        {"x": (1, 2, 7, 6), "w": (3, 2, 2, 3)},
        lambda g, n: g.conv2d(n["x"], n["w"], stride=[2, 1], padding=[1, 2], dilation=[2, 1]),
        False,
    ),
    (
        "conv2d-1x1",
        {"x": (2, 3, 4, 4), "w": (2, 3, 1, 1)},
        lambda g, n: g.conv2d(n["x"], n["w"]),
        False,
    ),
    ("max_pool2d", {"x": (2, 2, 4, 4)}, lambda g, n: g.max_pool2d(n["x"], kernel=2), True),
    (
        "avg_pool2d",
        {"x": (1, 2, 5, 5)},
        lambda g, n: g.avg_pool2d(n["x"], kernel=3, stride=2, padding=1),
        True,
    ),
]


@pytest.mark.parametrize(
    ("shapes", "build", "exact"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_vectorized_equals_the_loop(engine, shapes, build, exact):
    rng = np.random.default_rng(len(CASES))
    g = Graph()
    nodes: dict[str, Any] = {}
    inputs: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name == "k":  # int labels / indices, batched
            nodes[name] = g.input(name, dtype="int64")
            inputs[name] = rng.integers(0, 4, (B, *shape))
        else:  # x batched, w shared; positive values, away from ties
            nodes[name] = g.input(name)
            full = (B, *shape) if name == "x" else shape
            inputs[name] = rng.uniform(0.5, 2.0, full)
    out = build(g, nodes)
    loaded = engine.load_graph(g.to_proto())
    batch = {name: 0 for name in shapes if name != "w"}
    batched = engine.batched_graph_for(loaded, inputs, batch)
    assert batched.graph is not None, batched.missing
    out_shape = engine.forward(
        loaded, {n: v[0] if n in batch else v for n, v in inputs.items()}, [out.name]
    )[out.name].shape
    seeds = rng.standard_normal((B, *out_shape)).astype(
        engine.forward(
            loaded, {n: v[0] if n in batch else v for n, v in inputs.items()}, [out.name]
        )[out.name].dtype
    )

    vectorized = engine.gradient_per_example(loaded, inputs, out.name, batch, seeds)
    loop = engine.gradient_per_example(loaded, inputs, out.name, batch, seeds, vectorize=False)

    assert set(vectorized.values) == set(loop.values) == set(loaded.nodes)
    assert set(vectorized.gradients) == set(loop.gradients)
    assert vectorized.skipped == loop.skipped
    for kind in ("values", "gradients"):
        for name, expected in getattr(loop, kind).items():
            actual = getattr(vectorized, kind)[name]
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
            if exact:
                assert actual.tobytes() == expected.tobytes(), (kind, name)
            else:
                _close(actual, expected)


def test_every_op_with_a_rule_is_tested():
    tested: set[str] = set()
    for _, shapes, build, _ in CASES:
        g = Graph()
        build(g, {n: g.input(n, dtype="int64" if n == "k" else None) for n in shapes})
        tested |= {node.op for node in g.nodes}
    assert set(RULES) <= tested, set(RULES) - tested


# ---------------------------------------------------------------------------------------------
# 3. Fallback, errors, limits, deadlines


def test_an_op_without_a_rule_falls_back_to_the_loop(engine):
    rng = rng_for("per-example-fallback")
    g = Graph()
    x, w, k = g.input("x"), g.input("w"), g.input("k", dtype="int64")
    g.sum(g.mul(g.op("take", x, k), w), name="f")  # per-example indices: no rule
    inputs = {
        "x": rng.standard_normal((B, 4)),
        "w": rng.standard_normal(2),
        "k": np.array([[1, 3], [0, -1], [2, 2]]),
    }
    loaded = engine.load_graph(g.to_proto())
    batched = engine.batched_graph_for(loaded, inputs, {"x": 0, "k": 0})
    assert batched.graph is None and "op take" in batched.missing, batched.missing
    result = engine.gradient_per_example(loaded, inputs, "f", {"x": 0, "k": 0})
    expected_x = np.zeros((B, 4))
    for row, (i, j) in enumerate(inputs["k"]):
        expected_x[row, i] += inputs["w"][0]
        expected_x[row, j] += inputs["w"][1]
    np.testing.assert_array_equal(result.gradients["x"], expected_x)
    np.testing.assert_array_equal(
        result.gradients["w"], np.take_along_axis(inputs["x"], inputs["k"] % 4, axis=1)
    )


def test_a_large_conv_kernel_keeps_the_loop(engine):
    g = Graph()
    x, w = g.input("x"), g.input("w")
    g.sum(g.conv2d(x, w), name="f")
    inputs = {"x": np.ones((2, 1, 1, 9, 9)), "w": np.full((1, 1, 9, 9), 0.5)}
    loaded = engine.load_graph(g.to_proto())
    batched = engine.batched_graph_for(loaded, inputs, {"x": 0})
    assert batched.graph is None and "more than 64" in batched.missing
    result = engine.gradient_per_example(loaded, inputs, "f", {"x": 0})
    np.testing.assert_array_equal(result.gradients["w"], np.ones((2, 1, 1, 9, 9)))
    np.testing.assert_array_equal(result.values["f"], [40.5, 40.5])


def test_only_the_nodes_asked_for_are_batched(engine):
    rng = rng_for("per-example-roots")
    g = Graph()
    x, w = g.input("x"), g.input("w")
    g.sum(g.mul(x, w), name="f")
    g.op("sum_to_shape", g.input("unfed"), shape=[1], name="elsewhere")  # no rule, unfed
    inputs = {"x": rng.standard_normal((B, 2)), "w": rng.standard_normal(2)}
    loaded = engine.load_graph(g.to_proto())
    roots = ["f", "x", "w"]
    assert engine.batched_graph_for(loaded, inputs, {"x": 0}, roots).graph is not None
    kwargs: dict[str, Any] = {"wrt": ["x", "w"], "fetch": ["f"]}
    vectorized = engine.gradient_per_example(loaded, inputs, "f", {"x": 0}, **kwargs)
    loop = engine.gradient_per_example(loaded, inputs, "f", {"x": 0}, vectorize=False, **kwargs)
    for name in ("x", "w"):
        assert vectorized.gradients[name].tobytes() == loop.gradients[name].tobytes()
    np.testing.assert_array_equal(vectorized.gradients["w"], inputs["x"])
    assert vectorized.values["f"].tobytes() == loop.values["f"].tobytes()


@pytest.mark.parametrize(
    ("batch", "seed", "words", "node"),
    [
        ({"x": 0, "y": 0}, None, "input 'y' has 4 along axis 0", "y"),
        ({"x": 2, "y": 0}, None, "batch axis 2 of input 'x' is out of range", "x"),
        ({"nope": 0}, None, "batch_axes names 'nope'", None),
        ({"hidden": 0}, None, "which is not an input", "hidden"),
        ({"x": 0, "y": 0}, np.ones((4,)), "seed has shape [4]", None),
    ],
    ids=["sizes-differ", "axis-out-of-range", "unknown", "not-an-input", "bad-seed"],
)
def test_errors_are_invalid_argument_naming_the_input(client, batch, seed, words, node):
    inputs = _mlp_inputs(rng_for("per-example-errors"))
    if words.startswith("input 'y'"):
        inputs["y"] = inputs["y"][:4]
    with pytest.raises(GradientError) as error:
        client.gradient(_mlp(), "loss", inputs, seed=seed, batch=batch)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.value.details
    if node is not None:
        assert error.value.node == node


def test_non_scalar_output_without_seeds_and_batched_seed_are_invalid(client):
    g = Graph()
    x = g.input("x")
    out = g.tanh(x, name="out")
    with pytest.raises(GradientError) as error:
        client.gradient(g, out, {"x": np.ones((3, 2))}, batch={"x": 0})
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "one element per example" in error.value.details
    with pytest.raises(GradientError) as error:
        client.gradient(
            g, out, {"x": np.ones((3, 2))}, seed=np.ones((3, 2)), batched_seed=True, batch={"x": 0}
        )
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not combine" in error.value.details


def _limited_graph() -> tuple[Graph, dict[str, np.ndarray]]:
    g = Graph()
    a, b = g.input("A"), g.input("B")
    g.sum(g.tanh(g.matmul(a, b)), name="out")
    rng = rng_for("per-example-limits")
    return g, {"A": rng.standard_normal((1000, 20, 20)), "B": rng.standard_normal((20, 20))}


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "loop"])
def test_limits_charge_every_example(vectorize):
    g, inputs = _limited_graph()
    engine = Engine(Limits(max_flops=5_000_000))
    loaded = engine.load_graph(g.to_proto())
    few = {"A": inputs["A"][:2], "B": inputs["B"]}
    engine.gradient_per_example(loaded, few, "out", {"A": 0}, vectorize=vectorize)  # two fit
    with pytest.raises(LimitExceeded) as error:
        engine.gradient_per_example(loaded, inputs, "out", {"A": 0}, vectorize=vectorize)
    assert error.value.limit == "max_flops"


def test_limits_over_the_wire_are_resource_exhausted():
    g, inputs = _limited_graph()
    server, port = create_server("127.0.0.1:0", limits=Limits(max_flops=5_000_000))
    server.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=60) as limited:
            with pytest.raises(GradientError) as error:
                limited.gradient(g, "out", inputs, batch={"A": 0})
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_flops" in error.value.details
    finally:
        server.stop(0)


def test_the_loop_checks_the_deadline_between_examples(engine):
    g = Graph()
    x = g.input("x")
    g.sum(g.op("sum_to_shape", x, shape=[1]), name="f")  # no rule: the loop
    loaded = engine.load_graph(g.to_proto())
    calls = {"examples": 0}

    def check() -> None:
        calls["examples"] += 1
        if calls["examples"] > 50:
            raise DeadlineExceeded("deadline")

    with pytest.raises(DeadlineExceeded):
        engine.gradient_per_example(
            loaded, {"x": np.ones((1000, 2))}, "f", {"x": 0}, check_deadline=check
        )
    assert calls["examples"] == 51


# ---------------------------------------------------------------------------------------------
# 4. ListOps, the asyncio twin and the CLI


def test_list_ops_says_which_ops_are_batchable(client):
    ops = {op.name: op for op in client.list_ops()}
    assert {name for name, op in ops.items() if op.batchable} == set(RULES)
    assert ops["conv2d"].batchable and not ops["scatter_add"].batchable


def test_async_twin(server_address):
    g = Graph()
    x, w = g.input("x"), g.input("w")
    f = g.sum(g.mul(x, w), name="f")

    async def run() -> Any:
        async with AsyncGradientClient(server_address, timeout=60) as client:
            return await client.gradient(g, f, {"x": np.eye(2), "w": [3.0, 4.0]}, batch={x: 0})

    result = asyncio.run(run())
    np.testing.assert_array_equal(result.gradients["w"], np.eye(2))
    np.testing.assert_array_equal(result.gradients["x"], [[3.0, 4.0], [3.0, 4.0]])
    np.testing.assert_array_equal(result.values["f"], [3.0, 4.0])


def test_cli_grad_batch(server_address, capsys):
    vectorized = str(ROOT / "examples" / "lecture_vectorized.json")
    graph = json.loads(Path(vectorized).read_text())
    assert {node["name"] for node in graph["nodes"]} >= {"W", "x"}
    args = [vectorized, "-i", "W=[[0.1,0.5],[-0.3,0.8]]", "-i", "x=[[0.2,0.4],[1,0]]"]
    code = main(["--json", "grad", *args, "--batch", "x=0", "--target", server_address])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    single = main(
        [
            "--json",
            "grad",
            vectorized,
            "-i",
            "W=[[0.1,0.5],[-0.3,0.8]]",
            "-i",
            "x=[1,0]",
            "--target",
            server_address,
        ]
    )
    one = json.loads(capsys.readouterr().out)
    assert single == 0
    for name, gradient in one["gradients"].items():
        assert printed["gradients"][name][1] == gradient, name
