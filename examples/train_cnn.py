"""Train a small convolutional network through the gradient service.

conv2d -> relu -> max_pool2d -> linear -> cross-entropy, on tiny synthetic 8x8 images of
horizontal and vertical bars, by SGD with one step of a Session per SGD step.

    python examples/train_cnn.py --target localhost:50051
"""

from __future__ import annotations

import argparse

import numpy as np

from gradient_client import GradientClient, Graph


def bars(count: int = 64, size: int = 8, seed: int = 0):
    """Noisy images (N, 1, size, size) holding one horizontal (label 0) or vertical (1) bar."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, (count, 1, size, size))
    labels = rng.integers(0, 2, count)
    where = rng.integers(1, size - 1, count)
    for i in range(count):  # building the data set, not the request path
        if labels[i] == 0:
            images[i, 0, where[i], :] += 1.0
        else:
            images[i, 0, :, where[i]] += 1.0
    return images, labels


def cnn(channels: int, size: int, classes: int = 2) -> Graph:
    """The network and its loss: inputs X, y and parameters K, c (conv), W, b (linear)."""
    g = Graph()
    x, y = g.input("X"), g.input("y")
    kernel, conv_bias, weight, bias = (g.input(name) for name in ("K", "c", "W", "b"))
    features = g.relu(g.conv2d(x, kernel, padding=1) + conv_bias)
    pooled = g.max_pool2d(features, kernel=2)
    logits = g.add(g.flatten(pooled, start_axis=1) @ weight, bias, name="logits")
    g.cross_entropy(logits, y, name="loss")
    g.argmax(logits, axis=1, name="prediction")
    return g


def train(
    target: str = "localhost:50051",
    steps: int = 40,
    learning_rate: float = 0.3,
    channels: int = 4,
    seed: int = 0,
    report_every: int = 5,
) -> list[tuple[int, float, float]]:
    """Train and return (step, loss, accuracy) at every report."""
    images, labels = bars(seed=seed)
    size = images.shape[-1]
    rng = np.random.default_rng(seed)
    features = channels * (size // 2) ** 2
    params = {
        "K": rng.standard_normal((channels, 1, 3, 3)) * np.sqrt(2 / 9),
        "c": np.zeros((1, channels, 1, 1)),
        "W": rng.standard_normal((features, 2)) * np.sqrt(1 / features),
        "b": np.zeros(2),
    }
    graph = cnn(channels, size)
    history = []
    with (
        GradientClient(target, timeout=60) as client,
        client.session(graph, "loss", wrt=list(params), fetch=["loss", "prediction"]) as session,
    ):
        for step in range(steps + 1):
            result = session.gradient({"X": images, "y": labels, **params})
            if step % report_every == 0 or step == steps:
                loss = float(result.values["loss"])
                accuracy = float(np.mean(result.values["prediction"] == labels))
                history.append((step, loss, accuracy))
                print(f"step {step:4d}  loss {loss:.4f}  accuracy {accuracy:.3f}")
            for name in params:
                params[name] -= learning_rate * result.gradients[name]
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=0.3)
    args = parser.parse_args()
    train(args.target, args.steps, args.learning_rate)


if __name__ == "__main__":
    main()
