"""Forward mode: JacobianVectorProduct (client.jvp), against independent truths.

- Every differentiable op of the op table (the rows of test_second_order.OP_ROWS, which a
  coverage test there ties to OPS; re-checked here): the server's J·v of op(inputs) along
  random tangents against central differences of the in-process engine's forward pass, in
  float64, and against PyTorch's torch.func.jvp where torch has the op (the rows it lacks are
  skipped, saying why).
- Exact values: the lecture's f = (x + y)·z and f(x, W) = ||W·x||², every node's tangent.
- Non-scalar outputs (an MLP layer, softmax), float32 graphs, mixed precision.
- Composition: the JVP of a gradient graph is a Hessian-vector product (forward over reverse).
- K stacked tangents (batched) equal K separate calls bit for bit.
- Errors: tangent shape and dtype mismatches, unknown names, non-float inputs and outputs.
- The gradient-client jvp command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gradcheck import NOT_DIFFERENTIABLE, rng_for
from test_second_order import OP_ROWS, Row

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_pb2_grpc
from gradient_client import GradientError, Graph, to_proto
from gradient_client.cli import main
from gradient_server.engine import Engine
from gradient_server.ops import OPS

try:
    import torch

    F = torch.nn.functional
except ImportError:  # torch is not a dependency: its oracle runs where it is installed
    torch = None
    F = None

requires_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is not installed: the torch.func.jvp oracle runs where it is"
)

EPS = 1e-6
RTOL = 1e-6
ATOL = 1e-6
"""J·v against central differences of the forward pass (float64)."""

TORCH_TOL = 1e-10
"""J·v against torch.func.jvp (both exact up to rounding)."""

ROOT = Path(__file__).resolve().parent.parent


def fd_jvp(
    engine: Engine,
    graph: Graph,
    feeds: Mapping[str, np.ndarray],
    output: str,
    tangents: Mapping[str, np.ndarray],
    eps: float = EPS,
) -> np.ndarray:
    """(f(x + eps·v) - f(x - eps·v)) / (2·eps), by the in-process engine's forward pass."""
    loaded = engine.load_graph(graph.to_proto())
    plus = {**feeds, **{n: feeds[n] + eps * v for n, v in tangents.items()}}
    minus = {**feeds, **{n: feeds[n] - eps * v for n, v in tangents.items()}}
    high = engine.forward(loaded, plus, [output])[output]
    low = engine.forward(loaded, minus, [output])[output]
    return (high - low) / (2 * eps)


def _row_problem(r: Row, seed: str) -> tuple[Graph, str, dict, dict]:
    rng = rng_for(f"jvp-{seed}-{r.id}")
    g = Graph()
    operands = [g.input(f"x{i}") for i in range(len(r.shapes))]
    feeds = {
        node.name: domain(rng, shape)
        for node, domain, shape in zip(operands, r.domains, r.shapes, strict=True)
    }
    out = g.op(r.op, *operands, name="out", **r.attrs)
    tangents = {n: rng.standard_normal(v.shape) for n, v in feeds.items() if v.dtype.kind == "f"}
    return g, out.name, feeds, tangents


# ---------------------------------------------------------------------------------------------
# 1. Every op: finite differences and torch.func.jvp


def test_every_differentiable_op_has_a_row():
    tested = {r.op for r in OP_ROWS}
    missing = sorted(set(OPS) - tested - set(NOT_DIFFERENTIABLE))
    assert not missing, f"differentiable ops without a JVP row: {missing}"


@pytest.mark.parametrize("r", OP_ROWS, ids=lambda r: r.id)
def test_jvp_matches_finite_differences(client, engine, r):
    g, out, feeds, tangents = _row_problem(r, "fd")

    result = client.jvp(g, out, feeds, tangents)

    tangent = result.tangents[out]
    value = result.values[out]
    assert tangent.shape == value.shape and tangent.dtype == value.dtype == np.float64
    expected = fd_jvp(engine, g, feeds, out, tangents)
    np.testing.assert_allclose(tangent, expected, rtol=RTOL, atol=ATOL, err_msg="J·v")


def _dims(x: Any, axis: Any) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return tuple(a % max(x.ndim, 1) for a in axes)


def _reduce(fn: Callable) -> Callable:
    def reduce(a: dict, x: Any) -> Any:
        if x.ndim == 0:
            return fn(x.reshape(1), (0,), False).reshape(())
        return fn(x, _dims(x, a.get("axis")), a.get("keepdims", False))

    return reduce


def _prod(x: Any, dims: tuple[int, ...], keepdim: bool) -> Any:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=True)
    return x if keepdim else x.squeeze(dims) if dims else x


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return (values[0], values[-1])


def _expand_dims(a: dict, x: Any) -> Any:
    axes = a["axis"] if isinstance(a["axis"], (list, tuple)) else [a["axis"]]
    rank = x.ndim + len(axes)
    for axis in sorted(axis % rank for axis in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(a: dict, x: Any) -> Any:
    if a.get("axis") is None:
        return x.squeeze()
    return x.squeeze(_dims(x, a["axis"]))


def _slice(a: dict, x: Any) -> Any:
    chosen = [slice(None)] * x.ndim
    axes = a.get("axes") or range(len(a["starts"]))
    steps = a.get("steps") or [1] * len(a["starts"])
    for axis, start, stop, step in zip(axes, a["starts"], a["stops"], steps, strict=True):
        if step < 0:
            raise NotImplementedError("torch tensors do not take negative slice steps")
        chosen[axis] = slice(start, stop, step)
    return x[tuple(chosen)]


def _pad(a: dict, x: Any) -> Any:
    pads = a["pads"]
    widths: list[int] = []
    for i in reversed(range(x.ndim)):
        widths += [pads[2 * i], pads[2 * i + 1]]
    return F.pad(x, widths, value=a.get("value", 0.0))


def _take(a: dict, x: Any, indices: Any) -> Any:
    axis = a.get("axis", 0) % x.ndim
    flat = torch.as_tensor(np.asarray(indices).reshape(-1) % x.shape[axis])
    picked = x.index_select(axis, flat)
    return picked.reshape(x.shape[:axis] + tuple(np.shape(indices)) + x.shape[axis + 1 :])


def _sum_to_shape(a: dict, x: Any) -> Any:
    shape = tuple(a["shape"])
    total = x.sum(dim=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
    for axis, size in enumerate(shape):
        if size == 1:
            total = total.sum(dim=axis, keepdim=True)
    return total.reshape(shape)


def _cross_entropy(a: dict, logits: Any, labels: Any) -> Any:
    classes = logits.shape[-1]
    flat = logits.reshape(-1, classes)
    if isinstance(labels, np.ndarray) or not torch.is_floating_point(labels):
        target = torch.as_tensor(np.asarray(labels)).reshape(-1)
    else:
        target = labels.reshape(-1, classes)
    reduction = a.get("reduction", "mean")
    loss = F.cross_entropy(
        flat, target, reduction=reduction, label_smoothing=a.get("label_smoothing", 0.0)
    )
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss


def _conv(a: dict) -> dict:
    return {
        "stride": _pair(a.get("stride"), 1),
        "padding": _pair(a.get("padding"), 0),
        "dilation": _pair(a.get("dilation"), 1),
    }


def _pool(a: dict) -> dict:
    kernel = _pair(a["kernel"], 1)
    stride = kernel if a.get("stride") is None else _pair(a["stride"], 1)
    return {"kernel_size": kernel, "stride": stride, "padding": _pair(a.get("padding"), 0)}


TORCH: dict[str, Callable[..., Any]] = {
    "neg": lambda a, x: -x,
    "exp": lambda a, x: torch.exp(x),
    "log": lambda a, x: torch.log(x),
    "sqrt": lambda a, x: torch.sqrt(x),
    "square": lambda a, x: torch.square(x),
    "tanh": lambda a, x: torch.tanh(x),
    "sigmoid": lambda a, x: torch.sigmoid(x),
    "sin": lambda a, x: torch.sin(x),
    "cos": lambda a, x: torch.cos(x),
    "log1p": lambda a, x: torch.log1p(x),
    "expm1": lambda a, x: torch.expm1(x),
    "softplus": lambda a, x: F.softplus(x),
    "reciprocal": lambda a, x: torch.reciprocal(x),
    "abs": lambda a, x: torch.abs(x),
    "sign": lambda a, x: torch.sign(x),
    "relu": lambda a, x: torch.relu(x),
    "leaky_relu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "clip": lambda a, x: torch.clamp(x, a.get("min"), a.get("max")),
    "add": lambda a, x, y: x + y,
    "sub": lambda a, x, y: x - y,
    "mul": lambda a, x, y: x * y,
    "div": lambda a, x, y: x / y,
    "pow": lambda a, x, y: torch.pow(x, y),
    "maximum": lambda a, x, y: torch.maximum(x, y),
    "minimum": lambda a, x, y: torch.minimum(x, y),
    "where": lambda a, c, x, y: torch.where(torch.as_tensor(np.asarray(c)), x, y),
    "sum": _reduce(lambda x, d, k: torch.sum(x, dim=d, keepdim=k)),
    "mean": _reduce(lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "max": _reduce(lambda x, d, k: torch.amax(x, dim=d, keepdim=k)),
    "min": _reduce(lambda x, d, k: torch.amin(x, dim=d, keepdim=k)),
    "prod": _reduce(_prod),
    "logsumexp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "norm": _reduce(lambda x, d, k: torch.linalg.vector_norm(x, dim=d, keepdim=k)),
    "var": lambda a, x: _reduce(
        lambda x, d, k: torch.var(x, dim=d, keepdim=k, correction=a.get("ddof", 0))
    )(a, x),
    "matmul": lambda a, x, y: torch.matmul(x, y),
    "transpose": lambda a, x: x.permute(
        a["axes"] if a.get("axes") is not None else tuple(reversed(range(x.ndim)))
    ),
    "reshape": lambda a, x: x.reshape(a["shape"]),
    "broadcast_to": lambda a, x: x.broadcast_to(a["shape"]),
    "sum_to_shape": _sum_to_shape,
    "cast": lambda a, x: x.to(getattr(torch, a["dtype"])),
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "flatten": lambda a, x: torch.flatten(x, a.get("start_axis", 0), a.get("end_axis", -1)),
    "slice": _slice,
    "pad": _pad,
    "concat": lambda a, *xs: torch.cat(xs, dim=a.get("axis", 0)),
    "stack": lambda a, *xs: torch.stack(xs, dim=a.get("axis", 0)),
    "take": _take,
    "softmax": lambda a, x: torch.softmax(x, dim=a.get("axis", -1)),
    "log_softmax": lambda a, x: torch.log_softmax(x, dim=a.get("axis", -1)),
    "cross_entropy": _cross_entropy,
    "conv2d": lambda a, x, w: F.conv2d(x, w, **_conv(a)),
    "conv2d_input_grad": lambda a, g, w: torch.nn.grad.conv2d_input(
        a["input_shape"], w, g, **_conv(a)
    ),
    "conv2d_weight_grad": lambda a, x, g: torch.nn.grad.conv2d_weight(
        x, a["weight_shape"], g, **_conv(a)
    ),
    "avg_pool2d": lambda a, x: F.avg_pool2d(x, count_include_pad=True, **_pool(a)),
    "max_pool2d": lambda a, x: F.max_pool2d(x, **_pool(a)),
}
"""torch's version of each op, f(attrs, *operands); integer operands stay numpy arrays."""

NO_TORCH: dict[str, str] = {
    "prod_others": "torch has no product-of-the-others op (finite differences cover it)",
    "unslice": "an adjoint op (slice's transpose) with no torch counterpart",
    "scatter_add": "an adjoint op (take's transpose) with no torch op of the same semantics",
    "avg_pool2d_grad": "an adjoint op (avg_pool2d's transpose) with no torch counterpart",
    "max_pool2d_grad": "an adjoint op (max_pool2d's transpose) with no torch counterpart",
    "max_pool2d_gather": "an adjoint op (max_pool2d's routing) with no torch counterpart",
}


def test_every_row_op_has_a_torch_counterpart_or_a_reason():
    ops = {r.op for r in OP_ROWS}
    assert not ops - set(TORCH) - set(NO_TORCH), ops - set(TORCH) - set(NO_TORCH)
    assert not set(TORCH) & set(NO_TORCH)


@requires_torch
@pytest.mark.parametrize("r", OP_ROWS, ids=lambda r: r.id)
def test_jvp_matches_torch_func_jvp(client, r):
    if r.op in NO_TORCH:
        print(f"{r.id}: no torch check: {NO_TORCH[r.op]}")
        pytest.skip(NO_TORCH[r.op])
    g, out, feeds, tangents = _row_problem(r, "torch")
    names = list(feeds)
    floats = [n for n in names if feeds[n].dtype.kind == "f"]

    def f(*primals: Any) -> Any:
        given = dict(zip(floats, primals, strict=True))
        operands = [given.get(n, feeds[n]) for n in names]
        return TORCH[r.op](r.attrs, *operands)

    try:
        value, expected = torch.func.jvp(
            f,
            tuple(torch.from_numpy(feeds[n]) for n in floats),
            tuple(torch.from_numpy(tangents[n]) for n in floats),
        )
    except NotImplementedError as error:
        print(f"{r.id}: no torch check: {error}")
        pytest.skip(str(error))

    result = client.jvp(g, out, feeds, tangents)

    np.testing.assert_allclose(result.values[out], value.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        result.tangents[out], expected.numpy(), rtol=TORCH_TOL, atol=TORCH_TOL
    )


# ---------------------------------------------------------------------------------------------
# 2. Exact values, non-scalar outputs, dtypes, composition


def test_lecture_gates_every_tangent(client):
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    q = g.add(x, y, name="q")
    f = g.mul(q, z, name="f")
    inputs = {"x": -2.0, "y": 5.0, "z": -4.0}
    v = {"x": 1.0, "y": -3.0, "z": 2.0}

    r = client.jvp(g, f, inputs, v, all_tangents=True)

    # dq = dx + dy = -2; df = z·dq + q·dz = 8 + 6 = 14.
    assert {n: float(t) for n, t in r.tangents.items()} == {
        "x": 1.0, "y": -3.0, "z": 2.0, "q": -2.0, "f": 14.0,
    }  # fmt: skip
    assert float(r.values[f]) == -12.0 and set(r.values) == {"f"}
    # Only the output by default; tangents_of adds nodes; fetch adds values.
    only = client.jvp(g, f, inputs, {"z": 1.0}, tangents_of=[q], fetch=[q])
    assert set(only.tangents) == {"f", "q"} and set(only.values) == {"f", "q"}
    assert float(only.tangents[f]) == 3.0 and float(only.tangents[q]) == 0.0


def test_lecture_vectorized_tangent(client):
    g = Graph()
    W, x = g.input("W"), g.input("x")
    q = g.matmul(W, x, name="q")
    f = g.sum(g.square(q), name="f")
    w_value, x_value = np.array([[0.1, 0.5], [-0.3, 0.8]]), np.array([0.2, 0.4])
    v = {"W": np.array([[1.0, -1.0], [0.5, 2.0]]), "x": np.array([0.3, -0.7])}

    r = client.jvp(g, f, {"W": w_value, "x": x_value}, v, tangents_of=[q])

    dq = v["W"] @ x_value + w_value @ v["x"]
    np.testing.assert_allclose(r.tangents[q], dq, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(r.tangents[f], 2 * (w_value @ x_value) @ dq, rtol=1e-14)
    # <∇f, v> from the reverse pass agrees.
    grads = client.gradient(g, f, {"W": w_value, "x": x_value}).gradients
    dot = sum(float(np.sum(grads[n] * v[n])) for n in v)
    assert float(r.tangents[f]) == pytest.approx(dot, rel=1e-14)


def _mlp(g: Graph) -> Any:
    x, w1, b1, w2 = g.input("x"), g.input("W1"), g.input("b1"), g.input("W2")
    return g.softmax(g.matmul(g.tanh(g.add(g.matmul(x, w1), b1)), w2), axis=-1, name="probs")


def _mlp_inputs(rng: np.random.Generator, dtype: str = "float64") -> dict[str, np.ndarray]:
    shapes = {"x": (4, 3), "W1": (3, 5), "b1": (5,), "W2": (5, 2)}
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def test_non_scalar_output_matches_torch_and_finite_differences(client, engine):
    rng = rng_for("jvp-mlp")
    g = Graph()
    probs = _mlp(g)
    inputs = _mlp_inputs(rng)
    v = {n: rng.standard_normal(a.shape) for n, a in inputs.items() if n != "b1"}

    r = client.jvp(g, probs, inputs, v)

    assert r.tangents[probs].shape == (4, 2)
    np.testing.assert_allclose(
        r.tangents[probs], fd_jvp(engine, g, inputs, "probs", v), rtol=1e-6, atol=1e-8
    )
    if torch is None:
        return  # the finite differences above are the check; torch adds one where installed

    def torch_mlp(x, w1, b1, w2):
        return torch.softmax(torch.tanh(x @ w1 + b1) @ w2, dim=-1)

    names = ["x", "W1", "b1", "W2"]
    full_v = {**v, "b1": np.zeros(5)}
    _, expected = torch.func.jvp(
        torch_mlp,
        tuple(torch.from_numpy(inputs[n]) for n in names),
        tuple(torch.from_numpy(full_v[n]) for n in names),
    )
    np.testing.assert_allclose(r.tangents[probs], expected.numpy(), rtol=1e-12, atol=1e-14)


def test_float32_graph_gives_float32_tangents(client):
    rng = rng_for("jvp-float32")
    g = Graph()
    probs = _mlp(g)
    inputs = _mlp_inputs(rng, "float32")
    v = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in inputs.items()}

    r32 = client.jvp(g, probs, inputs, v, all_tangents=True)
    r64 = client.jvp(
        g, probs, {n: a.astype(np.float64) for n, a in inputs.items()}, v, all_tangents=True
    )

    for name, tangent in r32.tangents.items():
        assert tangent.dtype == np.float32, name
        np.testing.assert_allclose(tangent, r64.tangents[name], rtol=1e-4, atol=1e-5)
    # A float64 tangent for a float32 input is cast to float32.
    wide = client.jvp(g, probs, inputs, {n: a.astype(np.float64) for n, a in v.items()})
    assert wide.tangents[probs].tobytes() == r32.tangents[probs].tobytes()


def test_mixed_precision_tangents_keep_each_nodes_dtype(client):
    g = Graph()
    x, w = g.input("x"), g.input("w")
    y = g.mul(x, w, name="y")  # float32 * float64 -> float64
    f = g.sum(g.tanh(y), name="f")
    x32, w64 = np.array([0.5, -1.0], np.float32), np.array([2.0, 0.25])

    r = client.jvp(g, f, {"x": x32, "w": w64}, {"x": [1.0, 1.0]}, tangents_of=[x, y])

    assert r.tangents[x].dtype == np.float32 and r.tangents[y].dtype == np.float64
    np.testing.assert_array_equal(r.tangents[y], w64)
    expected = np.sum((1 - np.tanh(x32.astype(np.float64) * w64) ** 2) * w64)
    assert float(r.tangents[f]) == pytest.approx(expected, rel=1e-14)


def test_jvp_of_a_gradient_graph_is_a_hessian_vector_product(client):
    # Forward over reverse: the tangent of ∇f along v is H·v.
    rng = rng_for("jvp-forward-over-reverse")
    inputs = {"x": rng.uniform(-1, 1, (4, 3)), "W": rng.uniform(-1, 1, (3, 2))}
    g = Graph()
    f = g.sum(g.tanh(g.matmul(g.input("x"), g.input("W"))), name="f")
    v = {"x": rng.standard_normal((4, 3)), "W": rng.standard_normal((3, 2))}
    gg = client.gradient_graph(g, f, inputs, wrt=["x", "W"])

    r = client.jvp(
        gg.graph,
        gg.gradients["x"],
        {**inputs, gg.seed: 1.0},
        v,
        tangents_of=[gg.gradients["W"]],
    )
    product = client.hvp(g, f, inputs, v)

    np.testing.assert_allclose(r.tangents[gg.gradients["x"]], product["x"], rtol=1e-12)
    np.testing.assert_allclose(r.tangents[gg.gradients["W"]], product["W"], rtol=1e-12)


def test_nodes_off_the_tangent_path_and_integer_nodes(client):
    g = Graph()
    x, k = g.input("x"), g.input("k")
    other = g.exp(g.input("other"), name="other_exp")
    n = g.cast(k, "float64", name="n")
    f = g.add(g.sum(g.mul(x, n)), g.sum(other), name="f")
    inputs = {"x": [1.0, 2.0], "k": np.array([3, 4]), "other": [0.0, 1.0]}

    r = client.jvp(g, f, inputs, {"x": [1.0, -1.0]}, all_tangents=True)

    assert r.skipped == {"k": "int64 is not differentiable"}
    np.testing.assert_array_equal(r.tangents["other_exp"], [0.0, 0.0])
    np.testing.assert_array_equal(r.tangents["n"], [0.0, 0.0])
    assert float(r.tangents[f]) == -1.0
    # No tangent at all: every tangent is zeros.
    none = client.jvp(g, f, inputs, {})
    assert float(none.tangents[f]) == 0.0


# ---------------------------------------------------------------------------------------------
# 3. Several tangents in one call


def test_batched_tangents_equal_separate_calls_bit_for_bit(client):
    rng = rng_for("jvp-batched")
    g = Graph()
    probs = _mlp(g)
    inputs = _mlp_inputs(rng)
    k = 5
    stacked = {n: rng.standard_normal((k, *a.shape)) for n, a in inputs.items() if n != "W2"}

    batch = client.jvp(g, probs, inputs, stacked, all_tangents=True, batched=True)

    for row in range(k):
        single = client.jvp(
            g, probs, inputs, {n: t[row] for n, t in stacked.items()}, all_tangents=True
        )
        assert set(single.tangents) == set(batch.tangents)
        for name, tangent in single.tangents.items():
            assert batch.tangents[name].shape == (k, *tangent.shape), name
            assert batch.tangents[name][row].tobytes() == tangent.tobytes(), (name, row)
    assert batch.values[probs].shape == (4, 2)  # values are not stacked


def test_batched_tangents_must_agree_on_k(client):
    g = Graph()
    f = g.mul(g.input("x"), g.input("y"), name="f")
    with pytest.raises(GradientError) as error:
        client.jvp(g, f, {"x": 1.0, "y": 2.0}, {"x": np.ones(3), "y": np.ones(2)}, batched=True)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'y'" in error.value.details and "K" in error.value.details


# ---------------------------------------------------------------------------------------------
# 4. Errors


def _lecture() -> tuple[Graph, Any]:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    return g, g.mul(g.add(x, y, name="q"), z, name="f")


LECTURE = {"x": -2.0, "y": 5.0, "z": -4.0}


@pytest.mark.parametrize(
    ("tangents", "node", "words"),
    [
        ({"x": [1.0, 2.0]}, "x", "shape [2]"),
        ({"q": 1.0}, "q", "not an input"),
    ],
    ids=["shape", "not-an-input"],
)
def test_bad_tangents_are_invalid_argument_naming_the_input(client, tangents, node, words):
    g, f = _lecture()
    with pytest.raises(GradientError) as error:
        client.jvp(g, f, LECTURE, tangents)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{node}'" in error.value.details and words in error.value.details
    assert error.value.node == node


def test_integer_tangent_is_invalid_argument_over_the_wire(server_address):
    # The SDK casts tangents to float (as hvp's vector); a raw request may send any dtype.
    g, _ = _lecture()
    request = service_pb2.JacobianVectorProductRequest(
        graph=g.to_proto(),
        inputs={name: to_proto(np.float64(value)) for name, value in LECTURE.items()},
        output="f",
        tangents={"x": to_proto(np.array(1))},
    )
    with grpc.insecure_channel(server_address) as channel:
        stub = service_pb2_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.JacobianVectorProduct(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in error.value.details() and "int64" in error.value.details()


def test_unknown_names_are_invalid_argument(client):
    g, f = _lecture()
    for call in (
        lambda: client.jvp(g, f, LECTURE, {"ghost": 1.0}),
        lambda: client.jvp(g, "nope", LECTURE, {"x": 1.0}),
        lambda: client.jvp(g, f, LECTURE, {"x": 1.0}, tangents_of=["nope"]),
        lambda: client.jvp(g, f, LECTURE, {"x": 1.0}, fetch=["nope"]),
    ):
        with pytest.raises(GradientError) as error:
            call()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'ghost'" in error.value.details or "'nope'" in error.value.details


def test_non_float_inputs_and_outputs_are_invalid_argument(client):
    g = Graph()
    k = g.input("k")
    x = g.input("x")
    doubled = g.add(k, k, name="doubled")
    f = g.mul(x, g.cast(doubled, "float64"), name="f")
    inputs = {"k": np.array(3), "x": 1.5}
    for call, node in (
        (lambda: client.jvp(g, f, inputs, {"k": 1.0}), "k"),
        (lambda: client.jvp(g, doubled, inputs, {"x": 1.0}), "doubled"),
        (lambda: client.jvp(g, f, inputs, {"x": 1.0}, tangents_of=[doubled]), "doubled"),
    ):
        with pytest.raises(GradientError) as error:
            call()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{node}'" in error.value.details and "int64" in error.value.details
        assert error.value.node == node


# ---------------------------------------------------------------------------------------------
# 5. The command line


def test_cli_jvp(server_address, capsys):
    scalar = str(ROOT / "examples" / "lecture_scalar.json")
    args = [scalar, "-i", "x=-2", "-i", "y=5", "-i", "z=-4", "--tangent", "x=1"]
    code = main(["jvp", *args, "--tangent", "z=2", "--all-tangents", "--target", server_address])
    out, _ = capsys.readouterr()
    assert code == 0
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert rows == {"x": "1", "y": "0", "z": "2", "q": "1", "f": "2"}
    code = main(["--json", "jvp", *args, "--target", server_address])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed == {"output": "f", "value": -12.0, "tangents": {"f": -4.0}, "skipped": {}}
    code = main(["jvp", *args, "--tangent", "x=[1,2]", "--target", server_address])
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT:") and "'x'" in err
