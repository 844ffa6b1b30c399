"""Gradient checking helpers: input domains and central finite differences of a VJP."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gradient_server.engine import Engine
from gradient_server.ir import Graph as IRGraph

EPS = 1e-6
"""Step of the central differences (float64)."""

Domain = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
"""Draws an operand of a shape: where an op's finite differences are valid."""


# ---------------------------------------------------------------------------------------------
# Input domains


def rng_for(key: str) -> np.random.Generator:
    """A generator seeded by a test's id, so every case draws the same numbers every run."""
    return np.random.default_rng(zlib.crc32(key.encode()))


def real(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform in [-2, 2]."""
    return np.asarray(rng.uniform(-2.0, 2.0, shape), dtype=np.float64)


def positive(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform in [0.5, 2]: for log, sqrt and the base of pow."""
    return np.asarray(rng.uniform(0.5, 2.0, shape), dtype=np.float64)


def nonzero(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """|x| in [0.5, 2] with a random sign: for denominators, abs, relu and sign."""
    magnitude = rng.uniform(0.5, 2.0, shape)
    return np.asarray(np.where(rng.random(shape) < 0.5, -magnitude, magnitude), dtype=np.float64)


def _grid(rng: np.random.Generator, shape: tuple[int, ...], offset: float) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    steps = rng.permutation(size) - size // 2
    return np.asarray((0.3 * steps + offset).reshape(shape), dtype=np.float64)


def distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Pairwise distinct values on the grid 0.3·k: no ties inside a tensor (max, sort)."""
    return _grid(rng, shape, 0.0)


def distinct_shifted(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct values on 0.3·k + 0.15: at least 0.15 from every `distinct` value (no ties
    between the two operands of maximum / minimum, and never 0)."""
    return _grid(rng, shape, 0.15)


def boolean(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random booleans (a `where` condition)."""
    return np.asarray(rng.random(shape) < 0.5)


# ---------------------------------------------------------------------------------------------
# Finite differences


def numerical_vjp(
    engine: Engine,
    graph: IRGraph,
    feeds: Mapping[str, np.ndarray],
    output: str,
    seed: np.ndarray,
    wrt: Sequence[str],
    eps: float = EPS,
) -> dict[str, np.ndarray]:
    """Central differences of sum(seed * output) with respect to each feed named in `wrt`.

    `graph` is a loaded graph of the in-process engine; every feed in `wrt` must be float64.
    """

    def objective(values: Mapping[str, np.ndarray]) -> float:
        out = engine.forward(graph, values, fetch=[output])[output]
        return float(np.sum(seed * out.astype(np.float64)))

    gradients = {}
    for name in wrt:
        base = np.asarray(feeds[name])
        assert base.dtype == np.float64, f"finite differences of {name} need float64"
        gradient = np.zeros(base.shape, np.float64)
        for index in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[index] += eps
            minus[index] -= eps
            step = plus[index] - minus[index]  # the step actually taken, after rounding
            gradient[index] = (
                objective({**feeds, name: plus}) - objective({**feeds, name: minus})
            ) / step
        gradients[name] = gradient
    return gradients


def integers(low: int, high: int) -> Domain:
    """Random int64 values in [low, high): indices and labels (not differentiable)."""

    def draw(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(rng.integers(low, high, shape), dtype=np.int64)

    draw.__name__ = f"integers({low}, {high})"
    return draw


# ---------------------------------------------------------------------------------------------
# Loop-based numpy references for the windowed ops (NCHW), written independently of the
# server's strided views: one Python loop iteration per output pixel.


def _pair(value: Sequence[int] | None, default: Sequence[int]) -> tuple[int, int]:
    value = default if value is None else value
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _windows(shape, kernel, stride, padding, dilation):
    """(i, j, rows, cols): each output pixel and the slices of its window in the padded input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho = (shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    for i in range(ho):
        for j in range(wo):
            rows = slice(i * sh, i * sh + dh * (kh - 1) + 1, dh)
            cols = slice(j * sw, j * sw + dw * (kw - 1) + 1, dw)
            yield i, j, rows, cols


def _padded(x: np.ndarray, padding, fill: float = 0.0) -> np.ndarray:
    (ph, pw) = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)


def _unpadded(x: np.ndarray, padding) -> np.ndarray:
    (ph, pw) = padding
    return x[:, :, ph : x.shape[2] - ph, pw : x.shape[3] - pw]


def _conv_geometry(w_shape, stride, padding, dilation):
    return (
        tuple(w_shape[2:]),
        _pair(stride, (1,)),
        _pair(padding, (0,)),
        _pair(dilation, (1,)),
    )


def conv2d_ref(x, w, stride=None, padding=None, dilation=None) -> np.ndarray:
    geometry = _conv_geometry(w.shape, stride, padding, dilation)
    xp = _padded(x, geometry[2])
    pixels = list(_windows(x.shape, *geometry))
    ho, wo = pixels[-1][0] + 1, pixels[-1][1] + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i, j, rows, cols in pixels:
        out[:, :, i, j] = np.einsum("nckl,ockl->no", xp[:, :, rows, cols], w)
    return out


def conv2d_input_grad_ref(
    g, w, input_shape, stride=None, padding=None, dilation=None
) -> np.ndarray:
    geometry = _conv_geometry(w.shape, stride, padding, dilation)
    dxp = _padded(np.zeros(input_shape), geometry[2])
    for i, j, rows, cols in _windows(input_shape, *geometry):
        dxp[:, :, rows, cols] += np.einsum("no,ockl->nckl", g[:, :, i, j], w)
    return _unpadded(dxp, geometry[2])


def conv2d_weight_grad_ref(
    x, g, weight_shape, stride=None, padding=None, dilation=None
) -> np.ndarray:
    geometry = _conv_geometry(weight_shape, stride, padding, dilation)
    xp = _padded(x, geometry[2])
    dw = np.zeros(weight_shape)
    for i, j, rows, cols in _windows(x.shape, *geometry):
        dw += np.einsum("nckl,no->ockl", xp[:, :, rows, cols], g[:, :, i, j])
    return dw


def _pool_geometry(kernel, stride, padding):
    kernel = _pair(kernel, kernel)
    return kernel, _pair(stride, kernel), _pair(padding, (0,)), (1, 1)


def _pool_out(shape, geometry) -> np.ndarray:
    pixels = list(_windows(shape, *geometry))
    return np.zeros((shape[0], shape[1], pixels[-1][0] + 1, pixels[-1][1] + 1))


def avg_pool2d_ref(x, kernel, stride=None, padding=None) -> np.ndarray:
    # Padding counts as zeros in the average (PyTorch's count_include_pad=True).
    geometry = _pool_geometry(kernel, stride, padding)
    xp = _padded(x, geometry[2])
    out = _pool_out(x.shape, geometry)
    for i, j, rows, cols in _windows(x.shape, *geometry):
        out[:, :, i, j] = xp[:, :, rows, cols].mean(axis=(2, 3))
    return out


def avg_pool2d_grad_ref(g, input_shape, kernel, stride=None, padding=None) -> np.ndarray:
    geometry = _pool_geometry(kernel, stride, padding)
    dxp = _padded(np.zeros(input_shape), geometry[2])
    size = geometry[0][0] * geometry[0][1]
    for i, j, rows, cols in _windows(input_shape, *geometry):
        dxp[:, :, rows, cols] += g[:, :, i, j][:, :, None, None] / size
    return _unpadded(dxp, geometry[2])


def _max_routing(window: np.ndarray) -> np.ndarray:
    """(n, c, kh, kw) window -> each element's share: 1/k on the k tied maxima."""
    winners = window == window.max(axis=(2, 3), keepdims=True)
    return winners / winners.sum(axis=(2, 3), keepdims=True)


def max_pool2d_ref(x, kernel, stride=None, padding=None) -> np.ndarray:
    geometry = _pool_geometry(kernel, stride, padding)
    xp = _padded(x, geometry[2], -np.inf)
    out = _pool_out(x.shape, geometry)
    for i, j, rows, cols in _windows(x.shape, *geometry):
        out[:, :, i, j] = xp[:, :, rows, cols].max(axis=(2, 3))
    return out


def max_pool2d_grad_ref(x, g, kernel, stride=None, padding=None) -> np.ndarray:
    geometry = _pool_geometry(kernel, stride, padding)
    xp = _padded(x, geometry[2], -np.inf)
    dxp = np.zeros(xp.shape)
    for i, j, rows, cols in _windows(x.shape, *geometry):
        dxp[:, :, rows, cols] += _max_routing(xp[:, :, rows, cols]) * g[:, :, i, j][..., None, None]
    return _unpadded(dxp, geometry[2])


def max_pool2d_gather_ref(x, u, kernel, stride=None, padding=None) -> np.ndarray:
    geometry = _pool_geometry(kernel, stride, padding)
    xp = _padded(x, geometry[2], -np.inf)
    up = _padded(u, geometry[2])
    out = _pool_out(x.shape, geometry)
    for i, j, rows, cols in _windows(x.shape, *geometry):
        window = xp[:, :, rows, cols]
        out[:, :, i, j] = (_max_routing(window) * up[:, :, rows, cols]).sum(axis=(2, 3))
    return out


# Ops that have no gradient at all, and why (shared by the first- and second-order tables).
_SOURCE = "a source: it has no operands, so there is nothing to differentiate"
_COMPARISON = "a comparison: its output is bool, piecewise constant in its operands"
_LOGIC = "logic: bool operands and a bool output"
_INDEX = "an index: its int64 output is piecewise constant in x"

NOT_DIFFERENTIABLE: dict[str, str] = {
    "input": _SOURCE,
    "constant": _SOURCE,
    "zeros": _SOURCE,
    "equal": _COMPARISON,
    "not_equal": _COMPARISON,
    "greater": _COMPARISON,
    "greater_equal": _COMPARISON,
    "less": _COMPARISON,
    "less_equal": _COMPARISON,
    "logical_and": _LOGIC,
    "logical_or": _LOGIC,
    "logical_not": _LOGIC,
    "argmax": _INDEX,
    "argmin": _INDEX,
    "one_hot": "its only operand is integer indices",
}
