"""Several seeds in one call (Gradient.batched_seed) and whole Jacobians (client.jacobian).

- K stacked VJPs equal K separate Gradient calls bit for bit (non-scalar and scalar outputs,
  every node's gradient, float32), values are not stacked, and a bad batched seed is
  INVALID_ARGUMENT.
- Limits charge all K rows (and a Jacobian's products) before anything runs:
  RESOURCE_EXHAUSTED naming max_flops, while one row alone passes.
- Jacobians against torch.autograd.functional.jacobian and central differences, for a tall
  output (reverse mode chosen) and a wide one (forward mode chosen), both modes forced, several
  inputs, float32; Hessians against torch.autograd.functional.hessian.
- Errors, the asyncio twins, and the gradient-client jacobian command.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gradcheck import rng_for

from gradient_client import AsyncGradientClient, GradientClient, GradientError, Graph
from gradient_client.cli import main
from gradient_server.engine import Engine, Limits
from gradient_server.errors import LimitExceeded
from gradient_server.service import create_server

try:
    import torch
except ImportError:  # torch is not a dependency: its oracle runs where it is installed
    torch = None

ROOT = Path(__file__).resolve().parent.parent


def _mlp(g: Graph) -> Any:
    x, w1, b1, w2 = g.input("x"), g.input("W1"), g.input("b1"), g.input("W2")
    hidden = g.tanh(g.add(g.matmul(x, w1), b1), name="hidden")
    return g.softmax(g.matmul(hidden, w2), axis=-1, name="probs")


def _mlp_inputs(rng: np.random.Generator, dtype: str = "float64") -> dict[str, np.ndarray]:
    shapes = {"x": (4, 3), "W1": (3, 5), "b1": (5,), "W2": (5, 2)}
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def _torch_mlp(x: Any, w1: Any, b1: Any, w2: Any) -> Any:
    return torch.softmax(torch.tanh(x @ w1 + b1) @ w2, dim=-1)


# ---------------------------------------------------------------------------------------------
# 1. Batched seeds


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batched_vjps_equal_separate_calls_bit_for_bit(client, dtype):
    rng = rng_for(f"batched-vjp-{dtype}")
    g = Graph()
    probs = _mlp(g)
    g.exp(g.input("unused"), name="dead_end")  # its gradient is zeros in every row
    inputs = {**_mlp_inputs(rng, dtype), "unused": np.ones(3, dtype)}
    k = 6
    seeds = rng.standard_normal((k, 4, 2)).astype(dtype)

    batch = client.gradient(g, probs, inputs, seed=seeds, batched_seed=True)

    assert set(batch.values) == {node.name for node in g.nodes}
    for row in range(k):
        single = client.gradient(g, probs, inputs, seed=seeds[row])
        assert set(single.gradients) == set(batch.gradients)
        for name, gradient in single.gradients.items():
            assert batch.gradients[name].shape == (k, *gradient.shape), name
            assert batch.gradients[name].dtype == gradient.dtype == np.dtype(dtype), name
            assert batch.gradients[name][row].tobytes() == gradient.tobytes(), (name, row)
        for name, value in single.values.items():
            assert batch.values[name].tobytes() == value.tobytes(), name
    np.testing.assert_array_equal(batch.gradients["unused"], np.zeros((k, 3)))


def test_batched_seeds_of_a_scalar_output_scale_the_gradient(client):
    g = Graph()
    x = g.input("x")
    f = g.sum(g.square(x), name="f")
    x_value = np.array([0.5, -1.0, 2.0])

    r = client.gradient(g, f, {"x": x_value}, wrt=[x], seed=[1.0, -2.0, 0.5], batched_seed=True)

    np.testing.assert_array_equal(r.gradients[x], np.outer([1.0, -2.0, 0.5], 2 * x_value))


@pytest.mark.parametrize(
    ("seed", "words"),
    [(np.ones((4, 2)), "[K] + [4, 2]"), (np.ones((3, 4, 3)), "shape [3, 4, 3]"), (None, "seed")],
    ids=["no-leading-axis", "wrong-shape", "missing"],
)
def test_bad_batched_seeds_are_invalid_argument(client, seed, words):
    g = Graph()
    probs = _mlp(g)
    inputs = _mlp_inputs(rng_for("bad-batched-seed"))
    with pytest.raises(GradientError) as error:
        client.gradient(g, probs, inputs, seed=seed, batched_seed=True)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.value.details


# ---------------------------------------------------------------------------------------------
# 2. Limits charge every row before anything runs


def _matmul_graph() -> tuple[Graph, Any, dict[str, np.ndarray]]:
    g = Graph()
    a, b = g.input("A"), g.input("B")
    out = g.tanh(g.matmul(a, b), name="out")
    rng = rng_for("limits")
    return g, out, {"A": rng.standard_normal((20, 20)), "B": rng.standard_normal((20, 20))}


def test_engine_limits_charge_k_rows():
    g, out, inputs = _matmul_graph()
    engine = Engine(Limits(max_flops=5_000_000))
    loaded = engine.load_graph(g.to_proto())
    seed = np.ones((20, 20))
    engine.gradient(loaded, inputs, "out", seed)  # one VJP fits
    engine.gradient_batched(loaded, inputs, "out", np.stack([seed, seed]))  # two do too
    with pytest.raises(LimitExceeded) as error:
        engine.gradient_batched(loaded, inputs, "out", np.ones((1000, 20, 20)))
    assert error.value.limit == "max_flops" and "1000 products" in str(error.value)
    with pytest.raises(LimitExceeded):
        engine.jvp(loaded, inputs, "out", {"A": np.ones((1000, 20, 20))}, batched=True)
    with pytest.raises(LimitExceeded):  # 400 output elements, 800 input ones: 400 VJPs
        engine.jacobian(loaded, inputs, "out")


def test_limits_over_the_wire_are_resource_exhausted():
    g, out, inputs = _matmul_graph()
    server, port = create_server("127.0.0.1:0", limits=Limits(max_flops=5_000_000))
    server.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=60) as limited:
            limited.gradient(g, out, inputs, seed=np.ones((2, 20, 20)), batched_seed=True)
            for call in (
                lambda: limited.gradient(
                    g, out, inputs, seed=np.ones((1000, 20, 20)), batched_seed=True
                ),
                lambda: limited.jvp(g, out, inputs, {"B": np.ones((1000, 20, 20))}, batched=True),
                lambda: limited.jacobian(g, out, inputs),
            ):
                with pytest.raises(GradientError) as error:
                    call()
                assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_flops" in error.value.details
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------------------------
# 3. Jacobians


def fd_jacobian(engine: Engine, g: Graph, inputs: dict, output: str, name: str) -> np.ndarray:
    loaded = engine.load_graph(g.to_proto())
    base = inputs[name]
    out_shape = engine.forward(loaded, inputs, [output])[output].shape
    jac = np.zeros(out_shape + base.shape)
    for index in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[index] += 1e-6
        minus[index] -= 1e-6
        high = engine.forward(loaded, {**inputs, name: plus}, [output])[output]
        low = engine.forward(loaded, {**inputs, name: minus}, [output])[output]
        jac[(...,) + index] = (high - low) / 2e-6
    return jac


def test_tall_output_uses_reverse_mode(client, engine):
    # 8 output elements, 42 input elements: 8 VJPs.
    rng = rng_for("jacobian-tall")
    g = Graph()
    probs = _mlp(g)
    inputs = _mlp_inputs(rng)
    names = ["x", "W1", "b1", "W2"]

    r = client.jacobian(g, probs, inputs)

    assert r.mode == "reverse" and r.products == 8
    for name in names:
        assert r[name].shape == (4, 2, *inputs[name].shape), name
        np.testing.assert_allclose(
            r[name], fd_jacobian(engine, g, inputs, "probs", name), rtol=1e-6, atol=1e-8
        )
    if torch is not None:  # a second oracle where PyTorch is installed
        expected = torch.autograd.functional.jacobian(
            _torch_mlp, tuple(torch.from_numpy(inputs[n]) for n in names)
        )
        for name, truth in zip(names, expected, strict=True):
            np.testing.assert_allclose(r[name], truth.numpy(), rtol=1e-12, atol=1e-14)
    forced = client.jacobian(g, probs, inputs, mode="forward")
    assert forced.mode == "forward" and forced.products == 42
    for name in names:
        np.testing.assert_allclose(forced[name], r[name], rtol=1e-12, atol=1e-14)


def _wide(g: Graph) -> Any:
    # Output (3, 4) from inputs of 2 and 1 elements.
    x, s = g.input("x"), g.input("s")
    grid = g.constant(np.linspace(-1.0, 1.0, 12).reshape(3, 4, 1))
    return g.mul(g.sin(g.sum(g.mul(grid, x), axis=-1)), g.exp(s), name="out")


def test_wide_output_uses_forward_mode(client, engine):
    inputs = {"x": np.array([0.3, -1.2]), "s": np.array(0.4)}
    g = Graph()
    out = _wide(g)

    r = client.jacobian(g, out, inputs, wrt=["x", "s"])

    assert r.mode == "forward" and r.products == 3
    for name in ("x", "s"):
        assert r[name].shape == (3, 4, *inputs[name].shape)
        np.testing.assert_allclose(
            r[name], fd_jacobian(engine, g, inputs, "out", name), rtol=1e-6, atol=1e-8
        )
    # Exact, by hand: out = sin(grid·x summed) · e^s.
    grid = np.linspace(-1.0, 1.0, 12).reshape(3, 4, 1)
    inner = (grid * inputs["x"]).sum(-1)
    scale = np.exp(inputs["s"])
    by_x = np.broadcast_to(np.cos(inner)[..., None] * grid * scale, (3, 4, 2))
    np.testing.assert_allclose(r["x"], by_x, rtol=1e-12)
    np.testing.assert_allclose(r["s"], np.sin(inner) * scale, rtol=1e-12)
    forced = client.jacobian(g, out, inputs, wrt=["x", "s"], mode="reverse")
    assert forced.mode == "reverse" and forced.products == 12
    for name in ("x", "s"):
        np.testing.assert_allclose(forced[name], r[name], rtol=1e-12, atol=1e-14)


def test_float32_jacobian_stays_float32(client):
    rng = rng_for("jacobian-float32")
    g = Graph()
    probs = _mlp(g)
    inputs = _mlp_inputs(rng, "float32")
    wide = {n: a.astype(np.float64) for n, a in inputs.items()}
    for mode in ("reverse", "forward"):
        r32 = client.jacobian(g, probs, inputs, wrt=["x", "W2"], mode=mode)
        r64 = client.jacobian(g, probs, wide, wrt=["x", "W2"], mode=mode)
        for name in ("x", "W2"):
            assert r32[name].dtype == np.float32
            np.testing.assert_allclose(r32[name], r64[name], rtol=1e-4, atol=1e-5)


def test_hessian_matches_finite_differences_of_the_gradient(client):
    rng = rng_for("hessian-fd")
    x_value, w_value = rng.standard_normal((2, 3)), rng.standard_normal((3,))
    g = Graph()
    x, w = g.input("x"), g.input("w")
    f = g.sum(g.tanh(g.mul(g.matmul(x, w), g.sum(g.square(x)))), name="f")
    full = client.hessian(g, f, {"x": x_value, "w": w_value}, wrt=["x", "w"])
    flat = np.concatenate([x_value.ravel(), w_value])

    def gradient(point: np.ndarray) -> np.ndarray:
        feeds = {"x": point[:6].reshape(2, 3), "w": point[6:]}
        r = client.gradient(g, f, feeds, wrt=["x", "w"])
        return np.concatenate([r.gradients["x"].ravel(), r.gradients["w"]])

    columns = []
    for index in range(9):
        step = np.zeros(9)
        step[index] = 1e-6
        columns.append((gradient(flat + step) - gradient(flat - step)) / 2e-6)
    np.testing.assert_allclose(full, np.stack(columns, axis=1), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed: its oracle runs where it is")
def test_hessian_matches_torch(client):
    rng = rng_for("hessian-torch")
    x_value, w_value = rng.standard_normal((2, 3)), rng.standard_normal((3,))
    g = Graph()
    x, w = g.input("x"), g.input("w")
    f = g.sum(g.tanh(g.mul(g.matmul(x, w), g.sum(g.square(x)))), name="f")

    def torch_f(x: Any, w: Any) -> Any:
        return torch.sum(torch.tanh((x @ w) * torch.sum(x * x)))

    hessian_x = client.hessian(g, f, {"x": x_value, "w": w_value}, wrt=["x"])
    full = client.hessian(g, f, {"x": x_value, "w": w_value}, wrt=["x", "w"])

    blocks = torch.autograd.functional.hessian(
        torch_f, (torch.from_numpy(x_value), torch.from_numpy(w_value))
    )
    assert hessian_x.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(hessian_x, blocks[0][0].numpy(), rtol=1e-11, atol=1e-13)
    expected = np.block(
        [
            [blocks[0][0].numpy().reshape(6, 6), blocks[0][1].numpy().reshape(6, 3)],
            [blocks[1][0].numpy().reshape(3, 6), blocks[1][1].numpy()],
        ]
    )
    assert full.shape == (9, 9)
    np.testing.assert_allclose(full, expected, rtol=1e-11, atol=1e-13)


def test_hessian_of_a_non_scalar_output_is_invalid_argument(client):
    g = Graph()
    out = g.square(g.input("x"), name="out")
    with pytest.raises(GradientError) as error:
        client.hessian(g, out, {"x": [1.0, 2.0]}, wrt=["x"])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "one element" in error.value.details


def test_jacobian_errors_name_the_node(client):
    g = Graph()
    x, k = g.input("x"), g.input("k")
    q = g.mul(x, g.cast(k, "float64"), name="q")
    inputs = {"x": [1.0, 2.0], "k": np.array([1, 2])}
    for call, node, words in (
        (lambda: client.jacobian(g, q, inputs, wrt=[k]), "k", "int64"),
        (lambda: client.jacobian(g, q, inputs, wrt=[q]), "q", "input"),
        (lambda: client.jacobian(g, "nope", inputs), None, "'nope'"),
        (lambda: client.jacobian(g, q, inputs, wrt=["nope"]), None, "'nope'"),
        (lambda: client.jacobian(g, g.cast(k, "int32", name="ki"), inputs), "ki", "int32"),
    ):
        with pytest.raises(GradientError) as error:
            call()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.value.details
        if node is not None:
            assert error.value.node == node
    # Every float input by default; an input the output does not depend on has zeros.
    g.input("free")
    r = client.jacobian(g, q, {**inputs, "free": [3.0, 4.0, 5.0]})
    assert set(r.jacobians) == {"x", "free"}
    np.testing.assert_array_equal(r["x"], np.diag([1.0, 2.0]))
    np.testing.assert_array_equal(r["free"], np.zeros((2, 3)))


def test_async_twins(server_address):
    g = Graph()
    x = g.input("x")
    q = g.mul(g.square(x), 3.0, name="q")
    inputs = {"x": np.array([1.0, -2.0])}

    async def run() -> tuple:
        async with AsyncGradientClient(server_address, timeout=60) as client:
            return await asyncio.gather(
                client.jvp(g, q, inputs, {"x": [1.0, 1.0]}),
                client.jacobian(g, q, inputs),
                client.gradient(g, q, inputs, wrt=[x], seed=np.eye(2), batched_seed=True),
                client.hessian(g, g.sum(q, name="f"), inputs, wrt=["x"]),
            )

    jvp, jacobian, batched, hessian = asyncio.run(run())
    np.testing.assert_array_equal(jvp.tangents[q], [6.0, -12.0])
    np.testing.assert_array_equal(jacobian[x], np.diag([6.0, -12.0]))
    np.testing.assert_array_equal(batched.gradients[x], np.diag([6.0, -12.0]))
    np.testing.assert_array_equal(hessian, np.diag([6.0, 6.0]))


def test_cli_jacobian(server_address, capsys):
    vectorized = str(ROOT / "examples" / "lecture_vectorized.json")
    args = [vectorized, "-i", "W=[[0.1,0.5],[-0.3,0.8]]", "-i", "x=[0.2,0.4]", "--output", "q"]
    code = main(["--json", "jacobian", *args, "--wrt", "x", "--target", server_address])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed == {
        "output": "q", "mode": "reverse", "products": 2,
        "jacobians": {"x": [[0.1, 0.5], [-0.3, 0.8]]},
    }  # fmt: skip
    code = main(["jacobian", *args, "--mode", "forward", "--target", server_address])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[-1] == "forward mode, 6 products"
    with pytest.raises(SystemExit) as exited:
        main(["jacobian", *args, "--mode", "sideways", "--target", server_address])
    assert exited.value.code == 2
