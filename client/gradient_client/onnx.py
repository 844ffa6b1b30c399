"""Import ONNX models as graphs of the gradient service (the optional ``onnx`` extra).

``from_onnx(model)`` turns an ONNX model into a ``Graph`` of the service's ops, so that its
values and gradients are computed by the service:

>>> from gradient_client.onnx import from_onnx
>>> imported = from_onnx("model.onnx")  # doctest: +SKIP
>>> r = client.gradient(imported.graph, imported.output, imported.feeds({"x": x}))  # doctest: +SKIP

Initializers become inputs of the graph by default (``initializers="inputs"``), fed from
``imported.initializers`` by ``imported.feeds(...)``, so that the gradients of the weights
come back; ``initializers="constants"`` makes them constants instead. Each ONNX tensor keeps
its name: the node computing it is named after it, and the nodes an ONNX op is composed of
are named ``<tensor>/<step>``.

It needs the ``onnx`` package (``pip install "gradient-service-client[onnx]"``), imported
only when ``from_onnx`` runs: ``import gradient_client`` never imports it. It supports the
default ONNX domain at opsets 11 to 25 (``SUPPORTED_OPSETS``) and the ops of
``SUPPORTED_OPS``; any other op, opset, attribute value or data type is an
``OnnxImportError`` naming the ONNX node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .graph import Graph, Node

__all__ = [
    "SUPPORTED_OPS",
    "SUPPORTED_OPSETS",
    "OnnxGraph",
    "OnnxImportError",
    "from_onnx",
]

SUPPORTED_OPSETS = range(11, 26)
"""The versions of the default ONNX domain (``ai.onnx``) a model may import: 11 to 25."""

INSTALL_HINT = 'pip install "gradient-service-client[onnx]"'
"""How to install the onnx extra."""

# ONNX TensorProto data types the service has, and their numpy names.
_DTYPES = {1: "float32", 11: "float64", 6: "int32", 7: "int64", 9: "bool"}
_ONNX_TYPE_NAMES = {
    0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32",
    7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32",
    13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16",
}  # fmt: skip
_FLOATS = ("float32", "float64")

# Ops that must never be evaluated at import time, even when their inputs are constant.
_NOT_FOLDED = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
     "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceConstruct"}
)  # fmt: skip


class OnnxImportError(ValueError):
    """An ONNX model the importer cannot translate: an unsupported op, opset, attribute value
    or data type. ``node`` names the ONNX node (its name, or ``#index`` when it has none) and
    ``op_type`` its op; both are None for a model-wide problem (the opset)."""

    def __init__(self, message: str, *, node: str | None = None, op_type: str | None = None):
        super().__init__(message)
        self.node = node
        self.op_type = op_type


@dataclass(frozen=True)
class OnnxGraph:
    """An ONNX model imported by ``from_onnx``: the graph and what is needed to run it."""

    graph: Graph
    """The service graph. Its nodes are named after the ONNX tensors they compute."""
    inputs: tuple[str, ...]
    """The names of the model's own inputs (its graph inputs that are not initializers), to
    feed on every call."""
    outputs: tuple[str, ...]
    """The names of the nodes holding the model's outputs (the ONNX output names)."""
    initializers: dict[str, np.ndarray] = field(repr=False)
    """The initializers that became inputs of the graph (float ones, with
    ``initializers="inputs"``; empty with ``"constants"``), by name: feed them on every call
    (``feeds`` does), and their gradients come back. The arrays are writable copies, for a
    training loop to update."""
    opset: int
    """The model's version of the default ONNX domain."""

    @property
    def output(self) -> str:
        """The name of the model's only output; ValueError if it has several."""
        if len(self.outputs) != 1:
            raise ValueError(
                f"the model has {len(self.outputs)} outputs ({', '.join(self.outputs)}): "
                "choose one of `outputs`"
            )
        return self.outputs[0]

    def feeds(self, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The initializers with `inputs` (the model's inputs, by name) added: what a call on
        `graph` takes. A name in `inputs` overrides the initializer of that name."""
        return {**self.initializers, **(inputs or {})}


def from_onnx(
    model: Any,
    *,
    initializers: str = "inputs",
) -> OnnxGraph:
    """Import an ONNX model as a ``Graph`` of the service's ops.

    `model` is an ``onnx.ModelProto``, a path to an ``.onnx`` file, or the file's bytes.
    `initializers` is ``"inputs"`` (each float initializer becomes an input of the graph,
    fed from ``OnnxGraph.initializers``, so that its gradient comes back: what training
    needs) or ``"constants"`` (they become constants). Integer and bool initializers, and
    those read as static values (a Reshape's shape, Slice's starts...), are constants
    either way.

    Raises ``OnnxImportError`` (a ValueError) naming the ONNX node for an unsupported op,
    opset, attribute value or data type, and ModuleNotFoundError when the ``onnx`` package
    is not installed.
    """
    if initializers not in ("inputs", "constants"):
        raise ValueError(f'initializers must be "inputs" or "constants", got {initializers!r}')
    onnx = _import_onnx()
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = onnx.load_from_string(bytes(model))
    elif isinstance(model, (str, os.PathLike)):
        proto = onnx.load(os.fspath(model))
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        raise TypeError(
            f"model must be an onnx.ModelProto, a path or bytes, not {type(model).__name__}"
        )
    return _Importer(onnx, proto, initializers == "inputs").run()


def _import_onnx() -> Any:
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
        import onnx.shape_inference
    except ImportError:
        raise ModuleNotFoundError(
            f"importing ONNX models needs the onnx package: {INSTALL_HINT}", name="onnx"
        ) from None
    return onnx


# ---------------------------------------------------------------------------------------------
# The importer


@dataclass
class _TensorInfo:
    """What ONNX shape inference knows of a tensor: its element type and dimensions."""

    elem_type: int = 0
    dims: tuple[int | None, ...] | None = None  # None: rank unknown; None entries: symbolic
    symbols: tuple[str | None, ...] = ()  # each dimension's dim_param, where it has one


@dataclass(frozen=True)
class _Dim:
    """A dimension whose size is not known when the model is imported, named by its ONNX
    dim_param ("N"): what Shape gives for it, so that a Reshape can recognize its input's own
    dimension and keep it."""

    symbol: str


class _Context:
    """One ONNX node being translated: its attributes, operands and error messages."""

    def __init__(self, importer: _Importer, proto: Any, index: int):
        self.importer = importer
        self.proto = proto
        self.index = index
        self.op_type: str = proto.op_type
        self.label = proto.name or f"#{index}"
        helper = importer.onnx.helper
        self.attrs: dict[str, Any] = {
            a.name: helper.get_attribute_value(a) for a in proto.attribute
        }

    # -- errors -----------------------------------------------------------------------------

    def where(self) -> str:
        if self.proto.name:
            return f"ONNX node {self.proto.name!r} ({self.op_type})"
        return f"ONNX node #{self.index} ({self.op_type}, unnamed)"

    def error(self, message: str) -> OnnxImportError:
        return OnnxImportError(f"{self.where()}: {message}", node=self.label, op_type=self.op_type)

    # -- attributes -------------------------------------------------------------------------

    def check_attrs(self, allowed: Sequence[str]) -> None:
        unknown = sorted(set(self.attrs) - set(allowed))
        if unknown:
            raise self.error(f"attribute {unknown[0]!r} is not supported")

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        value = self.attrs.get(name)
        if value is None:
            return None if default is None else list(default)
        return [int(v) for v in value]

    # -- operands ---------------------------------------------------------------------------

    def has_input(self, i: int) -> bool:
        return i < len(self.proto.input) and self.proto.input[i] != ""

    def input_name(self, i: int) -> str:
        return str(self.proto.input[i])

    def input(self, i: int) -> Node:
        """Operand i as a node of the graph (an initializer or constant becomes one)."""
        if not self.has_input(i):
            raise self.error(f"input {i} is missing")
        return self.importer.node(self.input_name(i), self)

    def static(self, i: int, what: str) -> np.ndarray | None:
        """Operand i's value, known at import time (None when the optional operand is
        absent); an error when it is computed by the graph."""
        if not self.has_input(i):
            return None
        name = self.input_name(i)
        value = self.importer.static_value(name)
        if value is None:
            raise self.error(
                f"{what} (input {i}, {name!r}) must be a constant: an initializer, a Constant "
                "node, or computed from those"
            )
        return value

    def static_ints(self, i: int, what: str) -> list[int] | None:
        value = self.static(i, what)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def dtype(self, i: int) -> str | None:
        return self.importer.dtype_of(self.input_name(i))

    def dims(self, i: int) -> tuple[int | None, ...] | None:
        return self.importer.dims_of(self.input_name(i))

    def rank(self, i: int) -> int:
        dims = self.dims(i)
        if dims is None:
            raise self.error(f"the rank of input {i} ({self.input_name(i)!r}) is not known")
        return len(dims)

    def spatial(self, i: int, why: str) -> tuple[int, int]:
        """The static height and width of NCHW operand i."""
        dims = self.dims(i)
        if dims is None or len(dims) != 4 or dims[2] is None or dims[3] is None:
            raise self.error(f"{why} needs the input's height and width to be static")
        return dims[2], dims[3]

    # -- results ----------------------------------------------------------------------------

    def output(self, i: int = 0) -> str:
        return str(self.proto.output[i])

    def name(self, step: str) -> str:
        """A fresh name for a node computing part of output 0: ``<output>/<step>``."""
        return self.importer.fresh(f"{self.output()}/{step}")

    def only_first_output(self, what: str = "") -> None:
        extra = [name for name in list(self.proto.output)[1:] if name]
        if extra:
            raise self.error(f"output {extra[0]!r} is not supported{what}")


Handler = Callable[["_Importer", _Context], Node | None]
"""Translates one ONNX node: returns the node named after its first output, or None when
the output is known at import time (it is then in the importer's constants)."""


class _Importer:
    def __init__(self, onnx: Any, model: Any, initializers_as_inputs: bool):
        self.onnx = onnx
        self.model = model
        self.as_inputs = initializers_as_inputs
        self.graph = Graph()
        self.opset = self._opset()
        graph = model.graph
        self.inits: dict[str, np.ndarray] = {
            t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer
        }
        self.init_types = {t.name: t.data_type for t in graph.initializer}
        self.consts: dict[str, np.ndarray] = {}  # known at import time, never trainable
        # Shape arithmetic on dimensions of unknown size (object arrays of ints and _Dims),
        # with the node whose Shape they come from.
        self.symbolic: dict[str, np.ndarray] = {}
        self.origin: dict[str, str] = {}
        self.nodes: dict[str, Node] = {}  # ONNX tensor name -> the node computing it
        self.fed: dict[str, np.ndarray] = {}  # initializers that became inputs
        self.info = self._infer_types()
        self.reserved = {i.name for i in graph.input} | set(self.inits)
        for node in graph.node:
            self.reserved.update(n for n in node.output if n)
        for name, value in self.inits.items():
            if not (self.as_inputs and _dtype_name(value.dtype) in _FLOATS):
                self.consts[name] = value

    # -- model-wide -------------------------------------------------------------------------

    def _opset(self) -> int:
        versions = [o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        if not versions:
            raise OnnxImportError("the model does not import the default ONNX domain (ai.onnx)")
        version = int(versions[0])
        if version not in SUPPORTED_OPSETS:
            raise OnnxImportError(
                f"ONNX opset {version} is not supported: the importer supports opsets "
                f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1} (convert the model "
                "with onnx.version_converter.convert_version)"
            )
        return version

    def _infer_types(self) -> dict[str, _TensorInfo]:
        try:
            inferred = self.onnx.shape_inference.infer_shapes(self.model, data_prop=True)
        except Exception:  # inference is a help, never a requirement
            inferred = self.model
        info: dict[str, _TensorInfo] = {}
        graph = inferred.graph
        for value in [*graph.value_info, *graph.input, *graph.output]:
            tensor = value.type.tensor_type
            dims: tuple[int | None, ...] | None = None
            symbols: tuple[str | None, ...] = ()
            if tensor.HasField("shape"):
                dims = tuple(
                    int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim
                )
                symbols = tuple(d.dim_param or None for d in tensor.shape.dim)
            info[value.name] = _TensorInfo(tensor.elem_type, dims, symbols)
        for name, array in self.inits.items():
            info[name] = _TensorInfo(self.init_types[name], tuple(array.shape))
        return info

    def dtype_of(self, name: str) -> str | None:
        value = self.consts.get(name)
        if value is not None:
            return _dtype_name(value.dtype)
        info = self.info.get(name)
        return None if info is None else _DTYPES.get(info.elem_type)

    def dims_of(self, name: str) -> tuple[int | None, ...] | None:
        value = self.consts.get(name, self.inits.get(name))
        if value is not None:
            return tuple(value.shape)
        info = self.info.get(name)
        return None if info is None else info.dims

    def symbols_of(self, name: str) -> tuple[str | None, ...]:
        info = self.info.get(name)
        return () if info is None else info.symbols

    def fresh(self, stem: str) -> str:
        name, count = stem, 1
        while name in self.reserved or name in self.graph:
            count += 1
            name = f"{stem}_{count}"
        self.reserved.add(name)
        return name

    # -- tensors ----------------------------------------------------------------------------

    def static_value(self, name: str) -> np.ndarray | None:
        value = self.consts.get(name)
        return self.inits.get(name) if value is None else value

    def node(self, name: str, context: _Context | None = None) -> Node:
        """The node computing tensor `name`, made on first use for initializers and
        constants."""
        existing = self.nodes.get(name)
        if existing is not None:
            return existing
        if name in self.symbolic:
            message = (
                f"tensor {name!r} holds dimensions whose size is not known when the model is "
                f"imported (from {self.origin[name]}): only a Reshape's shape may use them"
            )
            raise OnnxImportError(message) if context is None else context.error(message)
        if name in self.consts:
            value = self.consts[name]
            self._check_dtype(value.dtype, name, context)
            made = self.graph.constant(value, name=name)
        elif name in self.inits:  # a float initializer fed as an input
            value = self.inits[name]
            made = self.graph.input(name, _dtype_name(value.dtype), value.shape)
            self.fed[name] = np.array(value)  # the caller's to update (a view of the model's
            # bytes otherwise, read-only)
        else:
            message = f"tensor {name!r} is used before any node computes it"
            if context is None:
                raise OnnxImportError(message)
            raise context.error(message)
        self.nodes[name] = made
        return made

    def _check_dtype(self, dtype: np.dtype, name: str, context: _Context | None) -> None:
        if _dtype_name(dtype) not in _DTYPES.values():
            message = (
                f"tensor {name!r} has dtype {dtype}, which the service does not have (it has "
                "float32, float64, int32, int64 and bool)"
            )
            raise OnnxImportError(message) if context is None else context.error(message)

    # -- the translation --------------------------------------------------------------------

    def run(self) -> OnnxGraph:
        graph = self.model.graph
        inputs = []
        for value in graph.input:
            if value.name in self.inits:
                continue  # an initializer listed as an input too (IR version < 4)
            inputs.append(value.name)
            self.nodes[value.name] = self._input(value)
        for index, proto in enumerate(graph.node):
            self._translate(_Context(self, proto, index))
        outputs = []
        for value in graph.output:
            self.node(value.name)
            outputs.append(value.name)
        return OnnxGraph(self.graph, tuple(inputs), tuple(outputs), dict(self.fed), self.opset)

    def _input(self, value: Any) -> Node:
        tensor = value.type.tensor_type
        dtype = _DTYPES.get(tensor.elem_type)
        if dtype is None:
            type_name = _ONNX_TYPE_NAMES.get(tensor.elem_type, str(tensor.elem_type))
            raise OnnxImportError(
                f"model input {value.name!r} has ONNX type {type_name}, which the service does "
                "not have (it has FLOAT, DOUBLE, INT32, INT64 and BOOL)"
            )
        shape = None
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shape = [int(d.dim_value) for d in tensor.shape.dim]
        return self.graph.input(value.name, dtype, shape)

    def _translate(self, c: _Context) -> None:
        proto = c.proto
        if proto.domain not in ("", "ai.onnx"):
            raise c.error(f"op {proto.domain}.{proto.op_type} is not supported (a custom domain)")
        if proto.op_type == "Constant":
            self.consts[c.output()] = _constant_value(c)
            return
        if self._fold(c) or self._symbolic(c):
            return
        handler = _HANDLERS.get(proto.op_type)
        if handler is None:
            raise c.error(
                f"op {proto.op_type} is not supported (gradient_client.onnx.SUPPORTED_OPS "
                "lists those that are)"
            )
        result = handler(self, c)
        if result is not None:
            assert result.name == c.output(), (result.name, c.output())
            self.nodes[c.output()] = result

    def _fold(self, c: _Context) -> bool:
        """Evaluate a node whose operands are all known at import time (shape arithmetic,
        constants computed from constants) with ONNX's reference evaluator."""
        names = [n for n in c.proto.input if n]
        if not names or c.op_type in _NOT_FOLDED or not all(n in self.consts for n in names):
            return False
        if c.op_type == "Shape":
            return False  # Shape of a constant is folded below, by its handler
        try:
            from onnx.reference import ReferenceEvaluator

            evaluator = ReferenceEvaluator(c.proto, opsets={"": self.opset})
            results = evaluator.run(None, {n: self.consts[n] for n in names})
        except Exception as error:
            if c.op_type in _HANDLERS:
                return False  # translated as usual, on constant nodes
            raise c.error(f"cannot evaluate it on its constant inputs: {error}") from None
        for name, value in zip(c.proto.output, results, strict=False):
            if name:
                self.consts[name] = np.asarray(value)
        return True

    def _symbolic(self, c: _Context) -> bool:
        """Shape arithmetic on dimensions of unknown size (Shape -> Gather -> Unsqueeze ->
        Concat, as exporters write x.view(x.size(0), -1)), evaluated on symbols."""
        names = [n for n in c.proto.input if n]
        tracked = [n for n in names if n in self.symbolic]
        if not tracked or (c.op_type == "Reshape" and names[0] not in self.symbolic):
            return False  # a Reshape's shape is resolved by its handler
        origin = self.origin[tracked[0]]
        if c.op_type not in _SYMBOLIC_OPS or not all(
            n in self.symbolic or n in self.consts for n in names
        ):
            raise c.error(
                f"input {tracked[0]!r} holds dimensions whose size is not known when the model "
                f"is imported (from {origin}); only Gather, Unsqueeze, Squeeze, Concat, Slice, "
                "Cast and Identity may compute a Reshape's shape from them"
            )
        values = [self.symbolic[n] if n in self.symbolic else self.consts[n] for n in names]
        try:
            result = _evaluate_symbolic(c, values)
        except OnnxImportError:
            raise
        except Exception as error:
            raise c.error(f"cannot evaluate it on dimensions ({error})") from None
        out = c.output()
        if any(isinstance(d, _Dim) for d in result.flat):
            self.symbolic[out] = result
            self.origin[out] = origin
        else:
            self.consts[out] = result.astype(np.int64)
        return True


_SYMBOLIC_OPS = frozenset({"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity"})


def _evaluate_symbolic(c: _Context, values: list[np.ndarray]) -> np.ndarray:
    """One op of shape arithmetic on object arrays of ints and _Dims."""
    x = np.asarray(values[0], dtype=object)
    op = c.op_type
    if op == "Identity":
        return x
    if op == "Cast":
        if _DTYPES.get(int(c.attr("to", 0))) not in ("int32", "int64"):
            raise c.error("a Cast of dimensions of unknown size to a non-integer type")
        return x
    if op == "Gather":
        indices = np.asarray(values[1]).astype(np.int64)
        return np.asarray(np.take(x, indices, axis=int(c.attr("axis", 0))), dtype=object)
    if op == "Concat":
        parts = [np.asarray(v, dtype=object) for v in values]
        return np.concatenate(parts, axis=int(c.attr("axis", 0)))
    if op == "Slice":
        chosen = [slice(None)] * x.ndim
        starts, ends = values[1], values[2]
        sliced = values[3] if len(values) > 3 else range(len(starts))
        steps = values[4] if len(values) > 4 else [1] * len(starts)
        for axis, start, end, step in zip(sliced, starts, ends, steps, strict=True):
            chosen[int(axis)] = slice(int(start), int(end), int(step))
        return x[tuple(chosen)]
    axes = c.ints("axes") or ([int(v) for v in values[1]] if len(values) > 1 else None)
    if op == "Unsqueeze":
        return np.expand_dims(x, tuple(axes or ()))
    return np.squeeze(x, axis=None if not axes else tuple(axes))  # Squeeze


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _constant_value(c: _Context) -> np.ndarray:
    c.check_attrs(
        ("value", "value_float", "value_floats", "value_int", "value_ints", "value_string",
         "value_strings", "sparse_value")
    )  # fmt: skip
    if len(c.attrs) != 1:
        raise c.error("needs exactly one value attribute")
    ((key, value),) = c.attrs.items()
    if key == "value":
        return np.asarray(c.importer.onnx.numpy_helper.to_array(value))
    if key == "value_float":
        return np.asarray(value, np.float32)
    if key == "value_floats":
        return np.asarray(list(value), np.float32)
    if key == "value_int":
        return np.asarray(value, np.int64)
    if key == "value_ints":
        return np.asarray(list(value), np.int64)
    raise c.error(f"a {key} is not supported (the service has no strings or sparse tensors)")


# ---------------------------------------------------------------------------------------------
# Op handlers: each returns the node named after the ONNX node's first output.


def _scalar(im: _Importer, c: _Context, value: float, step: str) -> Node:
    """A weakly typed scalar constant (it takes the dtype of the tensor it meets)."""
    return im.graph.constant(value, name=c.name(step), weak=True)


def _identity(im: _Importer, x: Node, name: str, dtype: str | None) -> Node:
    """A node named `name` with x's value: a cast to x's own dtype, or an empty squeeze."""
    if dtype is not None:
        return im.graph.cast(x, dtype, name=name)
    return im.graph.op("squeeze", x, name=name, axis=[])


def _elementwise(op: str) -> Handler:
    def handle(im: _Importer, c: _Context) -> Node:
        c.check_attrs(())
        operands = [c.input(i) for i in range(len(c.proto.input))]
        return im.graph.op(op, *operands, name=c.output())

    return handle


def _integer_result(op: str) -> Handler:
    """Div and Pow: the service computes them in floating point; integer operands get an
    integer result, as in ONNX (Div truncates toward zero)."""

    def handle(im: _Importer, c: _Context) -> Node:
        c.check_attrs(())
        x, y = c.input(0), c.input(1)
        x_type, y_type = c.dtype(0), c.dtype(1)
        if x_type is None or x_type in _FLOATS:
            if op == "pow" and x_type is not None and y_type is not None and y_type != x_type:
                y = im.graph.cast(y, x_type, name=c.name("exponent"))  # ONNX: x's type
            return im.graph.op(op, x, y, name=c.output())
        value = im.graph.op(op, x, y, name=c.name(op))
        return im.graph.cast(value, x_type, name=c.output())

    return handle


def _leaky_relu(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("alpha",))
    return im.graph.leaky_relu(c.input(0), float(c.attr("alpha", 0.01)), name=c.output())


def _softmax(op: str) -> Handler:
    def handle(im: _Importer, c: _Context) -> Node:
        c.check_attrs(("axis",))
        x = c.input(0)
        if im.opset >= 13 or c.attr("axis") == -1:  # (-1: the last axis alone at any opset)
            return im.graph.op(op, x, name=c.output(), axis=int(c.attr("axis", -1)))
        # Opsets 11 and 12 normalize over all the axes from `axis` on (the input seen as 2-D).
        rank = c.rank(0)
        axis = int(c.attr("axis", 1))
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            raise c.error(f"axis {c.attr('axis')} is out of range for rank {rank}")
        if axis == rank - 1:
            return im.graph.op(op, x, name=c.output(), axis=-1)
        lse = im.graph.logsumexp(x, list(range(axis, rank)), True, name=c.name("logsumexp"))
        if op == "log_softmax":
            return im.graph.sub(x, lse, name=c.output())
        return im.graph.exp(im.graph.sub(x, lse, name=c.name("log_softmax")), name=c.output())

    return handle


def _gemm(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("alpha", "beta", "transA", "transB"))
    g = im.graph
    a, b = c.input(0), c.input(1)
    if c.attr("transA", 0):
        a = g.transpose(a, [1, 0], name=c.name("transA"))
    if c.attr("transB", 0):
        b = g.transpose(b, [1, 0], name=c.name("transB"))
    alpha, beta = float(c.attr("alpha", 1.0)), float(c.attr("beta", 1.0))
    has_c = c.has_input(2) and beta != 0.0
    product = g.matmul(a, b, name=c.output() if alpha == 1.0 and not has_c else c.name("matmul"))
    if alpha != 1.0:
        scaled = c.output() if not has_c else c.name("alpha")
        product = g.mul(product, _scalar(im, c, alpha, "alpha_value"), name=scaled)
    if not has_c:
        return product
    bias = c.input(2)
    if beta != 1.0:
        bias = g.mul(bias, _scalar(im, c, beta, "beta_value"), name=c.name("beta"))
    return g.add(product, bias, name=c.output())


def _pair_attr(c: _Context, name: str, default: int) -> list[int]:
    values = c.ints(name, [default, default])
    assert values is not None
    if len(values) != 2:
        raise c.error(f"{name}={values} is not supported: only 2-D (NCHW) inputs are")
    return values


def _pads(c: _Context, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]):
    """ONNX's pads as (top, left, bottom, right), auto_pad resolved."""
    auto_pad = c.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = c.ints("pads", [0, 0, 0, 0])
        assert pads is not None
        if len(pads) != 4:
            raise c.error(f"pads={pads} is not supported: only 2-D (NCHW) inputs are")
        return pads
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise c.error(f"auto_pad={auto_pad!r} is not supported")
    begins, ends = [], []
    for size, k, s, d in zip(
        c.spatial(0, f"auto_pad={auto_pad}"), kernel, strides, dilations, strict=True
    ):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return [*begins, *ends]


def _padded(
    im: _Importer, c: _Context, x: Node, pads: Sequence[int], fill: float, kernel=None
) -> tuple[Node, list[int]]:
    """x and the symmetric padding to give the service's op: ONNX's pads when they are
    symmetric (and, for pooling, at most half the kernel), else x padded explicitly."""
    top, left, bottom, right = pads
    fits = kernel is None or (2 * top <= kernel[0] and 2 * left <= kernel[1])
    if top == bottom and left == right and fits:
        return x, [top, left]
    padded = im.graph.pad(x, [0, 0, 0, 0, top, bottom, left, right], fill, name=c.name("pad"))
    return padded, [0, 0]


def _check_4d(c: _Context, i: int, what: str) -> None:
    dims = c.dims(i)
    if dims is not None and len(dims) != 4:
        raise c.error(
            f"{what} of rank {len(dims)} is not supported: only 2-D (NCHW) {c.op_type} is"
        )


def _conv(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
    g = im.graph
    _check_4d(c, 0, "an input")
    _check_4d(c, 1, "a weight")
    w_dims = c.dims(1)
    kernel = c.ints("kernel_shape")
    if kernel is None:
        if w_dims is None or w_dims[2] is None or w_dims[3] is None:
            raise c.error("the kernel's shape is not known (no kernel_shape, weight not static)")
        kernel = [w_dims[2], w_dims[3]]
    if len(kernel) != 2:
        raise c.error(f"kernel_shape={kernel} is not supported: only 2-D convolution is")
    strides, dilations = _pair_attr(c, "strides", 1), _pair_attr(c, "dilations", 1)
    x, padding = _padded(im, c, c.input(0), _pads(c, kernel, strides, dilations), 0.0)
    w = c.input(1)
    geometry = {"stride": strides, "padding": padding, "dilation": dilations}
    group = int(c.attr("group", 1))
    final = c.name("conv") if c.has_input(2) else c.output()
    if group == 1:
        y = g.conv2d(x, w, **geometry, name=final)
    else:
        # A grouped convolution as `group` convolutions of channel slices, concatenated.
        if w_dims is None or w_dims[0] is None or w_dims[1] is None or w_dims[0] % group:
            raise c.error(f"group={group} needs a static weight shape divisible by the groups")
        per_in, per_out = w_dims[1], w_dims[0] // group
        parts = []
        for k in range(group):
            xs = g.slice(x, [k * per_in], [(k + 1) * per_in], axes=[1], name=c.name(f"x{k}"))
            ws = g.slice(w, [k * per_out], [(k + 1) * per_out], axes=[0], name=c.name(f"w{k}"))
            parts.append(g.conv2d(xs, ws, **geometry, name=c.name(f"conv{k}")))
        y = g.concat(*parts, axis=1, name=final)
    if not c.has_input(2):
        return y
    bias = g.expand_dims(c.input(2), [1, 2], name=c.name("bias"))
    return g.add(y, bias, name=c.output())


def _pool_geometry(c: _Context) -> tuple[list[int], list[int], list[int]]:
    """kernel, strides and (top, left, bottom, right) pads of MaxPool and AveragePool."""
    _check_4d(c, 0, "an input")
    kernel = c.ints("kernel_shape")
    if kernel is None or len(kernel) != 2:
        raise c.error(f"kernel_shape={kernel} is not supported: only 2-D pooling is")
    strides = _pair_attr(c, "strides", 1)
    if _pair_attr(c, "dilations", 1) != [1, 1]:
        raise c.error(f"dilations={c.ints('dilations')} is not supported: only 1")
    pads = _pads(c, kernel, strides, [1, 1])
    if c.attr("ceil_mode", 0):
        # ceil_mode only matters when a window would hang over the end: accept it when the
        # output has the same size either way.
        height, width = c.spatial(0, "ceil_mode=1")
        for size, k, s, begin, end in zip(
            (height, width), kernel, strides, pads[:2], pads[2:], strict=True
        ):
            span = size + begin + end - k
            if span % s:
                raise c.error(
                    "ceil_mode=1 is not supported where it changes the output's size (here a "
                    f"window of {k} at stride {s} over {size} + {begin + end} padding)"
                )
    return kernel, strides, pads


def _max_pool(im: _Importer, c: _Context) -> Node:
    c.check_attrs(
        ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides")
    )
    c.only_first_output(" (the Indices output of MaxPool)")
    kernel, strides, pads = _pool_geometry(c)
    x, padding = _padded(im, c, c.input(0), pads, -math.inf, kernel)
    return im.graph.max_pool2d(x, kernel, strides, padding, name=c.output())


def _window_counts(size: int, k: int, s: int, begin: int, end: int) -> np.ndarray:
    """How many elements of each window lie inside the input (not in its padding)."""
    out = (size + begin + end - k) // s + 1
    starts = np.arange(out) * s - begin
    return np.minimum(starts + k, size) - np.maximum(starts, 0)


def _average_pool(im: _Importer, c: _Context) -> Node:
    c.check_attrs(
        ("auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads",
         "strides")
    )  # fmt: skip
    kernel, strides, pads = _pool_geometry(c)
    x, padding = _padded(im, c, c.input(0), pads, 0.0, kernel)
    if c.attr("count_include_pad", 0) or not any(pads):
        return im.graph.avg_pool2d(x, kernel, strides, padding, name=c.output())
    # Padding left out of the count: the service's average (over whole windows) times
    # kernel size / the number of elements inside the input.
    height, width = c.spatial(0, "count_include_pad=0 with padding")
    rows = _window_counts(height, kernel[0], strides[0], pads[0], pads[2])
    cols = _window_counts(width, kernel[1], strides[1], pads[1], pads[3])
    factor = (kernel[0] * kernel[1]) / np.multiply.outer(rows, cols)
    mean = im.graph.avg_pool2d(x, kernel, strides, padding, name=c.name("avg_pool2d"))
    dtype = c.dtype(0) or "float32"
    scale = im.graph.constant(factor.astype(dtype), name=c.name("count"))
    return im.graph.mul(mean, scale, name=c.output())


def _global_average_pool(im: _Importer, c: _Context) -> Node:
    c.check_attrs(())
    axes = list(range(2, c.rank(0)))
    return im.graph.mean(c.input(0), axes, True, name=c.output())


def _flatten(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("axis",))
    g, x = im.graph, c.input(0)
    rank = c.rank(0)
    axis = int(c.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis <= rank:
        raise c.error(f"axis {c.attr('axis')} is out of range for rank {rank}")
    if axis in (0, rank):  # (1, size) or (size, 1)
        flat = g.flatten(x, name=c.name("flatten"))
        return g.expand_dims(flat, [0 if axis == 0 else 1], name=c.output())
    steps = []
    if axis < rank - 1:
        steps.append((axis, -1))
    if axis > 1:
        steps.append((0, axis - 1))
    if not steps:
        return _identity(im, x, c.output(), c.dtype(0))
    for k, (start, end) in enumerate(steps):
        last = k == len(steps) - 1
        x = g.flatten(x, start, end, name=c.output() if last else c.name("flatten"))
    return x


def _reshape(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("allowzero",))
    g, x = im.graph, c.input(0)
    if c.has_input(1) and c.input_name(1) in im.symbolic:
        shape = _symbolic_shape(im, c)
    else:
        shape = c.static_ints(1, "the shape") or []
    if c.attr("allowzero", 0) or 0 not in shape:
        return g.reshape(x, shape, name=c.output())
    dims = c.dims(0)
    resolved: list[int] = []
    for i, d in enumerate(shape):
        known = dims[i] if d == 0 and dims is not None and i < len(dims) else None
        resolved.append(d if d != 0 else (known if known is not None else 0))
    if 0 not in resolved:
        return g.reshape(x, resolved, name=c.output())
    # Leading zeros (copied dimensions) of unknown size: as a flatten, or with -1 first.
    lead = next((i for i, d in enumerate(resolved) if d != 0), len(resolved))
    rest = resolved[lead:]
    if 0 not in rest:
        if rest == [-1] and lead > 0:
            return g.flatten(x, lead, -1, name=c.output())
        inner = dims[1:] if dims is not None else [None]
        if lead == 1 and -1 in rest and all(d is not None for d in inner):
            # The -1 of (copied, ..., -1, ...): what the static dimensions after the first hold.
            known = math.prod(d for d in rest if d != -1)
            size = math.prod(d for d in inner if d is not None)
            if known and size % known == 0:
                rest = [size // known if d == -1 else d for d in rest]
        if lead == 1 and -1 not in rest:
            return g.reshape(x, [-1, *rest], name=c.output())
    position = next(i for i, d in enumerate(resolved) if d == 0)
    raise c.error(
        f"shape {shape}: the 0 at position {position} copies a dimension of the input whose "
        "size is not known when the model is imported"
    )


def _symbolic_shape(im: _Importer, c: _Context) -> list[int]:
    """A Reshape's shape computed from dimensions of unknown size: a dimension of the input
    kept in place becomes a 0 (copy it), one other unknown a -1."""
    if c.attr("allowzero", 0):
        raise c.error("allowzero=1 with a shape computed from dimensions of unknown size")
    symbols = im.symbols_of(c.input_name(0))
    shape: list[int | None] = []
    for i, d in enumerate(im.symbolic[c.input_name(1)].reshape(-1)):
        if not isinstance(d, _Dim):
            shape.append(int(d))
        elif i < len(symbols) and symbols[i] == d.symbol:
            shape.append(0)  # the input's own dimension, in place
        else:
            shape.append(None)
    unknown = [i for i, d in enumerate(shape) if d is None]
    if len(unknown) > 1 or (unknown and -1 in shape):
        raise c.error(
            f"its shape holds {len(unknown)} dimensions of unknown size that are not the "
            f"input's own in place (from {im.origin[c.input_name(1)]})"
        )
    return [-1 if d is None else d for d in shape]


def _transpose(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("perm",))
    return im.graph.transpose(c.input(0), c.ints("perm"), name=c.output())


def _concat(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("axis",))
    if "axis" not in c.attrs:
        raise c.error("the axis attribute is missing")
    operands = [c.input(i) for i in range(len(c.proto.input)) if c.has_input(i)]
    return im.graph.concat(*operands, axis=int(c.attr("axis")), name=c.output())


def _slice(im: _Importer, c: _Context) -> Node:
    c.check_attrs(())
    starts = c.static_ints(1, "starts")
    ends = c.static_ints(2, "ends")
    axes = c.static_ints(3, "axes")
    steps = c.static_ints(4, "steps")
    assert starts is not None and ends is not None
    return im.graph.slice(c.input(0), starts, ends, steps, axes, name=c.output())


def _gather(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("axis",))
    return im.graph.take(c.input(0), c.input(1), int(c.attr("axis", 0)), name=c.output())


def _axes(c: _Context, what: str = "axes") -> list[int] | None:
    """The axes of Squeeze, Unsqueeze and the reductions: an attribute in older opsets, an
    input (which must be constant) in newer ones."""
    if "axes" in c.attrs:
        return c.ints("axes")
    return c.static_ints(1, what)


def _squeeze(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("axes",))
    return im.graph.squeeze(c.input(0), _axes(c), name=c.output())


def _unsqueeze(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("axes",))
    axes = _axes(c)
    if axes is None:
        raise c.error("the axes are missing")
    return im.graph.expand_dims(c.input(0), axes, name=c.output())


def _reduction(op: str) -> Handler:
    def handle(im: _Importer, c: _Context) -> Node:
        c.check_attrs(("axes", "keepdims", "noop_with_empty_axes"))
        x = c.input(0)
        axes = _axes(c)
        keepdims = bool(c.attr("keepdims", 1))
        if not axes:
            if c.attr("noop_with_empty_axes", 0):
                return _identity(im, x, c.output(), c.dtype(0))
            axes = None
        x_type = c.dtype(0)
        attrs = {"axis": axes, "keepdims": keepdims or None}
        if op != "max" and x_type is not None and x_type not in _FLOATS:
            # The service sums integers in int64 and averages them in float64; ONNX keeps
            # the input's type.
            value = im.graph.op(op, x, name=c.name(op), **attrs)
            return im.graph.cast(value, x_type, name=c.output())
        return im.graph.op(op, x, name=c.output(), **attrs)

    return handle


def _clip(im: _Importer, c: _Context) -> Node:
    c.check_attrs(())
    g, x = im.graph, c.input(0)
    bounds: list[float | None] = []
    dynamic = False
    for i in (1, 2):
        if not c.has_input(i):
            bounds.append(None)
        elif (value := im.static_value(c.input_name(i))) is not None:
            bounds.append(float(np.asarray(value).reshape(())))
        else:
            bounds.append(None)
            dynamic = True
    if not dynamic:
        return g.clip(x, bounds[0], bounds[1], name=c.output())
    # Bounds computed by the graph: maximum and minimum (ties share the gradient).
    low, high = c.has_input(1), c.has_input(2)
    if low:
        x = g.maximum(x, c.input(1), name=c.output() if not high else c.name("min"))
    if high:
        x = g.minimum(x, c.input(2), name=c.output())
    return x


def _where(im: _Importer, c: _Context) -> Node:
    c.check_attrs(())
    return im.graph.where(c.input(0), c.input(1), c.input(2), name=c.output())


def _cast(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("to", "saturate", "round_mode"))
    if "to" not in c.attrs:
        raise c.error("the to attribute is missing")
    to = int(c.attr("to"))
    dtype = _DTYPES.get(to)
    if dtype is None:
        type_name = _ONNX_TYPE_NAMES.get(to, str(to))
        raise c.error(f"to={type_name} is not supported (the service has no such dtype)")
    return im.graph.cast(c.input(0), dtype, name=c.output())


def _identity_op(im: _Importer, c: _Context) -> Node:
    c.check_attrs(())
    return _identity(im, c.input(0), c.output(), c.dtype(0))


def _shape(im: _Importer, c: _Context) -> None:
    c.check_attrs(("start", "end"))
    dims = c.dims(0)
    if dims is None:
        raise c.error("Shape needs the rank of its input to be known")
    symbols = im.symbols_of(c.input_name(0))
    start, end = c.attr("start", 0), c.attr("end", None)
    entries: list[int | _Dim] = []
    for i, d in enumerate(dims):
        symbol = symbols[i] if i < len(symbols) else None
        # An unnamed dimension gets a name no other has: only a Reshape of this very input
        # could keep it (and it has no symbol to match), so it ends as a -1.
        entries.append(d if d is not None else _Dim(symbol or f"?{c.input_name(0)}:{i}"))
    entries = entries[start:end]
    if all(isinstance(d, int) for d in entries):
        im.consts[c.output()] = np.asarray(entries, np.int64)  # a node only if used as data
    else:
        im.symbolic[c.output()] = np.asarray(entries, dtype=object)
        im.origin[c.output()] = c.where()


def _batch_normalization(im: _Importer, c: _Context) -> Node:
    c.check_attrs(("epsilon", "momentum", "training_mode", "spatial"))
    if c.attr("training_mode", 0):
        raise c.error("training_mode=1 is not supported: only the inference form")
    if not c.attr("spatial", 1):
        raise c.error("spatial=0 is not supported")
    c.only_first_output(" (the running statistics of the training form)")
    g = im.graph
    x, scale, bias, mean, var = (c.input(i) for i in range(5))
    epsilon = float(c.attr("epsilon", 1e-5))
    # y = x * a + b with a = scale / sqrt(var + epsilon) and b = bias - mean * a, per channel.
    shifted = g.add(var, _scalar(im, c, epsilon, "epsilon"), name=c.name("var"))
    a = g.div(scale, g.sqrt(shifted, name=c.name("std")), name=c.name("a"))
    b = g.sub(bias, g.mul(mean, a, name=c.name("shift")), name=c.name("b"))
    expand = list(range(1, c.rank(0) - 1))
    if expand:
        a = g.expand_dims(a, expand, name=c.name("scale"))
        b = g.expand_dims(b, expand, name=c.name("bias"))
    return g.add(g.mul(x, a, name=c.name("scaled")), b, name=c.output())


_HANDLERS: dict[str, Handler] = {
    "Add": _elementwise("add"),
    "Sub": _elementwise("sub"),
    "Mul": _elementwise("mul"),
    "Div": _integer_result("div"),
    "Pow": _integer_result("pow"),
    "Neg": _elementwise("neg"),
    "Abs": _elementwise("abs"),
    "Exp": _elementwise("exp"),
    "Log": _elementwise("log"),
    "Sqrt": _elementwise("sqrt"),
    "Tanh": _elementwise("tanh"),
    "Sigmoid": _elementwise("sigmoid"),
    "Relu": _elementwise("relu"),
    "LeakyRelu": _leaky_relu,
    "Softmax": _softmax("softmax"),
    "LogSoftmax": _softmax("log_softmax"),
    "MatMul": _elementwise("matmul"),
    "Gemm": _gemm,
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Slice": _slice,
    "Gather": _gather,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "ReduceSum": _reduction("sum"),
    "ReduceMean": _reduction("mean"),
    "ReduceMax": _reduction("max"),
    "Clip": _clip,
    "Where": _where,
    "Cast": _cast,
    "Identity": _identity_op,
    "Shape": _shape,
    "BatchNormalization": _batch_normalization,
}

SUPPORTED_OPS = frozenset({*_HANDLERS, "Constant"})
"""The ONNX ops (default domain) the importer translates. Any op whose inputs are all
constants is also evaluated at import time (ONNX's reference evaluator), whatever it is."""
