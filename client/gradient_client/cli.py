"""The gradient-client command: list ops, run, check and draw graphs stored as JSON files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from gradient.v1 import graph_pb2

from . import security
from .client import GradientClient, GradientGraphResult, OpInfo
from .drawing import GraphvizError, draw, format_tensor, to_dot
from .errors import GradientError
from .tensors import DTYPE_NAMES, TensorFormatError

__all__ = ["main"]

DEFAULT_TARGET = "localhost:50051"
"""The server address used when --target is not given."""

DEFAULT_TIMEOUT = 60.0
"""Seconds each call may take when --timeout is not given."""


class _Failure(Exception):
    """Something went wrong at run time: print `error: message`, exit 1."""


class _Usage(Exception):
    """The command line does not fit the graph: print usage and the message, exit 2."""


# -- parsing values -------------------------------------------------------------------------


def _json_value(text: str) -> Any:
    """A number, a bool or a (nested) JSON list; ValueError otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{text!r} is not a number or a JSON list") from None
    if value is None or isinstance(value, (str, dict)):
        raise ValueError(f"{text!r} is not a number or a JSON list")
    return value


def _assignment(text: str) -> tuple[str, Any]:
    """Parse NAME=VALUE (VALUE a number or a JSON list) for --input and --vector."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE (e.g. x=-2 or 'W=[[1,2],[3,4]]'), got {text!r}"
        )
    try:
        return name.strip(), _json_value(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad value for {name.strip()!r}: {error}") from None


def _batch_axis(text: str) -> tuple[str, int]:
    """Parse NAME=AXIS (or NAME, axis 0) for --batch."""
    name, sep, axis = text.partition("=")
    try:
        if not name.strip():
            raise ValueError
        return name.strip(), int(axis) if sep else 0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=AXIS (e.g. X=0) or NAME, got {text!r}"
        ) from None


def _seed(text: str) -> np.ndarray:
    try:
        return np.asarray(_json_value(text), dtype="float64")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _jacobian_mode(text: str) -> str:
    if text not in ("auto", "reverse", "forward"):
        raise argparse.ArgumentTypeError(f"expected auto, reverse or forward, got {text!r}")
    return text


# -- the graph file -------------------------------------------------------------------------


@dataclass
class _GraphFile:
    """A graph read from a file, with what the file supplies besides its nodes."""

    message: graph_pb2.Graph
    defaults: dict[str, np.ndarray] = field(default_factory=dict)
    """Feeds the file supplies (an ONNX model's initializers), overridden by given ones."""
    outputs: list[str] = field(default_factory=list)
    """The outputs the file names (an ONNX model's); empty for a JSON graph."""


def _read_graph(path: str) -> _GraphFile:
    """A gradient.v1.Graph in JSON, or an ONNX model (a path ending in .onnx)."""
    if path.lower().endswith(".onnx"):
        return _read_onnx(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise _Failure(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return _GraphFile(json_format.Parse(text, graph_pb2.Graph()))
    except json_format.ParseError as error:
        raise _Failure(f"{path} is not a gradient.v1.Graph in JSON: {error}") from None


def _read_onnx(path: str) -> _GraphFile:
    """An ONNX model, imported with its initializers as inputs fed from the file (so that the
    gradients of the weights come back)."""
    from . import onnx as onnx_import  # imports the onnx package only when it runs

    try:
        imported = onnx_import.from_onnx(path)  # a path: external data files are found
    except OSError as error:
        raise _Failure(f"cannot read {path}: {error.strerror or error}") from None
    except ModuleNotFoundError as error:
        if error.name != "onnx":
            raise
        raise _Failure(str(error)) from None
    except onnx_import.OnnxImportError as error:
        raise _Failure(f"{path}: {error}") from None
    except DecodeError as error:
        raise _Failure(f"{path} is not an ONNX model: {error}") from None
    return _GraphFile(
        imported.graph.to_proto(), dict(imported.initializers), list(imported.outputs)
    )


def _declared_dtypes(graph: graph_pb2.Graph) -> dict[str, str]:
    """Input name -> the dtype its node declares (unknown names are left to the server)."""
    return {
        node.name: node.attrs["dtype"].s
        for node in graph.nodes
        if node.op == "input" and "dtype" in node.attrs and node.attrs["dtype"].s in DTYPE_NAMES
    }


def _arrays(
    graph: graph_pb2.Graph, pairs: Iterable[tuple[str, Any]], what: str
) -> dict[str, np.ndarray]:
    """numpy arrays for NAME=VALUE pairs: the input's declared dtype, float64 otherwise."""
    declared = _declared_dtypes(graph)
    arrays = {}
    for name, value in pairs:
        try:
            arrays[name] = np.asarray(value, dtype=declared.get(name, "float64"))
        except (TypeError, ValueError) as error:
            raise _Usage(f"bad value for {what} {name!r}: {error}") from None
    return arrays


def _inputs(args: argparse.Namespace, file: _GraphFile) -> dict[str, np.ndarray]:
    """The feeds: the file's own (an ONNX model's initializers), overridden by the arrays of
    the --inputs .npz file, overridden by each --input."""
    graph = file.message
    feeds: dict[str, np.ndarray] = dict(file.defaults)
    if args.inputs_file:
        declared = _declared_dtypes(graph)
        try:
            data = np.load(args.inputs_file, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise _Failure(f"cannot read inputs from {args.inputs_file}: {error}") from None
        if not hasattr(data, "files"):
            raise _Failure(f"{args.inputs_file} is not an .npz file (write one with numpy.savez)")
        with data:
            for name in data.files:
                array = data[name]
                feeds[name] = array.astype(declared[name]) if name in declared else array
    feeds.update(_arrays(graph, args.input or [], "--input"))
    return feeds


def _sinks(graph: graph_pb2.Graph) -> list[str]:
    used = {name for node in graph.nodes for name in node.inputs}
    return [node.name for node in graph.nodes if node.name not in used]


def _output(args: argparse.Namespace, file: _GraphFile) -> str:
    """--output, or the model's only output (ONNX), or the graph's only sink (the node no
    other node uses)."""
    if args.output:
        return args.output
    if len(file.outputs) == 1:
        return file.outputs[0]
    if file.outputs:
        raise _Usage(
            f"the model has several outputs ({', '.join(file.outputs)}); choose one with "
            "--output NAME"
        )
    sinks = _sinks(file.message)
    if len(sinks) == 1:
        return sinks[0]
    if not sinks:
        raise _Usage("the graph has no sink node to differentiate; choose one with --output")
    raise _Usage(
        f"the graph has several sink nodes ({', '.join(sinks)}); choose one with --output NAME"
    )


def _ordered(graph: graph_pb2.Graph, names: Iterable[str]) -> list[str]:
    """`names` in the graph file's node order (names the graph lacks come last)."""
    wanted = list(names)
    position = {node.name: i for i, node in enumerate(graph.nodes)}
    return sorted(wanted, key=lambda name: position.get(name, len(position)))


# -- printing -------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    table = [list(headers), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def _lists(arrays: dict[str, np.ndarray], order: list[str]) -> dict[str, Any]:
    return {name: np.asarray(arrays[name]).tolist() for name in order if name in arrays}


def _json_text(payload: Any, indent: str = "") -> str:
    """JSON with one dict entry per line and each tensor's nested lists on one line."""
    if isinstance(payload, dict) and payload:
        inner = indent + "  "
        entries = [f"{inner}{json.dumps(k)}: {_json_text(v, inner)}" for k, v in payload.items()]
        return "{\n" + ",\n".join(entries) + f"\n{indent}}}"
    if isinstance(payload, list) and any(isinstance(v, dict) for v in payload):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + _json_text(v, inner) for v in payload) + f"\n{indent}]"
    return json.dumps(payload)


def _print_json(payload: Any) -> None:
    print(_json_text(payload))


def _op_of(graph: graph_pb2.Graph) -> dict[str, str]:
    return {node.name: node.op for node in graph.nodes}


# -- commands -------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> GradientClient:
    return GradientClient(
        args.target,
        timeout=args.timeout,
        tls=security.tls_of(args),
        token=security.token_of(args),
    )


def _signature(op: OpInfo) -> str:
    inputs = []
    for i, (name, differentiable) in enumerate(zip(op.inputs, op.differentiable, strict=True)):
        text = f"*{name}" if op.variadic and i == len(op.inputs) - 1 else name
        inputs.append(text if differentiable else f"{text} [no grad]")
    attrs = []
    for attr in op.attrs:
        if attr.required:
            attrs.append(f"{attr.name}: {attr.type}")
        elif attr.default is None:
            attrs.append(f"[{attr.name}: {attr.type}]")
        else:
            attrs.append(f"{attr.name}: {attr.type} = {json.dumps(attr.default)}")
    params = "; ".join(part for part in (", ".join(inputs), ", ".join(attrs)) if part)
    return f"{op.name}({params})"


def _cmd_ops(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ops = client.list_ops()
    if args.names:
        known = {op.name: op for op in ops}
        unknown = [name for name in args.names if name not in known]
        if unknown:
            raise _Failure(f"the server has no op {', '.join(unknown)}")
        ops = [known[name] for name in args.names]
    if args.json:
        _print_json(
            [
                {
                    "name": op.name,
                    "doc": op.doc,
                    "inputs": [
                        {"name": name, "differentiable": differentiable}
                        for name, differentiable in zip(op.inputs, op.differentiable, strict=True)
                    ],
                    "variadic": op.variadic,
                    "batchable": op.batchable,
                    "attrs": [
                        {
                            "name": a.name,
                            "type": a.type,
                            "required": a.required,
                            "default": a.default,
                            "doc": a.doc,
                        }
                        for a in op.attrs
                    ],
                }
                for op in ops
            ]
        )
        return 0
    for op in ops:
        print(_signature(op))
        print(f"    {op.doc}")
        if args.names:
            for attr in op.attrs:
                print(f"    {attr.name}: {attr.doc}")
    if not args.names:
        print(
            f"\n{len(ops)} ops. [no grad]: an operand that gets no gradient; "
            "[name: type]: an optional attribute without a default."
        )
    return 0


def _cmd_forward(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph = file.message
    inputs = _inputs(args, file)
    with _client(args) as client:
        result = client.forward(graph, inputs, fetch=args.fetch or None)
    order = _ordered(graph, result.values)
    if args.json:
        _print_json({"values": _lists(result.values, order)})
        return 0
    ops = _op_of(graph)
    rows = [[name, ops.get(name, ""), format_tensor(result.values[name])] for name in order]
    print(_table(["node", "op", "value"], rows))
    return 0


def _cmd_grad(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph = file.message
    inputs = _inputs(args, file)
    output = _output(args, file)
    with _client(args) as client:
        result = client.gradient(
            graph,
            output,
            inputs,
            wrt=args.wrt or None,
            seed=args.seed,
            batch=dict(args.batch) if args.batch else None,
        )
    order = _ordered(graph, {**result.values, **result.gradients})
    if args.json:
        _print_json(
            {
                "output": output,
                "values": _lists(result.values, order),
                "gradients": _lists(result.gradients, order),
                "skipped": dict(result.skipped),
            }
        )
        return 0
    ops = _op_of(graph)
    rows = []
    for name in order:
        value = format_tensor(result.values[name]) if name in result.values else ""
        gradient = format_tensor(result.gradients[name]) if name in result.gradients else "-"
        rows.append([name, ops.get(name, ""), value, gradient])
    print(_table(["node", "op", "value", "gradient"], rows))
    for name, reason in result.skipped.items():
        print(f"no gradient for {name}: {reason}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph = file.message
    inputs = _inputs(args, file)
    output = _output(args, file)
    with _client(args) as client:
        report = client.check_gradient(
            graph,
            output,
            inputs,
            wrt=args.wrt or None,
            seed=args.seed,
            eps=args.eps,
            atol=args.atol,
            rtol=args.rtol,
            max_elements=args.max_elements,
            directions=args.directions,
        )
    if args.json:
        _print_json(
            {
                "passed": report.passed,
                "output": output,
                "nodes": {
                    name: {
                        "max_abs_error": check.max_abs_error,
                        "max_rel_error": check.max_rel_error,
                        "passed": check.passed,
                        "checked": check.checked,
                    }
                    for name, check in report.nodes.items()
                },
                "skipped": dict(report.skipped),
                "eps": report.eps,
                "atol": report.atol,
                "rtol": report.rtol,
            }
        )
    else:
        rows = [
            [
                name,
                str(check.checked),
                f"{check.max_abs_error:.3g}",
                f"{check.max_rel_error:.3g}",
                "ok" if check.passed else "FAILED",
            ]
            for name in _ordered(graph, report.nodes)
            for check in [report.nodes[name]]
        ]
        print(_table(["node", "checked", "max abs error", "max rel error", "result"], rows))
        for name, reason in report.skipped.items():
            print(f"not checked {name}: {reason}")
        verdict = "passed" if report.passed else "FAILED"
        print(f"{verdict} (eps {report.eps:g}, atol {report.atol:g}, rtol {report.rtol:g})")
    return 0 if report.passed else 1


def _cmd_draw(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph: Any = file.message
    result: Any = None
    backward: GradientGraphResult | None = None
    output: str | None = None
    if args.backward and not (args.input or args.inputs_file):
        raise _Usage("--backward needs the inputs: the backward graph depends on their shapes")
    if args.input or args.inputs_file:
        inputs = _inputs(args, file)
        output = _output(args, file)
        with _client(args) as client:
            if args.backward:
                backward, result = _backward(client, graph, output, inputs, args.seed)
                graph = backward.graph
            else:
                result = client.gradient(graph, output, inputs, seed=args.seed)
    # The backward graph's gradient nodes are labelled with the gradient they hold (∂f/∂x).
    if args.out is None or args.out == "-":
        sys.stdout.write(to_dot(graph, result, backward=backward, output=output))
        return 0
    try:
        path = draw(graph, args.out, result, args.format, backward=backward, output=output)
    except (OSError, ValueError) as error:
        raise _Failure(f"cannot write {args.out}: {error}") from None
    print(f"wrote {path}")
    return 0


def _backward(
    client: GradientClient, graph: Any, output: str, inputs: dict, seed: Any
) -> tuple[GradientGraphResult, Any]:
    """The forward-and-backward graph of `output`, and the values of all its nodes."""
    backward = client.gradient_graph(graph, output, inputs)
    if seed is None:
        shape = client.forward(graph, inputs, [output]).values[output].shape
        seed = np.ones(shape)
    values = client.forward(backward.graph, {**inputs, backward.seed: seed})
    return backward, values


def _cmd_hvp(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph = file.message
    inputs = _inputs(args, file)
    output = _output(args, file)
    vector = _arrays(graph, args.vector, "--vector")
    with _client(args) as client:
        products = client.hvp(graph, output, inputs, vector)
    order = _ordered(graph, products)
    if args.json:
        _print_json({"output": output, "hvp": _lists(products, order)})
        return 0
    rows = [
        [
            name,
            format_tensor(vector[name]) if name in vector else "0",
            format_tensor(products[name]),
        ]
        for name in order
    ]
    print(_table(["node", "vector", "hessian-vector product"], rows))
    return 0


def _cmd_jvp(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph = file.message
    inputs = _inputs(args, file)
    output = _output(args, file)
    tangents = _arrays(graph, args.tangent or [], "--tangent")
    with _client(args) as client:
        result = client.jvp(
            graph,
            output,
            inputs,
            tangents,
            tangents_of=args.tangent_of or None,
            all_tangents=args.all_tangents,
        )
    order = _ordered(graph, result.tangents)
    if args.json:
        _print_json(
            {
                "output": output,
                "value": np.asarray(result.values[output]).tolist(),
                "tangents": _lists(result.tangents, order),
                "skipped": dict(result.skipped),
            }
        )
        return 0
    ops = _op_of(graph)
    rows = [[name, ops.get(name, ""), format_tensor(result.tangents[name])] for name in order]
    print(_table(["node", "op", "tangent (J·v)"], rows))
    for name, reason in result.skipped.items():
        print(f"no tangent for {name}: {reason}")
    return 0


def _cmd_jacobian(args: argparse.Namespace) -> int:
    file = _read_graph(args.graph)
    graph = file.message
    inputs = _inputs(args, file)
    output = _output(args, file)
    with _client(args) as client:
        result = client.jacobian(graph, output, inputs, wrt=args.wrt or None, mode=args.mode)
    order = _ordered(graph, result.jacobians)
    if args.json:
        _print_json(
            {
                "output": output,
                "mode": result.mode,
                "products": result.products,
                "jacobians": _lists(result.jacobians, order),
            }
        )
        return 0
    rows = [
        [f"d{output}/d{name}", str(list(np.shape(result.jacobians[name]))), format_tensor(value)]
        for name in order
        for value in [result.jacobians[name]]
    ]
    print(_table(["jacobian", "shape", "value"], rows))
    print(f"{result.mode} mode, {result.products} products")
    return 0


# -- the parser -----------------------------------------------------------------------------


def _add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    # Accepted before and after the command; only the main parser sets the defaults, so a
    # command's parser does not overwrite a value given before the command.
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET if defaults else argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"server address (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT if defaults else argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT:g})",
    )
    security.add_arguments(parser, defaults=defaults)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, defaults=False)

    graph_file = argparse.ArgumentParser(add_help=False)
    graph_file.add_argument(
        "graph",
        metavar="GRAPH.json",
        help="a gradient.v1.Graph in JSON, or an ONNX model (MODEL.onnx: its initializers are "
        "fed as inputs, so their gradients come back; needs the onnx extra)",
    )

    feeds = argparse.ArgumentParser(add_help=False)
    feeds.add_argument(
        "-i",
        "--input",
        action="append",
        type=_assignment,
        metavar="NAME=VALUE",
        help="an input's value: a number or a JSON list (float64 unless the input node "
        "declares a dtype); repeat for each input",
    )
    feeds.add_argument(
        "--inputs",
        dest="inputs_file",
        metavar="FILE.npz",
        help="input values from a numpy .npz file (keyed by input name)",
    )

    differentiate = argparse.ArgumentParser(add_help=False)
    differentiate.add_argument(
        "--output",
        metavar="NAME",
        help="the node to differentiate (default: the graph's only sink node)",
    )
    differentiate.add_argument(
        "--seed",
        type=_seed,
        metavar="VALUE",
        help="upstream gradient of a non-scalar output (a JSON list of its shape)",
    )

    # --json is accepted before the command too; a command's parser sets it only when given,
    # so it does not undo one given before the command.
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON (tensors as nested lists) instead",
    )

    parser = argparse.ArgumentParser(
        prog="gradient-client",
        description="Call a gradient service: list its ops, and compute, check and draw the "
        "values and gradients of a graph stored as JSON (a gradient.v1.Graph) or of an ONNX "
        "model (.onnx).",
        epilog="example: gradient-client grad examples/lecture_scalar.json "
        "--input x=-2 --input y=5 --input z=-4",
    )
    _add_connection_options(parser, defaults=True)
    parser.add_argument(
        "--json", action="store_true", help="print JSON (for the commands that print results)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help: str, parents: list
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[*parents, common])
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    ops = command("ops", _cmd_ops, "list the server's ops", [as_json])
    ops.add_argument("names", nargs="*", metavar="OP", help="only these ops, with attribute docs")

    forward = command(
        "forward", _cmd_forward, "print every node's value", [graph_file, feeds, as_json]
    )
    forward.add_argument(
        "--fetch", action="append", metavar="NAME", help="only this node's value (repeatable)"
    )

    grad = command(
        "grad",
        _cmd_grad,
        "print every node's value and gradient",
        [graph_file, feeds, differentiate, as_json],
    )
    grad.add_argument(
        "--wrt", action="append", metavar="NAME", help="only this node's gradient (repeatable)"
    )
    grad.add_argument(
        "--batch",
        action="append",
        type=_batch_axis,
        metavar="NAME=AXIS",
        help="per-example gradients: the input holds a batch of examples along AXIS "
        "(default 0); values and gradients are stacked per example (repeatable)",
    )

    check = command(
        "check",
        _cmd_check,
        "check the gradients against finite differences (exit 1 if they disagree)",
        [graph_file, feeds, differentiate, as_json],
    )
    check.add_argument("--wrt", action="append", metavar="NAME", help="check only this node")
    check.add_argument("--eps", type=float, help="finite-difference step (default 1e-6)")
    check.add_argument("--atol", type=float, help="absolute tolerance (default 1e-5)")
    check.add_argument("--rtol", type=float, help="relative tolerance (default 1e-3)")
    check.add_argument(
        "--max-elements", type=int, default=0, metavar="N", help="sample N elements per node"
    )
    check.add_argument(
        "--directions", type=int, default=0, metavar="N", help="check N random directions"
    )

    drawing = command(
        "draw",
        _cmd_draw,
        "draw the graph (with values and gradients when inputs are given)",
        [graph_file, feeds, differentiate],
    )
    drawing.add_argument(
        "-o",
        "--out",
        metavar="FILE",
        help="FILE.svg, .png, .pdf (need Graphviz) or .dot; default: DOT text on stdout",
    )
    drawing.add_argument("--format", help="output format, overriding the file's suffix")
    drawing.add_argument(
        "--backward",
        action="store_true",
        help="draw the backward pass as a graph (forward and gradient nodes, with their values)",
    )

    hvp = command(
        "hvp",
        _cmd_hvp,
        "print the Hessian-vector product of the output at the inputs",
        [graph_file, feeds, differentiate, as_json],
    )
    hvp.add_argument(
        "--vector",
        action="append",
        type=_assignment,
        required=True,
        metavar="NAME=VALUE",
        help="the vector's part for one input (repeatable)",
    )

    jvp = command(
        "jvp",
        _cmd_jvp,
        "print the Jacobian-vector product (forward mode): the output's tangent along --tangent",
        [graph_file, feeds, as_json],
    )
    jvp.add_argument(
        "--output", metavar="NAME", help="the node whose tangent to print (default: the sink)"
    )
    jvp.add_argument(
        "--tangent",
        action="append",
        type=_assignment,
        metavar="NAME=VALUE",
        help="an input's tangent (repeatable; inputs not given move by zero)",
    )
    jvp.add_argument(
        "--tangent-of", action="append", metavar="NAME", help="also this node's tangent"
    )
    jvp.add_argument("--all-tangents", action="store_true", help="every node's tangent")

    jacobian = command(
        "jacobian",
        _cmd_jacobian,
        "print the Jacobian of the output with respect to float inputs",
        [graph_file, feeds, as_json],
    )
    jacobian.add_argument(
        "--output", metavar="NAME", help="the node to differentiate (default: the sink)"
    )
    jacobian.add_argument(
        "--wrt", action="append", metavar="NAME", help="only this input (repeatable)"
    )
    jacobian.add_argument(
        "--mode",
        type=_jacobian_mode,
        default="auto",
        metavar="MODE",
        help="reverse (a VJP per output element), forward (a JVP per input element), or auto "
        "(the fewer; the default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gradient-client command with `argv` (default sys.argv[1:]); return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _Usage as error:
        args.parser.error(str(error))  # exits 2
    except GradientError as error:
        print(f"error: {error.code.name}: {error.details}", file=sys.stderr)
    except (_Failure, GraphvizError, TensorFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # a command line prints one line, never a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
