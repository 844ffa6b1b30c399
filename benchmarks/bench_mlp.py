"""Benchmark: one MLP training step through the service, side by side with its baselines.

Runs, in one process and one run, the loss and weight gradients of a two-layer MLP with softmax
cross-entropy three ways: a Gradient call to an in-process server over a loopback channel,
the same graph on the engine directly (no gRPC), and hand-written numpy forward and backward
passes (and PyTorch's autograd when torch is installed). Prints the median times and the ratios
to hand-written numpy, and checks that all of them agree.

    python benchmarks/bench_mlp.py [--batch 256] [--hidden 256] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from gradient_client import GradientClient, Graph
from gradient_server.engine import Engine
from gradient_server.service import create_server


def mlp_graph() -> Graph:
    """loss = cross_entropy(relu(X @ W1 + b1) @ W2 + b2, y)."""
    g = Graph()
    x, y = g.input("X"), g.input("y")
    w1, b1, w2, b2 = (g.input(name) for name in ("W1", "b1", "W2", "b2"))
    logits = g.relu(x @ w1 + b1) @ w2 + b2
    g.cross_entropy(logits, y, name="loss")
    return g


def numpy_step(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same loss and gradients, written by hand in numpy."""
    x, y = p["X"], p["y"]
    pre = x @ p["W1"] + p["b1"]
    h = np.maximum(pre, 0)
    logits = h @ p["W2"] + p["b2"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    probabilities = e / e.sum(axis=1, keepdims=True)
    d_logits = probabilities
    d_logits[np.arange(len(y)), y] -= 1
    d_logits /= len(y)
    d_h = d_logits @ p["W2"].T
    d_pre = d_h * (pre > 0)
    return {
        "W1": x.T @ d_pre,
        "b1": d_pre.sum(axis=0),
        "W2": h.T @ d_logits,
        "b2": d_logits.sum(axis=0),
    }


def torch_step(torch, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same loss and gradients with PyTorch's autograd."""
    tensors = {k: torch.from_numpy(v) for k, v in p.items()}
    params = {k: tensors[k].requires_grad_() for k in ("W1", "b1", "W2", "b2")}
    logits = torch.relu(tensors["X"] @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
    loss = torch.nn.functional.cross_entropy(logits, tensors["y"])
    grads = torch.autograd.grad(loss, list(params.values()))
    return {k: g.numpy() for k, g in zip(params, grads, strict=True)}


def mlp_params(
    batch: int = 256, features: int = 64, hidden: int = 256, classes: int = 10, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random data and initial weights for the MLP (float64)."""
    rng = np.random.default_rng(seed)
    return {
        "X": rng.standard_normal((batch, features)),
        "y": rng.integers(0, classes, batch),
        "W1": rng.standard_normal((features, hidden)) * 0.1,
        "b1": np.zeros(hidden),
        "W2": rng.standard_normal((hidden, classes)) * 0.1,
        "b2": np.zeros(classes),
    }


def median_ms(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of `step` in milliseconds, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    params = mlp_params(args.batch, args.features, args.hidden, args.classes)
    wrt = ["W1", "b1", "W2", "b2"]
    graph = mlp_graph()
    engine = Engine()
    compiled = engine.load_graph(graph.to_proto())
    server, port = create_server("127.0.0.1:0")
    server.start()
    expected = numpy_step(dict(params))
    rows: list[tuple[str, float]] = []
    try:
        with GradientClient(f"127.0.0.1:{port}") as client:

            def service_step():
                return client.gradient(graph, "loss", params, wrt=wrt, fetch=["loss"]).gradients

            def engine_step():
                return engine.gradient(compiled, params, "loss", wrt=wrt, fetch=["loss"]).gradients

            for name, step in (("service (gRPC)", service_step), ("engine (no gRPC)", engine_step)):
                got = step()
                for key in wrt:
                    np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-12)
                rows.append((name, median_ms(step, args.repeats)))
    finally:
        server.stop(0)
    rows.append(("hand-written numpy", median_ms(lambda: numpy_step(dict(params)), args.repeats)))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        got = torch_step(torch, params)
        for key in wrt:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-8, atol=1e-10)
        torch_ms = median_ms(lambda: torch_step(torch, params), args.repeats)
        rows.append(("PyTorch autograd", torch_ms))

    baseline = dict(rows)["hand-written numpy"]
    print(
        f"MLP step: batch {args.batch}, {args.features} -> {args.hidden} -> {args.classes}, "
        f"float64, median of {args.repeats}"
    )
    for name, ms in rows:
        print(f"  {name:20s} {ms:8.3f} ms   {ms / baseline:6.2f}x hand-written numpy")
    if torch is None:
        print("  (PyTorch not installed: pip install torch to add it)")


if __name__ == "__main__":
    main()
