"""Calibration: the op table's cost estimates against the time each op really takes here.

An op's cost (OpDef.cost, see the cost section of gradient_server/ops/base.py) is in BLAS
flops: a multiply-add of a matrix product counts 2, and numpy's element-by-element work is
charged its time's worth. This script measures, on this machine:

- the reference rate: flops per second of a float64 matrix product through the op table;
- for representative calls of every op, the time its forward takes, and the ratio of that time
  to the time its cost predicts at the reference rate (1 is exact; above 1 the estimate is low,
  so the op could run longer past a deadline than the limit suggests).

It prints the worst ratio and the largest --max-op-flops that keeps every measured op under
the target time (default 0.25 s). Run it on the machine the server runs on:

    python benchmarks/calibrate_costs.py [--target 0.25] [--scale 1.0] [--only OP ...]
"""

from __future__ import annotations

import argparse
import functools
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradient_server.ir import make_node
from gradient_server.ops import OPS, Call
from gradient_server.tensor_type import TensorType

RNG = np.random.default_rng(0)


def f64(*shape: int) -> np.ndarray:
    return RNG.uniform(0.1, 2.0, shape)


def f32(*shape: int) -> np.ndarray:
    return f64(*shape).astype(np.float32)


def i64(high: int, *shape: int) -> np.ndarray:
    return RNG.integers(0, high, shape)


def boolean(*shape: int) -> np.ndarray:
    return RNG.random(shape) < 0.5


Case = tuple[str, Callable[[], list[np.ndarray]], dict[str, Any]]
"""An op, a function making its operands, and its attributes."""

M = 1 << 22  # elements of the elementwise cases (32 MiB in float64)


def _cases(scale: float) -> list[Case]:
    n = max(int(M * scale), 1)
    side = max(int(2048 * scale ** (1 / 2)), 1)  # side * side ~ n elements
    cube = max(int(1024 * scale ** (1 / 3)), 1)
    img = max(int(64 * scale ** (1 / 2)), 1)

    def nchw(c: int, s: int = img) -> Callable[[], list[np.ndarray]]:
        return lambda: [f64(8, c, s, s)]

    cases: list[Case] = [
        ("matmul", lambda: [f64(cube, cube), f64(cube, cube)], {}),
        ("matmul", lambda: [f32(cube, cube), f32(cube, cube)], {}),
        ("matmul", lambda: [f64(16, cube // 4, cube), f64(cube, cube // 4)], {}),
        ("matmul", lambda: [f64(side, side), f64(side)], {}),
        ("matmul", lambda: [f64(side, 1), f64(1, side)], {}),
        ("matmul", lambda: [i64(10, cube // 4, cube // 4), i64(10, cube // 4, cube // 4)], {}),
        ("matmul", lambda: [f32(cube, cube), f64(cube, cube)], {}),
    ]
    for op in ("add", "sub", "mul", "div", "pow", "maximum", "minimum"):
        cases.append((op, lambda: [f64(n), f64(n)], {}))
    cases.append(("add", lambda: [f64(side, side), f64(side)], {}))
    cases.append(("add", lambda: [f32(n), f64(n)], {}))
    cases.append(("add", lambda: [f64(side, side).T, f64(side, side)], {}))  # strided
    cases.append(("div", lambda: [i64(100, n), i64(100, n) + 1], {}))
    cases.append(("pow", lambda: [f32(n), f32(n)], {}))
    unary = (
        "neg exp log sqrt square abs sign tanh sigmoid relu sin cos log1p expm1 softplus reciprocal"
    ).split()
    for op in unary:
        cases.append((op, lambda: [f64(n)], {}))
    cases.append(("exp", lambda: [f32(n)], {}))
    cases.append(("sigmoid", lambda: [f32(n)], {}))
    cases.append(("tanh", lambda: [i64(3, n)], {}))
    for op in ("equal", "not_equal", "greater", "greater_equal", "less", "less_equal"):
        cases.append((op, lambda: [f64(n), f64(n)], {}))
    cases.append(("less", lambda: [f32(n), i64(2, n)], {}))
    cases.append(("where", lambda: [boolean(n), f64(n), f64(n)], {}))
    cases.append(("leaky_relu", lambda: [f64(n) - 1], {"alpha": 0.1}))
    cases.append(("clip", lambda: [f64(n)], {"min": 0.5, "max": 1.5}))
    cases.append(("logical_and", lambda: [boolean(n), boolean(n)], {}))
    cases.append(("logical_or", lambda: [boolean(n), boolean(n)], {}))
    cases.append(("logical_not", lambda: [boolean(n)], {}))
    for op in ("sum", "mean", "max", "min", "prod", "logsumexp", "var", "norm"):
        cases.append((op, lambda: [f64(side, side)], {"axis": [1]}))
        cases.append((op, lambda: [f64(side, side)], {"axis": [0]}))
        cases.append((op, lambda: [f64(side, side)], {}))
    cases.append(("sum", lambda: [f32(side, side)], {"axis": [0]}))
    cases.append(("sum", lambda: [i64(5, side, side)], {"axis": [0]}))
    cases.append(("mean", lambda: [i64(5, side, side)], {"axis": [1]}))
    for op in ("argmax", "argmin"):
        cases.append((op, lambda: [f64(side, side)], {"axis": 1}))
        cases.append((op, lambda: [f64(side, side)], {"axis": 0}))
    cases.append(("prod_others", lambda: [f64(side, side)], {"axis": -1}))
    cases.append(("prod_others", lambda: [f64(side, side)], {"axis": 0}))
    cases += [
        ("zeros", list, {"shape": [n], "dtype": "float64"}),
        ("constant", list, {"value": f64(4)}),
        ("cast", lambda: [f64(n)], {"dtype": "float32"}),
        ("cast", lambda: [f32(n)], {"dtype": "int64"}),
        ("reshape", lambda: [f64(side, side)], {"shape": [-1]}),
        ("reshape", lambda: [f64(side, side).T], {"shape": [-1]}),  # a strided copy
        ("transpose", lambda: [f64(side, side)], {}),
        ("broadcast_to", lambda: [f64(side)], {"shape": [side, side]}),
        ("sum_to_shape", lambda: [f64(side, side)], {"shape": [side]}),
        ("sum_to_shape", lambda: [f64(side, side)], {"shape": [side, 1]}),
        ("expand_dims", lambda: [f64(n)], {"axis": [0]}),
        ("squeeze", lambda: [f64(1, n)], {}),
        ("flatten", lambda: [f64(side, side)], {}),
        ("slice", lambda: [f64(side, side)], {"starts": [1], "stops": [-1], "axes": [1]}),
        (
            "unslice",
            lambda: [f64(side, side - 2)],
            {"shape": [side, side], "starts": [1], "stops": [-1], "axes": [1]},
        ),
        ("pad", lambda: [f64(side, side)], {"pads": [1, 1, 1, 1]}),
        ("concat", lambda: [f64(side, side // 2), f64(side, side // 2)], {"axis": 1}),
        ("stack", lambda: [f64(n // 2), f64(n // 2)], {"axis": 1}),
        ("take", lambda: [f64(side, side), i64(side, side)], {"axis": 0}),
        ("take", lambda: [f64(side, side), i64(side, side)], {"axis": 1}),
        ("take", lambda: [f64(n), i64(n, n)], {"axis": 0}),
        ("scatter_add", lambda: [f64(side, side), i64(side, side)], {"shape": [side, side]}),
        ("scatter_add", lambda: [f64(n), i64(16, n)], {"shape": [16]}),
        (
            "scatter_add",
            lambda: [f64(side, side), i64(side, side)],
            {"shape": [side, side], "axis": 1},
        ),
        ("one_hot", lambda: [i64(100, n // 100)], {"depth": 100}),
        ("one_hot", lambda: [i64(4, n // 4)], {"depth": 4}),
        ("softmax", lambda: [f64(side, side)], {}),
        ("softmax", lambda: [f64(side, side)], {"axis": 0}),
        ("log_softmax", lambda: [f64(side, side)], {}),
        ("log_softmax", lambda: [f32(side, side)], {"axis": 0}),
        ("cross_entropy", lambda: [f64(side, side), i64(side, side)], {}),
        ("cross_entropy", lambda: [f64(n // 10, 10), i64(10, n // 10)], {"reduction": "none"}),
    ]
    # Convolutions: few and many channels, small and large kernels, strides and padding.
    convs = [
        (3, 16, 3, {}),
        (32, 32, 3, {"padding": [1]}),
        (64, 64, 1, {}),
        (8, 8, 7, {"stride": [2], "padding": [3]}),
        (4, 4, 3, {"dilation": [2]}),
        (1, 1, 31, {"padding": [15]}),
        (64, 128, 3, {"stride": [2]}),
    ]
    for c, o, k, geometry in convs:
        x, w = (8, c, img, img), (o, c, k, k)
        stride = geometry.get("stride", [1])[0]
        pad = geometry.get("padding", [0])[0]
        dil = geometry.get("dilation", [1])[0]
        out = (img + 2 * pad - dil * (k - 1) - 1) // stride + 1
        g = (8, o, out, out)
        cases.append(("conv2d", lambda x=x, w=w: [f64(*x), f64(*w)], geometry))
        cases.append(
            (
                "conv2d_input_grad",
                lambda g=g, w=w: [f64(*g), f64(*w)],
                {**geometry, "input_shape": list(x)},
            )
        )
        cases.append(
            (
                "conv2d_weight_grad",
                lambda x=x, g=g: [f64(*x), f64(*g)],
                {**geometry, "weight_shape": list(w)},
            )
        )
    cases.append(("conv2d", lambda: [f32(8, 32, img, img), f32(32, 32, 3, 3)], {}))
    pools = [
        ({"kernel": [2]}, 16),
        ({"kernel": [3], "stride": [1], "padding": [1]}, 16),
        ({"kernel": [16]}, 16),
        ({"kernel": [7], "stride": [1]}, 4),
    ]
    for attrs, c in pools:
        k = attrs["kernel"][0]
        stride = attrs.get("stride", [k])[0]
        pad = attrs.get("padding", [0])[0]
        out = (img + 2 * pad - k) // stride + 1
        x, g = (8, c, img, img), (8, c, out, out)
        cases.append(("avg_pool2d", lambda x=x: [f64(*x)], attrs))
        cases.append(("max_pool2d", lambda x=x: [f64(*x)], attrs))
        cases.append(("avg_pool2d_grad", lambda g=g: [f64(*g)], {**attrs, "input_shape": list(x)}))
        cases.append(("max_pool2d_grad", lambda x=x, g=g: [f64(*x), f64(*g)], attrs))
        cases.append(("max_pool2d_gather", lambda x=x: [f64(*x), f64(*x)], attrs))
    return cases


def prepare(op: str, operands: Sequence[np.ndarray], attrs: dict[str, Any]):
    """The op's call for these operands and its forward function, bound as the executor does."""
    node = make_node("calibrated", op, [f"x{i}" for i in range(len(operands))], attrs)
    types = tuple(TensorType(a.dtype, a.shape) for a in operands)
    opdef = OPS[op]
    call = Call(node.attrs, types, opdef.infer(node.attrs, *types))
    direct = opdef.bind(call) if opdef.bind is not None else None
    return call, direct or functools.partial(opdef.forward, call)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        np.asarray(fn())
        best = min(best, time.perf_counter() - start)
    return best


def reference_rate(repeats: int) -> float:
    """Flops per second of a float64 matrix product (2 * n^3) through the op table."""
    a, b = f64(2048, 2048), f64(2048, 2048)
    _, forward = prepare("matmul", [a, b], {})
    return 2 * 2048**3 / best_time(lambda: forward(a, b), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.25, help="seconds one op may take")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the cases")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[], help="ops to measure (default all)")
    args = parser.parse_args()

    rate = reference_rate(args.repeats)
    print(f"reference: float64 matmul {rate / 1e9:.1f} GFLOP/s")
    rows = []
    for op, make, attrs in _cases(args.scale):
        if args.only and op not in args.only:
            continue
        operands = make()
        call, forward = prepare(op, operands, attrs)
        seconds = best_time(
            lambda forward=forward, operands=operands: forward(*operands), args.repeats
        )
        cost = OPS[op].estimated_cost(call)
        predicted = cost / rate
        ratio = seconds / predicted if predicted else float("inf")
        shapes = ", ".join(f"{a.dtype.name}{list(a.shape)}" for a in operands)
        strided = any(not a.flags.c_contiguous for a in operands)
        rows.append((ratio, op, seconds, strided))
        print(
            f"{op:20s} {seconds * 1e3:9.2f} ms  predicted {predicted * 1e3:9.2f} ms  "
            f"ratio {ratio:5.2f}  {shapes} {attrs if attrs else ''}"
            + ("  (a transposed operand)" if strided else "")
        )
    again = reference_rate(args.repeats)
    print(f"reference again: {again / 1e9:.1f} GFLOP/s")
    if abs(again - rate) > 0.2 * rate:
        print("the machine was busy: the figures are not reliable")
    measured = [row for row in rows if row[2] > 1e-3]  # below a millisecond, overhead rules
    for strided in (False, True):
        chosen = sorted(row for row in measured if row[3] == strided)
        if not chosen:
            continue
        what = "with a transposed operand" if strided else "with contiguous operands"
        worst = chosen[-1]
        print(
            f"\n{len(chosen)} cases over 1 ms {what}: ratios from {chosen[0][0]:.2f} to "
            f"{worst[0]:.2f} ({worst[1]}), median {chosen[len(chosen) // 2][0]:.2f}"
        )
        bound = args.target * rate / worst[0]
        print(f"  the largest --max-op-flops keeping them under {args.target} s: {bound:.3g}")


if __name__ == "__main__":
    main()
