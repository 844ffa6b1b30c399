"""ONNX import (gradient_client.onnx.from_onnx): models built with onnx.helper and exported from
PyTorch, checked against independent truth.

- Forward values of float32 models against onnxruntime: rtol 1e-6, atol 1e-6 (float32 rounding
  of results near 0 needs the absolute part; numpy and onnxruntime round differently).
- Gradients of the same models cast to float64 against central finite differences (the
  engine's forward passes, tests/gradcheck.py), and against PyTorch autograd in float64 for the
  MLP, the CNN and a model exported with torch.onnx.export.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from gradcheck import numerical_vjp, rng_for  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gradient_client.cli import main as cli_main  # noqa: E402
from gradient_client.onnx import (  # noqa: E402
    SUPPORTED_OPS,
    SUPPORTED_OPSETS,
    OnnxGraph,
    OnnxImportError,
    from_onnx,
)

try:
    import torch
except ImportError:  # the PyTorch comparisons skip, saying why
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

ROOT = Path(__file__).resolve().parent.parent
FLOAT, DOUBLE = TensorProto.FLOAT, TensorProto.DOUBLE
RTOL, ATOL = 1e-6, 1e-6
"""Forward values against onnxruntime (float32)."""
GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-8
"""Gradients (float64) against central differences with step 1e-6."""


# ---------------------------------------------------------------------------------------------
# Building and running models


def make_model(nodes, inputs, outputs, initializers=None, opset=17):
    """A model of `nodes`. inputs: {name: (elem_type, shape)}; outputs: names (FLOAT) or
    (name, elem_type) pairs; initializers: {name: array}."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [
            helper.make_tensor_value_info(*(o if isinstance(o, tuple) else (o, FLOAT)), None)
            for o in outputs
        ],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what every onnxruntime reads
    return model


def as_float64(model):
    """The model with every float32 tensor, type and Cast made float64 (for finite
    differences)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = DOUBLE
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                array = numpy_helper.to_array(attr.t).astype(np.float64)
                attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = DOUBLE
    return copy


def run_ort(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_engine(engine, imported: OnnxGraph, feeds, fetch=None):
    graph = engine.load_graph(imported.graph.to_proto())
    return engine.forward(graph, imported.feeds(feeds), fetch=list(fetch or imported.outputs))


def check_forward(engine, model, feeds, **options):
    """The imported model's outputs against onnxruntime's: the same dtype and values."""
    imported = from_onnx(model, **options)
    values = run_engine(engine, imported, feeds)
    for name, expected in zip(imported.outputs, run_ort(model, feeds), strict=True):
        assert values[name].dtype == expected.dtype, name
        np.testing.assert_allclose(values[name], expected, rtol=RTOL, atol=ATOL, err_msg=name)
    return imported, values


def check_gradients(engine, model, feeds, key):
    """Gradients of the float64 model, with every float initializer an input, against central
    differences of a random vector-Jacobian product; returns the float64 imported model and
    its gradients."""
    model64 = as_float64(model)
    imported = from_onnx(model64)
    feeds64 = imported.feeds(
        {n: v.astype(np.float64) if v.dtype == np.float32 else v for n, v in feeds.items()}
    )
    graph = engine.load_graph(imported.graph.to_proto())
    output = imported.outputs[0]
    value = engine.forward(graph, feeds64, fetch=[output])[output]
    seed = rng_for(key).standard_normal(value.shape)
    wrt = [n for n, v in feeds64.items() if v.dtype == np.float64]
    assert wrt
    result = engine.gradient(graph, feeds64, output, seed=seed, wrt=wrt)
    expected = numerical_vjp(engine, graph, feeds64, output, seed, wrt)
    for name in wrt:
        np.testing.assert_allclose(
            result.gradients[name], expected[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name
        )
    return imported, feeds64, seed, result


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


# ---------------------------------------------------------------------------------------------
# One model per op


def real(rng, shape):
    return rng.uniform(-2.0, 2.0, shape).astype(np.float32)


def positive(rng, shape):
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)


def nonzero(rng, shape):
    magnitude = rng.uniform(0.5, 2.0, shape)
    return np.where(rng.random(shape) < 0.5, -magnitude, magnitude).astype(np.float32)


def distinct(rng, shape):
    """Distinct values 0.3 apart (no ties for max and max pooling)."""
    size = int(np.prod(shape))
    return (0.3 * (rng.permutation(size) - size // 2) + 0.1).reshape(shape).astype(np.float32)


@dataclass
class Case:
    """One op's model: its nodes, its float inputs (name -> shape and domain), initializers,
    the opset and the output's element type."""

    id: str
    nodes: list
    inputs: dict
    initializers: dict = field(default_factory=dict)
    opset: int = 17
    output_type: int = FLOAT
    differentiable: bool = True
    extra_inputs: dict = field(default_factory=dict)  # non-float inputs: name -> array

    def model(self):
        inputs = {n: (FLOAT, list(shape)) for n, (shape, _) in self.inputs.items()}
        for name, array in self.extra_inputs.items():
            inputs[name] = (helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
        return make_model(
            self.nodes, inputs, [("y", self.output_type)], self.initializers, self.opset
        )

    def feeds(self):
        rng = rng_for(self.id)
        feeds = {n: domain(rng, shape) for n, (shape, domain) in self.inputs.items()}
        return {**feeds, **self.extra_inputs}


def _w(seed, *shape, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


I64 = np.int64
CASES = [
    Case("Add", [node("Add", "ab")], {"a": ((2, 3), real), "b": ((3,), real)}),
    Case("Sub", [node("Sub", "ab")], {"a": ((2, 1), real), "b": ((2, 3), real)}),
    Case("Mul", [node("Mul", "ab")], {"a": ((2, 3), real), "b": ((2, 3), real)}),
    Case("Div", [node("Div", "ab")], {"a": ((2, 3), real), "b": ((2, 3), nonzero)}),
    Case("Pow", [node("Pow", "ab")], {"a": ((2, 3), positive), "b": ((2, 3), real)}),
    Case(
        "Pow-int-exponent",
        [node("Pow", "ab")],
        {"a": ((2, 3), real)},
        initializers={"b": np.array(3, np.int64)},
    ),
    Case("Neg", [node("Neg", "x")], {"x": ((2, 3), real)}),
    Case("Abs", [node("Abs", "x")], {"x": ((2, 3), nonzero)}),
    Case("Exp", [node("Exp", "x")], {"x": ((2, 3), real)}),
    Case("Log", [node("Log", "x")], {"x": ((2, 3), positive)}),
    Case("Sqrt", [node("Sqrt", "x")], {"x": ((2, 3), positive)}),
    Case("Tanh", [node("Tanh", "x")], {"x": ((2, 3), real)}),
    Case("Sigmoid", [node("Sigmoid", "x")], {"x": ((2, 3), real)}),
    Case("Relu", [node("Relu", "x")], {"x": ((2, 3), nonzero)}),
    Case("LeakyRelu", [node("LeakyRelu", "x", alpha=0.2)], {"x": ((2, 3), nonzero)}),
    Case("Softmax", [node("Softmax", "x", axis=1)], {"x": ((2, 3, 4), real)}),
    Case("Softmax-opset11", [node("Softmax", "x", axis=1)], {"x": ((2, 3, 4), real)}, opset=11),
    Case("Softmax-opset11-last", [node("Softmax", "x")], {"x": ((2, 5), real)}, opset=11),
    Case("LogSoftmax", [node("LogSoftmax", "x", axis=-1)], {"x": ((2, 3, 4), real)}),
    Case(
        "LogSoftmax-opset12", [node("LogSoftmax", "x", axis=1)], {"x": ((2, 3, 4), real)}, opset=12
    ),
    Case("MatMul", [node("MatMul", "ab")], {"a": ((2, 3, 4), real), "b": ((4, 5), real)}),
    Case(
        "Gemm",
        [node("Gemm", "abc", alpha=0.5, beta=2.0, transA=1, transB=1)],
        {"a": ((4, 3), real), "b": ((5, 4), real), "c": ((5,), real)},
    ),
    Case("Gemm-no-c", [node("Gemm", "ab")], {"a": ((3, 4), real), "b": ((4, 2), real)}),
    Case(
        "Conv",
        [node("Conv", "xwb", strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])],
        {"x": ((2, 2, 7, 6), real), "w": ((3, 2, 3, 2), real), "b": ((3,), real)},
    ),
    Case(
        "Conv-same-upper",
        [node("Conv", "xw", auto_pad="SAME_UPPER", strides=[2, 2])],
        {"x": ((1, 2, 6, 5), real), "w": ((2, 2, 3, 3), real)},
    ),
    Case(
        "Conv-groups",
        [node("Conv", "xwb", group=2, pads=[1, 1, 1, 1])],
        {"x": ((2, 4, 5, 5), real), "w": ((6, 2, 3, 3), real), "b": ((6,), real)},
    ),
    Case(
        "MaxPool",
        [node("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1])],
        {"x": ((2, 2, 5, 6), distinct)},
    ),
    Case(
        "MaxPool-asymmetric",
        [node("MaxPool", "x", kernel_shape=[3, 2], pads=[0, 1, 2, 0])],
        {"x": ((1, 2, 5, 4), distinct)},
    ),
    Case(
        "MaxPool-ceil-same-size",
        [node("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
        {"x": ((1, 1, 4, 6), distinct)},
    ),
    Case(
        "AveragePool",
        [node("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        {"x": ((2, 2, 6, 5), real)},
    ),
    Case(
        "AveragePool-count-pad",
        [node("AveragePool", "x", kernel_shape=[2, 3], pads=[1, 1, 0, 1], count_include_pad=1)],
        {"x": ((1, 2, 4, 5), real)},
    ),
    Case(
        "AveragePool-asymmetric",
        [node("AveragePool", "x", kernel_shape=[3, 2], strides=[2, 1], pads=[2, 0, 1, 1])],
        {"x": ((1, 2, 5, 4), real)},
    ),
    Case(
        "AveragePool-same-lower",
        [node("AveragePool", "x", kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER")],
        {"x": ((1, 1, 5, 5), real)},
    ),
    Case(
        "MaxPool-same-upper",
        [node("MaxPool", "x", kernel_shape=[3, 3], auto_pad="SAME_UPPER")],
        {"x": ((1, 2, 4, 5), distinct)},
    ),
    Case("GlobalAveragePool", [node("GlobalAveragePool", "x")], {"x": ((2, 3, 4, 5), real)}),
    Case("Flatten", [node("Flatten", "x", axis=2)], {"x": ((2, 3, 4, 5), real)}),
    Case("Flatten-axis0", [node("Flatten", "x", axis=0)], {"x": ((2, 3, 4), real)}),
    Case("Flatten-axis-1", [node("Flatten", "x", axis=-1)], {"x": ((2, 3, 4), real)}),
    Case(
        "Reshape",
        [node("Reshape", ["x", "shape"])],
        {"x": ((2, 3, 4), real)},
        initializers={"shape": np.array([0, -1, 2], I64)},
    ),
    Case("Transpose", [node("Transpose", "x", perm=[1, 2, 0])], {"x": ((2, 3, 4), real)}),
    Case(
        "Concat",
        [node("Concat", ["a", "b", "c"], axis=1)],
        {"a": ((2, 1, 3), real), "b": ((2, 2, 3), real)},
        initializers={"c": _w(1, 2, 2, 3)},
    ),
    Case(
        "Slice",
        [node("Slice", ["x", "starts", "ends", "axes", "steps"])],
        {"x": ((4, 5, 6), real)},
        initializers={
            "starts": np.array([-1, 1], I64),
            "ends": np.array([-(2**63), 2**63 - 1], I64),
            "axes": np.array([0, 2], I64),
            "steps": np.array([-2, 2], I64),
        },
    ),
    Case(
        "Gather",
        [node("Gather", ["x", "i"], axis=1)],
        {"x": ((2, 4, 3), real)},
        initializers={"i": np.array([[3, 0], [-1, 3]], I64)},
    ),
    Case(
        "Gather-fed-indices",
        [node("Gather", ["x", "i"])],
        {"x": ((4, 3), real)},
        extra_inputs={"i": np.array([2, 0, 2], I64)},
    ),
    Case("Squeeze-opset11", [node("Squeeze", "x", axes=[1])], {"x": ((2, 1, 3), real)}, opset=11),
    Case(
        "Squeeze",
        [node("Squeeze", ["x", "axes"])],
        {"x": ((2, 1, 3, 1), real)},
        initializers={"axes": np.array([-1, 1], I64)},
    ),
    Case("Squeeze-all", [node("Squeeze", "x")], {"x": ((1, 3, 1), real)}),
    Case(
        "Unsqueeze-opset11", [node("Unsqueeze", "x", axes=[0, 3])], {"x": ((2, 3), real)}, opset=11
    ),
    Case(
        "Unsqueeze",
        [node("Unsqueeze", ["x", "axes"])],
        {"x": ((2, 3), real)},
        initializers={"axes": np.array([-1, 1], I64)},
    ),
    Case(
        "ReduceSum-opset11", [node("ReduceSum", "x", axes=[1])], {"x": ((2, 3, 4), real)}, opset=11
    ),
    Case(
        "ReduceSum",
        [node("ReduceSum", ["x", "axes"], keepdims=0)],
        {"x": ((2, 3, 4), real)},
        initializers={"axes": np.array([0, 2], I64)},
    ),
    Case("ReduceSum-all", [node("ReduceSum", "x", keepdims=0)], {"x": ((2, 3), real)}),
    Case(
        "ReduceMean-opset17",
        [node("ReduceMean", "x", axes=[-1])],
        {"x": ((2, 3, 4), real)},
        opset=17,
    ),
    Case(
        "ReduceMean",
        [node("ReduceMean", ["x", "axes"], keepdims=0)],
        {"x": ((2, 3, 4), real)},
        initializers={"axes": np.array([1], I64)},
        opset=18,
    ),
    Case("ReduceMax-opset13", [node("ReduceMax", "x", axes=[1, 2])], {"x": ((2, 3, 4), distinct)}),
    Case(
        "ReduceMax",
        [node("ReduceMax", ["x", "axes"])],
        {"x": ((2, 3, 4), distinct)},
        initializers={"axes": np.array([0], I64)},
        opset=18,
    ),
    Case(
        "Clip",
        [node("Clip", ["x", "lo", "hi"])],
        {"x": ((3, 4), distinct)},
        initializers={"lo": np.float32(-0.45), "hi": np.float32(0.75)},
    ),
    Case(
        "Clip-min-only",
        [node("Clip", ["x", "lo"])],
        {"x": ((3, 4), distinct)},
        initializers={"lo": np.float32(-0.45)},
    ),
    Case(
        "Clip-fed-bounds",
        [node("Clip", ["x", "lo", "hi"])],
        {
            "x": ((3, 4), distinct),
            "lo": ((), lambda rng, s: np.array(-0.45, np.float32)),
            "hi": ((), lambda rng, s: np.array(0.75, np.float32)),
        },
    ),  # fmt: skip
    Case(
        "Where",
        [node("Where", ["c", "a", "b"])],
        {"a": ((2, 3), real), "b": ((3,), real)},
        extra_inputs={"c": np.array([[True, False, True], [False, False, True]])},
    ),
    Case(
        "Cast",
        [node("Cast", "x", ["t"], to=TensorProto.INT64), node("Cast", "t", to=FLOAT)],
        {"x": ((2, 3), real)},
        differentiable=False,
    ),
    Case(
        "Constant",
        [
            node("Constant", [], ["k"], value=numpy_helper.from_array(_w(3, 3))),
            node("Mul", ["x", "k"]),
        ],
        {"x": ((2, 3), real)},
    ),
    Case(
        "Constant-value-float",
        [node("Constant", [], ["k"], value_float=2.5), node("Mul", ["x", "k"])],
        {"x": ((2, 3), real)},
    ),
    Case("Identity", [node("Identity", "x")], {"x": ((2, 3), real)}),
    Case(
        "BatchNormalization",
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
        {"x": ((2, 3, 4, 2), real)},
        initializers={
            "s": _w(4, 3),
            "b": _w(5, 3),
            "m": _w(6, 3),
            "v": _w(7, 3, low=0.5, high=2.0),
        },
    ),
    Case(
        "BatchNormalization-2d",
        [node("BatchNormalization", ["x", "s", "b", "m", "v"])],
        {"x": ((4, 3), real)},
        initializers={"s": _w(8, 3), "b": _w(9, 3), "m": _w(10, 3), "v": _w(11, 3, low=0.5)},
        opset=13,
    ),
    Case(
        "Shape-arithmetic",
        [
            node("Shape", "x", ["s"]),
            node("Gather", ["s", "zero"], ["n"], axis=0),
            node("Unsqueeze", ["n", "zero1"], ["n1"]),
            node("Concat", ["n1", "minus1"], ["target"], axis=0),
            node("Reshape", ["x", "target"]),
        ],
        {"x": ((2, 3, 4), real)},
        initializers={
            "zero": np.array(0, I64),
            "zero1": np.array([0], I64),
            "minus1": np.array([-1], I64),
        },
    ),
]


def test_every_supported_op_has_a_case():
    covered = {n.op_type for case in CASES for n in case.nodes}
    assert covered >= SUPPORTED_OPS, sorted(SUPPORTED_OPS - covered)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_op_forward_matches_onnxruntime(case, engine):
    check_forward(engine, case.model(), case.feeds())


@pytest.mark.parametrize("case", [c for c in CASES if c.differentiable], ids=lambda case: case.id)
def test_op_gradients_match_finite_differences(case, engine):
    check_gradients(engine, case.model(), case.feeds(), case.id)


@pytest.mark.parametrize("case", [c for c in CASES if c.initializers], ids=lambda c: c.id)
def test_initializers_as_constants(case, engine):
    imported, _ = check_forward(engine, case.model(), case.feeds(), initializers="constants")
    assert imported.initializers == {}
    ops = {n.name: n.op for n in imported.graph.nodes}
    assert all(ops.get(name, "constant") == "constant" for name in case.initializers)


def test_opset_variants_agree(engine):
    """The same reductions and axes ops written for several opsets give the same values."""
    x = real(rng_for("opsets"), (2, 1, 3))
    results = []
    for opset in (11, 13, 18, 21, 25):
        axes_input = opset >= 13
        reduce_input = opset >= 18
        nodes = [
            node("Squeeze", ["x", "ax1"] if axes_input else ["x"], ["s"],
                 **({} if axes_input else {"axes": [1]})),
            node("Unsqueeze", ["s", "ax0"] if axes_input else ["s"], ["u"],
                 **({} if axes_input else {"axes": [0]})),
            node("ReduceSum", ["u", "ax2"] if axes_input else ["u"], ["r"],
                 **({} if axes_input else {"axes": [2]})),
            node("ReduceMean", ["r", "ax0"] if reduce_input else ["r"], ["m"],
                 **({} if reduce_input else {"axes": [0]})),
            node("Softmax", ["m"], axis=-1),
        ]  # fmt: skip
        inits = {"ax0": np.array([0], I64), "ax1": np.array([1], I64), "ax2": np.array([2], I64)}
        model = make_model(nodes, {"x": (FLOAT, [2, 1, 3])}, ["y"], inits, opset=opset)
        imported, values = check_forward(engine, model, {"x": x})
        assert imported.opset == opset
        results.append(values["y"])
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_int_arithmetic_keeps_onnx_types(engine):
    """Div of integers truncates and keeps the type; ReduceSum and ReduceMean of int32 stay
    int32 (the service would widen them)."""
    a = np.array([[7, -7, 9], [1, 5, -3]], np.int32)
    b = np.array([[2, 2, -4], [3, 5, 2]], np.int32)
    model = make_model(
        [
            node("Div", "ab", ["q"]),
            node("ReduceSum", ["q"], ["s"], axes=[1], keepdims=0),
            node("ReduceMean", ["a"], ["m"], axes=[0], keepdims=0),
            node("Pow", ["a", "two"], ["p"]),
        ],
        {"a": (TensorProto.INT32, [2, 3]), "b": (TensorProto.INT32, [2, 3])},
        [("q", TensorProto.INT32), ("s", TensorProto.INT32), ("m", TensorProto.INT32),
         ("p", TensorProto.INT32)],
        {"two": np.array(2, np.int32)},
        opset=12,
    )  # fmt: skip
    check_forward(engine, model, {"a": a, "b": b})


def test_symbolic_batch_dimension(engine):
    """A batch dimension named, not sized: the input declares no shape, so any batch runs, and
    Reshape's copied dimension (0) becomes a flatten or a -1."""
    model = make_model(
        [
            node("Reshape", ["x", "keep_flat"], ["flat"]),
            node("Reshape", ["flat", "keep_split"], ["split"]),
            node("Flatten", ["split"], ["f"], axis=1),
            node("Gemm", ["f", "W"], ["y"]),
        ],
        {"x": (FLOAT, ["N", 3, 2, 2])},
        ["y"],
        {
            "keep_flat": np.array([0, -1], I64),
            "keep_split": np.array([0, 6, 2], I64),
            "W": _w(40, 12, 2),
        },
    )
    imported = from_onnx(model)
    assert "shape" not in imported.graph.to_proto().nodes[0].attrs  # the input "x"
    ops = {n.name: n.op for n in imported.graph.nodes}
    assert (ops["flat"], ops["split"]) == ("flatten", "reshape")
    for batch in (1, 5):
        check_forward(engine, model, {"x": real(rng_for(f"batch{batch}"), (batch, 3, 2, 2))})
    unknown = make_model(
        [node("Reshape", ["x", "shape"], name="r")],
        {"x": (FLOAT, ["N", "M"])},
        ["y"],
        {"shape": np.array([0, 0, 1], I64)},
    )
    with pytest.raises(
        OnnxImportError, match=r"'r' \(Reshape\): shape \[0, 0, 1\]: the 0 at position 0"
    ):
        from_onnx(unknown)


def _dynamic_flatten_model():
    """x.view(x.size(0), -1) and x.reshape(x.size(0), 2, -1) as exporters write them, on a
    batch of unknown size "N": Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [
        node("Shape", ["x"], ["s"], name="/Shape"),
        node("Gather", ["s", "zero"], ["n"], axis=0),
        node("Unsqueeze", ["n", "axes0"], ["n1"]),
        node("Concat", ["n1", "minus1"], ["target"], axis=0),
        node("Reshape", ["x", "target"], ["flat"]),
        node("Concat", ["n1", "two", "minus1"], ["target3"], axis=0),
        node("Reshape", ["x", "target3"], ["split"]),
        node("ReduceSum", ["split", "axes0"], ["folded"], keepdims=0),
        node("MatMul", ["flat", "W"], ["h"]),
        node("Slice", ["h", "zero1", "two", "axes1"], ["y"]),
    ]
    inits = {
        "zero": np.array(0, I64),
        "zero1": np.array([0], I64),
        "axes0": np.array([0], I64),
        "axes1": np.array([1], I64),
        "two": np.array([2], I64),
        "minus1": np.array([-1], I64),
        "W": _w(42, 12, 3),
    }
    return make_model(nodes, {"x": (FLOAT, ["N", 3, 4])}, ["y", "folded"], inits, opset=17)


def test_shapes_computed_from_a_dimension_of_unknown_size(engine):
    model = _dynamic_flatten_model()
    imported = from_onnx(model)
    ops = {n.name: n.op for n in imported.graph.nodes}
    assert (ops["flat"], ops["split"]) == ("flatten", "reshape")
    assert not {"s", "n", "n1", "target"} & set(ops)  # evaluated on import, not nodes
    for batch in (1, 4):
        check_forward(engine, model, {"x": real(rng_for(f"dyn{batch}"), (batch, 3, 4))})
    check_gradients(engine, model, {"x": real(rng_for("dyn"), (2, 3, 4))}, "dyn-grad")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            [node("Cast", ["s"], ["f"], to=FLOAT, name="tofloat"), node("Mul", ["x", "f"])],
            r"'tofloat' \(Cast\): a Cast of dimensions of unknown size to a non-integer type",
        ),
        (
            [node("Mul", ["s", "s"], ["sq"], name="square"), node("Reshape", ["x", "sq"])],
            r"'square' \(Mul\): input 's' holds dimensions whose size is not known when the "
            r"model is imported \(from ONNX node '/Shape' \(Shape\)\)",
        ),
        (
            [node("Reshape", ["z", "s2"], name="r2")],
            r"'r2' \(Reshape\): its shape holds 2 dimensions of unknown size",
        ),
    ],
    ids=["cast-to-float", "arithmetic", "two-unknowns"],
)
def test_dimensions_of_unknown_size_only_shape_reshapes(extra, message):
    nodes = [
        node("Shape", ["x"], ["s"], name="/Shape"),
        node("Shape", ["z"], ["sz"]),
        node("Concat", ["s", "sz"], ["s2"], axis=0),
        *extra,
    ]
    model = make_model(nodes, {"x": (FLOAT, ["N", 3]), "z": (FLOAT, ["M"])}, ["y"])
    with pytest.raises(OnnxImportError, match=message):
        from_onnx(model)


def test_initializers_listed_as_inputs(engine):
    """Models of IR version 3 list their initializers among the inputs too: they are
    initializers (fed by `feeds`), not inputs the caller must give."""
    model = make_model(
        [node("MatMul", ["x", "W"])],
        {"x": (FLOAT, [2, 3]), "W": (FLOAT, [3, 2])},
        ["y"],
        {"W": _w(41, 3, 2)},
    )
    imported, _ = check_forward(engine, model, {"x": real(rng_for("ir3"), (2, 3))})
    assert imported.inputs == ("x",) and list(imported.initializers) == ["W"]


# ---------------------------------------------------------------------------------------------
# An MLP and a CNN, end to end over gRPC, and against PyTorch


def mlp_model():
    """Gemm (transB, as torch's Linear) -> Relu -> MatMul + Add -> LogSoftmax."""
    inits = {
        "W1": _w(20, 5, 4),
        "b1": _w(21, 5),
        "W2": _w(22, 5, 3),
        "b2": _w(23, 3),
    }
    nodes = [
        node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
        node("Relu", ["h"], ["a"]),
        node("MatMul", ["a", "W2"], ["z"]),
        node("Add", ["z", "b2"], ["logits"]),
        node("LogSoftmax", ["logits"], ["y"], axis=1),
    ]
    return make_model(nodes, {"x": (FLOAT, [6, 4])}, ["y"], inits, opset=17)


def mlp_torch(x, W1, b1, W2, b2):
    h = torch.relu(torch.nn.functional.linear(x, W1, b1))
    return torch.log_softmax(h @ W2 + b2, dim=1)


def cnn_model(opset=17):
    """Conv (padded) -> BatchNormalization -> Relu -> MaxPool -> AveragePool -> Conv ->
    GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    inits = {
        "c1.w": _w(30, 4, 2, 3, 3),
        "c1.b": _w(31, 4),
        "bn.scale": _w(32, 4),
        "bn.bias": _w(33, 4),
        "bn.mean": _w(34, 4),
        "bn.var": _w(35, 4, low=0.5, high=2.0),
        "c2.w": _w(36, 3, 4, 2, 2),
        "fc.w": _w(37, 5, 3),
        "fc.b": _w(38, 5),
    }
    nodes = [
        node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"]),
        node("Relu", ["bn"], ["r"]),
        node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("AveragePool", ["p"], ["q"], kernel_shape=[2, 2], strides=[1, 1]),
        node("Conv", ["q", "c2.w"], ["c2"]),
        node("GlobalAveragePool", ["c2"], ["g"]),
        node("Flatten", ["g"], ["f"]),
        node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
        node("Softmax", ["logits"], ["y"], axis=1),
    ]
    return make_model(nodes, {"x": (FLOAT, [3, 2, 10, 10])}, ["y"], inits, opset=opset)


def cnn_torch(x, p):
    F = torch.nn.functional
    h = F.conv2d(x, p["c1.w"], p["c1.b"], padding=1)

    def channels(v):
        return v[:, None, None]

    # batch_norm's inference form, written out (torch gives no gradient to its statistics)
    h = (h - channels(p["bn.mean"])) / torch.sqrt(channels(p["bn.var"]) + 1e-5)
    h = h * channels(p["bn.scale"]) + channels(p["bn.bias"])
    h = F.avg_pool2d(F.max_pool2d(F.relu(h), 2), 2, stride=1)
    h = F.conv2d(h, p["c2.w"]).mean(dim=(2, 3))
    return torch.softmax(F.linear(h, p["fc.w"], p["fc.b"]), dim=1)


def _torch_gradients(fn, feeds, names, seed):
    tensors = {
        n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in feeds.items()
    }
    out = fn(tensors)
    out.backward(torch.tensor(seed))
    return {n: tensors[n].grad.numpy() for n in names}


def test_mlp_over_grpc(client):
    model = mlp_model()
    x = real(rng_for("mlp"), (6, 4))
    imported = from_onnx(model)
    assert imported.inputs == ("x",) and imported.outputs == ("y",)
    assert set(imported.initializers) == {"W1", "b1", "W2", "b2"}
    assert imported.graph["W1"].op == "input"  # a weight whose gradient comes back
    seed = rng_for("mlp-seed").standard_normal((6, 3)).astype(np.float32)
    r = client.gradient(imported.graph, imported.output, imported.feeds({"x": x}), seed=seed)
    (expected,) = run_ort(model, {"x": x})
    assert r.values["y"].dtype == np.float32
    np.testing.assert_allclose(r.values["y"], expected, rtol=RTOL, atol=ATOL)
    # Intermediate tensors keep their ONNX names.
    (logits,) = run_ort(_with_output(model, "logits"), {"x": x})
    np.testing.assert_allclose(r.values["logits"], logits, rtol=RTOL, atol=ATOL)
    assert {"W1", "b1", "W2", "b2", "x", "h", "a"} <= set(r.gradients)


def _with_output(model, name):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
    return copy


def test_mlp_gradients(engine):
    model = mlp_model()
    feeds = {"x": real(rng_for("mlp"), (6, 4))}
    imported, feeds64, seed, result = check_gradients(engine, model, feeds, "mlp-grad")
    if torch is not None:
        names = ["x", "W1", "b1", "W2", "b2"]
        expected = _torch_gradients(
            lambda t: mlp_torch(*(t[n] for n in names)), feeds64, names, seed
        )
        for name in names:
            np.testing.assert_allclose(
                result.gradients[name], expected[name], rtol=1e-10, atol=1e-12
            )


def test_training_the_imported_weights(client):
    """SGD on the imported initializers (updated in place) lowers the model's loss; the same
    steps in numpy give the same weights."""
    model = _loss_model()
    imported = from_onnx(model)
    params = imported.initializers
    assert all(array.flags.writeable for array in params.values())
    x = real(rng_for("train"), (6, 4))
    reference = {name: array.astype(np.float64) for name, array in params.items()}
    losses = []
    with client.session(imported.graph, "loss", wrt=list(params), fetch=["loss"]) as session:
        for _ in range(20):
            r = session.gradient(imported.feeds({"x": x}))
            losses.append(float(r.values["loss"]))
            for name in params:
                params[name] -= np.float32(0.5) * r.gradients[name]
            _numpy_sgd_step(reference, x, 0.5)
    # Down from 2.04 towards the loss's minimum, log 3 (every class equally likely).
    assert np.log(3) - 1e-6 <= losses[-1] < losses[0] - 0.9
    for name in params:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-5)


def _numpy_sgd_step(p, x, rate):
    """One SGD step of the loss model, -mean(log_softmax(relu(x W1ᵀ + b1) W2 + b2)), by hand."""
    h = x @ p["W1"].T + p["b1"]
    a = np.maximum(h, 0)
    z = a @ p["W2"] + p["b2"]
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    n, k = z.shape
    dz = (softmax * k - 1) / (n * k)  # d/dz of -mean over all n*k log-probabilities
    dh = (dz @ p["W2"].T) * (h > 0)
    grads = {"W2": a.T @ dz, "b2": dz.sum(0), "W1": dh.T @ x, "b1": dh.sum(0)}
    for name, gradient in grads.items():
        p[name] -= rate * gradient


def test_cnn_over_grpc(client):
    model = cnn_model()
    x = real(rng_for("cnn"), (3, 2, 10, 10))
    imported = from_onnx(model)
    r = client.forward(imported.graph, imported.feeds({"x": x}), fetch=["y"])
    (expected,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(r.values["y"], expected, rtol=RTOL, atol=ATOL)
    seed = rng_for("cnn-seed").standard_normal((3, 5)).astype(np.float32)
    g = client.gradient(imported.graph, "y", imported.feeds({"x": x}), seed=seed, wrt=["c1.w"])
    assert g.gradients["c1.w"].shape == (4, 2, 3, 3)


def test_cnn_gradients(engine):
    model = cnn_model()
    feeds = {"x": real(rng_for("cnn"), (3, 2, 10, 10))}
    imported, feeds64, seed, result = check_gradients(engine, model, feeds, "cnn-grad")
    if torch is not None:
        names = list(feeds64)
        expected = _torch_gradients(lambda t: cnn_torch(t["x"], t), feeds64, names, seed)
        for name in names:
            np.testing.assert_allclose(
                result.gradients[name], expected[name], rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize("opset", [11, 13, 21, 25])
def test_cnn_at_several_opsets(engine, opset):
    x = real(rng_for("cnn"), (3, 2, 10, 10))
    check_forward(engine, cnn_model(opset), {"x": x})


# ---------------------------------------------------------------------------------------------
# A model exported from PyTorch


def _export(module, x):
    """torch.onnx.export's bytes, or a skip when the exporter lacks a dependency."""
    buffer = io.BytesIO()
    options = {"input_names": ["x"], "output_names": ["y"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # the TorchScript exporter keeps the modules' parameter names
                torch.onnx.export(
                    module, (x,), buffer, dynamo=False,
                    training=torch.onnx.TrainingMode.PRESERVE, **options,
                )  # fmt: skip
            except TypeError:  # a PyTorch without the TorchScript exporter
                buffer = io.BytesIO()
                torch.onnx.export(module, (x,), buffer, **options)
    except (ImportError, ModuleNotFoundError) as error:
        pytest.skip(f"torch.onnx.export needs a package that is not installed: {error}")
    return buffer.getvalue()


class _Net(torch.nn.Module if torch is not None else object):  # type: ignore[misc]
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, groups=2),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.log_softmax(self.fc(torch.flatten(self.features(x), 1)), dim=1)


@requires_torch
def test_model_exported_from_pytorch(engine):
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # statistics that are not the initial ones
        bn = net.features[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    net.eval()
    x = torch.randn(2, 2, 8, 8)
    model = onnx.load_from_string(_export(net, x))
    imported, values = check_forward(engine, model, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(values["y"], net(x).numpy(), rtol=1e-5, atol=1e-6)

    # Gradients of the float64 model against PyTorch autograd, by parameter name.
    net64 = net.double()
    x64 = x.double().requires_grad_(True)
    model64 = onnx.load_from_string(_export(net64, x64.detach()))
    imported = from_onnx(model64)
    seed = rng_for("torch-seed").standard_normal((2, 3))
    net64.zero_grad()
    net64(x64).backward(torch.tensor(seed))
    graph = engine.load_graph(imported.graph.to_proto())
    feeds = imported.feeds({"x": x64.detach().numpy()})
    result = engine.gradient(graph, feeds, imported.output, seed=seed)
    parameters = dict(net64.named_parameters())
    compared = [name for name in imported.initializers if name in parameters]
    assert len(compared) >= 6, compared  # conv, batch norm and linear weights and biases
    for name in compared:
        np.testing.assert_allclose(
            result.gradients[name], parameters[name].grad.numpy(), rtol=1e-9, atol=1e-12
        )
    np.testing.assert_allclose(result.gradients["x"], x64.grad.numpy(), rtol=1e-9, atol=1e-12)


class _ViewNet(torch.nn.Module if torch is not None else object):  # type: ignore[misc]
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.fc = torch.nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h + torch.nn.functional.leaky_relu(self.depthwise(h), 0.1)  # a residual
        h = self.pool(h)
        h = h.view(h.size(0), -1)
        return torch.softmax(torch.clamp(self.fc(h), -1.0, 1.0), dim=-1)


@requires_torch
def test_dynamic_batch_export_from_pytorch(engine):
    """view(x.size(0), -1) exported with a batch of any size: Shape and its arithmetic."""
    torch.manual_seed(1)
    net = _ViewNet().eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, opset_version=17,
                input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}},
            )  # fmt: skip
    except (ImportError, TypeError) as error:
        pytest.skip(f"the TorchScript exporter is not available: {error}")
    model = onnx.load_from_string(buffer.getvalue())
    assert "Shape" in {n.op_type for n in model.graph.node}
    for batch in (2, 5):
        x = torch.randn(batch, 3, 8, 8)
        imported, values = check_forward(engine, model, {"x": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(values["y"], net(x).numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unsupported_op_names_the_node():
    model = make_model(
        [node("Relu", "x", ["r"]), node("Erf", ["r"], name="my_erf")], {"x": (FLOAT, [2])}, ["y"]
    )
    with pytest.raises(OnnxImportError, match=r"ONNX node 'my_erf' \(Erf\): op Erf is not supp"):
        from_onnx(model)
    unnamed = make_model([node("Relu", "x", ["r"]), node("Erf", ["r"])], {"x": (FLOAT, [2])}, ["y"])
    with pytest.raises(OnnxImportError, match=r"ONNX node #1 \(Erf, unnamed\)") as error:
        from_onnx(unnamed)
    assert (error.value.node, error.value.op_type) == ("#1", "Erf")
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("opset", [9, 10, 26])
def test_unsupported_opset(opset):
    model = make_model([node("Relu", "x")], {"x": (FLOAT, [2])}, ["y"], opset=opset)
    with pytest.raises(OnnxImportError, match=f"ONNX opset {opset} is not supported.*11 to 25"):
        from_onnx(model)
    assert SUPPORTED_OPSETS == range(11, 26)


@pytest.mark.parametrize(
    ("nodes", "shape", "inits", "message"),
    [
        (
            [node("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="pool")],
            [1, 1, 5, 5],
            {},
            r"'pool' \(MaxPool\): ceil_mode=1 is not supported where it changes",
        ),
        (
            [node("MaxPool", "x", ["y", "idx"], kernel_shape=[2, 2], name="pool")],
            [1, 1, 4, 4],
            {},
            r"output 'idx' is not supported \(the Indices output",
        ),
        (
            [node("AveragePool", "x", kernel_shape=[2, 2], dilations=[2, 2], name="pool")],
            [1, 1, 6, 6],
            {},
            r"dilations=\[2, 2\] is not supported",
        ),
        (
            [node("Conv", "xw", name="conv3d")],
            [1, 1, 4, 4, 4],
            {"w": np.ones((1, 1, 2, 2, 2), np.float32)},
            r"'conv3d' \(Conv\): an input of rank 5 is not supported",
        ),
        (
            [node("Reshape", ["x", "x"], name="r")],
            [2],
            {},
            r"'r' \(Reshape\): the shape \(input 1, 'x'\) must be a constant",
        ),
        (
            [node("LeakyRelu", "x", name="l", beta=1.0)],
            [2],
            {},
            r"'l' \(LeakyRelu\): attribute 'beta' is not supported",
        ),
        (
            [node("Cast", "x", to=TensorProto.FLOAT16, name="c")],
            [2],
            {},
            r"'c' \(Cast\): to=FLOAT16 is not supported",
        ),
        (
            [node("BatchNormalization", ["x", "s", "s", "s", "s"], training_mode=1, name="bn")],
            [2, 1],
            {"s": np.ones(1, np.float32)},
            r"'bn' \(BatchNormalization\): training_mode=1 is not supported",
        ),
        (
            [node("Add", ["x", "h"], name="add")],
            [2],
            {"h": np.ones(2, np.float16)},
            r"'add' \(Add\): tensor 'h' has dtype float16",
        ),
        (
            [node("Relu", "x", domain="com.microsoft", name="ms")],
            [2],
            {},
            r"'ms' \(Relu\): op com.microsoft.Relu is not supported",
        ),
    ],
    ids=["ceil_mode", "indices", "dilations", "conv3d", "dynamic-shape", "attribute", "cast",
         "training", "float16", "domain"],
)  # fmt: skip
def test_unsupported_attributes_and_types_name_the_node(nodes, shape, inits, message):
    model = make_model(nodes, {"x": (FLOAT, shape)}, ["y"], inits)
    with pytest.raises(OnnxImportError, match=message):
        from_onnx(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match='initializers must be "inputs" or "constants"'):
        from_onnx(mlp_model(), initializers="weights")
    with pytest.raises(TypeError, match="must be an onnx.ModelProto, a path or bytes"):
        from_onnx(42)
    two = make_model(
        [node("Relu", "x", ["a"]), node("Neg", "x", ["b"])], {"x": (FLOAT, [2])}, ["a", "b"]
    )
    imported = from_onnx(two)
    assert imported.outputs == ("a", "b")
    with pytest.raises(ValueError, match="the model has 2 outputs"):
        _ = imported.output


# ---------------------------------------------------------------------------------------------
# Paths and bytes, the optional dependency, the command line and the README


def test_path_and_bytes(tmp_path, engine):
    model = mlp_model()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    x = {"x": real(rng_for("mlp"), (6, 4))}
    expected = run_engine(engine, from_onnx(model), x)["y"]
    for source in (path, str(path), path.read_bytes()):
        np.testing.assert_array_equal(run_engine(engine, from_onnx(source), x)["y"], expected)


def test_the_sdk_never_imports_onnx():
    code = (
        "import sys, gradient_client, gradient_client.cli, gradient_client.onnx\n"
        "assert 'onnx' not in sys.modules, 'gradient_client imported onnx'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_onnx_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails
    with pytest.raises(ModuleNotFoundError, match=r"gradient-service-client\[onnx\]"):
        from_onnx(path)
    assert cli_main(["grad", str(path), "--input", "x=0"]) == 1
    assert 'needs the onnx package: pip install "gradient-service-client[onnx]"' in (
        capsys.readouterr().err
    )


def _loss_model():
    """The MLP with a scalar loss: the mean of its output's negative log-probabilities."""
    model = mlp_model()
    model.graph.node.append(node("ReduceMean", ["y"], ["nll"], keepdims=0))
    model.graph.node.append(node("Neg", ["nll"], ["loss"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("loss", FLOAT, []))
    return model


@pytest.fixture
def cli(server_address, capsys):
    def run(*args):
        code = cli_main([*args, "--target", server_address])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_grad_of_an_onnx_model(cli, tmp_path, client):
    model = _loss_model()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    x = real(rng_for("cli"), (6, 4))
    code, out, err = cli("grad", str(path), "--input", f"x={json.dumps(x.tolist())}", "--json")
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert answer["output"] == "loss"  # the model's output, not asked for
    imported = from_onnx(model)
    expected = client.gradient(imported.graph, "loss", imported.feeds({"x": x}))
    (loss,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(answer["values"]["loss"], loss, rtol=RTOL)
    for name in ("W1", "b1", "W2", "b2", "x"):  # the weights' gradients come back
        np.testing.assert_array_equal(
            np.asarray(answer["gradients"][name], np.float32), expected.gradients[name]
        )
    # The table, an initializer overridden by --input, and forward.
    code, out, _ = cli("grad", str(path), "--input", f"x={json.dumps(x.tolist())}")
    assert code == 0 and out.splitlines()[0].split() == ["node", "op", "value", "gradient"]
    assert any(line.split()[:2] == ["W1", "input"] for line in out.splitlines())
    zeros = json.dumps(np.zeros((3,)).tolist())
    code, out, _ = cli(
        "forward", str(path), "--input", f"x={json.dumps(x.tolist())}", "--input", f"b2={zeros}",
        "--fetch", "logits", "--json",
    )  # fmt: skip
    assert code == 0
    (logits,) = run_ort(_with_output(model, "logits"), {"x": x})
    b2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b2"))
    np.testing.assert_allclose(
        json.loads(out)["values"]["logits"], logits - b2, rtol=1e-5, atol=1e-6
    )


def test_cli_onnx_errors(cli, tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(make_model([node("Erf", "x", name="e")], {"x": (FLOAT, [2])}, ["y"]), path)
    code, _, err = cli("grad", str(path), "--input", "x=[1,2]")
    assert code == 1
    assert f"error: {path}: ONNX node 'e' (Erf): op Erf is not supported" in err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff not a model")
    code, _, err = cli("grad", str(garbage), "--input", "x=[1,2]")
    assert code == 1 and f"{garbage} is not an ONNX model" in err
    code, _, err = cli("grad", str(tmp_path / "none.onnx"))
    assert code == 1 and "cannot read" in err
    # A non-scalar output needs a seed, as for any graph.
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    x = np.ones((6, 4)).tolist()
    seed = str(np.ones((6, 3)).tolist())
    code, out, _ = cli(
        "grad", str(path), "--input", f"x={x}", "--seed", seed, "--json", "--wrt", "W2"
    )
    assert code == 0
    assert set(json.loads(out)["gradients"]) == {"W2"}
    code, _, err = cli("grad", str(path), "--input", f"x={x}")
    assert code == 1 and "seed" in err


def _readme_section(title: str) -> str:
    """The README's text under a heading (## or ###) up to the next one of its level or
    higher (code blocks hold no such lines)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    level = len(title.split(" ")[0])
    ends = [text.find(f"\n{'#' * n} ", start + 1) for n in range(2, level + 1)]
    return text[start : min(end for end in ends if end > 0)]


def test_readme_reference_gives_the_signatures():
    from test_docs import _actual_params, _documented_params

    reference = _readme_section("### ONNX import")
    for key, function in {
        "gradient_client.onnx.from_onnx": from_onnx,
        "imported.feeds": OnnxGraph.feeds,
    }.items():
        spans = re.findall(rf"`{re.escape(key)}(\([^`]*\))`", reference)
        assert spans, f"the README's reference does not give the signature of {key}"
        for params in spans:
            assert _documented_params(params) == _actual_params(function), key
    bullet = reference[reference.index("- `OnnxGraph`:") :]
    for name in [f.name for f in OnnxGraph.__dataclass_fields__.values()] + ["output", "feeds"]:
        assert f"`{name}`" in bullet or f"`imported.{name}" in bullet, name
    for name in ("OnnxImportError", "`node`", "`op_type`", "SUPPORTED_OPS", "SUPPORTED_OPSETS"):
        assert name in reference
    assert "range(11, 26)" in reference


def test_readme_section_lists_every_op_and_runs(server_address, capsys, monkeypatch, tmp_path):
    section = _readme_section("## Importing ONNX models")
    table = section[section.index("| ONNX op |") :]
    for op in SUPPORTED_OPS:
        assert re.search(rf"\b{op}\b", table), f"the README's table does not list {op}"
    assert "opsets 11 to 25" in section
    block = section.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(block.replace("localhost:50051", server_address), "README", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["('x', 'labels') ('loss',) ['W', 'b']", "True"]
    # The loss and its gradients, by hand.
    r, x, labels = namespace["r"], namespace["x"], namespace["labels"]
    W, b = namespace["W"], namespace["b"]
    z = x.astype(np.float64) @ W.T + b
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(r.values["loss"], -(log_p * labels).sum(), rtol=1e-6)
    p = np.exp(log_p)
    np.testing.assert_allclose(r.gradients["W"], (p - labels).T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.gradients["b"], (p - labels).sum(axis=0), rtol=1e-5, atol=1e-6)
