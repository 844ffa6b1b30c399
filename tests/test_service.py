"""The service end to end over a real loopback channel: health, reflection, ListOps, deep
graphs, big messages, the console command and its graceful shutdown, caching, node order,
skipped and unreached nodes, the dtype promotion rule, and the asyncio client."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient.v1 import graph_pb2
from gradient_client import AsyncGradientClient, GradientClient, GradientError, Graph, to_proto
from gradient_server.ops import OPS
from gradient_server.ops.base import REQUIRED

SERVICE = "gradient.v1.GradientService"


@pytest.fixture(scope="module")
def channel(server_address) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_address) as connected:
        yield connected


def lecture_graph() -> Graph:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    g.mul(g.add(x, y, name="q"), z, name="f")
    return g


# ---------------------------------------------------------------------------------------------
# Health and reflection


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_is_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_reflection_resolves_the_service_and_its_messages(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    file = database.FindFileContainingSymbol(SERVICE)
    assert file.package == "gradient.v1"
    assert file.name.endswith("gradient_service.proto")
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    methods = {m.name: m for m in service.methods}
    # The proto evolves additively: these must be there (other RPCs may be added).
    assert {"Forward", "Gradient", "ListOps"} <= set(methods)
    assert methods["Gradient"].input_type.full_name == "gradient.v1.GradientRequest"
    assert methods["Gradient"].output_type.full_name == "gradient.v1.GradientResponse"
    # The imported files resolve too: a client can build a Tensor from reflection alone.
    tensor = pool.FindMessageTypeByName("gradient.v1.Tensor")
    fields = {f.name: f.number for f in tensor.fields}
    assert (
        fields.items()
        >= {
            "dtype": 1,
            "shape": 2,
            "data": 3,
            "float_values": 4,
            "int_values": 5,
            "bool_values": 6,
        }.items()
    )
    node = pool.FindMessageTypeByName("gradient.v1.Node")
    assert {f.name for f in node.fields} >= {"name", "op", "inputs", "attrs"}


# ---------------------------------------------------------------------------------------------
# ListOps


def _expected_default(spec):
    if spec.default is REQUIRED or spec.default is None:
        return None
    if isinstance(spec.default, (tuple, list)):
        return list(spec.default)
    if isinstance(spec.default, np.dtype):
        return spec.default.name
    return spec.default


def test_list_ops_lists_every_op_of_the_table(client):
    ops = client.list_ops()
    names = [op.name for op in ops]
    assert names == sorted(OPS), "every op, sorted by name"
    for info in ops:
        opdef = OPS[info.name]
        assert info.doc.strip(), info.name
        assert info.inputs == tuple(opdef.inputs)
        assert len(info.differentiable) == len(opdef.inputs)
        assert info.differentiable == tuple(
            bool(opdef.differentiable[i]) for i in range(len(opdef.inputs))
        )
        assert info.variadic == opdef.variadic
        assert [a.name for a in info.attrs] == [a.name for a in opdef.attrs]
        for attr, spec in zip(info.attrs, opdef.attrs, strict=True):
            assert attr.type == ("string" if spec.kind == "dtype" else spec.kind)
            assert attr.type in (
                "int",
                "float",
                "string",
                "bool",
                "ints",
                "floats",
                "tensor",
                "axes",
            )
            assert attr.required == (spec.default is REQUIRED)
            assert attr.default == _expected_default(spec), (info.name, attr.name)


def test_list_ops_facts_a_user_relies_on(client):
    ops = {op.name: op for op in client.list_ops()}
    for source in ("input", "constant"):
        assert ops[source].inputs == ()
    assert ops["add"].inputs == ("x", "y") and ops["add"].differentiable == (True, True)
    assert ops["matmul"].differentiable == (True, True)
    assert ops["where"].differentiable == (False, True, True)
    for comparison in ("equal", "not_equal", "greater", "greater_equal", "less", "less_equal"):
        assert ops[comparison].differentiable == (False, False), comparison
    reshape = {a.name: a for a in ops["reshape"].attrs}
    assert reshape["shape"].required and reshape["shape"].type == "ints"
    total = {a.name: a for a in ops["sum"].attrs}
    assert not total["axis"].required and total["axis"].type == "axes"
    assert total["keepdims"].default is False
    value = {a.name: a for a in ops["constant"].attrs}["value"]
    assert value.required and value.type == "tensor"


def test_list_ops_on_the_raw_stub(channel):
    stub = service_grpc.GradientServiceStub(channel)
    response = stub.ListOps(service_pb2.ListOpsRequest(), timeout=10)
    assert [op.name for op in response.ops] == sorted(OPS)
    keepdims = next(
        a for a in next(o for o in response.ops if o.name == "mean").attrs if a.name == "keepdims"
    )
    assert keepdims.HasField("default") and keepdims.default.b is False
    axis = next(
        a for a in next(o for o in response.ops if o.name == "mean").attrs if a.name == "axis"
    )
    assert not axis.HasField("default")  # "all axes" has no wire value


# ---------------------------------------------------------------------------------------------
# Scale: deep graphs and big messages


def add_chain(length: int) -> tuple[graph_pb2.Graph, str]:
    """x, a constant `one`, and `length` nodes n_i = n_{i-1} + one (n_{-1} = x)."""
    message = graph_pb2.Graph()
    message.nodes.add(name="x", op="input")
    one = message.nodes.add(name="one", op="constant")
    one.attrs["value"].tensor.CopyFrom(to_proto(np.float64(1.0)))
    previous = "x"
    for i in range(length):
        name = f"n{i}"
        message.nodes.add(name=name, op="add", inputs=[previous, "one"])
        previous = name
    return message, previous


def test_100k_node_chain_gradient(client):
    length = 100_000
    message, last = add_chain(length)
    result = client.gradient(
        message,
        output=last,
        inputs={"x": 0.5},
        wrt=["x", "one", "n0", "n50000", last],
        fetch=[last, "n50000"],
    )
    assert float(result.values[last]) == 0.5 + length
    assert float(result.values["n50000"]) == 0.5 + 50_001
    # d last / d x = 1; `one` is added `length` times; every link passes the gradient on.
    assert float(result.gradients["x"]) == 1.0
    assert float(result.gradients["one"]) == float(length)
    assert float(result.gradients["n0"]) == 1.0
    assert float(result.gradients["n50000"]) == 1.0
    assert float(result.gradients[last]) == 1.0


def test_50_mb_tensor_goes_through_forward(client):
    rng = np.random.default_rng(0)
    big = rng.standard_normal(50 * 1024 * 1024 // 8)  # 50 MiB of float64
    assert big.nbytes > 12 * 4 * 1024 * 1024
    g = Graph()
    g.neg(g.input("x"), name="y")
    result = client.forward(g, {"x": big}, fetch=["y"])
    assert result["y"].dtype == np.float64
    assert result["y"].tobytes() == (-big).tobytes()


# ---------------------------------------------------------------------------------------------
# The console command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_chain(count: int) -> tuple[Graph, str]:
    """w multiplied by itself `count` times."""
    g = Graph()
    w = h = g.input("w")
    for _ in range(count):
        h = g.matmul(h, w)
    return g, h.name


class ServerProcess:
    """`gradient-server` (the console command) on a free port, as a subprocess."""

    def __init__(self, log_path: Path, *args: str):
        command = Path(sys.executable).parent / "gradient-server"
        assert command.exists(), command
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [str(command), "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_serving(self, channel: grpc.Channel) -> health_pb2_grpc.HealthStub:
        grpc.channel_ready_future(channel).result(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while True:
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return health
            assert time.monotonic() < deadline, "never SERVING"
            time.sleep(0.05)

    def close(self) -> str:
        """Kill the process if it still runs; return its log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.log_path.read_text()


def test_console_command_serves_and_shuts_down_gracefully(tmp_path):
    server = ServerProcess(tmp_path / "server.log", "--grace", "30")
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = server.wait_serving(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            with GradientClient(server.target, timeout=60) as remote:
                r = remote.gradient(lecture_graph(), "f", {"x": -2.0, "y": 5.0, "z": -4.0})
                assert float(r.values["f"]) == -12.0 and float(r.gradients["x"]) == -4.0

                # Watch health before the signal; it must report NOT_SERVING after it.
                watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

                # Size an in-flight call on this server: time a short chain of matmuls of an
                # identity, then make one that runs for seconds.
                size = 300
                w = np.eye(size)
                probe_graph, probe_last = matmul_chain(200)
                remote.forward(probe_graph, {"w": w}, fetch=[probe_last])  # warm up
                tick = time.perf_counter()
                remote.forward(probe_graph, {"w": w}, fetch=[probe_last])
                per_op = max((time.perf_counter() - tick) / 200, 1e-5)
                count = max(200, min(100_000, int(1.5 / per_op)))  # plus its compile time
                g, last = matmul_chain(count)
                outcome: dict[str, object] = {}

                def in_flight():
                    try:
                        outcome["value"] = remote.forward(g, {"w": w}, fetch=[last])[last]
                    except BaseException as e:  # noqa: BLE001
                        outcome["error"] = e
                    outcome["done"] = time.monotonic()

                worker = threading.Thread(target=in_flight)
                worker.start()
                time.sleep(0.3)
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)

                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                watch.cancel()

                worker.join(timeout=60)
                assert "error" not in outcome, outcome.get("error")
                assert outcome["done"] > signalled, "the call should still run at SIGTERM"
                assert np.array_equal(outcome["value"], np.eye(size))
        assert server.process.wait(timeout=30) == 0
    finally:
        log = server.close()
    assert "Traceback" not in log, log


def test_shutdown_with_several_health_watchers_exits(tmp_path):
    """A load balancer (or several) watches health and drops each stream when it turns
    NOT_SERVING. The server must still stop within its grace period and exit 0."""
    grace = 3
    server = ServerProcess(tmp_path / "server.log", "--grace", str(grace))
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = server.wait_serving(channel)
            watches = [
                health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=grace + 3)
                for name in ("", SERVICE) * 4
            ]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            updates = []
            for watch in watches:
                try:
                    updates.append(next(watch).status)
                except grpc.RpcError as e:
                    updates.append(e.code())
                watch.cancel()
        try:
            status = server.process.wait(timeout=max(1.0, signalled + grace + 4 - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "still running"
        assert updates == [health_pb2.HealthCheckResponse.NOT_SERVING] * 8, updates
        assert status == 0, f"{status} {time.monotonic() - signalled:.1f} s after SIGTERM"
    finally:
        log = server.close()
    assert "Traceback" not in log, log


def test_shutdown_ends_watch_streams_and_idle_sessions_and_exits_when_the_last_call_ends(
    tmp_path,
):
    """SIGTERM with a 30 s grace period: a Watch stream its client never closes gets
    NOT_SERVING and ends, an idle session is ended, a new call is refused, the call in flight
    finishes, and the process exits 0 about as soon as it has (not after the grace period)."""
    server = ServerProcess(tmp_path / "server.log", "--grace", "30")
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = server.wait_serving(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with GradientClient(server.target, timeout=60) as remote:
                idle = remote.session(lecture_graph(), "f")
                assert float(idle.gradient({"x": -2.0, "y": 5.0, "z": -4.0}).values["f"]) == -12
                w = np.eye(300)
                probe, probe_last = matmul_chain(200)
                remote.forward(probe, {"w": w}, fetch=[probe_last])  # warm up
                tick = time.perf_counter()
                remote.forward(probe, {"w": w}, fetch=[probe_last])
                per_op = max((time.perf_counter() - tick) / 200, 1e-5)
                g, last = matmul_chain(max(200, min(100_000, int(1.5 / per_op))))
                outcome: dict[str, object] = {}

                def in_flight():
                    try:
                        outcome["value"] = remote.forward(g, {"w": w}, fetch=[last])[last]
                    except BaseException as e:  # noqa: BLE001
                        outcome["error"] = e
                    outcome["done"] = time.monotonic()

                worker = threading.Thread(target=in_flight)
                worker.start()
                time.sleep(0.3)
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)

                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(StopIteration):  # the server ended the stream
                    next(watch)
                with pytest.raises(GradientError) as refused:
                    idle.gradient({"x": 1.0, "y": 1.0, "z": 1.0})
                ended = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
                assert refused.value.code in ended
                idle.cancel()
                # Without the SDK's retries, to see the server's own answer to a new call: it
                # is refused, UNAVAILABLE, or CANCELLED when it reached gRPC exactly as the
                # server stopped accepting calls (gRPC cancels the calls it had not started).
                no_retries = {"loadBalancingConfig": [{"pick_first": {}}]}
                with pytest.raises(GradientError) as late:
                    with GradientClient(
                        server.target, timeout=5, service_config=no_retries
                    ) as newcomer:
                        newcomer.gradient(lecture_graph(), "f", {"x": 1.0, "y": 1.0, "z": 1.0})
                assert late.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                worker.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["done"] > signalled, "the call should still run at SIGTERM"
        assert np.array_equal(outcome["value"], np.eye(300))
        assert server.process.wait(timeout=30) == 0
        exited = time.monotonic()
        assert exited - outcome["done"] < 2.5, f"exited {exited - outcome['done']:.2f} s late"
    finally:
        log = server.close()
    assert "Traceback" not in log, log


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def test_a_killed_worker_is_replaced_and_sigterm_drains_them_all(tmp_path):
    server = ServerProcess(tmp_path / "server.log", "--workers", "2", "--grace", "30")
    try:
        with grpc.insecure_channel(server.target) as channel:
            server.wait_serving(channel)
            deadline = time.monotonic() + 30
            while len(_children(server.process.pid)) < 2:
                assert time.monotonic() < deadline, "never two workers"
                time.sleep(0.05)
            first, second = _children(server.process.pid)
            os.kill(first, signal.SIGKILL)
            while True:  # a new worker takes the dead one's place
                workers = _children(server.process.pid)
                if len(workers) == 2 and first not in workers:
                    break
                assert time.monotonic() < deadline, f"not replaced: {workers}"
                time.sleep(0.05)
            assert second in workers
            with GradientClient(server.target, timeout=30, connections=4) as client:
                for _ in range(8):  # every connection, whichever worker it reached
                    r = client.gradient(lecture_graph(), "f", {"x": -2.0, "y": 5.0, "z": -4.0})
                    assert float(r.gradients["x"]) == -4.0
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        for worker in workers:
            assert (
                not Path(f"/proc/{worker}").exists()
                or "Z" in Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            )
    finally:
        log = server.close()
    assert "was killed by SIGKILL; restarting it" in log, log
    assert "Traceback" not in log, log


def test_workers_that_keep_dying_at_start_make_the_server_give_up():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gradient_server.main", "--port", str(port), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "at start 5 times in a row: giving up" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_console_command_refuses_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gradient_server.main", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Caching and node order


def test_same_graph_twice_with_other_values(client):
    g = lecture_graph()
    first = client.gradient(g, "f", {"x": -2.0, "y": 5.0, "z": -4.0})
    second = client.gradient(g, "f", {"x": 1.0, "y": 2.0, "z": 10.0})
    assert float(first.values["f"]) == -12.0
    assert float(second.values["f"]) == 30.0
    assert float(first.gradients["x"]) == -4.0 and float(second.gradients["x"]) == 10.0
    assert float(second.gradients["z"]) == 3.0
    # And again with another shape: the broadcast gradients follow.
    third = client.gradient(
        g, "f", {"x": np.array([1.0, 2.0]), "y": 1.0, "z": 2.0}, seed=np.array([1.0, 1.0])
    )
    assert third.values["f"].tolist() == [4.0, 6.0]
    assert float(third.gradients["y"]) == 4.0  # summed over the broadcast axis
    assert third.gradients["x"].tolist() == [2.0, 2.0]
    assert float(third.gradients["z"]) == 5.0
    again = client.forward(g, {"x": -2.0, "y": 5.0, "z": -4.0})
    assert float(again["f"]) == -12.0


def test_graphs_differing_only_in_a_constant_or_attribute_are_not_confused(client):
    results = []
    for scale in (2.0, 3.0):
        g = Graph()
        g.mul(g.input("x"), g.constant(np.array([scale, 1.0]), name="c"), name="y")
        results.append(client.forward(g, {"x": np.array([1.0, 1.0])})["y"].tolist())
    assert results == [[2.0, 1.0], [3.0, 1.0]]
    shapes = []
    for shape in ((2, 3), (3, 2)):
        g = Graph()
        g.reshape(g.input("x"), shape, name="r")
        shapes.append(client.forward(g, {"x": np.arange(6.0)})["r"].shape)
    assert shapes == [(2, 3), (3, 2)]


def fan_graph() -> graph_pb2.Graph:
    """x feeds many products whose gradients accumulate: float rounding depends on order."""
    rng = np.random.default_rng(7)
    g = Graph()
    x = g.input("x")
    terms = []
    for i in range(40):
        c = g.constant(rng.standard_normal(5) * 10.0 ** rng.integers(-8, 8), name=f"c{i:02d}")
        terms.append(g.mul(g.tanh(g.mul(x, c, name=f"p{i:02d}"), name=f"t{i:02d}"), c))
    total = terms[0]
    for i, term in enumerate(terms[1:]):
        total = g.add(total, term, name=f"s{i:02d}")
    g.sum(total, name="loss")
    return g.to_proto()


def test_node_order_does_not_change_results(client):
    message = fan_graph()
    x = np.linspace(-3.0, 3.0, 5)
    reference = client.gradient(message, "loss", {"x": x})
    rng = np.random.default_rng(11)
    orders = [list(reversed(message.nodes))] + [
        [message.nodes[int(i)] for i in rng.permutation(len(message.nodes))] for _ in range(3)
    ]
    for nodes in orders:
        shuffled = graph_pb2.Graph(nodes=nodes)
        assert shuffled.SerializeToString() != message.SerializeToString()
        result = client.gradient(shuffled, "loss", {"x": x})
        assert result.values.keys() == reference.values.keys()
        assert result.gradients.keys() == reference.gradients.keys()
        for name, value in reference.values.items():
            assert result.values[name].tobytes() == value.tobytes(), name
        for name, grad in reference.gradients.items():
            assert result.gradients[name].tobytes() == grad.tobytes(), name
    # And the numbers are right: d/dx sum_i c_i tanh(c_i x) = sum_i c_i^2 (1 - tanh^2(c_i x)).
    constants = {n.name: n for n in message.nodes if n.op == "constant" and n.name.startswith("c")}
    expected = np.zeros(5)
    for node in constants.values():
        c = np.frombuffer(node.attrs["value"].tensor.data, dtype="<f8")
        expected += c * c * (1.0 - np.tanh(c * x) ** 2)
    np.testing.assert_allclose(reference.gradients["x"], expected, rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------------------------------------
# Skipped and unreached nodes


def test_int_and_bool_nodes_are_skipped_with_a_reason(client):
    g = Graph()
    x, k = g.input("x"), g.input("k")
    positive = g.greater(x, 0.0, name="positive")
    g.sum(g.mul(x, k, name="xk"), name="loss")
    inputs = {"x": np.array([1.5, -2.0]), "k": np.array([3, 4], dtype=np.int64)}
    r = client.gradient(g, "loss", inputs, wrt=["x"], fetch=["loss"])
    assert r.gradients["x"].tolist() == [3.0, 4.0]
    assert float(r.values["loss"]) == 1.5 * 3 - 2.0 * 4
    # By default (every node) they are skipped with a reason, every float node has a gradient.
    everything = client.gradient(g, "loss", inputs)
    assert {"k", "positive"} == set(everything.skipped)
    assert "int64" in everything.skipped["k"] and "bool" in everything.skipped["positive"]
    assert set(everything.gradients) | set(everything.skipped) == set(everything.values)
    # Named explicitly, a node without a gradient is an error naming it (as in JAX, PyTorch).
    for name, dtype in (("k", "int64"), (positive, "bool")):
        with pytest.raises(GradientError) as refused:
            client.gradient(g, "loss", inputs, wrt=["x", name])
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert dtype in refused.value.details


def test_unreached_float_nodes_get_zero_gradients_of_their_shape(client):
    g = Graph()
    x = g.input("x")
    unused = g.input("unused", dtype="float32", shape=(4,))
    g.exp(x, name="dangling")
    g.mul(unused, 3.0, name="also_dangling")
    g.sum(g.square(x), name="loss")
    x_value = np.arange(6.0).reshape(2, 3)
    r = client.gradient(g, "loss", {"x": x_value, "unused": np.ones(4, np.float32)})
    assert np.array_equal(r.gradients["x"], 2 * x_value)
    for name, shape, dtype in [
        ("dangling", (2, 3), np.float64),
        ("unused", (4,), np.float32),
        ("also_dangling", (4,), np.float32),
    ]:
        grad = r.gradients[name]
        assert grad.shape == shape and grad.dtype == dtype, name
        assert not grad.any(), name
    # Requested explicitly, too.
    only = client.gradient(
        g, "loss", {"x": x_value, "unused": np.ones(4, np.float32)}, wrt=["dangling"]
    )
    assert set(only.gradients) == {"dangling"}
    assert np.array_equal(only.gradients["dangling"], np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# dtypes: numpy promotion between tensors; Python numbers are weak


def test_float32_graph_stays_float32(client):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 2)).astype(np.float32)
    g = Graph()
    xn, wn = g.input("x"), g.input("w")
    z = g.matmul(xn, wn, name="z")
    h = g.tanh(z, name="h")
    scaled = g.mul(h, 2.0, name="scaled")
    shifted = g.add(scaled, 1, name="shifted")
    loss = g.mean(g.square(shifted, name="sq"), name="loss")
    r = client.gradient(g, loss, {"x": x, "w": w})
    for name in ("x", "w", "z", "h", "scaled", "shifted", "sq", "loss"):
        assert r.values[name].dtype == np.float32, name
        assert r.gradients[name].dtype == np.float32, name
    # Reference in float64 from the float32 inputs.
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    h64 = np.tanh(x64 @ w64)
    s64 = 2.0 * h64 + 1.0
    np.testing.assert_allclose(r.values["loss"], np.mean(s64**2), rtol=1e-5)
    d_s = 2.0 * s64 / s64.size
    d_z = d_s * 2.0 * (1.0 - h64**2)
    np.testing.assert_allclose(r.gradients["w"], x64.T @ d_z, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.gradients["x"], d_z @ w64.T, rtol=1e-4, atol=1e-6)


def test_float32_times_a_python_float_stays_float32(client):
    x = np.array([1.1, -2.3, 1e-3], dtype=np.float32)
    g = Graph()
    g.mul(g.input("x"), 0.1, name="y")
    r = client.gradient(g, "y", {"x": x}, seed=np.ones(3, np.float32))
    assert r.values["y"].dtype == np.float32
    # Computed in float32, as numpy does with a Python scalar.
    assert r.values["y"].tobytes() == (x * np.float32(0.1)).tobytes()
    assert r.gradients["x"].dtype == np.float32
    assert r.gradients["x"].tobytes() == np.full(3, np.float32(0.1)).tobytes()


def test_float32_and_float64_inputs_promote_to_float64(client):
    a = np.array([0.1, 0.2], dtype=np.float32)
    b = np.array([0.3, 0.4], dtype=np.float64)
    g = Graph()
    g.sum(g.add(g.input("a"), g.input("b"), name="s"), name="loss")
    r = client.gradient(g, "loss", {"a": a, "b": b})
    assert r.values["s"].dtype == np.float64
    assert r.values["s"].tobytes() == (a.astype(np.float64) + b).tobytes()
    assert r.gradients["a"].dtype == np.float32 and r.gradients["a"].tolist() == [1.0, 1.0]
    assert r.gradients["b"].dtype == np.float64 and r.gradients["b"].tolist() == [1.0, 1.0]


def test_float32_with_a_float64_array_constant_promotes(client):
    x = np.array([0.1, 0.2], dtype=np.float32)
    g = Graph()
    g.mul(g.input("x"), np.array([3.0, 3.0]), name="y")  # an array is strongly typed
    r = client.forward(g, {"x": x})
    assert r["y"].dtype == np.float64
    assert r["y"].tobytes() == (x.astype(np.float64) * 3.0).tobytes()


def test_int32_plus_float32_gives_float64(client):
    i = np.array([16_777_217, -3], dtype=np.int32)  # 2**24 + 1 is not a float32
    f = np.array([0.5, 0.25], dtype=np.float32)
    g = Graph()
    g.add(g.input("i"), g.input("f"), name="s")
    r = client.forward(g, {"i": i, "f": f})
    assert r["s"].dtype == np.float64 == np.result_type(np.int32, np.float32)
    assert r["s"].tolist() == [16_777_217.5, -2.75]


def test_int_input_times_a_python_float_gives_float64(client):
    for dtype in (np.int64, np.int32):
        k = np.array([3, -7, 2**40 if dtype == np.int64 else 5], dtype=dtype)
        g = Graph()
        g.mul(g.input("k"), 2.5, name="y")
        r = client.forward(g, {"k": k})
        assert r["y"].dtype == np.float64, dtype
        assert r["y"].tolist() == [v * 2.5 for v in k.tolist()]


def test_int_input_times_a_python_int_keeps_its_dtype(client):
    for dtype in (np.int32, np.int64):
        k = np.array([3, -7], dtype=dtype)
        g = Graph()
        g.mul(g.input("k"), 2, name="y")
        r = client.forward(g, {"k": k})
        assert r["y"].dtype == dtype
        assert r["y"].tolist() == [6, -14]


def test_promotion_gradient_is_exact(client):
    """d/df of sum(i * f) with int32 i and float32 f is i, returned as float32."""
    i = np.array([2, -3], dtype=np.int32)
    f = np.array([0.5, 1.5], dtype=np.float32)
    g = Graph()
    g.sum(g.mul(g.input("i"), g.input("f"), name="p"), name="loss")
    r = client.gradient(g, "loss", {"i": i, "f": f}, wrt=["f", "p"])
    assert r.gradients["f"].dtype == np.float32 and r.gradients["f"].tolist() == [2.0, -3.0]
    assert r.gradients["p"].dtype == np.float64
    assert "i" in client.gradient(g, "loss", {"i": i, "f": f}).skipped
    assert float(r.values["loss"]) == 1.0 - 4.5


# ---------------------------------------------------------------------------------------------
# The asyncio client


def test_async_client_matches_the_sync_one(client, server_address):
    g = Graph()
    x, w = g.input("x"), g.input("w")
    q = g.matmul(w, x, name="q")
    g.sum(g.square(q), name="f")
    inputs = {"x": np.array([0.2, 0.4]), "w": np.array([[0.1, 0.5], [-0.3, 0.8]])}

    async def run():
        async with AsyncGradientClient(server_address, timeout=30) as remote:
            gradient, forward, ops = await asyncio.gather(
                remote.gradient(g, "f", inputs),
                remote.forward(g, inputs, fetch=["q"]),
                remote.list_ops(),
            )
            try:
                bad = Graph()
                bad.op("nope", bad.input("x"), name="bad")
                await remote.forward(bad, {"x": 1.0})
            except Exception as e:  # noqa: BLE001
                error = e
            else:
                error = None
            return gradient, forward, ops, error

    gradient, forward, ops, error = asyncio.run(run())
    sync = client.gradient(g, "f", inputs)
    assert gradient.values.keys() == sync.values.keys()
    for name in sync.values:
        assert gradient.values[name].tobytes() == sync.values[name].tobytes()
    for name in sync.gradients:
        assert gradient.gradients[name].tobytes() == sync.gradients[name].tobytes()
    assert forward["q"].tobytes() == client.forward(g, inputs, fetch=["q"])["q"].tobytes()
    assert ops == client.list_ops()
    # The lecture's numbers (DESIGN.md section 7).
    assert math.isclose(float(gradient.values["f"]), 0.116, rel_tol=1e-12)
    np.testing.assert_allclose(gradient.gradients["w"], [[0.088, 0.176], [0.104, 0.208]])
    np.testing.assert_allclose(gradient.gradients["x"], [-0.112, 0.636])
    assert isinstance(error, GradientError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "'bad'" in error.details
