"""The Node.js example (examples/node, docs/other-languages.md) against a live server: the
lecture's numbers, computed here independently with numpy, come back through @grpc/grpc-js.

Runs when `node` and `npm` are on PATH (.ci/run installs them). `npm ci` installs into a copy
of examples/node under the test's temporary directory, so no node_modules is left in the tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

import gradient_client.wire
from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient.v1 import graph_pb2, tensor_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
GUIDE = ROOT / "docs" / "other-languages.md"
FILES = ("package.json", "package-lock.json", "lecture.js")

# The lecture's vectorized example.
W = np.array([[0.1, 0.5], [-0.3, 0.8]])
X = np.array([0.2, 0.4])
TOLERANCE = 1e-12


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        pytest.skip(f"{missing} not on PATH: the Node.js example needs both (CI installs them)")
    return node, npm


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """examples/node copied into a temporary tree beside a link to the repository's protos (so
    that the script finds them by its default relative path), its packages installed there."""
    _, npm = _tools()
    tree = tmp_path_factory.mktemp("node-example")
    (tree / "protos").symlink_to(ROOT / "protos", target_is_directory=True)
    directory = tree / "examples" / "node"
    directory.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(EXAMPLE / name, directory / name)
    environment = {**os.environ, "npm_config_update_notifier": "false"}
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"
    return directory


@pytest.fixture
def decoded_payloads(monkeypatch) -> list[tuple[int, tuple[int, ...], int]]:
    """(dtype, shape, payload offset in the message) of each raw tensor the server decodes."""
    seen: list[tuple[int, tuple[int, ...], int]] = []
    real = gradient_client.wire.array_from_data

    def spy(dtype, shape, offset=0, nbytes=0, *, buffer):
        seen.append((dtype, tuple(shape), offset))
        return real(dtype, shape, offset, nbytes, buffer=buffer)

    monkeypatch.setattr(gradient_client.wire, "array_from_data", spy)
    return seen


def _digest_of(example: str) -> str:
    graph = json_format.Parse((ROOT / "examples" / example).read_text(), graph_pb2.Graph())
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


def _close(actual, expected) -> None:
    np.testing.assert_allclose(np.array(actual, dtype=np.float64), expected, rtol=0, atol=TOLERANCE)


def test_node_example_computes_the_lecture(example_dir, server_address, decoded_payloads):
    node, _ = _tools()
    ran = subprocess.run(
        [node, "lecture.js", server_address],
        cwd=example_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, f"lecture.js failed:\n{ran.stdout}\n{ran.stderr}"
    records = {record["example"]: record for record in map(json.loads, ran.stdout.splitlines())}
    assert list(records) == [
        "scalar",
        "vectorized",
        "vectorized-by-digest",
        "unknown-digest",
        "shape-mismatch",
    ]

    # f = (x + y) * z at x=-2, y=5, z=-4, as the lecture derives it by hand: exact.
    scalar = records["scalar"]
    assert scalar["values"] == {"x": -2, "y": 5, "z": -4, "q": 3, "f": -12}
    assert scalar["gradients"] == {"x": -4, "y": -4, "z": 3, "q": -4, "f": 1}

    # f = ||W x||^2: df/dx = 2 W^T (W x), df/dW = 2 (W x) x^T.
    q = W @ X
    expected_values = {"W": W, "x": X, "q": q, "q_squared": q**2, "f": np.sum(q**2)}
    expected_gradients = {
        "W": 2 * np.outer(q, X),
        "x": 2 * W.T @ q,
        "q": 2 * q,
        "q_squared": np.ones(2),
        "f": 1.0,
    }
    vectorized = records["vectorized"]
    assert set(vectorized["values"]) == set(expected_values)
    assert set(vectorized["gradients"]) == set(expected_gradients)
    for name, expected in expected_values.items():
        _close(vectorized["values"][name], expected)
    for name, expected in expected_gradients.items():
        _close(vectorized["gradients"][name], expected)
    # The lecture's own (rounded) numbers.
    _close(vectorized["values"]["f"], 0.116)
    _close(vectorized["gradients"]["W"], [[0.088, 0.176], [0.104, 0.208]])
    _close(vectorized["gradients"]["x"], [-0.112, 0.636])
    # The graph the script sent is the one of examples/lecture_vectorized.json, byte for byte.
    assert vectorized["graph_digest"] == _digest_of("lecture_vectorized.json")

    # The same by digest alone (wrt W and x): the same numbers, bit for bit.
    again = records["vectorized-by-digest"]
    assert again["values"] == vectorized["values"]
    assert again["gradients"] == {name: vectorized["gradients"][name] for name in ("W", "x")}

    # The raw inputs written by hand landed aligned in the message: the first raw tensors the
    # server decoded (the scalar lecture's are lists) are W and x of the vectorized call.
    float64 = tensor_pb2.DTYPE_FLOAT64
    assert [(dtype, shape) for dtype, shape, _ in decoded_payloads[:2]] == [
        (float64, (2, 2)),
        (float64, (2,)),
    ]
    assert [offset % 8 for _, _, offset in decoded_payloads[:2]] == [0, 0]

    # Failures: the code, the message and the ErrorInfo of grpc-status-details-bin.
    unknown = records["unknown-digest"]
    assert (unknown["code"], unknown["status"]) == (5, "NOT_FOUND")
    assert unknown["reason"] == "UNKNOWN_GRAPH_DIGEST"
    mismatch = records["shape-mismatch"]
    assert (mismatch["code"], mismatch["status"]) == (3, "INVALID_ARGUMENT")
    assert mismatch["reason"] == "INVALID_GRAPH"
    assert mismatch["metadata"] == {"node": "q", "op": "matmul"}
    assert "node 'q' (op matmul)" in mismatch["details"]


def test_example_files_stay_out_of_git_and_in_step():
    """node_modules is ignored; the lockfile pins what package.json asks for."""
    assert "node_modules/" in (EXAMPLE / ".gitignore").read_text().split()
    package = json.loads((EXAMPLE / "package.json").read_text())
    lock = json.loads((EXAMPLE / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == package["dependencies"]
    assert set(package["dependencies"]) == {"@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"}


def test_guide_grpcurl_example_with_raw_bytes(server_address):
    """The guide's grpcurl request (base64 float64 inputs) gives the lecture's gradients."""
    block = GUIDE.read_text().split("<!-- grpcurl-raw-example -->")[1]
    body = re.search(r"-d '(.*?)'", block, flags=re.S).group(1)
    request = json_format.Parse(body, service_pb2.GradientRequest())
    with grpc.insecure_channel(server_address) as channel:
        response = service_grpc.GradientServiceStub(channel).Gradient(request, timeout=10)
    answer = json.loads(json_format.MessageToJson(response))
    q = W @ X
    assert set(answer["gradients"]) == {"W", "x"}
    _close(answer["gradients"]["W"]["floatValues"], (2 * np.outer(q, X)).ravel())
    _close(answer["gradients"]["x"]["floatValues"], 2 * W.T @ q)
    _close(answer["values"]["f"]["floatValues"], [np.sum(q**2)])
    assert answer["gradients"]["W"]["shape"] == ["2", "2"]  # int64 as strings, as the guide says
