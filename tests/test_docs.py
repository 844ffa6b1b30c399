"""The README stays true: its op table, its SDK quickstart and its grpcurl example."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient_server.opdocs import section

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_op_table_is_current():
    assert section() in README, "README's op table is stale: python -m gradient_server.opdocs"


def test_quickstart_prints_the_lecture_values(server_address):
    quickstart = _code_blocks("python")[0].replace("localhost:50051", server_address)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(quickstart, "README quickstart", "exec"), {})
    first_line = printed.getvalue().splitlines()[0]
    assert first_line == "3.0 -4.0"


def test_vectorized_example_prints_the_lecture_gradients(server_address):
    example = _code_blocks("python")[1].replace("localhost:50051", server_address)
    namespace: dict = {}
    exec(compile(_code_blocks("python")[0].split("g = Graph()")[0], "imports", "exec"), namespace)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(example, "README vectorized", "exec"), namespace)
    gradients = namespace["r"].gradients
    np.testing.assert_allclose(gradients["W"], [[0.088, 0.176], [0.104, 0.208]], atol=1e-12)
    np.testing.assert_allclose(gradients["x"], [-0.112, 0.636], atol=1e-12)


def test_grpcurl_example_json(server_address):
    block = README.split("<!-- grpcurl-example -->")[1]
    body = re.search(r"-d '(.*?)'", block, flags=re.S).group(1)
    request = json_format.Parse(body, service_pb2.GradientRequest())
    with grpc.insecure_channel(server_address) as channel:
        response = service_grpc.GradientServiceStub(channel).Gradient(request, timeout=10)
    answer = json.loads(json_format.MessageToJson(response))
    values = {k: v["floatValues"] for k, v in answer["values"].items()}
    gradients = {k: v["floatValues"] for k, v in answer["gradients"].items()}
    assert values == {"x": [-2.0], "y": [5.0], "z": [-4.0], "q": [3.0], "f": [-12.0]}
    assert gradients == {"x": [-4.0], "y": [-4.0], "z": [3.0], "q": [-4.0], "f": [1.0]}
