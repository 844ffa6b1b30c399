"""The gradient-client command against a live server: tables, JSON, drawings and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from gradient_client import GradientClient
from gradient_client.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCALAR = str(ROOT / "examples" / "lecture_scalar.json")
VECTORIZED = str(ROOT / "examples" / "lecture_vectorized.json")
LECTURE_INPUTS = ["--input", "x=-2", "--input", "y=5", "--input", "z=-4"]
W = [[0.1, 0.5], [-0.3, 0.8]]
X = [0.2, 0.4]
VECTORIZED_INPUTS = ["--input", "W=[[0.1,0.5],[-0.3,0.8]]", "--input", "x=[0.2,0.4]"]

requires_dot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz's `dot` program is not on PATH (apt-get install graphviz); CI installs it",
)


@pytest.fixture
def cli(server_address, capsys):
    """Run the command in-process against the session's server: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--target", server_address])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _table(text: str) -> dict[str, list[str]]:
    """The printed table as first column -> other columns (split on runs of 2+ spaces)."""
    rows = {}
    for line in text.splitlines()[1:]:
        cells = [cell for cell in line.split("  ") if cell]
        rows[cells[0].strip()] = [cell.strip() for cell in cells[1:]]
    return rows


def _write_graph(path: Path, nodes: list[dict]) -> str:
    path.write_text(json.dumps({"nodes": nodes}))
    return str(path)


def test_grad_prints_every_value_and_gradient(cli):
    code, out, err = cli("grad", SCALAR, *LECTURE_INPUTS)
    assert (code, err) == (0, "")
    assert out.splitlines()[0].split() == ["node", "op", "value", "gradient"]
    assert _table(out) == {
        "x": ["input", "-2", "-4"],
        "y": ["input", "5", "-4"],
        "z": ["input", "-4", "3"],
        "q": ["add", "3", "-4"],
        "f": ["mul", "-12", "1"],
    }


def test_readme_shows_the_real_output(cli):
    section = (ROOT / "README.md").read_text().split("<!-- cli-example -->")[1]
    command = section.split("```sh\n")[1].split("\n")[0]
    printed = section.split("```text\n")[1].split("```")[0]
    args = command.split()
    assert args[:3] == ["gradient-client", "grad", "examples/lecture_scalar.json"]
    code, out, _ = cli("grad", SCALAR, *args[3:])
    assert (code, out) == (0, printed)


@pytest.mark.parametrize("where", ["after the command", "before the command"])
def test_grad_json(cli, where):
    if where == "after the command":
        code, out, _ = cli("grad", SCALAR, *LECTURE_INPUTS, "--json")
    else:
        code, out, _ = cli("--json", "grad", SCALAR, *LECTURE_INPUTS)
    assert code == 0
    answer = json.loads(out)
    assert answer["output"] == "f"
    assert answer["values"] == {"x": -2.0, "y": 5.0, "z": -4.0, "q": 3.0, "f": -12.0}
    assert answer["gradients"] == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}
    assert answer["skipped"] == {}


def test_vectorized_lecture(cli):
    code, out, _ = cli("grad", VECTORIZED, *VECTORIZED_INPUTS)
    assert code == 0
    assert _table(out)["W"] == [
        "input",
        "[[0.1, 0.5], [-0.3, 0.8]]",
        "[[0.088, 0.176], [0.104, 0.208]]",
    ]
    assert _table(out)["f"] == ["sum", "0.116", "1"]
    code, out, _ = cli("grad", VECTORIZED, *VECTORIZED_INPUTS, "--json")
    answer = json.loads(out)
    np.testing.assert_allclose(answer["values"]["q"], [0.22, 0.26], atol=1e-12)
    np.testing.assert_allclose(answer["values"]["f"], 0.116, atol=1e-12)
    np.testing.assert_allclose(answer["gradients"]["q"], [0.44, 0.52], atol=1e-12)
    np.testing.assert_allclose(
        answer["gradients"]["W"], [[0.088, 0.176], [0.104, 0.208]], atol=1e-12
    )
    np.testing.assert_allclose(answer["gradients"]["x"], [-0.112, 0.636], atol=1e-12)


def test_npz_inputs_and_overrides(cli, tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, W=np.array(W), x=np.array(X))
    code, out, _ = cli("grad", VECTORIZED, "--inputs", str(path), "--json")
    assert code == 0
    np.testing.assert_allclose(json.loads(out)["gradients"]["W"], [[0.088, 0.176], [0.104, 0.208]])
    # --input overrides the file: x = [1, 0] gives q = W[:, 0], dF/dW = 2 q x^T.
    code, out, _ = cli("grad", VECTORIZED, "--inputs", str(path), "--input", "x=[1,0]", "--json")
    assert code == 0
    np.testing.assert_allclose(json.loads(out)["gradients"]["W"], [[0.2, 0.0], [-0.6, 0.0]])


def test_declared_dtypes_are_honoured(cli, tmp_path):
    graph = _write_graph(
        tmp_path / "f32.json",
        [
            {"name": "x", "op": "input", "attrs": {"dtype": {"s": "float32"}}},
            {"name": "y", "op": "square", "inputs": ["x"]},
        ],
    )
    # The server insists on a declared dtype, so this only runs if the CLI fed float32.
    code, out, err = cli("grad", graph, "--input", "x=[1.5,0.1]", "--seed", "[1,0.5]")
    assert (code, err) == (0, "")
    assert _table(out) == {
        "x": ["input", "[1.5, 0.1]", "[3, 0.1]"],
        "y": ["square", "[2.25, 0.01]", "[1, 0.5]"],
    }
    code, out, _ = cli("grad", graph, "--input", "x=[1.5,0.1]", "--seed", "[1,0.5]", "--json")
    assert json.loads(out)["values"]["x"] == [1.5, float(np.float32(0.1))] != [1.5, 0.1]


def test_forward(cli):
    code, out, _ = cli("forward", SCALAR, *LECTURE_INPUTS)
    assert code == 0
    assert out.splitlines()[0].split() == ["node", "op", "value"]
    assert _table(out) == {
        "x": ["input", "-2"],
        "y": ["input", "5"],
        "z": ["input", "-4"],
        "q": ["add", "3"],
        "f": ["mul", "-12"],
    }
    code, out, _ = cli("forward", SCALAR, *LECTURE_INPUTS, "--fetch", "q", "--json")
    assert json.loads(out) == {"values": {"q": 3.0}}


def test_check_passes(cli):
    code, out, _ = cli("check", VECTORIZED, *VECTORIZED_INPUTS)
    assert code == 0
    rows = _table(out)
    assert rows["W"][0] == "4" and rows["W"][-1] == "ok"
    assert rows["x"][0] == "2" and rows["x"][-1] == "ok"
    assert out.splitlines()[-1] == "passed (eps 1e-06, atol 1e-05, rtol 0.001)"
    code, out, _ = cli("check", SCALAR, *LECTURE_INPUTS, "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"] is True
    assert set(report["nodes"]) == {"x", "y", "z"}
    assert all(node["max_abs_error"] < 1e-6 for node in report["nodes"].values())


def test_ops(cli):
    code, out, _ = cli("ops")
    assert code == 0
    lines = out.splitlines()
    assert "matmul(x, y)" in lines
    assert (
        'cross_entropy(logits, labels; reduction: string = "mean", label_smoothing: float = 0.0)'
        in lines
    )
    assert "take(x, indices [no grad]; axis: int = 0)" in lines
    assert "sum(x; [axis: axes], keepdims: bool = false)" in lines
    assert (
        "    Matrix product with numpy.matmul semantics (1-D operands and broadcast batches)."
        in lines
    )
    code, out, _ = cli("ops", "matmul", "--json")
    (matmul,) = json.loads(out)
    assert matmul["name"] == "matmul"
    assert matmul["inputs"] == [
        {"name": "x", "differentiable": True},
        {"name": "y", "differentiable": True},
    ]
    code, _, err = cli("ops", "frobnicate")
    assert (code, err) == (1, "error: the server has no op frobnicate\n")


def test_draw_dot_with_values(cli, tmp_path):
    path = tmp_path / "lecture.dot"
    code, out, _ = cli("draw", SCALAR, *LECTURE_INPUTS, "-o", str(path))
    assert (code, out) == (0, f"wrote {path}\n")
    dot = path.read_text()
    assert "rankdir=LR;" in dot
    assert '<b>f</b><br/><font color="gray30" point-size="10">mul</font><br/>' in dot
    assert '<font color="darkgreen">-12</font><br/><font color="red">1</font>' in dot
    assert '<font color="darkgreen">3</font><br/><font color="red">-4</font>' in dot


def test_draw_the_backward_graph(cli):
    # f = q * z: the backward pass is grad_q = seed * z = -4 and grad_z = seed * q = 3.
    code, out, _ = cli("draw", SCALAR, *LECTURE_INPUTS, "--backward")
    assert code == 0 and out.startswith("digraph gradient {")
    for name in ("grad/seed_1", "grad/mul_2", "grad/mul_3"):
        assert f"<b>{name}</b>" in out, name
    assert '<b>grad/mul_2</b><br/><font color="gray30" point-size="10">mul</font><br/>' in out
    assert '<font color="darkgreen">-4</font>' in out and '<font color="darkgreen">3</font>' in out


def test_draw_backward_needs_inputs(cli, capsys):
    with pytest.raises(SystemExit) as exited:
        cli("draw", SCALAR, "--backward")
    assert exited.value.code == 2
    assert "--backward needs the inputs" in capsys.readouterr().err


def test_draw_bare_graph_to_stdout(cli):
    code, out, _ = cli("draw", VECTORIZED)
    assert code == 0 and out.startswith("digraph gradient {")
    assert "<b>q_squared</b>" in out and "darkgreen" not in out


@requires_dot
def test_draw_svg_with_values(cli, tmp_path):
    path = tmp_path / "lecture.svg"
    code, _, _ = cli("draw", VECTORIZED, *VECTORIZED_INPUTS, "-o", str(path))
    assert code == 0
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {element.text for element in root.iter() if element.tag.endswith("text")}
    assert {"W", "x", "q", "q_squared", "f", "matmul", "0.116"} <= texts
    assert "[[0.088, 0.176], [0.104, 0.208]]" in texts
    assert "[-0.112, 0.636]" in texts


def test_output_defaults_to_the_only_sink(cli, tmp_path):
    code, out, _ = cli("grad", SCALAR, *LECTURE_INPUTS, "--output", "q")
    assert code == 0
    assert _table(out)["x"] == ["input", "-2", "1"]
    assert _table(out)["z"] == ["input", "-4", "0"]
    graph = _write_graph(
        tmp_path / "two_sinks.json",
        [
            {"name": "x", "op": "input"},
            {"name": "double", "op": "add", "inputs": ["x", "x"]},
            {"name": "square", "op": "mul", "inputs": ["x", "x"]},
        ],
    )
    with pytest.raises(SystemExit) as exited:
        cli("grad", graph, "--input", "x=3")
    assert exited.value.code == 2
    code, out, _ = cli("grad", graph, "--input", "x=3", "--output", "square")
    assert code == 0 and _table(out)["x"] == ["input", "3", "6"]


def test_several_sinks_message(server_address, tmp_path, capsys):
    graph = _write_graph(
        tmp_path / "two_sinks.json",
        [{"name": "a", "op": "input"}, {"name": "b", "op": "input"}],
    )
    with pytest.raises(SystemExit) as exited:
        main(["grad", graph, "-i", "a=1", "-i", "b=2", "--target", server_address])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "several sink nodes (a, b); choose one with --output NAME" in err


def test_bad_input_syntax_exits_2(cli, capsys):
    for bad in ("x", "x=abc", "=3", 'x="text"'):
        with pytest.raises(SystemExit) as exited:
            cli("grad", SCALAR, "--input", bad)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "usage: gradient-client grad" in err and "argument -i/--input" in err
    with pytest.raises(SystemExit) as exited:
        cli("grad", VECTORIZED, "--input", "W=[[1,2],[3]]", "--input", "x=[1,2]")
    assert exited.value.code == 2
    assert "bad value for --input 'W'" in capsys.readouterr().err


def test_server_errors_exit_1(cli, tmp_path):
    graph = _write_graph(
        tmp_path / "unknown_op.json",
        [{"name": "x", "op": "input"}, {"name": "y", "op": "frobnicate", "inputs": ["x"]}],
    )
    code, out, err = cli("grad", graph, "--input", "x=1")
    assert (code, out) == (1, "")
    assert err.startswith("error: INVALID_ARGUMENT: ") and "frobnicate" in err
    assert err.count("\n") == 1
    code, _, err = cli("grad", SCALAR, "--input", "x=1")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: node 'y'")


def test_file_errors_exit_1(cli, tmp_path):
    code, _, err = cli("grad", str(tmp_path / "missing.json"))
    assert code == 1 and err.startswith("error: cannot read ") and "missing.json" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"nodes": [{"name": "x", "opp": "input"}]}')
    code, _, err = cli("forward", str(broken))
    assert code == 1 and "is not a gradient.v1.Graph in JSON" in err
    code, _, err = cli("grad", SCALAR, "--inputs", str(broken))
    assert code == 1 and err.startswith("error: cannot read inputs from ")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    code, _, err = cli("grad", SCALAR, "--inputs", str(tmp_path / "plain.npy"))
    assert code == 1 and "is not an .npz file" in err


def test_unreachable_server_exits_1(capsys):
    code = main(["ops", "--target", "127.0.0.1:1", "--timeout", "5"])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


@pytest.mark.skipif(
    not hasattr(GradientClient, "hvp"), reason="GradientClient.hvp has not landed yet"
)
def test_hvp(cli):
    # f = (x + y) z has Hessian [[0, 0, 1], [0, 0, 1], [1, 1, 0]] over (x, y, z).
    code, out, _ = cli("hvp", SCALAR, *LECTURE_INPUTS, "--vector", "x=1", "--vector", "z=2")
    assert code == 0
    assert _table(out) == {"x": ["1", "2"], "y": ["0", "2"], "z": ["2", "1"]}
    # ||W x||^2 has gradient 2 W^T W x in x and 2 (W x) x^T in W; differentiate both along v.
    v_w, v_x = np.array([[1.0, 0.0], [0.5, -1.0]]), np.array([0.3, -0.7])
    code, out, _ = cli(
        "hvp",
        VECTORIZED,
        *VECTORIZED_INPUTS,
        "--vector",
        f"W={json.dumps(v_w.tolist())}",
        "--vector",
        f"x={json.dumps(v_x.tolist())}",
        "--json",
    )
    assert code == 0
    products = json.loads(out)["hvp"]
    w, x = np.array(W), np.array(X)
    np.testing.assert_allclose(
        products["x"], 2 * (v_w.T @ w @ x + w.T @ v_w @ x + w.T @ w @ v_x), atol=1e-12
    )
    np.testing.assert_allclose(
        products["W"], 2 * (np.outer(v_w @ x + w @ v_x, x) + np.outer(w @ x, v_x)), atol=1e-12
    )


def test_console_command_runs_as_a_process(server_address, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "gradient_client.cli"]
    done = subprocess.run(
        [*command, "grad", SCALAR, *LECTURE_INPUTS, "--target", server_address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert _table(done.stdout)["q"] == ["add", "3", "-4"]
    graph = _write_graph(tmp_path / "unknown.json", [{"name": "x", "op": "frobnicate"}])
    done = subprocess.run(
        [*command, "forward", graph, "--target", server_address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ") and "frobnicate" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [*command, "grad", SCALAR, "--input", "x"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_draw_without_graphviz_says_how_to_install_it(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = cli("draw", SCALAR, *LECTURE_INPUTS, "-o", str(tmp_path / "lecture.svg"))
    assert (code, out) == (1, "")
    assert err.startswith("error: cannot write ") and "apt-get install graphviz" in err
    code, _, _ = cli("draw", SCALAR, *LECTURE_INPUTS, "-o", str(tmp_path / "lecture.dot"))
    assert code == 0 and (tmp_path / "lecture.dot").read_text().startswith("digraph")


def test_connection_options_go_before_or_after_the_command(server_address, capsys):
    assert main(["--target", server_address, "forward", SCALAR, *LECTURE_INPUTS]) == 0
    assert _table(capsys.readouterr().out)["f"] == ["mul", "-12"]
    # After the command wins, as the later option.
    argv = ["--target", "127.0.0.1:1", "forward", SCALAR, *LECTURE_INPUTS]
    assert main([*argv, "--target", server_address]) == 0
    assert _table(capsys.readouterr().out)["f"] == ["mul", "-12"]


def test_unsupported_dtype_in_npz_exits_1(cli, tmp_path):
    path = tmp_path / "half.npz"
    np.savez(path, x=np.float16(1), y=np.float16(2), z=np.float16(3))
    code, out, err = cli("grad", SCALAR, "--inputs", str(path))
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and "dtype float16 is not supported" in err
