"""Benchmark: the serving path side by side with bare gRPC, in one run, as ratios.

Starts the servers as separate processes on loopback ports (as an operator runs them): a bare
gRPC echo server (benchmarks/echo_server.py, the floor) and `gradient-server`. Then measures

- tiny calls: the lecture's f = (x + y)·z through the SDK, p50 latency and the server's CPU
  per call, against an echo of a message of the same size;
- transport: a 64 MiB float64 tensor in and 64 MiB out, by Forward and by Gradient, in MiB/s
  against the echo of the same bytes;
- ‖Wx‖² with W 2048×2048 float64 through the service, against the engine alone in this process;
- calls/s from 8 threads on the tiny graph: unary calls, session steps and the echo;
- 1 vs 2 worker processes, 8 threads, the client spreading calls over 2 connections;
- one MLP training step: the engine alone, a unary call, a session step, hand-written numpy
  and PyTorch (when installed).

Each figure is a median over repetitions after a warm-up (the spread, p10–p90, in brackets),
printed in one table with its floor from the same run.

    python benchmarks/bench_serving.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import wrappers_pb2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_mlp import mlp_graph, mlp_params, numpy_step, torch_step  # noqa: E402
from echo_server import MAX_MESSAGE, MESSAGE_METHOD, RAW_METHOD  # noqa: E402

from gradient_client import GradientClient, Graph  # noqa: E402
from gradient_server.engine import Engine  # noqa: E402

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Processes and measurements


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live child processes (Linux /proc)."""
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            with open(f"/proc/{current}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{current}/task/{current}/children") as children:
                pids.extend(int(child) for child in children.read().split())
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextmanager
def running(command: list[str], port: int) -> Iterator[subprocess.Popen]:
    """Run a server process until the block ends; wait until its port answers gRPC."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def gradient_server(port: int, *extra: str) -> list[str]:
    """The `gradient-server` command line (its defaults, but for the port)."""
    return [sys.executable, "-m", "gradient_server.main", "--port", str(port), *extra]


def echo_server(port: int) -> list[str]:
    """The echo server's command line."""
    return [sys.executable, str(HERE / "echo_server.py"), "--port", str(port)]


@dataclass(frozen=True)
class Timing:
    """Median and spread (10th and 90th percentiles) of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        ordered = sorted(samples)
        if len(ordered) < 10:
            return cls(statistics.median(ordered), ordered[0], ordered[-1])
        deciles = statistics.quantiles(ordered, n=10)
        return cls(statistics.median(ordered), deciles[0], deciles[-1])


def timed(call: Callable[[], object], repeats: int, warmup: int) -> Timing:
    """Wall seconds of `call`, repeated after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, block: int = 50
) -> dict:
    """Wall seconds of each call, the calls taking turns in blocks of `block` calls (so that
    drifts of the machine's speed affect them alike, while each runs warm, back to back, as
    a client looping on one server does; the first calls of each block are not counted):
    name -> Timing."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    settle = max(block // 10, 1)
    while len(next(iter(samples.values()))) < repeats:
        for name, call in calls.items():
            for index in range(block + settle):
                start = time.perf_counter()
                call()
                if index >= settle:
                    samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(times) for name, times in samples.items()}


def cpu_per_call(pid: int, call: Callable[[], object], count: int) -> float:
    """CPU seconds a server process spends per call, over `count` sequential calls."""
    before = process_cpu_seconds(pid)
    for _ in range(count):
        call()
    return (process_cpu_seconds(pid) - before) / count


def calls_per_second(call: Callable[[], object], threads: int, seconds: float) -> float:
    """Calls completed per second by `threads` threads calling `call` in a loop."""
    for _ in range(20):
        call()
    done = [0] * threads
    stop = threading.Event()

    def loop(index: int) -> None:
        while not stop.is_set():
            call()
            done[index] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - start)


def echo_stub(channel: grpc.Channel, method: str = MESSAGE_METHOD) -> Callable:
    """A callable for one of the echo server's methods."""
    if method == RAW_METHOD:
        return channel.unary_unary(method)
    return channel.unary_unary(
        method,
        request_serializer=wrappers_pb2.BytesValue.SerializeToString,
        response_deserializer=wrappers_pb2.BytesValue.FromString,
    )


def channel_to(port: int) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Row:
    what: str
    value: str
    floor: str
    ratio: float | None
    goal: str = ""


def lecture_graph() -> tuple[Graph, dict[str, float]]:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    g.mul(g.add(x, y, name="q"), z, name="f")
    return g, {"x": -2.0, "y": 5.0, "z": -4.0}


def ms(timing: Timing) -> str:
    return f"{timing.median * 1e3:.3f} ms [{timing.low * 1e3:.3f}–{timing.high * 1e3:.3f}]"


def bench_tiny(args, echo_port: int, echo_pid: int, port: int, pid: int) -> list[Row]:
    graph, inputs = lecture_graph()
    repeats, warmup = args.tiny_calls, args.tiny_calls // 10
    with GradientClient(f"127.0.0.1:{port}") as client, channel_to(echo_port) as channel:
        request_size = len(graph.message().SerializeToString()) + 3 * 40
        echo = echo_stub(channel)
        message = wrappers_pb2.BytesValue(value=b"\x01" * request_size)
        raw = echo_stub(channel, RAW_METHOD)
        payload = message.SerializeToString()

        def tiny_call():
            return client.gradient(graph, "f", inputs)

        assert tiny_call().gradients["x"] == -4.0
        with client.session(graph, "f") as session:

            def session_step():
                return session.gradient(inputs)

            assert session_step().gradients["x"] == -4.0
            times = interleaved(
                {
                    "echo": lambda: echo(message),
                    "raw": lambda: raw(payload),
                    "unary": tiny_call,
                    "session": session_step,
                },
                repeats,
                warmup,
            )
        echo_cpu = service_cpu = 0.0
        windows = 10  # short windows taking turns, so that drifts of speed affect both alike
        for _ in range(windows):
            echo_cpu += cpu_per_call(echo_pid, lambda: echo(message), repeats // windows)
            service_cpu += cpu_per_call(pid, tiny_call, repeats // windows)
    echo_time = times["echo"]
    return [
        Row(
            "tiny Gradient, f = (x+y)·z, p50",
            ms(times["unary"]),
            f"echo {ms(echo_time)}",
            times["unary"].median / echo_time.median,
            "≤ 1.3× (moonshot 1.1×)",
        ),
        Row(
            "  the same, one step of a Session",
            ms(times["session"]),
            f"echo {ms(echo_time)}",
            times["session"].median / echo_time.median,
        ),
        Row(
            "  server CPU per tiny call",
            f"{service_cpu * 1e3 / windows:.3f} ms",
            f"echo {echo_cpu * 1e3 / windows:.3f} ms",
            service_cpu / echo_cpu,
            "≤ 1.5×",
        ),
        Row("  raw-bytes echo p50 (no protobuf)", "", ms(times["raw"]), None),
    ]


def bench_transport(args, echo_port: int, port: int) -> list[Row]:
    size = args.transport_mib * MIB
    x = np.random.default_rng(0).standard_normal(size // 8)
    forward_graph = Graph()
    forward_graph.mul(forward_graph.input("x"), 2.0, name="y")
    gradient_graph = Graph()
    xg = gradient_graph.input("x")
    gradient_graph.sum(gradient_graph.square(xg) * 0.5, name="f")  # gradient: x itself
    repeats = args.transport_repeats
    moved = 2 * size / MIB  # MiB in and out per round trip
    with GradientClient(f"127.0.0.1:{port}") as client, channel_to(echo_port) as channel:
        echo = echo_stub(channel)
        message = wrappers_pb2.BytesValue(value=x.tobytes())
        raw = echo_stub(channel, RAW_METHOD)
        payload = message.SerializeToString()
        del message

        def forward():
            return client.forward(forward_graph, {"x": x}, fetch=["y"])

        def gradient():
            return client.gradient(gradient_graph, "f", {"x": x}, wrt=["x"], fetch=["f"])

        np.testing.assert_array_equal(forward().values["y"], 2 * x)
        np.testing.assert_allclose(gradient().gradients["x"], x)
        echo_time = timed(lambda: echo(wrappers_pb2.BytesValue(value=payload)), repeats, 1)
        raw_time = timed(lambda: raw(payload), repeats, 1)
        forward_time = timed(forward, repeats, 1)
        gradient_time = timed(gradient, repeats, 1)

    def rate(timing: Timing) -> str:
        return f"{moved / timing.median:.0f} MiB/s"

    label = f"{args.transport_mib} MiB float64 in, {args.transport_mib} MiB out"
    return [
        Row(
            f"Forward, {label}",
            rate(forward_time),
            f"echo {rate(echo_time)}",
            echo_time.median / forward_time.median,
            "≥ 0.9×",
        ),
        Row(
            f"Gradient, {label}",
            rate(gradient_time),
            f"echo {rate(echo_time)}",
            echo_time.median / gradient_time.median,
            "≥ 0.9×",
        ),
        Row("  raw-bytes echo of the same bytes", "", rate(raw_time), None),
    ]


def bench_wx(args, echo_port: int, port: int) -> list[Row]:
    n = args.wx_size
    rng = np.random.default_rng(1)
    inputs = {"W": rng.standard_normal((n, n)), "x": rng.standard_normal(n)}
    g = Graph()
    w, x = g.input("W"), g.input("x")
    g.sum(g.square(w @ x), name="f")
    engine = Engine()
    compiled = engine.load_graph(g.message())
    wrt = ["W", "x"]
    with GradientClient(f"127.0.0.1:{port}") as client, channel_to(echo_port) as channel:
        echo = echo_stub(channel)
        payload = inputs["W"].tobytes()

        def service():
            return client.gradient(g, "f", inputs, wrt=wrt, fetch=["f"])

        def alone():
            return engine.gradient(compiled, inputs, "f", wrt=wrt, fetch=["f"])

        np.testing.assert_allclose(service().gradients["W"], alone().gradients["W"])
        service_time = timed(service, args.wx_repeats, 1)
        engine_time = timed(alone, args.wx_repeats, 1)
        echo_time = timed(lambda: echo(wrappers_pb2.BytesValue(value=payload)), args.wx_repeats, 1)
    return [
        Row(
            f"‖Wx‖², W {n}×{n} float64, Gradient",
            ms(service_time),
            f"engine alone {ms(engine_time)}",
            service_time.median / engine_time.median,
            "≤ 2×",
        ),
        Row("  echo of W's bytes (in and out)", "", ms(echo_time), None),
    ]


def bench_calls_per_second(args, echo_port: int, port: int) -> list[Row]:
    graph, inputs = lecture_graph()
    threads, seconds = args.threads, args.seconds
    with GradientClient(f"127.0.0.1:{port}") as client, channel_to(echo_port) as channel:
        echo = echo_stub(channel)
        message = wrappers_pb2.BytesValue(value=b"\x01" * 200)
        echo_rate = calls_per_second(lambda: echo(message), threads, seconds)
        unary_rate = calls_per_second(lambda: client.gradient(graph, "f", inputs), threads, seconds)
        with client.session(graph, "f") as session:
            session_rate = calls_per_second(lambda: session.gradient(inputs), threads, seconds)

            def ahead(count: int = 500) -> None:
                for future in [session.gradient_future(inputs) for _ in range(count)]:
                    future.result()

            ahead_rate = 500 * calls_per_second(ahead, 1, seconds)
    return [
        Row(
            f"tiny Gradient calls/s, {threads} threads, unary",
            f"{unary_rate:.0f}/s",
            f"echo {echo_rate:.0f}/s",
            unary_rate / echo_rate,
        ),
        Row(
            f"tiny Gradient steps/s, {threads} threads, one Session",
            f"{session_rate:.0f}/s",
            f"unary {unary_rate:.0f}/s",
            session_rate / unary_rate,
            "≥ 3× (moonshot 5×)",
        ),
        Row(
            "  the same, 1 thread sending 500 steps ahead (futures)",
            f"{ahead_rate:.0f}/s",
            f"unary {unary_rate:.0f}/s",
            ahead_rate / unary_rate,
            "≥ 3× (moonshot 5×)",
        ),
    ]


def bench_workers(args) -> list[Row]:
    graph, inputs = lecture_graph()
    rates = {}
    for workers in (1, 2):
        port = free_port()
        with running(gradient_server(port, "--workers", str(workers)), port):
            for connections in (2, 8):
                with GradientClient(f"127.0.0.1:{port}", connections=connections) as client:
                    rates[workers, connections] = calls_per_second(
                        lambda client=client: client.gradient(graph, "f", inputs),
                        args.threads,
                        args.seconds,
                    )
    return [
        Row(
            f"tiny Gradient calls/s, {args.threads} threads, connections={connections}, "
            "--workers 2",
            f"{rates[2, connections]:.0f}/s",
            f"--workers 1: {rates[1, connections]:.0f}/s",
            rates[2, connections] / rates[1, connections],
            "≥ 1.6×" if connections == 2 else "",
        )
        for connections in (2, 8)
    ]


def bench_mlp_step(args, port: int) -> list[Row]:
    params = mlp_params(batch=args.mlp_batch)
    wrt = ["W1", "b1", "W2", "b2"]
    graph = mlp_graph()
    engine = Engine()
    compiled = engine.load_graph(graph.message())
    expected = numpy_step(dict(params))
    repeats = args.mlp_repeats
    steps: dict[str, Callable[[], dict[str, np.ndarray]]] = {}
    with GradientClient(f"127.0.0.1:{port}") as client:
        steps["engine alone"] = lambda: (
            engine.gradient(compiled, params, "loss", wrt=wrt, fetch=["loss"]).gradients
        )
        steps["service, unary"] = lambda: (
            client.gradient(graph, "loss", params, wrt=wrt, fetch=["loss"]).gradients
        )
        with client.session(graph, "loss", wrt=wrt, fetch=["loss"]) as session:
            steps["service, Session"] = lambda: session.gradient(params).gradients
            for step in steps.values():
                got = step()
                for key in wrt:
                    np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-12)
            steps["hand-written numpy"] = lambda: numpy_step(dict(params))
            timings = interleaved(steps, repeats, 5)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        timings["PyTorch autograd"] = timed(lambda: torch_step(torch, params), repeats, 5)
    base = timings["hand-written numpy"].median
    rows = [
        Row(f"MLP step, batch {args.mlp_batch}: {name}", ms(t), "numpy", t.median / base)
        for name, t in timings.items()
    ]
    if torch is None:
        rows.append(Row("  (PyTorch not installed: pip install torch adds it)", "", "", None))
    return rows


def print_table(rows: list[Row]) -> None:
    headers = ("what", "service", "floor, same run", "ratio", "goal")
    cells = [
        (r.what, r.value, r.floor, "" if r.ratio is None else f"{r.ratio:.2f}×", r.goal)
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cell in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--transport-mib", type=int, default=64)
    parser.add_argument("--wx-size", type=int, default=2048)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument(
        "--only",
        choices=["tiny", "transport", "wx", "calls", "mlp", "workers"],
        action="append",
        help="run only these parts (repeatable)",
    )
    args = parser.parse_args()
    parts = set(args.only or ["tiny", "transport", "wx", "calls", "mlp", "workers"])
    scale = 10 if args.quick else 1
    args.tiny_calls = 3000 // scale
    args.transport_repeats = max(7 // scale, 2)
    args.wx_repeats = 15 // scale
    args.seconds = 4.0 / scale
    args.mlp_repeats = 50 // scale

    echo_port, port = free_port(), free_port()
    rows: list[Row] = []
    with (
        running(echo_server(echo_port), echo_port) as echo,
        running(gradient_server(port), port) as server,
    ):
        if "tiny" in parts:
            rows += bench_tiny(args, echo_port, echo.pid, port, server.pid)
        if "transport" in parts:
            rows += bench_transport(args, echo_port, port)
        if "wx" in parts:
            rows += bench_wx(args, echo_port, port)
        if "calls" in parts:
            rows += bench_calls_per_second(args, echo_port, port)
        if "mlp" in parts:
            rows += bench_mlp_step(args, port)
    if "workers" in parts:
        rows += bench_workers(args)
    cpus = os.cpu_count()
    print(
        f"gradient service benchmarks: {platform.processor() or platform.machine()}, "
        f"{cpus} cores, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"numpy {np.__version__}"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
