"""What a new user meets first: results looked up by the nodes they hold, no silent missing
gradient for a node they asked for, and errors that say what to fix."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gradient_client import GradientClient, GradientError, Graph
from gradient_server import main as server_main

LECTURE = {"x": -2.0, "y": 5.0, "z": -4.0}


def lecture() -> tuple[Graph, dict]:
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    q = g.add(x, y, name="q")
    f = g.mul(q, z, name="f")
    return g, {"x": x, "y": y, "z": z, "q": q, "f": f}


def test_results_are_looked_up_by_node_or_name(client):
    g, n = lecture()
    inputs = {n["x"]: -2.0, n["y"]: 5.0, n["z"]: -4.0}
    result = client.gradient(g, n["f"], inputs, fetch=[n["q"], n["f"]])
    assert float(result.values[n["f"]]) == float(result.values["f"]) == -12.0
    assert float(result.gradients[n["x"]]) == -4.0 and float(result.gradients[n["z"]]) == 3.0
    assert n["x"] in result.gradients and "x" in result.gradients
    assert float(result.gradients.get(n["q"])) == -4.0 and float(result.values.get(n["q"])) == 3.0
    assert result.values.get(Graph().input("nowhere"), "absent") == "absent"
    assert float(client.forward(g, inputs)[n["q"]]) == 3.0
    backward = client.gradient_graph(g, n["f"], inputs)
    assert backward.gradients[n["x"]] == backward.gradients["x"]
    products = client.hvp(g, n["f"], inputs, {n["x"]: 1.0, n["y"]: 0.0, n["z"]: 0.0})
    assert float(products[n["z"]]) == 1.0  # d2f/dz dx = 1
    hessian = client.hessian(g, n["f"], inputs, wrt=[n["x"], n["z"]])
    assert hessian.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # f = (x + y) z
    report = client.check_gradient(g, n["f"], inputs)
    assert report.passed and report.nodes[n["y"]].passed


def test_an_integer_input_named_in_wrt_is_an_error_that_says_how_to_fix_it(client):
    g, n = lecture()
    inputs = {"x": -2, "y": 5.0, "z": -4.0}  # -2, not -2.0
    for call in (
        lambda: client.gradient(g, "f", inputs, wrt=["x"]),
        lambda: client.gradient_graph(g, "f", inputs, wrt=[n["x"], n["y"]]),
        lambda: client.check_gradient(g, "f", inputs, wrt=["x"]),
    ):
        with pytest.raises(GradientError) as refused:
            call()
        error = refused.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'x'" in error.details and "int64" in error.details
        assert "-2.0" in error.details and "dtype='float64'" in error.details
        assert error.node == "x" and error.field_violations[0][0] == "wrt"
    # With no wrt, every node is asked for: x is reported as skipped, the others answered.
    result = client.gradient(g, "f", inputs)
    assert "x" in result.skipped and float(result.gradients["y"]) == -4.0


def test_unknown_names_get_a_did_you_mean(client):
    g, _ = lecture()
    cases = [
        (lambda: client.gradient(g, "ff", LECTURE), "did you mean 'f'?"),
        (lambda: client.gradient(g, "f", LECTURE, wrt=["qq"]), "did you mean 'q'?"),
        (lambda: client.forward(g, LECTURE, fetch=["z1"]), "did you mean 'z'?"),
        (lambda: client.forward(g, {**LECTURE, "yy": 1.0}), "did you mean 'y'?"),
    ]
    typo = Graph()
    typo.op("matmull", typo.input("a"), typo.input("b"), name="m")
    cases.append(
        (
            lambda: client.forward(typo, {"a": np.ones((1, 1)), "b": np.ones((1, 1))}),
            "did you mean 'matmul'",
        )
    )
    attr = Graph()
    attr.op("sum", attr.input("a"), name="s", axiss=0)
    cases.append((lambda: client.forward(attr, {"a": np.ones(2)}), "did you mean 'axis'?"))
    for call, hint in cases:
        with pytest.raises(GradientError) as refused:
            call()
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert hint in refused.value.details, refused.value.details


def test_no_server_at_the_target_says_so():
    with GradientClient("127.0.0.1:1", timeout=5) as nowhere:
        with pytest.raises(GradientError) as refused:
            nowhere.forward(lecture()[0], LECTURE)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no server answered at 127.0.0.1:1: is gradient-server running there" in str(
        refused.value
    )


def test_every_server_flag_shows_its_default_in_help():
    parser = server_main._parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.default in (None, False, argparse_suppress()) or not action.option_strings:
            continue
        help_text = parser._get_formatter()._get_help_string(action)
        assert "default" in help_text, action.option_strings
    assert "nodes in one request's graph (default 1000000)" in " ".join(text.split())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
