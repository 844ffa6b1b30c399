"""Benchmark: the engine in-process, side by side with hand-written numpy, PyTorch and JAX.

The workloads of issue 11, each timed as "value + every input gradient" (median over
repetitions, after a first call that is reported on its own: it compiles the engine's plan):

- A: f = ||W·x||², n = 2048, float64; gradients of W and x.
- B: MLP 256×1024 → 1024 → 1024 → 10, relu, cross-entropy (integer labels, mean over the batch),
  float32; gradients of every weight and bias.
- C: a chain of 1000 elementwise ops on 16 float64 (op k: k%3==0 → x + 0.01·sin k,
  k%3==1 → x · (1 + 0.01·cos k), k%3==2 → tanh x), loss = sum; gradient of x.
- D: the same chain on 1,000,000 float64.
- BF: a chain of exactly 1,000,000 nodes (input x of 4 float64, one shared constant, then
  alternately x·c and tanh, then a sum), Forward of the sum from the serialized Graph bytes
  (load_graph_bytes + forward on a fresh Engine each repetition, so nothing is cached).
- BG: the same chain of 100,000 nodes, Gradient, the same way.

The sides: the engine (gradient_server.engine, no gRPC), hand-written numpy of the same math
(forward and backward by hand: the baseline of every ratio), PyTorch eager (autograd) and JAX
(jit of value_and_grad, compile time reported apart, results awaited with block_until_ready).
PyTorch and JAX are skipped with a note when they do not import; the big chains (BF, BG) run
on the engine and numpy only.

Each side of each workload runs in a fresh subprocess of this script (``--worker W SIDE``), so
that its peak RSS (VmHWM at its end, see peak_rss(); ru_maxrss where there is no /proc) is its
own: the table shows the increase over the RSS after imports and input creation, and the
absolute peak. Every side's value and gradients are
checked against numpy's (rtol 1e-6 in float64, 1e-3 in float32, see check()); a mismatch fails
the run.

The engine is first tried with the default Limits(); a refusal is reported, and the workload is
then measured with raised limits.

    python benchmarks/bench_engine.py [--quick] [--repeats N] [--only A,C] [--sides engine,numpy]

--repeats sets the repetitions of A, B and C; D and the big chains take at most 3 (a D run
takes seconds). --quick shrinks every workload for a smoke run (goals then do not apply).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("A", "B", "C", "D", "BF", "BG")
SIDES = ("engine", "numpy", "torch", "jax")
BIG = ("BF", "BG")
SKIP_EXIT = 3
"""A worker's exit status when its library (torch, jax) does not import."""
RESULT = "RESULT "
"""The prefix of the worker's one line of JSON on stdout."""
MB = 1 << 20
BIG_CONSTANT = 1.5
"""The shared constant c of the big chains: x·c then tanh has a non-zero fixed point."""
BIG_X = (0.5, 1.0, -0.25, 2.0)

Step = Callable[[], tuple[Any, dict[str, Any]]]


@dataclass(frozen=True)
class Sizes:
    """The sizes of every workload (full, or --quick)."""

    a_n: int
    b_batch: int
    b_features: int
    b_hidden: int
    b_classes: int
    c_elements: int
    chain_ops: int
    d_elements: int
    big_forward_nodes: int
    big_gradient_nodes: int


FULL = Sizes(2048, 256, 1024, 1024, 10, 16, 1000, 1_000_000, 1_000_000, 100_000)
# The quick chains have 100 ops, not 1000: JAX takes some 40 s to compile 1000.
QUICK = Sizes(256, 64, 256, 256, 10, 16, 100, 10_000, 10_000, 5_000)


def default_repeats(workload: str, repeats: int | None, quick: bool) -> int:
    """Timed repetitions of a workload: --repeats (or 10, 30 for C), at most 3 for D and the
    big chains unless --quick."""
    if repeats is None:
        repeats = {"C": 30}.get(workload, 10)
    if workload in ("D", *BIG) and not quick:
        return min(repeats, 3)
    return repeats


def title(workload: str, sizes: Sizes) -> str:
    """A workload's row label."""
    s = sizes
    return {
        "A": f"A: ||Wx||^2 n={s.a_n} f64",
        "B": f"B: MLP {s.b_batch}x{s.b_features}-{s.b_hidden}-{s.b_hidden}-{s.b_classes} f32",
        "C": f"C: chain {s.chain_ops} ops x {s.c_elements} f64",
        "D": f"D: chain {s.chain_ops} ops x {s.d_elements:,} f64",
        "BF": f"BF: {s.big_forward_nodes:,}-node chain Forward",
        "BG": f"BG: {s.big_gradient_nodes:,}-node chain Gradient",
    }[workload]


GOALS = {
    "A": "<= 1.05x",
    "B": "<= 1.05x",
    "C": "<= 2x",
    "D": "<= 1.0x, RSS <= 1.2x",
    "BF": "<= 8 s",
    "BG": "<= 2 s",
}


# ---------------------------------------------------------------------------------------------
# Inputs and the math


def chain_op(k: int) -> tuple[str, float]:
    """Op k of the C/D chain: ("add", c), ("mul", a) or ("tanh", 0.0)."""
    if k % 3 == 0:
        return "add", 0.01 * math.sin(k)
    if k % 3 == 1:
        return "mul", 1.0 + 0.01 * math.cos(k)
    return "tanh", 0.0


def make_inputs(workload: str, sizes: Sizes) -> dict[str, np.ndarray]:
    """The workload's inputs (fixed seeds), as numpy arrays."""
    rng = np.random.default_rng(11)
    if workload == "A":
        n = sizes.a_n
        return {"W": rng.standard_normal((n, n)) / math.sqrt(n), "x": rng.standard_normal(n)}
    if workload == "B":
        f, h, c, b = sizes.b_features, sizes.b_hidden, sizes.b_classes, sizes.b_batch
        f32 = np.float32
        return {
            "X": rng.standard_normal((b, f)).astype(f32),
            "y": rng.integers(0, c, b).astype(np.int64),
            "W1": (rng.standard_normal((f, h)) * math.sqrt(2 / f)).astype(f32),
            "b1": (rng.standard_normal(h) * 0.01).astype(f32),
            "W2": (rng.standard_normal((h, h)) * math.sqrt(2 / h)).astype(f32),
            "b2": (rng.standard_normal(h) * 0.01).astype(f32),
            "W3": (rng.standard_normal((h, c)) * math.sqrt(1 / h)).astype(f32),
            "b3": (rng.standard_normal(c) * 0.01).astype(f32),
        }
    if workload in ("C", "D"):
        n = sizes.c_elements if workload == "C" else sizes.d_elements
        return {"x": rng.standard_normal(n)}
    return {"x": np.array(BIG_X)}


def wrt_of(workload: str) -> list[str]:
    """The inputs whose gradients a workload asks for."""
    return {"A": ["W", "x"], "B": ["W1", "b1", "W2", "b2", "W3", "b3"]}.get(workload, ["x"])


def big_ops(sizes: Sizes, workload: str) -> int:
    """The ops of a big chain between its input and constant and its sum."""
    nodes = sizes.big_forward_nodes if workload == "BF" else sizes.big_gradient_nodes
    return nodes - 3


def build_graph(workload: str, sizes: Sizes):
    """The workload as a gradient_client.Graph; its output node is "loss"."""
    from gradient_client import Graph

    g = Graph()
    if workload == "A":
        w, x = g.input("W"), g.input("x")
        g.sum(g.square(w @ x), name="loss")
    elif workload == "B":
        x, y = g.input("X"), g.input("y")
        w1, b1, w2, b2, w3, b3 = (g.input(n) for n in ("W1", "b1", "W2", "b2", "W3", "b3"))
        h1 = g.relu(x @ w1 + b1)
        h2 = g.relu(h1 @ w2 + b2)
        g.cross_entropy(h2 @ w3 + b3, y, reduction="mean", name="loss")
    elif workload in ("C", "D"):
        v = g.input("x")
        for k in range(sizes.chain_ops):
            op, c = chain_op(k)
            v = v + c if op == "add" else v * c if op == "mul" else g.tanh(v)
        g.sum(v, name="loss")
    else:
        v = g.input("x")
        c = g.constant(np.float64(BIG_CONSTANT), name="c")
        for i in range(big_ops(sizes, workload)):
            v = g.mul(v, c) if i % 2 == 0 else g.tanh(v)
        g.sum(v, name="loss")
        nodes = sizes.big_forward_nodes if workload == "BF" else sizes.big_gradient_nodes
        assert len(g) == nodes, (len(g), nodes)
    return g


# -- hand-written numpy ------------------------------------------------------------------------


def numpy_norm(p: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
    """A by hand: f = q·q with q = W x; df/dW = 2 q xᵀ, df/dx = Wᵀ 2q."""
    w, x = p["W"], p["x"]
    q = w @ x
    dq = 2 * q
    return q @ q, {"W": np.outer(dq, x), "x": w.T @ dq}


def numpy_mlp(p: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
    """B by hand: the three-layer relu MLP, softmax cross-entropy (mean), and backprop."""
    x, y = p["X"], p["y"]
    z1 = x @ p["W1"] + p["b1"]
    h1 = np.maximum(z1, 0)
    z2 = h1 @ p["W2"] + p["b2"]
    h2 = np.maximum(z2, 0)
    logits = h2 @ p["W3"] + p["b3"]
    top = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - top)
    total = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = np.mean(np.log(total[:, 0]) + top[:, 0] - logits[rows, y])
    d_logits = e / total
    d_logits[rows, y] -= 1
    d_logits /= np.float32(len(y))
    d_z2 = (d_logits @ p["W3"].T) * (z2 > 0)
    d_z1 = (d_z2 @ p["W2"].T) * (z1 > 0)
    return loss, {
        "W1": x.T @ d_z1,
        "b1": d_z1.sum(axis=0),
        "W2": h1.T @ d_z2,
        "b2": d_z2.sum(axis=0),
        "W3": h2.T @ d_logits,
        "b3": d_logits.sum(axis=0),
    }


def numpy_chain(x: np.ndarray, ops: int) -> tuple[Any, dict[str, np.ndarray]]:
    """C and D by hand: the forward pass keeps only the tanh outputs (the one op whose
    derivative needs a value, 1 - y²); the backward pass multiplies the seed through."""
    saved = []
    for k in range(ops):
        op, c = chain_op(k)
        if op == "add":
            x = x + c
        elif op == "mul":
            x = x * c
        else:
            x = np.tanh(x)
            saved.append(x)
    value = x.sum()
    g = np.ones_like(x)
    del x
    for k in reversed(range(ops)):
        op, c = chain_op(k)
        if op == "mul":
            g *= c
        elif op == "tanh":
            y = saved.pop()
            g *= 1 - y * y
            del y
    return value, {"x": g}


def numpy_big_forward(x: np.ndarray, ops: int) -> tuple[Any, dict[str, np.ndarray]]:
    """BF by hand: alternately x·c and tanh, then the sum."""
    c = np.float64(BIG_CONSTANT)
    for i in range(ops):
        x = x * c if i % 2 == 0 else np.tanh(x)
    return x.sum(), {}


def numpy_big_gradient(x: np.ndarray, ops: int) -> tuple[Any, dict[str, np.ndarray]]:
    """BG by hand: the big chain forward (keeping the tanh outputs) and backward."""
    c = np.float64(BIG_CONSTANT)
    saved = []
    for i in range(ops):
        if i % 2 == 0:
            x = x * c
        else:
            x = np.tanh(x)
            saved.append(x)
    value = x.sum()
    g = np.ones_like(x)
    for i in reversed(range(ops)):
        if i % 2 == 0:
            g = g * c
        else:
            y = saved.pop()
            g = g * (1 - y * y)
    return value, {"x": g}


def numpy_step(workload: str, sizes: Sizes, p: dict[str, np.ndarray]) -> Step:
    """The hand-written numpy side of a workload, as a step returning (value, gradients)."""
    if workload == "A":
        return lambda: numpy_norm(p)
    if workload == "B":
        return lambda: numpy_mlp(p)
    if workload in ("C", "D"):
        return lambda: numpy_chain(p["x"], sizes.chain_ops)
    ops = big_ops(sizes, workload)
    if workload == "BF":
        return lambda: numpy_big_forward(p["x"], ops)
    return lambda: numpy_big_gradient(p["x"], ops)


# -- PyTorch eager -----------------------------------------------------------------------------


def torch_step(torch: Any, workload: str, sizes: Sizes, p: dict[str, np.ndarray]) -> Step:
    """The PyTorch eager side: the forward pass in torch, gradients by torch.autograd.grad."""
    tensors = {k: torch.from_numpy(v) for k, v in p.items()}
    wrt = wrt_of(workload)
    leaves = [tensors[k].requires_grad_() for k in wrt]

    def loss() -> Any:
        t = tensors
        if workload == "A":
            q = t["W"] @ t["x"]
            return (q * q).sum()
        if workload == "B":
            h1 = torch.relu(t["X"] @ t["W1"] + t["b1"])
            h2 = torch.relu(h1 @ t["W2"] + t["b2"])
            return torch.nn.functional.cross_entropy(h2 @ t["W3"] + t["b3"], t["y"])
        v = t["x"]
        for k in range(sizes.chain_ops):
            op, c = chain_op(k)
            v = v + c if op == "add" else v * c if op == "mul" else torch.tanh(v)
        return v.sum()

    def step() -> tuple[Any, dict[str, Any]]:
        value = loss()
        grads = torch.autograd.grad(value, leaves)
        return value.detach().numpy(), {k: g.numpy() for k, g in zip(wrt, grads, strict=True)}

    return step


# -- JAX ---------------------------------------------------------------------------------------


def jax_step(jax: Any, workload: str, sizes: Sizes, p: dict[str, np.ndarray]) -> tuple[Step, float]:
    """The JAX side: jit(value_and_grad) compiled ahead (the compile time is returned) and
    run on inputs already on the device, awaited with block_until_ready."""
    jnp = jax.numpy
    wrt = wrt_of(workload)
    rest = [k for k in p if k not in wrt]

    def loss(params: dict[str, Any], other: dict[str, Any]) -> Any:
        t = {**params, **other}
        if workload == "A":
            q = t["W"] @ t["x"]
            return jnp.sum(q * q)
        if workload == "B":
            h1 = jax.nn.relu(t["X"] @ t["W1"] + t["b1"])
            h2 = jax.nn.relu(h1 @ t["W2"] + t["b2"])
            logits = h2 @ t["W3"] + t["b3"]
            picked = jnp.take_along_axis(logits, t["y"][:, None], axis=1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)
        v = t["x"]
        for k in range(sizes.chain_ops):
            op, c = chain_op(k)
            v = v + c if op == "add" else v * c if op == "mul" else jnp.tanh(v)
        return jnp.sum(v)

    params = {k: jax.device_put(p[k]) for k in wrt}
    other = {k: jax.device_put(p[k]) for k in rest}
    began = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, other).compile()
    compile_seconds = time.perf_counter() - began

    def step() -> tuple[Any, dict[str, Any]]:
        return jax.block_until_ready(compiled(params, other))

    return step, compile_seconds


# ---------------------------------------------------------------------------------------------
# The worker: one side of one workload, in its own process


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """This process's resident set size now, in bytes (its peak where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes.

    On Linux this is VmHWM, the peak of this process's own address space, and not ru_maxrss:
    a process started by fork (or vfork) and exec keeps in ru_maxrss the peak of the process
    that started it, when that was higher (a worker of 10 MB reports its driver's 160 MB).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def raised_limits():
    """Limits that admit every workload (the engine is tried with the default ones first)."""
    from gradient_server.engine import Limits

    return Limits(
        max_nodes=2_000_000,
        max_tensor_elements=1 << 31,
        max_bytes=1 << 40,
        max_flops=10**15,
        max_op_flops=10**14,
    )


def timed(step: Step) -> tuple[float, tuple[Any, dict[str, Any]]]:
    """Seconds one call of `step` takes, and what it returned."""
    began = time.perf_counter()
    out = step()
    return time.perf_counter() - began, out


def copied(out: tuple[Any, dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A result as numpy arrays of its own (a later call may reuse the engine's buffers)."""
    value, grads = out
    return np.array(value), {k: np.array(v) for k, v in grads.items()}


def run_engine(workload: str, p: dict[str, np.ndarray], graph: Any, report: dict) -> tuple:
    """The engine on workload A-D: Engine.gradient on a loaded graph, first with the default
    Limits(); a refusal is noted and the engine remade with raised limits."""
    from gradient_server.engine import Engine
    from gradient_server.errors import LimitExceeded

    message = graph.to_proto()
    wrt = wrt_of(workload)

    def make(limits: Any) -> Step:
        engine = Engine(limits)
        loaded = engine.load_graph(message)

        def step() -> tuple[Any, dict[str, Any]]:
            r = engine.gradient(loaded, p, "loss", wrt=wrt, fetch=["loss"])
            return r.values["loss"], r.gradients

        return step

    step = make(None)
    try:
        first, out = timed(step)
    except LimitExceeded as e:
        report["refused_by_default"] = str(e)
        step = make(raised_limits())
        first, out = timed(step)
    return step, first, copied(out)


def run_engine_big(workload: str, p: dict[str, np.ndarray], data: bytes, repeats: int, report):
    """The engine on a big chain: each repetition a fresh Engine, load_graph_bytes then Forward
    (BF) or Gradient (BG); the first with the default Limits(). Afterwards one more call on
    the last engine (its plan cached) times the run alone: compile = first call - that."""
    from gradient_server.engine import Engine
    from gradient_server.errors import LimitExceeded

    def call(engine: Any, graph: Any) -> tuple[Any, dict[str, Any]]:
        if workload == "BF":
            return engine.forward(graph, p, fetch=["loss"])["loss"], {}
        r = engine.gradient(graph, p, "loss", wrt=["x"], fetch=["loss"])
        return r.values["loss"], r.gradients

    limits = None
    decode, compute, totals = [], [], []
    engine = graph = out = None
    while len(totals) < repeats:
        engine = graph = None
        gc.collect()
        engine = Engine(limits)
        try:
            began = time.perf_counter()
            graph = engine.load_graph_bytes(data)
            loaded = time.perf_counter()
            out = call(engine, graph)
            done = time.perf_counter()
        except LimitExceeded as e:
            if limits is not None:
                raise
            report["refused_by_default"] = str(e)
            limits = raised_limits()
            continue
        decode.append(loaded - began)
        compute.append(done - loaded)
        totals.append(done - began)
    compiles = engine.stats().compiles
    warm, _ = timed(lambda: call(engine, graph))
    recompiled = engine.stats().compiles != compiles
    report["breakdown"] = {
        "decode": statistics.median(decode),
        "compile+run": statistics.median(compute),
        "run (warm)": warm,
        "warm recompiled": recompiled,
    }
    return totals, copied(out)


def worker(workload: str, side: str, sizes: Sizes, repeats: int, out_dir: Path) -> int:
    """Run one side of one workload; print its RESULT line; save its outputs for the check."""
    report: dict[str, Any] = {"workload": workload, "side": side, "notes": []}
    lib: Any = None
    if side in ("torch", "jax"):
        try:
            if side == "torch":
                import torch as lib

                report["notes"].append(f"torch {lib.__version__}, {lib.get_num_threads()} threads")
            else:
                import jax as lib

                lib.config.update("jax_enable_x64", True)
                report["notes"].append(f"jax {lib.__version__}")
        except Exception as e:  # ImportError, or a broken installation
            print(f"SKIP {side} is not importable: {type(e).__name__}: {e}")
            return SKIP_EXIT
    elif side == "engine":
        import gradient_server.engine  # noqa: F401

        if os.environ.get("GRADIENT_CHECK_RESULT_TYPES"):
            report["notes"].append("GRADIENT_CHECK_RESULT_TYPES is set: the engine checks types")

    p = make_inputs(workload, sizes)
    graph = data = None
    if side == "engine":
        graph = build_graph(workload, sizes)
        if workload in BIG:
            data = graph.message().SerializeToString()
            report["graph_bytes"] = len(data)
            graph = None
    gc.collect()
    report["baseline_rss"] = current_rss()

    times: list[float]
    if side == "engine" and workload in BIG:
        assert data is not None
        times, out = run_engine_big(workload, p, data, repeats, report)
        first = times[0]
    else:
        if side == "engine":
            step, first, out = run_engine(workload, p, graph, report)
        elif side == "numpy":
            step = numpy_step(workload, sizes, p)
            first, raw = timed(step)
            out = copied(raw)
        elif side == "torch":
            step = torch_step(lib, workload, sizes, p)
            first, raw = timed(step)
            out = copied(raw)
        else:
            step, report["compile"] = jax_step(lib, workload, sizes, p)
            first, raw = timed(step)
            out = copied(raw)
        times = [timed(step)[0] for _ in range(repeats)]
    report["peak_rss"] = peak_rss()
    report.update(first=first, times=times, median=statistics.median(times), min=min(times))
    value, grads = out
    np.savez(
        out_dir / f"{workload}-{side}.npz", value=value, **{f"d_{k}": v for k, v in grads.items()}
    )
    print(RESULT + json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------------
# The driver: every side of every workload in its own subprocess, then the table


def run_worker(
    workload: str, side: str, args: argparse.Namespace, out_dir: Path
) -> tuple[str, dict | str]:
    """Run a worker; ("ok", its report), ("skip", why) or ("fail", what it printed)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", workload, side]
    command += ["--repeats", str(default_repeats(workload, args.repeats, args.quick))]
    command += ["--out", str(out_dir)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == SKIP_EXIT:
        return "skip", done.stdout.strip().removeprefix("SKIP ")
    for line in done.stdout.splitlines():
        if done.returncode == 0 and line.startswith(RESULT):
            return "ok", json.loads(line[len(RESULT) :])
    return "fail", f"exit {done.returncode}\n{done.stdout}{done.stderr}".strip()


def check(workload: str, side: str, out_dir: Path) -> str | None:
    """None if the side's value and gradients agree with numpy's, else what differs.

    Each array is compared elementwise with rtol 1e-6 (float64) or 1e-3 (float32), and an
    absolute slack of 1% of that relative tolerance times the array's largest magnitude (at
    least 1e-8): float32 sums in another order differ by ~1e-7 of the largest element, which is
    far more than 1e-3 of an element near zero.
    """
    expected = np.load(out_dir / f"{workload}-numpy.npz")
    got = np.load(out_dir / f"{workload}-{side}.npz")
    problems = []
    if sorted(got.files) != sorted(expected.files):
        return f"returned {sorted(got.files)}, numpy {sorted(expected.files)}"
    for key in expected.files:
        want, have = expected[key], got[key]
        rtol = 1e-3 if want.dtype == np.float32 else 1e-6
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        atol = max(1e-8, 1e-2 * rtol * scale)
        if have.shape != want.shape:
            problems.append(f"{key}: shape {have.shape}, numpy {want.shape}")
        elif not np.allclose(have, want, rtol=rtol, atol=atol):
            error = np.max(np.abs(have.astype(np.float64) - want))
            problems.append(
                f"{key}: not allclose (rtol {rtol}, atol {atol:.3g}): max |difference| "
                f"{error:.3g}, max |numpy| {scale:.3g}"
            )
    return "; ".join(problems) or None


def fmt_time(seconds: float | None) -> str:
    """A time with a readable unit."""
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def goal_met(workload: str, ratio: float | None, total: float | None, rss: float | None) -> str:
    """Whether a workload's goal is met in this run."""
    if workload == "BF" or workload == "BG":
        if total is None:
            return "?"
        return "met" if total <= (8.0 if workload == "BF" else 2.0) else "MISSED"
    if ratio is None:
        return "?"
    bound = {"A": 1.05, "B": 1.05, "C": 2.0, "D": 1.0}[workload]
    ok = ratio <= bound and (workload != "D" or (rss is not None and rss <= 1.2))
    return "met" if ok else "MISSED"


def table(rows: list[list[str]]) -> str:
    """Rows as a Markdown table (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def driver(args: argparse.Namespace) -> int:
    """Run the chosen workloads and sides, print the tables and notes; 1 if anything failed."""
    sizes = QUICK if args.quick else FULL
    workloads = [w.strip().upper() for w in args.only.split(",")] if args.only else WORKLOADS
    sides = [s.strip() for s in args.sides.split(",")] if args.sides else list(SIDES)
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}: choose from {', '.join(WORKLOADS)}")
    for s in sides:
        if s not in SIDES:
            raise SystemExit(f"unknown side {s!r}: choose from {', '.join(SIDES)}")
    if "numpy" not in sides:
        sides.insert(0, "numpy")  # the baseline of every ratio and of the check
    print(
        f"Engine benchmark ({'quick sizes: goals do not apply' if args.quick else 'full sizes'})"
        f", python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[tuple[str, str], dict] = {}
    notes: list[str] = []
    failures: list[str] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        out_dir = Path(tmp)
        for w in workloads:
            for side in sides:
                if w in BIG and side in ("torch", "jax"):
                    continue
                if side in skipped:
                    continue
                status, got = run_worker(w, side, args, out_dir)
                if status == "skip":
                    skipped[side] = str(got)
                    notes.append(f"{side} skipped: {got}")
                    print(f"  {w:2s} {side:6s} skipped: {got}", flush=True)
                    continue
                if status == "fail":
                    failures.append(f"{w} {side} failed: {got}")
                    print(f"  {w:2s} {side:6s} FAILED:\n{got}", file=sys.stderr, flush=True)
                    continue
                assert isinstance(got, dict)
                results[w, side] = got
                increase = (got["peak_rss"] - got["baseline_rss"]) / MB
                print(
                    f"  {w:2s} {side:6s} median {fmt_time(got['median'])} "
                    f"(first {fmt_time(got['first'])}, {len(got['times'])} runs), "
                    f"peak RSS {got['peak_rss'] / MB:.0f} MB ({increase:+.0f} MB)",
                    flush=True,
                )
            if (w, "numpy") in results:
                for side in sides:
                    if side != "numpy" and (w, side) in results:
                        problem = check(w, side, out_dir)
                        if problem:
                            failures.append(f"{w}: {side} disagrees with numpy: {problem}")
                            print(f"FAIL {w}: {side} != numpy: {problem}", file=sys.stderr)

    header = ["workload", "engine", "numpy", "torch", "jax", "engine/numpy", "goal"]
    rows = [header + ["met?", "peak RSS increase engine/numpy"]]
    rss_rows = [["workload", "side", "baseline RSS", "peak RSS", "increase"]]
    for w in workloads:
        median = {s: results[w, s]["median"] for s in SIDES if (w, s) in results}
        ratio = median["engine"] / median["numpy"] if {"engine", "numpy"} <= median.keys() else None
        increases = {
            s: results[w, s]["peak_rss"] - results[w, s]["baseline_rss"]
            for s in SIDES
            if (w, s) in results
        }
        rss = None
        if {"engine", "numpy"} <= increases.keys() and increases["numpy"] >= MB:
            rss = increases["engine"] / increases["numpy"]
        cells = [title(w, sizes)]
        for s in SIDES:
            if s in median:
                text = fmt_time(median[s])
                if s in ("torch", "jax"):
                    text += f" ({median[s] / median['numpy']:.2f}x)" if "numpy" in median else ""
                cells.append(text)
            else:
                cells.append("-")
        cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
        cells.append(GOALS[w])
        met = goal_met(w, ratio, median.get("engine"), rss)
        cells.append("n/a (quick)" if args.quick else met)
        if {"engine", "numpy"} <= increases.keys():
            megabytes = f"{increases['engine'] / MB:+.0f} / {increases['numpy'] / MB:+.0f} MB"
            cells.append(f"{rss:.2f}x ({megabytes})" if rss is not None else megabytes)
        else:
            cells.append("-")
        rows.append(cells)
        for s in SIDES:
            if (w, s) in results:
                r = results[w, s]
                rss_rows.append(
                    [
                        w,
                        s,
                        f"{r['baseline_rss'] / MB:.0f} MB",
                        f"{r['peak_rss'] / MB:.0f} MB",
                        f"{(r['peak_rss'] - r['baseline_rss']) / MB:+.0f} MB",
                    ]
                )
        engine = results.get((w, "engine"))
        if engine:
            if "refused_by_default" in engine:
                notes.append(f"{w}: the default Limits() REFUSE it: {engine['refused_by_default']}")
            else:
                notes.append(f"{w}: the default Limits() accept it")
            if w in BIG:
                b = engine["breakdown"]
                again = ", but it RECOMPILED" if b["warm recompiled"] else ""
                notes.append(
                    f"{w}: engine breakdown (medians): decode {fmt_time(b['decode'])}, "
                    f"compile+run {fmt_time(b['compile+run'])}, of which the run alone (a "
                    f"second call, plan cached{again}) {fmt_time(b['run (warm)'])}; "
                    f"serialized graph {engine['graph_bytes']:,} bytes"
                )
            else:
                notes.append(f"{w}: engine first call (compile + run) {fmt_time(engine['first'])}")
        jax_result = results.get((w, "jax"))
        if jax_result:
            notes.append(
                f"{w}: jax jit compile {fmt_time(jax_result['compile'])} (not in the median)"
            )
    for r in results.values():
        for note in r["notes"]:
            if note not in notes:
                notes.append(note)

    print()
    print("Median of value + every input gradient (big chains: decode + compile + run on a fresh")
    print("engine); ratios to hand-written numpy; peak RSS increase over the RSS after imports and")
    print("inputs, each side in its own process:")
    print(table(rows))
    print()
    print(table(rss_rows))
    print()
    for note in notes:
        print(f"- {note}")
    if failures:
        print(f"\nFAILED ({len(failures)}):", file=sys.stderr)
        for failure in failures:
            print(f"- {failure}", file=sys.stderr)
        return 1
    print("\nEvery side's value and gradients agree with hand-written numpy.")
    return 0


def main() -> None:
    """Parse the arguments; run as the driver, or as a worker (--worker W SIDE)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions")
    parser.add_argument("--only", default="", help=f"workloads, of {','.join(WORKLOADS)}")
    parser.add_argument("--sides", default="", help=f"sides, of {','.join(SIDES)}")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.worker:
        workload, side = args.worker
        sizes = QUICK if args.quick else FULL
        repeats = args.repeats or default_repeats(workload, None, args.quick)
        sys.exit(worker(workload, side, sizes, repeats, args.out))
    sys.exit(driver(args))


if __name__ == "__main__":
    main()
