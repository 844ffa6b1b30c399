"""The README stays true.

- Every ```python block runs as written, each on its own: a fresh namespace per block (every
  block carries its own imports), run in README order against the test session's live server
  (the README's target "localhost:50051" is replaced by its address), in a temporary
  directory (blocks write drawings). What the blocks print or compute is checked against
  what the README says they print. Blocks marked `<!-- fragment -->` on the line before their
  fence (a cluster's addresses, TLS certificates) are only compiled; there are at most
  MAX_FRAGMENTS of them, and no Python hides in a ```text block.
- The SDK reference lists every public method of the SDK's classes with its exact parameters
  (names, positional or keyword-only, defaults), every field of the result types and every
  attribute of GradientError.
- The commands' flags, the healthcheck's environment variables and the exit codes are
  documented as the commands behave.
- The op table is current, and the grpcurl example gets the lecture's answer.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

import gradient_client
from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient_client import (
    TLS,
    AsyncGradientClient,
    GradientClient,
    GradientError,
    Graph,
    Node,
    cli,
)
from gradient_client.session import AsyncSession, Session, StepFuture
from gradient_server import healthcheck
from gradient_server import main as server_main
from gradient_server.opdocs import section

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TARGET = "localhost:50051"
FRAGMENT = "<!-- fragment -->"
MAX_FRAGMENTS = 1


# ------------------------------------------------------------------------- the code blocks


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    fragment: bool


def _blocks() -> list[Block]:
    """Every fenced block of the README (indented ones too), in order."""
    lines = README.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        fragment = i > 0 and lines[i - 1].strip() == FRAGMENT
        blocks.append(Block(opening.group(1), code, i + 1, fragment))
        i = end + 1
    return blocks


PYTHON = [block for block in _blocks() if block.language == "python"]
RUNNABLE = [block for block in PYTHON if not block.fragment]


def _one(marker: str) -> Block:
    """The one runnable block containing `marker`."""
    found = [block for block in RUNNABLE if marker in block.code]
    assert len(found) == 1, f"{len(found)} runnable README blocks contain {marker!r}"
    return found[0]


def _lecture(namespace: dict, printed: str) -> None:
    assert printed.splitlines()[0] == "3.0 -4.0"
    gradients = namespace["r"].gradients
    assert {name: float(gradients[name]) for name in "fqzxy"} == {
        "f": 1.0, "q": -4.0, "z": 3.0, "x": -4.0, "y": -4.0,
    }  # fmt: skip


def _vectorized(namespace: dict, printed: str) -> None:
    r = namespace["r"]
    np.testing.assert_allclose(r.values["f"], 0.116, atol=1e-12)
    np.testing.assert_allclose(r.gradients["W"], [[0.088, 0.176], [0.104, 0.208]], atol=1e-12)
    np.testing.assert_allclose(r.gradients["x"], [-0.112, 0.636], atol=1e-12)
    assert printed.splitlines()[-1] == "[-0.112  0.636]"


def _session(namespace: dict, printed: str) -> None:
    assert len(namespace["values"]) == 100
    assert printed.splitlines()[-1] == "True"


def _asyncio(namespace: dict, printed: str) -> None:
    gradients, values = (ast.literal_eval(line) for line in printed.splitlines())
    np.testing.assert_allclose(gradients, 1 - np.tanh([0.0, 0.5, 1.0]) ** 2)
    np.testing.assert_allclose(values, np.tanh([0.0, 0.5, 1.0]))


def _error(namespace: dict, printed: str) -> None:
    first, second, third = printed.splitlines()
    assert first == "INVALID_ARGUMENT INVALID_GRAPH q"
    assert second.startswith("node 'q' (op matmul): contracted dimensions differ: [2, 2] @ [3]")
    assert ast.literal_eval(third.rsplit(" ", 1)[0]) == {"op": "matmul", "node": "q"}
    assert third.endswith(" graph.nodes")


def _backward(namespace: dict, printed: str) -> None:
    W, x = namespace["inputs"]["W"], namespace["inputs"]["x"]
    gram = W.T @ W
    np.testing.assert_allclose(
        namespace["values"][namespace["gg"].gradients["x"]], 2 * gram @ x, atol=1e-15
    )
    np.testing.assert_allclose(namespace["r"].gradients["x"], 8 * gram @ gram @ x, atol=1e-12)
    lines = printed.splitlines()
    assert lines[1] == "[-0.112  0.636]"
    assert lines[2] == "[ 0.2  -0.38]"
    assert lines[-1] == "[-0.52816  2.34928]"
    np.testing.assert_allclose(2 * gram, [[0.2, -0.38], [-0.38, 1.78]], atol=1e-12)
    assert Path("backward.dot").read_text().startswith("digraph")


def _training(namespace: dict, printed: str) -> None:
    assert printed.splitlines()[0] == "step 0  loss 0.875  accuracy 0.65"
    last = printed.splitlines()[-1].split()
    assert last[:2] == ["step", "100"]
    assert float(last[3]) < 0.05 and float(last[5]) == 1.0


def _drawing(namespace: dict, printed: str) -> None:
    assert namespace["dot_text"] == Path("lecture.dot").read_text()
    assert "-12" in namespace["dot_text"]


CHECKS = {
    'q = g.add(x, y, name="q")': _lecture,
    "r = client.gradient(g, output=f, inputs=inputs)": _vectorized,
    "gradient_future": _session,
    "asyncio.run(main())": _asyncio,
    "except GradientError as error:": _error,
    "client.gradient_graph(": _backward,
    "session.gradient(": _training,
    'g.draw("lecture.dot", r)': _drawing,
}
"""What each block must print or compute, by a string only that block holds."""


def test_blocks_are_found_and_fragments_are_few():
    assert len(RUNNABLE) >= len(CHECKS)
    fragments = [block.line for block in PYTHON if block.fragment]
    assert len(fragments) <= MAX_FRAGMENTS, f"fragments at lines {fragments}: keep them few"
    for marker in CHECKS:
        _one(marker)


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: f"line{block.line}")
def test_python_block_parses(block):
    compile(block.code, f"README.md:{block.line}", "exec")


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: f"line{block.line}")
def test_python_block_runs(block, server_address, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = block.code.replace(TARGET, server_address)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, f"README.md:{block.line}", "exec"), namespace)
    printed = capsys.readouterr().out
    for marker, check in CHECKS.items():
        if marker in block.code:
            check(namespace, printed)


def test_no_python_hides_in_text_blocks():
    """A block of code the reader would run is a python block (runnable, or a fragment)."""
    for block in _blocks():
        if block.language not in ("", "text"):
            continue
        try:
            tree = ast.parse(block.code)
        except SyntaxError:
            continue
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        assert not calls, f"README.md:{block.line} holds Python in a {block.language!r} block"


# ------------------------------------------------------------------------ the SDK reference


def _section(title: str, level: int = 2) -> str:
    """The text under a heading, up to the next heading of the same or a higher level
    (lines in code blocks are not headings)."""
    lines = README.splitlines()
    start = lines.index(f"{'#' * level} {title}")
    fenced = False
    for end in range(start + 1, len(lines)):
        if re.match(r"^\s*```", lines[end]):
            fenced = not fenced
        elif not fenced and re.match(rf"^#{{1,{level}}} ", lines[end]):
            break
    else:
        end = len(lines)
    return "\n".join(lines[start:end]) + "\n"


REFERENCE = _section("SDK reference")
NO_DEFAULT = object()
SIGNATURE = re.compile(r"^(?:await\s+)?((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*)(\(.*\))$")


def _documented_params(params: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter of a signature text such as "(x, *, name=None)"."""
    arguments = ast.parse(f"def _{params}: pass").body[0].args  # type: ignore[attr-defined]
    result: list[tuple[str, str, object]] = []
    positional = arguments.args
    defaults = [NO_DEFAULT] * (len(positional) - len(arguments.defaults)) + [
        ast.literal_eval(d) for d in arguments.defaults
    ]
    for arg, default in zip(positional, defaults, strict=True):
        result.append((arg.arg, "POSITIONAL_OR_KEYWORD", default))
    if arguments.vararg:
        result.append((arguments.vararg.arg, "VAR_POSITIONAL", NO_DEFAULT))
    for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True):
        value = NO_DEFAULT if default is None else ast.literal_eval(default)
        result.append((arg.arg, "KEYWORD_ONLY", value))
    if arguments.kwarg:
        result.append((arguments.kwarg.arg, "VAR_KEYWORD", NO_DEFAULT))
    return result


def _actual_params(function) -> list[tuple[str, str, object]]:
    parameters = list(inspect.signature(function).parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    return [
        (p.name, p.kind.name, NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
        for p in parameters
    ]


def _documented_signatures() -> dict[str, list[str]]:
    """Signature texts keyed by what they document ("client.gradient", "GradientClient",
    "g.sum", ...): the reference's code spans that read as calls with a parameter list, and
    the rows of its table of op methods."""
    found: dict[str, list[str]] = {}
    for span in re.findall(r"`([^`\n]+)`", REFERENCE):
        match = SIGNATURE.match(span.strip())
        if not match:
            continue
        receiver, name, params = match.groups()
        try:
            _documented_params(params)
        except (SyntaxError, ValueError):
            continue  # a call such as `client.gradient(...)`, not a signature
        found.setdefault(receiver + name, []).append(params)
    for methods, params in re.findall(r"^\| ((?:`\w+` ?)+) \| `(\([^`]*\))`", REFERENCE, re.M):
        for name in re.findall(r"`(\w+)`", methods):
            found.setdefault(f"g.{name}", []).append(params)
    return found


DOCUMENTED = _documented_signatures()


def _public_methods(cls: type) -> dict[str, object]:
    """The public methods the SDK defines on a class (classmethods included), by name."""
    methods = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name)
        function = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if inspect.isfunction(function) and function.__module__.startswith("gradient_client"):
            methods[name] = getattr(cls, name)
    return methods


def _assert_documented(key: str, function) -> None:
    texts = DOCUMENTED.get(key)
    assert texts, f"the README's SDK reference does not give the signature of {key}"
    actual = _actual_params(function)
    for text in texts:
        documented = _documented_params(text)
        assert documented == actual, (
            f"the README documents {key}{text}, but it is {key}{inspect.signature(function)}"
        )


RECEIVERS = {
    GradientClient: "client.",
    Session: "s.",
    StepFuture: "future.",
    TLS: "tls.",
}


@pytest.mark.parametrize("cls", [GradientClient, AsyncGradientClient, TLS, GradientError, Graph])
def test_reference_gives_each_constructor(cls):
    _assert_documented(cls.__name__, cls)


@pytest.mark.parametrize("cls", list(RECEIVERS))
def test_reference_gives_each_method(cls):
    methods = _public_methods(cls)
    assert methods
    for name, method in methods.items():
        _assert_documented(RECEIVERS[cls] + name, method)


def test_reference_gives_each_graph_method():
    for name, method in _public_methods(Graph).items():
        receiver = (
            "Graph." if isinstance(inspect.getattr_static(Graph, name), classmethod) else "g."
        )
        _assert_documented(receiver + name, method)
    assert "`Graph.from_proto(message)`" in REFERENCE
    assert "`g.nodes`" in REFERENCE  # the one property


def test_reference_gives_error_classmethods_and_functions():
    for name, method in _public_methods(GradientError).items():
        _assert_documented(f"GradientError.{name}", method)
    for name in ("to_proto", "from_proto", "to_dot", "draw"):
        _assert_documented(f"gradient_client.{name}", getattr(gradient_client, name))


@pytest.mark.parametrize(
    ("asynchronous", "blocking"), [(AsyncGradientClient, GradientClient), (AsyncSession, Session)]
)
def test_async_twins_have_the_documented_signatures(asynchronous, blocking):
    """The README says the asyncio classes take the same parameters as the blocking ones."""
    twin_methods = _public_methods(asynchronous)
    blocking_methods = _public_methods(blocking)
    if asynchronous is AsyncGradientClient:
        assert set(twin_methods) == set(blocking_methods)
        assert _actual_params(AsyncGradientClient) == _actual_params(GradientClient)
        paragraph = REFERENCE[REFERENCE.index("`AsyncGradientClient(") :]
        assert "same methods with the same parameters" in paragraph
    else:
        paragraph = REFERENCE[REFERENCE.index("An `AsyncSession`") :].split("\n\n")[0]
        for name in twin_methods:
            assert f"s.{name}(" in paragraph, f"AsyncSession.{name} is not in the README"
    for name, method in twin_methods.items():
        assert _actual_params(method) == _actual_params(blocking_methods[name]), name


def test_reference_names_every_instance_attribute(server_address):
    client = GradientClient("localhost:1")
    for name in (n for n in vars(client) if not n.startswith("_")):
        assert f"`client.{name}`" in REFERENCE, f"client.{name} is not in the README"
    client.close()
    graph = Graph()
    graph.input("x")
    with GradientClient(server_address) as live, live.session(graph) as session:
        for name in (n for n in vars(session) if not n.startswith("_")):
            assert f"`s.{name}`" in REFERENCE, f"s.{name} is not in the README"
    for name in Node.__slots__:
        assert f"`node.{name}`" in REFERENCE, f"node.{name} is not in the README"


def test_reference_names_every_error_attribute():
    text = _section("GradientError", level=3)
    error = GradientError(grpc.StatusCode.INTERNAL, "x")
    attributes = [n for n in vars(error) if not n.startswith("_")]
    attributes += [n for n, v in vars(GradientError).items() if isinstance(v, property)]
    assert {"code", "details", "reason", "node", "info", "status_details"} <= set(attributes)
    for name in attributes:
        assert f"`{name}`" in text, f"GradientError.{name} is not in the README's reference"


@pytest.mark.parametrize(
    "cls",
    [
        gradient_client.GradientResult,
        gradient_client.ForwardResult,
        gradient_client.GradientCheckReport,
        gradient_client.NodeCheck,
        gradient_client.GradientGraphResult,
        gradient_client.OpInfo,
        gradient_client.OpAttr,
    ],
)
def test_reference_names_every_result_field(cls):
    bullet = re.search(rf"^- `{cls.__name__}`:(.*?)(?=^- |\n\n)", REFERENCE, re.M | re.S)
    assert bullet, f"the README's reference has no bullet for {cls.__name__}"
    for field in dataclasses.fields(cls):
        assert f"`{field.name}`" in bullet.group(1), f"{cls.__name__}.{field.name} is missing"


def test_reference_names_everything_the_sdk_exports():
    for name in gradient_client.__all__:
        assert f"`{name}" in REFERENCE or f"gradient_client.{name}(" in REFERENCE, name


# ---------------------------------------------------------------- commands and exit codes


def _flags(parser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags.update(s for s in action.option_strings if s not in ("-h", "--help"))
        for sub in getattr(action, "choices", None) or {}:
            if hasattr(action.choices[sub], "_actions"):
                flags |= _flags(action.choices[sub])
    return flags


def test_client_flags_are_documented():
    text = _section("Command line and drawings")
    for flag in _flags(cli._parser()):
        assert f"`{flag}" in text or f"{flag} " in text, f"gradient-client {flag} is undocumented"


def test_healthcheck_is_documented():
    text = _section("gradient-healthcheck", level=3)
    for flag in _flags(healthcheck._parser()):
        assert f"`{flag}" in text, f"gradient-healthcheck {flag} is undocumented"
    for variable in (healthcheck.TARGET_ENV, healthcheck.PORT_ENV):
        assert f"${variable}" in text
    assert f"(default {healthcheck.DEFAULT_TIMEOUT:g})" in text


def _exit_table() -> dict[str, dict[int, str]]:
    """The exit codes table: command -> exit code -> what the README says it means."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in _section("Exit codes", level=3).splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    header, *body = rows
    commands = [cell.strip("`") for cell in header[1:]]
    return {
        command: {int(row[0]): row[1 + i] for row in body if row[1 + i]}
        for i, command in enumerate(commands)
    }


def _taken_port():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_exit_codes_are_documented_as_the_commands_behave(server_address, tmp_path, monkeypatch):
    table = _exit_table()
    assert set(table["gradient-client"]) == {0, 1, 2, 130}
    assert set(table["gradient-server"]) == {0, 1, 2}
    assert set(table["gradient-healthcheck"]) == {0, 1}

    # gradient-client: 0 done, 1 failed, 2 usage, 130 interrupted
    assert cli.main(["--target", server_address, "ops"]) == 0
    assert cli.main(["--target", server_address, "grad", str(tmp_path / "none.json")]) == 1
    with pytest.raises(SystemExit) as usage:
        cli.main(["--no-such-flag", "ops"])
    assert usage.value.code == 2

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_ops", interrupted)
    assert cli.main(["--target", server_address, "ops"]) == 130

    # gradient-healthcheck: 0 serving, 1 anything else (a bad flag too)
    assert healthcheck.main(["--target", server_address]) == 0
    assert healthcheck.main(["--target", server_address, "--service", "no.Such"]) == 1
    with pytest.raises(SystemExit) as usage:
        healthcheck.main(["--no-such-flag"])
    assert usage.value.code == 1

    # gradient-server: 2 usage, 1 when it cannot start (0 after a graceful stop and 1 when
    # --workers keep dying are tests/test_service.py's)
    with pytest.raises(SystemExit) as usage:
        server_main.main(["--no-such-flag"])
    assert usage.value.code == 2
    with _taken_port() as held:
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gradient_server.main", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "could not bind" in done.stderr


# ------------------------------------------------------------ op table and grpcurl example


def test_op_table_is_current():
    assert section() in README, "README's op table is stale: python -m gradient_server.opdocs"


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
