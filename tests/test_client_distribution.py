"""The client distribution on its own: `pip install ./client` is the SDK, the generated
gradient.v1 modules and the `gradient-client` command, and brings only grpcio, protobuf and
numpy (and what those need themselves).

Its wheel is built from a copy of client/ (`pip wheel --no-deps`, as the Dockerfile's builder
does), and installed alone into a fresh virtual environment (`python -m venv`, no system site
packages), its dependencies from the package index this machine's pip is configured with: nothing
from the project's own environment. (As in test_container_run.py, the venv is made
`--without-pip` and installed into by this interpreter's pip with `--python`: the same
resolution, without bootstrapping a pip in it.) There, with `python -I` and a working directory
outside the repository, a script imports the SDK, makes a Gradient call to a server this test
runs in-process, and lists the installed distributions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from gradient_server.service import create_server

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"
NAME = "gradient-service-client"
DEPENDENCIES = {"grpcio", "protobuf", "numpy"}  # the client's only requirements

# Run in the client-only environment: the lecture's f = (x + y) * z, an error the server
# reports, and what is installed there.
PROBE = r"""
import importlib.metadata, importlib.util, json, sys

import gradient.v1
import gradient_client
from gradient_client import GradientClient, GradientError, Graph

with GradientClient(sys.argv[1], timeout=30) as client:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = (x + y) * z
    r = client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})
    bad = Graph()
    bad.op("no_such_op", bad.input("x"), name="bad")
    try:
        client.forward(bad, {"x": 1.0})
        error = None
    except GradientError as caught:
        error = [caught.code.name, caught.details]

print(json.dumps({
    "value": float(r.values[f.name]),
    "gradients": [float(r.gradients[n]) for n in "xyz"],
    "error": error,
    "files": [gradient_client.__file__, gradient.v1.__file__],
    "server_importable": importlib.util.find_spec("gradient_server") is not None,
    "google_rpc": importlib.util.find_spec("google.rpc") is not None,
    "distributions": {
        d.metadata["Name"]: d.requires or [] for d in importlib.metadata.distributions()
    },
}))
"""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}{result.stderr}"
    return result


@dataclass
class Installed:
    wheel: Path
    venv: Path
    workdir: Path  # outside the repository: nothing can be imported from its sources


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("client-distribution")
    source, wheels, venv, workdir = (base / n for n in ("client", "wheels", "venv", "work"))
    leftovers = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "dist", "*.egg-info")
    shutil.copytree(CLIENT, source, ignore=leftovers)
    workdir.mkdir()
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-cache-dir", "--no-deps", "--wheel-dir", str(wheels), str(source)])
    (wheel,) = wheels.glob("*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    _run([*pip, "--python", python, "install", "--no-cache-dir", str(wheel)], cwd=workdir)
    return Installed(wheel, venv, workdir)


@pytest.fixture(scope="module")
def target():
    server, port = create_server("127.0.0.1:0", threads=2)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_the_wheel_holds_the_sdk_the_generated_modules_and_no_server(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"gradient", "gradient_client"}, tops
    for needed in ("gradient_client/py.typed", "gradient/v1/graph_pb2.pyi"):
        assert needed in names, f"{needed} is not in {installed.wheel.name}"
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", name) for name in names), names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    lines = zipfile.ZipFile(installed.wheel).read(metadata).decode().splitlines()
    required = [
        Requirement(line.split(":", 1)[1]) for line in lines if line[:14] == "Requires-Dist:"
    ]
    plain = {_normalized(r.name) for r in required if not r.marker or "extra" not in str(r.marker)}
    assert plain == DEPENDENCIES, [str(r) for r in required]


def test_alone_it_talks_to_a_server_with_only_grpcio_protobuf_and_numpy(installed, target):
    python = str(installed.venv / "bin" / "python")
    # -I: no PYTHON* variables, no user site, and neither the script's folder nor cwd on the path.
    out = _run([python, "-I", "-c", PROBE, target], cwd=installed.workdir).stdout
    probe = json.loads(out)

    assert probe["value"] == -12.0
    assert probe["gradients"] == [-4.0, -4.0, 3.0]
    # Without googleapis-common-protos the SDK still says what failed (from the status).
    assert not probe["google_rpc"]
    code, details = probe["error"]
    assert code == "INVALID_ARGUMENT" and "no_such_op" in details, probe["error"]
    for file in probe["files"]:
        assert Path(file).is_relative_to(installed.venv), probe["files"]
    assert not probe["server_importable"]

    # Installed: the client and its three requirements, with whatever they need in turn
    # (grpcio needs typing-extensions), and nothing else; no pip (the venv is made without).
    installed_here = {_normalized(name): needs for name, needs in probe["distributions"].items()}
    environment = {**default_environment(), "extra": ""}
    expected, todo = {_normalized(NAME)}, list(DEPENDENCIES)
    while todo:
        name = todo.pop()
        if name in expected:
            continue
        expected.add(name)
        assert name in installed_here, f"{name} is required but not installed: {installed_here}"
        for line in installed_here[name]:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(_normalized(requirement.name))
    assert set(installed_here) == expected, sorted(installed_here)


def test_its_gradient_client_command_runs(installed):
    result = _run(
        [str(installed.venv / "bin" / "gradient-client"), "--help"], cwd=installed.workdir
    )
    assert "usage: gradient-client" in result.stdout, result.stdout


def test_the_server_distribution_depends_on_this_client_version():
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert client["name"] == NAME
    pins = [Requirement(r) for r in server["dependencies"]]
    (pin,) = [r for r in pins if _normalized(r.name) == NAME]
    assert str(pin.specifier) == f"=={client['version']}" == f"=={server['version']}"
    assert "gradient-client" in client["scripts"] and "gradient-client" not in server["scripts"]
    # The client's license file is a copy of the repository's (it must lie inside client/).
    assert (CLIENT / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
