"""Graphviz drawings of graphs, with each node's value and gradient as in the backprop lecture."""

from __future__ import annotations

import html
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradient.v1 import graph_pb2

from .tensors import TensorFormatError, from_proto

__all__ = ["GraphvizError", "draw", "format_tensor", "to_dot"]

VALUE_COLOR = "darkgreen"
"""Colour of values in drawings (the lecture's green numbers above the edges)."""

GRADIENT_COLOR = "red"
"""Colour of gradients in drawings (the lecture's red numbers below the edges)."""

FULL_ELEMENTS = 6
"""Tensors of at most this many elements are shown in full; larger ones are summarised."""

HIDDEN_ATTRS = frozenset({"weak"})
"""Attributes internal to the service (a constant's weak typing), left out of labels."""

GRADIENT_NAMES = 3
"""A gradient node holding more gradients than this names the first few and counts the rest."""

_TEXT_FORMATS = {".dot": "dot", ".gv": "dot"}
_INSTALL_HINT = (
    "the Graphviz `dot` program is not installed (or not on PATH); install Graphviz "
    "(`apt-get install graphviz`, `brew install graphviz`, `conda install graphviz`, "
    "or https://graphviz.org/download/), or write a .dot file instead"
)


class GraphvizError(RuntimeError):
    """Graphviz's `dot` program is missing or failed to render a drawing."""


def format_tensor(value: Any) -> str:
    """A short, one-line text for a tensor.

    Scalars print as numbers (``-12``, ``0.116``), tensors of up to six elements in full
    (``[0.22, 0.26]``), larger ones as dtype, shape and their first numbers
    (``float32[64,3] [0.12, -0.5, 0.3, ...]``).
    """
    array = np.asarray(value)
    if array.ndim == 0:
        return _scalar(array.item())
    if array.size <= FULL_ELEMENTS:
        return _nested(array.tolist())
    shape = ",".join(str(d) for d in array.shape)
    head = ", ".join(_scalar(v) for v in array.reshape(-1)[:3].tolist())
    return f"{array.dtype.name}[{shape}] [{head}, ...]"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _nested(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_nested(v) for v in value) + "]"
    return _scalar(value)


def _message(graph: Any) -> graph_pb2.Graph:
    """The gradient.v1.Graph message of a Graph builder (or the message itself)."""
    to_proto = getattr(graph, "to_proto", None)
    return to_proto() if callable(to_proto) else graph


def _result_maps(result: Any) -> tuple[Mapping, Mapping, Mapping]:
    """(values, gradients, skipped) of a GradientResult, a ForwardResult or a values dict."""
    if result is None:
        return {}, {}, {}
    if isinstance(result, Mapping):
        return result, {}, {}
    return (
        getattr(result, "values", None) or {},
        getattr(result, "gradients", None) or {},
        getattr(result, "skipped", None) or {},
    )


def _attr_text(attr: graph_pb2.AttrValue) -> str:
    kind = attr.WhichOneof("value")
    if kind == "tensor":
        try:
            return format_tensor(from_proto(attr.tensor))
        except TensorFormatError:
            return "<bad tensor>"
    if kind in ("ints", "floats"):
        return _nested(list(getattr(attr, kind).values))
    if kind == "f":
        return _scalar(attr.f)
    return str(getattr(attr, kind)) if kind else ""


def _font(text: str, color: str, size: int | None = None) -> str:
    size_attr = f' point-size="{size}"' if size else ""
    return f'<font color="{color}"{size_attr}>{html.escape(text)}</font>'


def _constant_text(attr: graph_pb2.AttrValue) -> str:
    """A constant's value: its number or (up to six) numbers, else its dtype and shape."""
    if attr.WhichOneof("value") != "tensor":
        return _attr_text(attr)
    try:
        array = from_proto(attr.tensor)
    except TensorFormatError:
        return "<bad tensor>"
    if array.size <= FULL_ELEMENTS:
        return format_tensor(array)
    return f"{array.dtype.name}[{','.join(str(d) for d in array.shape)}]"


def _op_text(node: graph_pb2.Node) -> str:
    """The op and its attributes; a constant shows its value, internal attributes are hidden."""
    parts = [node.op]
    if node.op == "constant" and "value" in node.attrs:
        parts.append(_constant_text(node.attrs["value"]))
    parts += [
        f"{key}={_attr_text(node.attrs[key])}"
        for key in sorted(node.attrs)
        if key not in HIDDEN_ATTRS and not (node.op == "constant" and key == "value")
    ]
    return " ".join(parts)


def _gradient_labels(message: graph_pb2.Graph, backward: Any, output: str | None) -> dict[str, str]:
    """Node name -> "∂f/∂x" for each node of a backward graph holding a gradient.

    `backward` is a GradientGraphResult (or anything with `gradients`, a mapping from each
    differentiated node to the node holding its gradient, and `seed`, the seed input).
    """
    if backward is None:
        return {}
    gradients: Mapping[str, str] = getattr(backward, "gradients", None) or {}
    seed: str | None = getattr(backward, "seed", None)
    if output is None:
        output = next((name for name, holder in gradients.items() if holder == seed), "f")
    order = {node.name: index for index, node in enumerate(message.nodes)}
    constants = {node.name for node in message.nodes if node.op == "constant"}
    held: dict[str, list[str]] = {}
    for name in sorted(gradients, key=lambda n: (n in constants, order.get(n, len(order)), n)):
        if gradients[name] == seed and name == output:
            continue  # the seed itself is ∂f/∂f
        held.setdefault(gradients[name], []).append(name)
    labels = {}
    for holder, names in held.items():
        shown = [f"∂{output}/∂{name}" for name in names[:GRADIENT_NAMES]]
        if len(names) > GRADIENT_NAMES:
            shown.append(f"+{len(names) - GRADIENT_NAMES} more")
        labels[holder] = ", ".join(shown)
    if seed is not None:
        seed_text = f"∂{output}/∂{output} (seed)"
        labels[seed] = f"{seed_text}, {labels[seed]}" if seed in labels else seed_text
    return labels


def _node_label(
    node: graph_pb2.Node,
    values: Mapping,
    gradients: Mapping,
    skipped: Mapping,
    holds: str | None = None,
) -> str:
    lines = [f"<b>{html.escape(node.name)}</b>", _font(_op_text(node), "gray30", 10)]
    if holds:
        lines.append(_font(holds, GRADIENT_COLOR, 10))
    if node.name in values:
        lines.append(_font(format_tensor(values[node.name]), VALUE_COLOR))
    if node.name in gradients:
        lines.append(_font(format_tensor(gradients[node.name]), GRADIENT_COLOR))
    elif node.name in skipped:
        lines.append(_font("no gradient", "gray50", 10))
    return "<" + "<br/>".join(lines) + ">"


def _edge_label(source: str, values: Mapping, gradients: Mapping) -> str | None:
    parts = []
    if source in values:
        parts.append(_font(format_tensor(values[source]), VALUE_COLOR))
    if source in gradients:
        parts.append(_font(format_tensor(gradients[source]), GRADIENT_COLOR))
    return "<" + "<br/>".join(parts) + ">" if parts else None


def to_dot(
    graph: Any, result: Any = None, *, backward: Any = None, output: str | None = None
) -> str:
    """The graph as Graphviz DOT text, laid out left to right as in the backprop lecture.

    `graph` is a Graph builder or a gradient.v1.Graph message. Each node is a box with its
    name and op (and attributes; a constant shows its value). Given a `result` (a
    GradientResult, a ForwardResult, anything with `values` / `gradients` dicts keyed by node
    name, or a dict of values), each node also shows its value in dark green and its gradient
    in red, and each edge carries its source's value above its gradient. Given `backward`, the
    GradientGraphResult whose graph is drawn, each node holding a gradient is labelled in red
    with the gradient it holds (``∂f/∂x``, f being `output`, by default the node whose
    gradient is the seed) and the seed input with ``∂f/∂f (seed)``. A legend names the
    colours actually drawn. Node names may hold any characters: they only appear, escaped, in
    HTML-like labels; the DOT identifiers are generated (n0, n1...).
    """
    message = _message(graph)
    values, gradients, skipped = _result_maps(result)
    holds = _gradient_labels(message, backward, output)
    ids: dict[str, str] = {}
    defined = {node.name for node in message.nodes}
    drawn = defined | {source for node in message.nodes for source in node.inputs}

    def node_id(name: str) -> str:
        if name not in ids:
            ids[name] = f"n{len(ids)}"
        return ids[name]

    lines = [
        "digraph gradient {",
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="Helvetica", fontsize=12];',
        '  edge [fontname="Helvetica", fontsize=11, arrowsize=0.7];',
    ]
    legend = []
    if any(name in values for name in drawn):
        legend.append(_font("value", VALUE_COLOR))
    if any(name in gradients for name in drawn) or any(name in defined for name in holds):
        legend.append(_font("gradient", GRADIENT_COLOR))
    if legend:
        legend_label = "<" + " / ".join(legend) + ">"
        lines.append(f'  labelloc=b; fontname="Helvetica"; fontsize=11; label={legend_label};')
    for node in message.nodes:
        label = _node_label(node, values, gradients, skipped, holds.get(node.name))
        lines.append(f"  {node_id(node.name)} [label={label}];")
    for node in message.nodes:
        for source in node.inputs:
            if source not in defined:
                defined.add(source)
                missing = f"<<b>{html.escape(source)}</b><br/>{_font('(missing)', 'gray50', 10)}>"
                lines.append(f"  {node_id(source)} [label={missing}, style=dashed];")
            edge_label = _edge_label(source, values, gradients)
            attrs = f" [label={edge_label}]" if edge_label else ""
            lines.append(f"  {node_id(source)} -> {node_id(node.name)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(
    graph: Any,
    path: str | Path,
    result: Any = None,
    format: str | None = None,
    *,
    backward: Any = None,
    output: str | None = None,
) -> Path:
    """Write a drawing of the graph (see to_dot) to `path`, and return the path.

    The format is `format` or the file's suffix: ``.dot`` / ``.gv`` write the DOT text
    (no Graphviz needed); any other (``.svg``, ``.png``, ``.pdf``, ...) is rendered by
    Graphviz's `dot` program, and GraphvizError says how to install it when it is missing.
    """
    path = Path(path)
    fmt = (format or _TEXT_FORMATS.get(path.suffix.lower()) or path.suffix.lstrip(".")).lower()
    if not fmt:
        raise ValueError(f"cannot tell the format of {str(path)!r}: give a suffix or format=")
    text = to_dot(graph, result, backward=backward, output=output)
    if fmt in ("dot", "gv"):
        path.write_text(text, encoding="utf-8")
        return path
    program = shutil.which("dot")
    if program is None:
        raise GraphvizError(f"cannot write {path}: {_INSTALL_HINT}")
    completed = subprocess.run(
        [program, f"-T{fmt}", "-o", str(path)],
        input=text.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        message = completed.stderr.decode("utf-8", "replace").strip()
        raise GraphvizError(f"dot -T{fmt} failed: {message}")
    return path
