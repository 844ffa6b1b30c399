"""Train a multilayer perceptron through the gradient service.

A two-layer MLP with softmax cross-entropy learns a synthetic 3-class problem (three
interleaved spirals), by plain SGD. The steps run in one Session: the graph crosses the wire
once, then every step sends the data and weights and gets the loss's gradient with respect to
the weights back; the update happens here in numpy.

    python examples/train_mlp.py --target localhost:50051
"""

from __future__ import annotations

import argparse

import numpy as np

from gradient_client import GradientClient, Graph


def spirals(points_per_class: int = 100, classes: int = 3, seed: int = 0):
    """Points on `classes` interleaved spiral arms in 2-D, with labels."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(classes):
        radius = np.linspace(0.05, 1.0, points_per_class)
        angle = label * 2 * np.pi / classes + radius * 4 + rng.normal(0, 0.15, points_per_class)
        xs.append(np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1))
        ys.append(np.full(points_per_class, label))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def mlp(hidden: int, classes: int) -> tuple[Graph, dict[str, str]]:
    """The model and loss as a graph: inputs X, y and parameters W1, b1, W2, b2."""
    g = Graph()
    x, y = g.input("X"), g.input("y")
    w1, b1, w2, b2 = (g.input(name) for name in ("W1", "b1", "W2", "b2"))
    h = g.relu(x @ w1 + b1)
    logits = g.add(h @ w2, b2, name="logits")
    g.cross_entropy(logits, y, name="loss")
    g.argmax(logits, axis=1, name="prediction")
    return g, {"loss": "loss", "prediction": "prediction"}


def train(
    target: str = "localhost:50051",
    steps: int = 300,
    learning_rate: float = 1.0,
    hidden: int = 64,
    seed: int = 0,
    report_every: int = 25,
) -> list[tuple[int, float, float]]:
    """Train and return (step, loss, accuracy) at every report."""
    x, y = spirals(seed=seed)
    classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    params = {
        "W1": (rng.standard_normal((2, hidden)) * np.sqrt(2 / 2)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "W2": (rng.standard_normal((hidden, classes)) * np.sqrt(1 / hidden)).astype(np.float32),
        "b2": np.zeros(classes, np.float32),
    }
    graph, _ = mlp(hidden, classes)
    history = []
    with (
        GradientClient(target, timeout=30) as client,
        client.session(graph, "loss", wrt=list(params), fetch=["loss", "prediction"]) as session,
    ):
        for step in range(steps + 1):
            result = session.gradient({"X": x, "y": y, **params})
            if step % report_every == 0 or step == steps:
                loss = float(result.values["loss"])
                accuracy = float(np.mean(result.values["prediction"] == y))
                history.append((step, loss, accuracy))
                print(f"step {step:4d}  loss {loss:.4f}  accuracy {accuracy:.3f}")
            for name in params:
                params[name] -= learning_rate * result.gradients[name]
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    args = parser.parse_args()
    train(args.target, args.steps, args.learning_rate)


if __name__ == "__main__":
    main()
