"""A `gradient-server` in a process of its own, for tests that watch its memory (RSS) or must
survive its crash, and raw-bytes calls on a generic channel (no protobuf on the client side).

Used by test_hostile.py and test_byte_fuzz.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2
from gradient_client.tensors import from_proto, to_proto

SERVICE = "gradient.v1.GradientService"
UNARY = (
    "Forward",
    "Gradient",
    "CheckGradient",
    "GradientGraph",
    "HessianVectorProduct",
    "JacobianVectorProduct",
    "Jacobian",
)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
_SERVING = re.compile(rb"serving gradient\.v1\.GradientService on [^ ]+:(\d+)")


class ServerProcess:
    """`python -m gradient_server.main --port 0 FLAGS...`, started and SERVING.

    The bound port is read from the server's log line. Use as a context manager, or call
    close(); the log (stdout and stderr) is kept in `log_path`.
    """

    def __init__(
        self,
        log_path: Path,
        *flags: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
    ):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradient_server.main", "--host", "127.0.0.1", "--port", "0"]
            + list(flags),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        try:
            self.port = self._wait_port(startup_timeout)
            self.target = f"127.0.0.1:{self.port}"
            self.channel = grpc.insecure_channel(self.target, CHANNEL_OPTIONS)
            self._wait_serving(startup_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            match = _SERVING.search(self.log_path.read_bytes())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def _wait_serving(self, timeout: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        while health.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                raise RuntimeError("the server never turned SERVING")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> int:
        """The server's resident set size in bytes (VmRSS of /proc/<pid>/status)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) * 1024

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def unary(self, method: str):
        """A raw-bytes callable for a unary method: bytes in, bytes out."""
        return self.channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )

    def stream(self, method: str = "Session"):
        """A raw-bytes callable for a bidirectional stream: an iterator of bytes in and out."""
        return self.channel.stream_stream(
            f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers) and close the channel."""
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def call_unary(server: ServerProcess, method: str, data: bytes, timeout: float = 30.0):
    """(code, details, response bytes or None) of one raw-bytes unary call."""
    try:
        response = server.unary(method)(data, timeout=timeout)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None
    return grpc.StatusCode.OK, "", response


def call_session(server: ServerProcess, messages: Iterable[bytes], timeout: float = 30.0):
    """(code, details, response messages) of one raw-bytes Session stream: the code is the
    stream's own (OK when it ended normally)."""
    responses: list[bytes] = []
    try:
        for response in server.stream()(iter(list(messages)), timeout=timeout):
            responses.append(response)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", responses
    return grpc.StatusCode.OK, "", responses


# ---------------------------------------------------------------------------------------------
# The lecture's f = (x + y) * z at x = -2, y = 5, z = -4 (DESIGN.md section 7)

LECTURE_GRAPH = graph_pb2.Graph(
    nodes=[
        graph_pb2.Node(name="x", op="input"),
        graph_pb2.Node(name="y", op="input"),
        graph_pb2.Node(name="z", op="input"),
        graph_pb2.Node(name="q", op="add", inputs=["x", "y"]),
        graph_pb2.Node(name="f", op="mul", inputs=["q", "z"]),
    ]
)
LECTURE_INPUTS = {name: to_proto(np.float64(v)) for name, v in (("x", -2), ("y", 5), ("z", -4))}
LECTURE_VALUES = {"x": -2.0, "y": 5.0, "z": -4.0, "q": 3.0, "f": -12.0}
LECTURE_GRADIENTS = {"f": 1.0, "q": -4.0, "z": 3.0, "x": -4.0, "y": -4.0}
LECTURE_REQUEST = service_pb2.GradientRequest(
    graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, output="f"
).SerializeToString()


def assert_lecture(server: ServerProcess, timeout: float = 10.0) -> None:
    """The server answers the lecture's Gradient request exactly."""
    code, details, data = call_unary(server, "Gradient", LECTURE_REQUEST, timeout)
    assert code == grpc.StatusCode.OK, f"the lecture's request got {code.name}: {details}"
    response = service_pb2.GradientResponse.FromString(data)
    values = {name: float(from_proto(t)) for name, t in response.values.items()}
    gradients = {name: float(from_proto(t)) for name, t in response.gradients.items()}
    assert values == LECTURE_VALUES
    assert gradients == LECTURE_GRADIENTS
