"""Drawings: DOT text with values and gradients as in the lecture, summaries, escaping, SVG."""

from __future__ import annotations

import html
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from gradient_client import Graph, GraphvizError, draw, to_dot
from gradient_client.drawing import GRADIENT_COLOR, VALUE_COLOR, format_tensor

requires_dot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz's `dot` program is not on PATH (apt-get install graphviz); CI installs it",
)

# The lecture's f = (x + y) * z at x = -2, y = 5, z = -4: node -> (op, value, gradient).
LECTURE = {
    "x": ("input", "-2", "-4"),
    "y": ("input", "5", "-4"),
    "z": ("input", "-4", "3"),
    "q": ("add", "3", "-4"),
    "f": ("mul", "-12", "1"),
}
ODD_NAMES = ['a/b "c" <d> & e\\', "x]; y -> z {", "grad/dense_1:0 'w'"]


def _lecture(client):
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    q = g.add(x, y, name="q")
    f = g.mul(q, z, name="f")
    return g, client.gradient(g, output=f, inputs={"x": -2.0, "y": 5.0, "z": -4.0})


def _nodes(dot: str) -> dict[str, tuple[str, str]]:
    """Node name -> (DOT id, label line) of every node statement."""
    nodes = {}
    for line in dot.splitlines():
        match = re.fullmatch(r"  (n\d+) \[label=<<b>(.*?)</b>.*>(, style=dashed)?\];", line)
        if match:
            nodes[html.unescape(match.group(2))] = (match.group(1), line)
    return nodes


def _value(text: str) -> str:
    return f'<font color="{VALUE_COLOR}">{html.escape(text)}</font>'


def _gradient(text: str) -> str:
    return f'<font color="{GRADIENT_COLOR}">{html.escape(text)}</font>'


def test_lecture_nodes_show_name_op_value_and_gradient(client):
    g, result = _lecture(client)
    dot = g.to_dot(result)
    assert dot.startswith("digraph gradient {") and "rankdir=LR;" in dot
    nodes = _nodes(dot)
    assert set(nodes) == set(LECTURE)
    for name, (op, value, gradient) in LECTURE.items():
        line = nodes[name][1]
        assert f'<font color="gray30" point-size="10">{op}</font>' in line
        assert _value(value) + "<br/>" + _gradient(gradient) in line, line


def test_lecture_edges_carry_the_source_value_above_its_gradient(client):
    g, result = _lecture(client)
    dot = to_dot(g, result)
    ids = {name: node_id for name, (node_id, _) in _nodes(dot).items()}
    edges = {
        (match.group(1), match.group(2)): match.group(3)
        for match in re.finditer(r"^  (n\d+) -> (n\d+) \[label=<(.*)>\];$", dot, flags=re.M)
    }
    expected = {("x", "q"), ("y", "q"), ("q", "f"), ("z", "f")}
    assert set(edges) == {(ids[a], ids[b]) for a, b in expected}
    for source, target in expected:
        _, value, gradient = LECTURE[source]
        label = edges[ids[source], ids[target]]
        assert label == _value(value) + "<br/>" + _gradient(gradient)


def test_message_and_builder_draw_the_same(client):
    g, result = _lecture(client)
    assert to_dot(g.to_proto(), result) == g.to_dot(result)
    # Anything with `values` and `gradients` dicts will do.
    plain = type("Plain", (), {"values": result.values, "gradients": result.gradients})()
    assert to_dot(g, plain) == g.to_dot(result)


def test_forward_result_shows_values_only(client):
    g, _ = _lecture(client)
    result = client.forward(g, {"x": -2.0, "y": 5.0, "z": -4.0})
    nodes = _nodes(g.to_dot(result))
    assert _value("-12") in nodes["f"][1] and GRADIENT_COLOR not in nodes["f"][1]


def test_bare_graph_has_names_ops_and_constants_only():
    g = Graph()
    x = g.input("x", dtype="float32")
    g.sum(g.mul(x, g.constant(np.array([2.0, 3.0]), name="c"), name="m"), axis=0, name="s")
    dot = g.to_dot()
    assert VALUE_COLOR not in dot and GRADIENT_COLOR not in dot and "label=<<font" not in dot
    nodes = _nodes(dot)
    assert set(nodes) == {"x", "c", "m", "s"}
    assert "input dtype=float32" in nodes["x"][1]
    assert "sum axis=[0]" in nodes["s"][1]
    assert "[2, 3]" in nodes["c"][1]  # a constant shows its tensor


def test_tensor_summaries():
    assert format_tensor(np.float64(-12.0)) == "-12"
    assert format_tensor(0.11600000000000003) == "0.116"
    assert format_tensor(np.int64(3)) == "3"
    assert format_tensor(np.bool_(True)) == "True"
    assert format_tensor([0.22, 0.26000000000000006]) == "[0.22, 0.26]"
    assert format_tensor(np.arange(6.0).reshape(2, 3)) == "[[0, 1, 2], [3, 4, 5]]"
    large = np.arange(192, dtype=np.float32).reshape(64, 3) / 8
    assert format_tensor(large) == "float32[64,3] [0, 0.125, 0.25, ...]"
    assert format_tensor(np.zeros((0, 3))) == "[]"


def test_large_tensors_are_summarised_in_the_drawing(client):
    g = Graph()
    W, x = g.input("W"), g.input("x")
    g.sum(g.square(g.matmul(W, x, name="q")), name="f")
    W_value = np.linspace(-1, 1, 192).reshape(64, 3)
    result = client.gradient(g, "f", {"W": W_value, "x": [1.0, 2.0, 3.0]})
    nodes = _nodes(g.to_dot(result))
    assert _value(format_tensor(W_value)) in nodes["W"][1]
    assert _value("float64[64,3] [-1, -0.9895, -0.9791, ...]") in nodes["W"][1]
    q = W_value @ [1.0, 2.0, 3.0]
    assert _value(format_tensor(q)) + "<br/>" + _gradient(format_tensor(2 * q)) in nodes["q"][1]
    assert format_tensor(2 * q) == "float64[64] [-11.83, -11.46, -11.08, ...]"
    assert _value("[1, 2, 3]") in nodes["x"][1]
    assert max(len(line) for line in g.to_dot(result).splitlines()) < 400


def test_odd_names_are_escaped():
    g = Graph()
    a, b = (g.input(name) for name in ODD_NAMES[:2])
    g.add(a, b, name=ODD_NAMES[2])
    message = g.to_proto()
    message.nodes[2].inputs.append("not & here")  # an input the graph lacks: drawn dashed
    dot = to_dot(message)
    nodes = _nodes(dot)
    assert set(nodes) == {*ODD_NAMES, "not & here"}
    assert nodes["not & here"][1].endswith(", style=dashed];")
    assert "&lt;d&gt; &amp; e\\" in dot
    for name in ODD_NAMES:
        assert name not in dot  # each holds a character that must be escaped
    assert len(re.findall(r" -> ", dot)) == 3


def test_dot_suffix_needs_no_graphviz(client, tmp_path, monkeypatch):
    g, result = _lecture(client)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    written = g.draw(tmp_path / "lecture.dot", result)
    assert written.read_text() == g.to_dot(result)
    assert draw(g, tmp_path / "lecture.gv").read_text() == g.to_dot()


def test_missing_graphviz_says_how_to_install_it(client, tmp_path, monkeypatch):
    g, result = _lecture(client)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GraphvizError, match="install Graphviz") as caught:
        g.draw(tmp_path / "lecture.svg", result)
    assert "apt-get install graphviz" in str(caught.value)
    assert "brew install graphviz" in str(caught.value)
    assert not (tmp_path / "lecture.svg").exists()


def test_a_path_without_suffix_needs_a_format(tmp_path):
    g = Graph()
    g.input("x")
    with pytest.raises(ValueError, match="format"):
        draw(g, tmp_path / "drawing")
    assert draw(g, tmp_path / "drawing", format="dot").read_text() == g.to_dot()


def _svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return [element.text for element in root.iter() if element.tag.endswith("text")]


@requires_dot
def test_lecture_svg(client, tmp_path):
    g, result = _lecture(client)
    path = g.draw(tmp_path / "lecture.svg", result)
    # Each node shows name, op, value and gradient; each edge its source's value and gradient.
    expected = Counter(["value", " / ", "gradient"])
    for name, (op, value, gradient) in LECTURE.items():
        expected.update([name, op, value, gradient])
    for source in ("x", "y", "q", "z"):
        expected.update(LECTURE[source][1:])
    assert Counter(_svg_texts(path)) == expected


@requires_dot
def test_png_and_odd_names_render(tmp_path):
    g = Graph()
    a, b = (g.input(name) for name in ODD_NAMES[:2])
    g.add(a, b, name=ODD_NAMES[2])
    texts = _svg_texts(draw(g, tmp_path / "odd.svg"))
    assert set(ODD_NAMES) <= set(texts)
    assert draw(g, tmp_path / "odd.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@requires_dot
def test_graphviz_failure_is_reported(tmp_path):
    g = Graph()
    g.input("x")
    with pytest.raises(GraphvizError, match="dot -Tnot-a-format failed"):
        draw(g, tmp_path / "x.svg", format="not-a-format")


def _legend(dot: str) -> str | None:
    """The legend's label (the graph's own `label=`), or None when there is no legend."""
    match = re.search(r"^  labelloc=b; .* label=<(.*)>;$", dot, flags=re.M)
    return match.group(1) if match else None


def test_the_legend_names_only_what_is_drawn(client):
    g, result = _lecture(client)
    both = _value("value") + " / " + _gradient("gradient")
    assert _legend(g.to_dot(result)) == both
    forward = client.forward(g, {"x": -2.0, "y": 5.0, "z": -4.0})
    assert _legend(g.to_dot(forward)) == _value("value")  # no red is drawn: no "gradient"
    assert GRADIENT_COLOR not in g.to_dot(forward)
    gradients_only = type("Plain", (), {"gradients": result.gradients})()
    assert _legend(g.to_dot(gradients_only)) == _gradient("gradient")
    assert _legend(g.to_dot()) is None and "label=<<font" not in g.to_dot()
    # Values of nodes the graph lacks are not drawn, so they bring no legend either.
    assert _legend(g.to_dot({"elsewhere": 1.0})) is None


def _lecture_backward(client):
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = g.mul(g.add(x, y, name="q"), z, name="f")
    inputs = {"x": -2.0, "y": 5.0, "z": -4.0}
    backward = client.gradient_graph(g, f, inputs)
    values = client.forward(backward.graph, {**inputs, backward.seed: 1.0})
    return backward, values


def test_backward_gradient_nodes_say_which_gradient_they_hold(client):
    backward, values = _lecture_backward(client)
    dot = to_dot(backward.graph, values, backward=backward)
    nodes = _nodes(dot)
    holds = f'<font color="{GRADIENT_COLOR}" point-size="10">'
    seed = nodes[backward.seed][1]
    assert holds + "∂f/∂f (seed)</font>" in seed and _value("1") in seed
    z_holder = nodes[backward.gradients["z"]][1]
    assert holds + "∂f/∂z</font>" in z_holder and _value("3") in z_holder
    # x, y and q share one gradient node (an add passes its gradient on): it names all three.
    assert backward.gradients["x"] == backward.gradients["y"] == backward.gradients["q"]
    shared = nodes[backward.gradients["x"]][1]
    assert holds + "∂f/∂x, ∂f/∂y, ∂f/∂q</font>" in shared and _value("-4") in shared
    # The op stays, the gradient it holds comes next, then its value.
    assert '<font color="gray30" point-size="10">mul</font><br/>' + holds + "∂f/∂z" in z_holder
    for name in ("x", "y", "z", "q", "f"):
        assert "∂" not in nodes[name][1]  # forward nodes hold no gradient
    assert _legend(dot) == _value("value") + " / " + _gradient("gradient")
    # The output's name is given or taken from the node whose gradient is the seed.
    named = to_dot(backward.graph, values, backward=backward, output="L")
    assert "∂L/∂z" in named and "∂L/∂L (seed)" in named and "∂f/" not in named
    # Without `backward` the same graph has no gradient labels (and no red at all).
    assert "∂" not in to_dot(backward.graph, values)
    assert _legend(to_dot(backward.graph, values)) == _value("value")


def test_backward_labels_without_values_bring_the_gradient_legend(client, tmp_path):
    backward, _ = _lecture_backward(client)
    dot = to_dot(backward.graph, backward=backward)
    assert _legend(dot) == _gradient("gradient") and VALUE_COLOR not in dot
    written = draw(backward.graph, tmp_path / "backward.dot", backward=backward)
    assert written.read_text() == dot


def test_many_gradients_held_by_one_node_are_counted():
    g = Graph()
    xs = [g.input(f"x{i}") for i in range(5)]
    total = xs[0]
    for x in xs[1:]:
        total = g.add(total, x)
    seed = g.input("seed")
    backward = SimpleNamespace(gradients={f"x{i}": "seed" for i in range(5)}, seed=seed.name)
    nodes = _nodes(to_dot(g, backward=backward, output="f"))
    assert "∂f/∂f (seed), ∂f/∂x0, ∂f/∂x1, ∂f/∂x2, +2 more</font>" in nodes["seed"][1]


def test_constants_show_their_value_not_internal_attributes(client):
    g = Graph()
    x = g.input("x")
    doubled = g.mul(x, 2.5, name="d")  # a Python number: a weak scalar constant
    small = g.constant(np.array([1.0, 2.0, 3.0]), name="small")
    large = g.constant(np.arange(12, dtype=np.float32).reshape(3, 4), name="large")
    g.sum(g.add(g.add(doubled, small), g.sum(large)), name="f")
    weak = next(
        node for node in g.to_proto().nodes if node.op == "constant" and node.attrs["weak"].b
    )
    for dot in (g.to_dot(), g.to_dot(client.gradient(g, "f", {"x": [1.0, 2.0, 3.0]}))):
        assert "weak" not in dot
        nodes = _nodes(dot)
        op = '<font color="gray30" point-size="10">'
        assert op + "constant 2.5</font>" in nodes[weak.name][1]
        assert op + "constant [1, 2, 3]</font>" in nodes["small"][1]
        assert op + "constant float32[3,4]</font>" in nodes["large"][1]
        assert "11" not in nodes["large"][1]  # a large constant's numbers are not listed
