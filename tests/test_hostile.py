"""A hostile corpus: well over a hundred distinct bad requests, each with its exact status code.

The server under test runs as a process of its own with modest limits, so that its memory can
be read from /proc and a crash shows. Every request is sent as raw bytes on a generic channel
(no client-side checks). Each case asserts the exact status code (for a Session, the stream's
or one step's), a message of at most 1 KiB with no Python traceback that names the culprit
where it should; afterwards the lecture's request still answers exactly and the server's RSS is
within 10% of what it was after warming up (DESIGN.md sections 5 and 8, README "Errors").
"""

from __future__ import annotations

import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from server_process import (
    LECTURE_GRAPH,
    LECTURE_INPUTS,
    LECTURE_REQUEST,
    ServerProcess,
    assert_lecture,
    call_session,
    call_unary,
)

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2, tensor_pb2
from gradient_client.tensors import to_proto
from gradient_client.wire import graph_digest

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

MAX_NODES = 5000
MAX_ELEMENTS = 1_000_000
MAX_BYTES = 32 << 20
MAX_MESSAGE_MB = 4
MAX_SESSIONS = 2
MAX_CONCURRENT = 4
FLAGS = (
    f"--max-nodes={MAX_NODES}",
    f"--max-tensor-elements={MAX_ELEMENTS}",
    f"--max-bytes={MAX_BYTES}",
    "--max-check-evaluations=500",
    f"--max-message-mb={MAX_MESSAGE_MB}",
    f"--max-sessions={MAX_SESSIONS}",
    f"--max-concurrent-rpcs={MAX_CONCURRENT}",
    "--cache-mb=8",
    "--threads=4",
    "--max-op-flops=1e8",
    "--max-flops=1e9",
)
RSS_TOLERANCE = 0.10
MiB = 1 << 20
# glibc keeps freed memory in per-thread arenas and raises its mmap threshold as large blocks
# come and go, so the RSS of a process that handled a few megabyte-sized requests wanders by
# +-10% with no leak at all. Fixed thresholds and two arenas make RSS follow what the server
# really holds, which is what the memory check is about.
ALLOCATOR = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(128 << 10),
    "MALLOC_TRIM_THRESHOLD_": str(128 << 10),
}


# ---------------------------------------------------------------------------------------------
# Building requests

FLOAT64, FLOAT32, INT32, INT64, BOOL = (
    tensor_pb2.DTYPE_FLOAT64,
    tensor_pb2.DTYPE_FLOAT32,
    tensor_pb2.DTYPE_INT32,
    tensor_pb2.DTYPE_INT64,
    tensor_pb2.DTYPE_BOOL,
)
LEN, START_GROUP, END_GROUP = 2, 3, 4


def attr(value: Any) -> graph_pb2.AttrValue:
    """An AttrValue from a Python value (bool, int, float, str, list of ints or floats,
    Tensor message) or an AttrValue itself."""
    if isinstance(value, graph_pb2.AttrValue):
        return value
    if isinstance(value, tensor_pb2.Tensor):
        return graph_pb2.AttrValue(tensor=value)
    if isinstance(value, bool):
        return graph_pb2.AttrValue(b=value)
    if isinstance(value, int):
        return graph_pb2.AttrValue(i=value)
    if isinstance(value, float):
        return graph_pb2.AttrValue(f=value)
    if isinstance(value, str):
        return graph_pb2.AttrValue(s=value)
    values = list(value)
    if values and isinstance(values[0], float):
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=values))
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


def N(name: str, op: str, *inputs: str, **attrs: Any) -> graph_pb2.Node:  # noqa: N802
    node = graph_pb2.Node(name=name, op=op, inputs=list(inputs))
    for key, value in attrs.items():
        node.attrs[key].CopyFrom(attr(value))
    return node


def G(*nodes: graph_pb2.Node) -> graph_pb2.Graph:  # noqa: N802
    return graph_pb2.Graph(nodes=list(nodes))


def t(value: Any, dtype: Any = None) -> tensor_pb2.Tensor:
    return to_proto(np.asarray(value, dtype=dtype))


def raw_tensor(dtype: int, shape: list[int], **payload: Any) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, **payload)


X = N("x", "input")
Y = N("y", "input")
SUM_GRAPH = G(X, N("f", "sum", "x"))
ONE = {"x": t(1.0)}
VEC3 = {"x": t([1.0, 2.0, 3.0])}


def chain(length: int, op: str = "neg") -> tuple[graph_pb2.Graph, str]:
    """x -> op -> op -> ...: `length` nodes in all; the graph and its last node's name."""
    nodes = [N("x", "input")]
    for i in range(length - 1):
        nodes.append(N(f"n{i}", op, nodes[-1].name))
    return G(*nodes), nodes[-1].name


def cycle(length: int) -> graph_pb2.Graph:
    return G(*(N(f"n{i}", "neg", f"n{(i + 1) % length}") for i in range(length)))


def request(rpc: str, graph: graph_pb2.Graph | None = None, inputs=None, **fields: Any):
    """The `rpc`'s request message (output defaults to "f" where there is one)."""
    kinds = {
        "Forward": service_pb2.ForwardRequest,
        "Gradient": service_pb2.GradientRequest,
        "CheckGradient": service_pb2.CheckGradientRequest,
        "GradientGraph": service_pb2.GradientGraphRequest,
        "HessianVectorProduct": service_pb2.HessianVectorProductRequest,
        "JacobianVectorProduct": service_pb2.JacobianVectorProductRequest,
        "Jacobian": service_pb2.JacobianRequest,
    }
    message = kinds[rpc](**fields)
    if graph is not None:
        message.graph.CopyFrom(graph)
    for name, tensor in (inputs or {}).items():
        message.inputs[name].CopyFrom(tensor)
    return message


def lecture(rpc: str, **fields: Any):
    """The lecture's request for `rpc` (output f), with `fields` changed."""
    if rpc != "Forward":
        fields.setdefault("output", "f")
    return request(rpc, LECTURE_GRAPH, LECTURE_INPUTS, **fields)


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field, however the payload looks."""
    return tag(number, LEN) + varint(len(payload)) + payload


def nested_groups(depth: int, number: int = 99) -> bytes:
    return tag(number, START_GROUP) * depth + tag(number, END_GROUP) * depth


def garbage(seed: int, size: int, message_type: Any) -> bytes:
    """Random bytes that protobuf itself refuses as `message_type` (the first such draw)."""
    rng = random.Random(seed)
    while True:
        data = rng.randbytes(size)
        try:
            message_type.FromString(data)
        except DecodeError:
            return data


def truncated(message: Any, keep: float) -> bytes:
    """The first `keep` fraction of a message's bytes, where protobuf refuses the rest."""
    data = message.SerializeToString()
    for cut in range(int(len(data) * keep), len(data)):
        try:
            type(message).FromString(data[:cut])
        except DecodeError:
            return data[:cut]
    raise AssertionError("no truncation of the message fails to parse")


def unparseable_session_start_graph() -> bytes:
    start = field_bytes(1, nested_groups(10_000))  # SessionStart.graph
    return field_bytes(1, start)


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Case:
    """One hostile request and what it must get.

    `request` is a message or raw bytes (for Session, a list of them, one per stream message),
    or a function making it (for large requests, built only when the case runs).
    For a Session with `step=True` the stream itself ends OK and a step's StepError carries
    `code`; otherwise `code` is the status of the call (or the stream). `run`, when given,
    makes the call itself (it gets the server) and returns (code, details).
    """

    id: str
    rpc: str
    request: Any
    code: grpc.StatusCode
    fragments: tuple[str, ...] = ()
    step: bool = False
    timeout: float = 30.0
    run: Callable[[ServerProcess], tuple[grpc.StatusCode, str]] | None = None


CASES: list[Case] = []


def case(id_: str, rpc: str, req: Any, code: grpc.StatusCode, *fragments: str, **kw: Any):
    CASES.append(Case(id_, rpc, req, code, tuple(fragments), **kw))


def graph_case(id_: str, rpcs: str, graph, inputs, code, *fragments: str, **fields: Any) -> None:
    """The same bad graph sent to each of the RPCs named in `rpcs` (initials: F G C GG H JV
    J)."""
    names = {
        "F": "Forward",
        "G": "Gradient",
        "C": "CheckGradient",
        "GG": "GradientGraph",
        "H": "HessianVectorProduct",
        "JV": "JacobianVectorProduct",
        "J": "Jacobian",
    }
    for initials in rpcs.split():
        rpc = names[initials]
        extra = dict(fields)
        if rpc != "Forward":
            extra.setdefault("output", "f")
        else:
            extra.pop("output", None)
        if callable(graph):  # a large graph, built when the case runs

            def build(rpc=rpc, extra=extra):
                return request(rpc, graph(), inputs, **extra)

            case(f"{id_} [{initials}]", rpc, build, code, *fragments)
        else:
            case(f"{id_} [{initials}]", rpc, request(rpc, graph, inputs, **extra), code, *fragments)


# -- malformed graphs --------------------------------------------------------------------------

graph_case(
    "unknown op",
    "F G",
    G(X, N("f", "frobnicate", "x")),
    ONE,
    INVALID,
    "'f'",
    "frobnicate",
)
graph_case("empty op", "C", G(X, N("f", "", "x")), ONE, INVALID, "'f'")
graph_case("op differing in case", "GG", G(X, N("f", "Neg", "x")), ONE, INVALID, "'f'", "Neg")
graph_case("100 KB op name", "F H", G(N("a", "o" * 100_000)), {}, INVALID, "node 'a': unknown op")
graph_case(
    "100 KB node name",
    "F G",
    G(N("x" * 100_000, "neg", "missing")),
    {},
    INVALID,
    "(op neg)",
    "'missing'",
)
graph_case(
    "100 KB name of a missing operand",
    "C",
    G(X, N("f", "neg", "m" * 100_000)),
    ONE,
    INVALID,
    "'f'",
)
graph_case("empty node name", "F", G(X, N("", "neg", "x")), ONE, INVALID, "empty name")
graph_case(
    "duplicate node name",
    "G GG",
    G(X, N("f", "neg", "x"), N("f", "exp", "x")),
    ONE,
    INVALID,
    "'f'",
    "duplicate",
)
graph_case(
    "operand naming no node", "F H", G(X, N("f", "add", "x", "ghost")), ONE, INVALID, "ghost"
)
graph_case("self loop", "F G", G(X, N("f", "add", "x", "f")), ONE, INVALID, "'f'", "cycle")
graph_case(
    "three-node cycle",
    "C GG H",
    G(X, N("a", "add", "x", "c"), N("b", "neg", "a"), N("c", "neg", "b"), N("f", "sum", "c")),
    ONE,
    INVALID,
    "cycle",
)
graph_case(
    "2000-node cycle",
    "F G C",
    lambda: cycle(2000),
    {},
    INVALID,
    "node 'n0' (op neg) is on a cycle",
    "characters cut",
    output="n0",
)
graph_case(
    "2000-node cycle", "GG H", lambda: cycle(2000), {}, INVALID, "is on a cycle", output="n0"
)
graph_case("too few operands", "F", G(X, N("f", "add", "x")), ONE, INVALID, "'f'", "add")
graph_case("too many operands", "G", G(X, N("f", "neg", "x", "x")), ONE, INVALID, "'f'", "neg")
graph_case("operands of a source", "F", G(N("x", "input", "x")), ONE, INVALID, "'x'")
graph_case(
    "unknown attribute", "F C", G(X, N("f", "neg", "x", bogus=3)), ONE, INVALID, "'f'", "bogus"
)
graph_case(
    "100 KB attribute name",
    "GG",
    G(X, N("f", "neg", "x", **{"a" * 100_000: 1})),
    ONE,
    INVALID,
    "'f'",
)
graph_case(
    "missing required attribute", "F", G(X, N("f", "reshape", "x")), VEC3, INVALID, "'f'", "shape"
)
graph_case(
    "attribute of the wrong kind",
    "G",
    G(X, N("f", "reshape", "x", shape="six")),
    VEC3,
    INVALID,
    "'f'",
    "shape",
)
graph_case(
    "attribute with no value set",
    "F",
    G(X, N("f", "reshape", "x", shape=graph_pb2.AttrValue())),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "float where an int list is expected",
    "F",
    G(X, N("f", "reshape", "x", shape=float("nan"))),
    VEC3,
    INVALID,
    "'f'",
)
graph_case("float axis", "G", G(X, N("f", "sum", "x", axis=1.5)), VEC3, INVALID, "'f'", "axis")
graph_case("constant without value", "F", G(N("c", "constant")), {}, INVALID, "'c'", "value")
graph_case(
    "constant with a short payload",
    "G",
    G(N("c", "constant", value=raw_tensor(FLOAT64, [3], data=b"\0" * 8)), N("f", "sum", "c")),
    {},
    INVALID,
    "'c'",
)
graph_case(
    "constant claiming 2^40 elements without data",
    "F GG",
    G(N("c", "constant", value=raw_tensor(FLOAT64, [1 << 20, 1 << 20])), N("f", "sum", "c")),
    {},
    INVALID,
    "'c'",
)
graph_case(
    "constant of an unknown dtype",
    "F",
    G(N("c", "constant", value=raw_tensor(99, [1], data=b"\0" * 8))),
    {},
    INVALID,
    "'c'",
)
graph_case(
    "input declaring dtype float16",
    "F",
    G(N("x", "input", dtype="float16"), N("f", "neg", "x")),
    ONE,
    INVALID,
    "'x'",
    "float16",
)
graph_case(
    "cast to complex128",
    "G",
    G(X, N("f", "cast", "x", dtype="complex128")),
    ONE,
    INVALID,
    "'f'",
    "complex128",
)
graph_case(
    "100 KB dtype string",
    "F",
    G(X, N("f", "cast", "x", dtype="d" * 100_000)),
    ONE,
    INVALID,
    "'f'",
)
graph_case(
    "cross_entropy reduction unknown",
    "F",
    G(X, N("k", "input"), N("f", "cross_entropy", "x", "k", reduction="median")),
    {"x": t(np.zeros((2, 3))), "k": t([0, 1])},
    INVALID,
    "'f'",
    "reduction",
)
graph_case(
    "cross_entropy label_smoothing above 1",
    "F G",
    G(X, N("k", "input"), N("f", "cross_entropy", "x", "k", label_smoothing=1.5)),
    {"x": t(np.zeros((2, 3))), "k": t([0, 1])},
    INVALID,
    "'f'",
    "label_smoothing",
)
graph_case(
    "cross_entropy label_smoothing below 0",
    "F",
    G(X, N("k", "input"), N("f", "cross_entropy", "x", "k", label_smoothing=-0.1)),
    {"x": t(np.zeros((2, 3))), "k": t(np.full((2, 3), 1 / 3))},
    INVALID,
    "'f'",
    "label_smoothing",
)

# -- huge attribute lists ---------------------------------------------------------------------
# Refused before the list is converted (a list attribute holds at most 128 values), so none of
# them costs the server memory or stays cached.

graph_case(
    "reshape shape of 3M entries",
    "F",
    lambda: G(X, N("f", "reshape", "x", shape=[1] * 3_000_000)),
    VEC3,
    INVALID,
    "node 'f' (op reshape)",
)
graph_case(
    "transpose axes of 2M entries",
    "G",
    lambda: G(X, N("f", "transpose", "x", axes=[1] * 2_000_000)),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "unknown attribute of 400k floats",
    "F",
    lambda: G(X, N("f", "neg", "x", bogus=[0.5] * 400_000)),
    VEC3,
    INVALID,
    "'f'",
    "bogus",
)
graph_case(
    "slice starts of 2M entries",
    "GG",
    lambda: G(X, N("f", "slice", "x", starts=[0] * 2_000_000, stops=[1])),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "pad pads of 2M entries",
    "F",
    lambda: G(X, N("f", "pad", "x", pads=[0] * 2_000_000)),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "sum over 1M axes",
    "C H",
    lambda: G(X, N("f", "sum", "x", axis=[0] * 1_000_000)),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "zeros of rank 1M",
    "F",
    lambda: G(N("f", "zeros", shape=[1] * 1_000_000, dtype="float64")),
    {},
    INVALID,
    "'f'",
)
graph_case(
    "conv2d stride of 1M entries",
    "F",
    lambda: G(X, Y, N("f", "conv2d", "x", "y", stride=[1] * 1_000_000)),
    {"x": t(np.ones((1, 1, 3, 3))), "y": t(np.ones((1, 1, 1, 1)))},
    INVALID,
    "'f'",
)
graph_case(
    "expand_dims of 70 axes",
    "F",
    G(X, N("f", "expand_dims", "x", axis=list(range(70)))),
    ONE,
    INVALID,
    "'f'",
)
graph_case(
    "reshape to rank 65", "G", G(X, N("f", "reshape", "x", shape=[1] * 65)), ONE, INVALID, "'f'"
)

# -- shapes and dtypes -------------------------------------------------------------------------

graph_case(
    "add of mismatched shapes",
    "F G",
    G(X, Y, N("f", "add", "x", "y")),
    {"x": t(np.zeros((2, 3))), "y": t(np.zeros(4))},
    INVALID,
    "'f'",
    "[2, 3]",
    "[4]",
)
graph_case(
    "matmul of mismatched shapes",
    "GG",
    G(X, Y, N("f", "matmul", "x", "y")),
    {"x": t(np.zeros((2, 3))), "y": t(np.zeros((2, 3)))},
    INVALID,
    "'f'",
    "matmul",
)
graph_case(
    "reshape to a wrong size",
    "F",
    G(X, N("f", "reshape", "x", shape=[4, 2])),
    {"x": t(np.zeros((2, 3)))},
    INVALID,
    "'f'",
    "[4, 2]",
)
graph_case(
    "reshape with two -1",
    "C",
    G(X, N("f", "reshape", "x", shape=[-1, -1])),
    {"x": t(np.zeros((2, 3)))},
    INVALID,
    "'f'",
)
graph_case(
    "reshape to a size overflowing int64",
    "F",
    G(X, N("f", "reshape", "x", shape=[2**62, 4, -1])),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "transpose with a repeated axis",
    "F",
    G(X, N("f", "transpose", "x", axes=[0, 0])),
    {"x": t(np.zeros((2, 3)))},
    INVALID,
    "'f'",
)
graph_case(
    "sum over an axis out of range", "G", G(X, N("f", "sum", "x", axis=5)), VEC3, INVALID, "'f'"
)
graph_case(
    "softmax over an axis out of range",
    "H",
    G(X, N("s", "softmax", "x", axis=-7), N("f", "sum", "s")),
    VEC3,
    INVALID,
    "'s'",
)
graph_case(
    "concat of mismatched shapes",
    "F",
    G(X, Y, N("f", "concat", "x", "y", axis=0)),
    {"x": t(np.zeros((2, 3))), "y": t(np.zeros((2, 4)))},
    INVALID,
    "'f'",
)
graph_case(
    "stack of mismatched shapes",
    "GG",
    G(X, Y, N("f", "stack", "x", "y")),
    {"x": t(np.zeros(2)), "y": t(np.zeros(3))},
    INVALID,
    "'f'",
)
graph_case(
    "squeeze of an axis that is not 1",
    "F",
    G(X, N("f", "squeeze", "x", axis=0)),
    {"x": t(np.zeros((2, 3)))},
    INVALID,
    "'f'",
)
graph_case("var with ddof = N", "G", G(X, N("f", "var", "x", ddof=3)), VEC3, INVALID, "'f'")
graph_case(
    "unslice to a negative shape",
    "F",
    G(X, N("f", "unslice", "x", shape=[-1], starts=[0], stops=[1])),
    {"x": t(np.zeros(0))},
    INVALID,
    "'f'",
)
graph_case(
    "sum_to_shape to a shape that does not broadcast",
    "F",
    G(X, N("f", "sum_to_shape", "x", shape=[4])),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "where with a float condition",
    "F",
    G(X, N("f", "where", "x", "x", "x")),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "logical_and of floats",
    "F",
    G(X, N("f", "logical_and", "x", "x")),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "take with float indices",
    "G",
    G(X, N("i", "constant", value=t([0.0, 1.0])), N("f", "take", "x", "i")),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "cross_entropy with float labels not of the logits' shape",
    "G",
    G(X, Y, N("f", "cross_entropy", "x", "y")),
    {"x": t(np.zeros((2, 3))), "y": t([0.0, 1.0])},
    INVALID,
    "'f'",
)
graph_case(
    "int pad with a NaN value",
    "F",
    G(X, N("f", "pad", "x", pads=[1, 1], value=float("nan"))),
    {"x": t([1, 2])},
    INVALID,
    "'f'",
)

# -- out-of-range indices (data-dependent: checked when the op runs) ---------------------------

graph_case(
    "take of index 10 from 3",
    "F",
    G(X, N("i", "constant", value=t([0, 10])), N("f", "take", "x", "i")),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "take of index 10 from 3, seeded",
    "G",
    G(X, N("i", "constant", value=t([0, 10])), N("f", "take", "x", "i")),
    VEC3,
    INVALID,
    "'f'",
    "index 10",
    seed=t(np.ones(2)),
)
graph_case(
    "take of index -10 from 3",
    "F",
    G(X, N("i", "constant", value=t([-10])), N("f", "take", "x", "i")),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "take of a fed index 2^62",
    "G",
    G(X, Y, N("f", "take", "x", "y")),
    {"x": t([1.0, 2.0, 3.0]), "y": t([2**62])},
    INVALID,
    "'f'",
)
graph_case(
    "scatter_add to index 5 of 3",
    "F",
    G(X, N("i", "constant", value=t([5])), N("f", "scatter_add", "x", "i", shape=[3])),
    {"x": t([1.0])},
    INVALID,
    "'f'",
)
graph_case(
    "cross_entropy label 7 of 3 classes",
    "G",
    G(X, Y, N("f", "cross_entropy", "x", "y")),
    {"x": t(np.zeros((2, 3))), "y": t([0, 7])},
    INVALID,
    "'f'",
)
graph_case(
    "cross_entropy label -1",
    "C",
    G(X, Y, N("f", "cross_entropy", "x", "y")),
    {"x": t(np.zeros((2, 3))), "y": t([0, -1])},
    INVALID,
    "'f'",
)

# -- axes and attributes out of range ---------------------------------------------------------

M23 = {"x": t(np.zeros((2, 3)))}
for id_, rpcs, graph, inputs in [
    ("one_hot of index 5 at depth 3", "F", G(X, N("f", "one_hot", "x", depth=3)), {"x": t([5])}),
    ("one_hot of depth -1", "GG", G(X, N("f", "one_hot", "x", depth=-1)), {"x": t([0])}),
    (
        "one_hot of dtype str",
        "F",
        G(X, N("f", "one_hot", "x", depth=3, dtype="str")),
        {"x": t([0])},
    ),
    (
        "take along axis 2^62",
        "GG",
        G(X, N("i", "constant", value=t([0])), N("f", "take", "x", "i", axis=2**62)),
        VEC3,
    ),
    (
        "scatter_add to index -5 of 3",
        "F",
        G(X, N("i", "constant", value=t([-5])), N("f", "scatter_add", "x", "i", shape=[3])),
        {"x": t([1.0])},
    ),
    ("pad of (-5, -5)", "C", G(X, N("f", "pad", "x", pads=[-5, -5])), VEC3),
    ("var with ddof 2^62", "C", G(X, N("f", "var", "x", ddof=2**62)), VEC3),
    ("expand_dims at axis 2^62", "GG", G(X, N("f", "expand_dims", "x", axis=2**62)), VEC3),
    ("concat along axis 5", "C", G(X, N("f", "concat", "x", "x", axis=5)), VEC3),
    ("stack along axis -100", "GG", G(X, N("f", "stack", "x", "x", axis=-100)), VEC3),
    ("squeeze of axis 2^40", "F", G(X, N("f", "squeeze", "x", axis=2**40)), VEC3),
    ("prod_others along axis 9", "C", G(X, N("f", "prod_others", "x", axis=9)), VEC3),
    (
        "flatten with start after end",
        "GG",
        G(X, N("f", "flatten", "x", start_axis=1, end_axis=0)),
        M23,
    ),
    ("input declaring shape [-3]", "H", G(N("x", "input", shape=[-3]), N("f", "neg", "x")), ONE),
    (
        "input declaring its dtype as an int",
        "GG",
        G(N("x", "input", dtype=3), N("f", "neg", "x")),
        ONE,
    ),
    (
        "where with an int condition",
        "GG",
        G(X, N("c", "constant", value=t([1, 0, 1])), N("f", "where", "c", "x", "x")),
        VEC3,
    ),
    ("matmul of scalars", "C", G(X, N("f", "matmul", "x", "x")), ONE),
    ("max of an empty axis", "F", G(X, N("f", "max", "x")), {"x": t(np.zeros(0))}),
    ("argmax of an empty tensor", "F", G(X, N("f", "argmax", "x")), {"x": t(np.zeros(0))}),
    ("min of an empty int tensor", "F", G(X, N("f", "min", "x")), {"x": t(np.zeros(0, np.int32))}),
    (
        "take from an empty axis",
        "G",
        G(X, N("i", "constant", value=t([0])), N("f", "take", "x", "i")),
        {"x": t(np.zeros(0))},
    ),
    (
        "cross_entropy over 0 classes",
        "G",
        G(X, Y, N("f", "cross_entropy", "x", "y")),
        {"x": t(np.zeros((2, 0))), "y": t(np.zeros(2, np.int64))},
    ),
    (
        "conv2d of mismatched channels",
        "GG",
        G(X, Y, N("f", "conv2d", "x", "y")),
        {"x": t(np.ones((1, 2, 4, 4))), "y": t(np.ones((1, 3, 2, 2)))},
    ),
    (
        "conv2d kernel larger than the input",
        "C",
        G(X, Y, N("f", "conv2d", "x", "y")),
        {"x": t(np.ones((1, 1, 2, 2))), "y": t(np.ones((1, 1, 3, 3)))},
    ),
    (
        "max_pool2d kernel larger than the input",
        "GG",
        G(X, N("f", "max_pool2d", "x", kernel=[5])),
        {"x": t(np.ones((1, 1, 4, 4)))},
    ),
    (
        "avg_pool2d padding over half the kernel",
        "C",
        G(X, N("f", "avg_pool2d", "x", kernel=[2], padding=[3])),
        {"x": t(np.ones((1, 1, 4, 4)))},
    ),
]:
    graph_case(id_, rpcs, graph, inputs, INVALID, "'f'" if "input declaring" not in id_ else "'x'")
case("an int seed", "Gradient", lecture("Gradient", seed=t(1)), INVALID, "seed")
case("a bool seed", "Gradient", lecture("Gradient", seed=t(True)), INVALID, "seed")
case(
    "GradientGraph fed 2^30 elements claimed without data",
    "GradientGraph",
    request("GradientGraph", SUM_GRAPH, {"x": raw_tensor(FLOAT64, [1 << 30])}, output="f"),
    INVALID,
    "'x'",
)

# -- zero and negative strides, windows --------------------------------------------------------

IMAGE = {"x": t(np.ones((1, 1, 4, 4))), "y": t(np.ones((1, 1, 2, 2)))}
IMAGE_ONLY = {"x": IMAGE["x"]}
graph_case(
    "conv2d stride 0",
    "F G",
    G(X, Y, N("f", "conv2d", "x", "y", stride=[0])),
    IMAGE,
    INVALID,
    "'f'",
)
graph_case(
    "conv2d dilation 0",
    "F",
    G(X, Y, N("f", "conv2d", "x", "y", dilation=[0])),
    IMAGE,
    INVALID,
    "'f'",
)
graph_case(
    "conv2d negative padding",
    "GG",
    G(X, Y, N("f", "conv2d", "x", "y", padding=[-1])),
    IMAGE,
    INVALID,
    "'f'",
)
graph_case(
    "max_pool2d stride 0",
    "F",
    G(X, N("f", "max_pool2d", "x", kernel=[2], stride=[0])),
    IMAGE_ONLY,
    INVALID,
    "'f'",
)
graph_case(
    "avg_pool2d kernel 0",
    "G",
    G(X, N("f", "avg_pool2d", "x", kernel=[0])),
    IMAGE_ONLY,
    INVALID,
    "'f'",
)
graph_case(
    "max_pool2d negative stride",
    "F",
    G(X, N("f", "max_pool2d", "x", kernel=[2], stride=[-2])),
    IMAGE_ONLY,
    INVALID,
    "'f'",
)
graph_case(
    "slice step 0",
    "F G",
    G(X, N("f", "slice", "x", starts=[0], stops=[3], steps=[0])),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "unslice step 0",
    "F",
    G(X, N("f", "unslice", "x", shape=[3], starts=[0], stops=[3], steps=[0])),
    VEC3,
    INVALID,
    "'f'",
)
graph_case(
    "conv2d of a 3-d input",
    "F",
    G(X, Y, N("f", "conv2d", "x", "y")),
    {"x": t(np.ones((1, 4, 4))), "y": t(np.ones((1, 1, 2, 2)))},
    INVALID,
    "'f'",
)

# -- limits: broadcast blow-ups, huge shapes, deep graphs -------------------------------------

graph_case(
    "broadcast add blowing up to 10^10 elements",
    "F G",
    G(X, Y, N("f", "add", "x", "y")),
    {"x": t(np.zeros((100_000, 1))), "y": t(np.zeros((1, 100_000)))},
    EXHAUSTED,
    "'f'",
    "max_tensor_elements",
)
graph_case(
    "zeros feeding a huge matmul",
    "F G",
    G(
        N("a", "zeros", shape=[2000, 500], dtype="float64"),
        N("b", "zeros", shape=[500, 2000], dtype="float64"),
        N("m", "matmul", "a", "b"),
        N("f", "sum", "m"),
    ),
    {},
    EXHAUSTED,
    "'m'",
    "max_tensor_elements",
)
graph_case(
    "zeros feeding a matmul over max_op_flops",
    "F",
    G(
        N("a", "zeros", shape=[900, 1000], dtype="float64"),
        N("b", "zeros", shape=[1000, 900], dtype="float64"),
        N("m", "matmul", "a", "b"),
        N("f", "sum", "m"),
    ),
    {},
    EXHAUSTED,
    "'m'",
    "max_op_flops",
)
graph_case(
    "a chain of matmuls over max_flops",
    "F",
    G(
        N("w", "zeros", shape=[200, 200], dtype="float64"),
        N("m0", "matmul", "w", "w"),
        *(N(f"m{i}", "matmul", f"m{i - 1}", "w") for i in range(1, 80)),
        N("f", "sum", "m79"),
    ),
    {},
    EXHAUSTED,
    "max_flops",
)
graph_case(
    "zeros of 2^124 elements",
    "F",
    G(N("f", "zeros", shape=[2**62, 2**62], dtype="float32")),
    {},
    EXHAUSTED,
    "'f'",
    "max_tensor_elements",
)
graph_case(
    "one_hot of depth 2^40",
    "F",
    G(X, N("f", "one_hot", "x", depth=2**40)),
    {"x": t([1, 2])},
    EXHAUSTED,
    "'f'",
)
graph_case(
    "values over max_bytes",
    "F",
    G(
        N("a", "zeros", shape=[1000, 1000], dtype="float64"),
        N("b", "square", "a"),
        N("c", "square", "b"),
        N("d", "square", "c"),
        N("f", "square", "d"),
    ),
    {},
    EXHAUSTED,
    "max_bytes",
)
graph_case(
    "a 10,000-deep chain over max_nodes",
    "F G",
    lambda: chain(10_000)[0],
    ONE,
    EXHAUSTED,
    "max_nodes",
    output="n9998",
)
graph_case(
    "a 4,999-deep chain ending in a missing operand",
    "G",
    lambda: G(*chain(4998)[0].nodes, N("f", "add", "n4996", "ghost")),
    ONE,
    INVALID,
    "'f'",
    "ghost",
)
graph_case(
    "a fed bool tensor over max_tensor_elements",
    "F",
    G(X, N("f", "logical_not", "x")),
    {"x": t(np.zeros(MAX_ELEMENTS + 1, bool))},
    EXHAUSTED,
    "'x'",
    "max_tensor_elements",
)
graph_case(
    "a bool constant over max_tensor_elements",
    "F",
    G(N("c", "constant", value=t(np.zeros(MAX_ELEMENTS + 1, bool))), N("f", "logical_not", "c")),
    {},
    EXHAUSTED,
    "'c'",
    "max_tensor_elements",
)
case(
    "a response over max_message_mb [F]",
    "Forward",
    request("Forward", G(N("f", "zeros", shape=[600_000], dtype="float64"))),
    EXHAUSTED,
    "max_message_mb",
)
case(
    "a request over max_message_mb",
    "Forward",
    request("Forward", G(X, N("f", "neg", "x")), {"x": t(np.zeros(600_000))}),
    EXHAUSTED,
)

# -- tensors and feeds -------------------------------------------------------------------------

NEG = G(X, N("f", "neg", "x"))
SUM = G(X, N("f", "sum", "x"))
bad_feeds = {
    "payload of the wrong length": (raw_tensor(FLOAT64, [2, 3], data=b"\0" * 40), ("'x'", "48")),
    "a partial element": (raw_tensor(FLOAT32, [2], data=b"\0" * 7), ("'x'",)),
    "2^40 elements claimed without data": (raw_tensor(FLOAT64, [1 << 20, 1 << 20]), ("'x'",)),
    "2^124 elements claimed without data": (raw_tensor(FLOAT64, [2**62, 2**62]), ("'x'",)),
    "2^63-1 elements claimed with 8 bytes": (
        raw_tensor(FLOAT64, [2**63 - 1], data=b"\0" * 8),
        ("'x'",),
    ),
    "list form of the wrong count": (
        raw_tensor(FLOAT64, [3], float_values=[1.0, 2.0]),
        ("'x'", "float_values"),
    ),
    "list form of the wrong kind": (raw_tensor(FLOAT64, [2], int_values=[1, 2]), ("'x'",)),
    "bool list for an int tensor": (raw_tensor(INT64, [1], bool_values=[True]), ("'x'",)),
    "two payload forms": (
        raw_tensor(FLOAT64, [1], data=b"\0" * 8, float_values=[0.0]),
        ("'x'", "float_values"),
    ),
    "no dtype": (raw_tensor(0, [1], float_values=[1.0]), ("'x'", "dtype")),
    "dtype 99": (raw_tensor(99, [1], data=b"\0" * 8), ("'x'",)),
    "a negative dimension": (raw_tensor(FLOAT64, [-1]), ("'x'", "negative")),
    "a nonzero tensor without payload": (raw_tensor(FLOAT64, [2]), ("'x'", "payload")),
    "bool bytes other than 0 and 1": (raw_tensor(BOOL, [2], data=b"\x00\x02"), ("'x'",)),
    "rank 65": (raw_tensor(FLOAT64, [1] * 65, data=b"\0" * 8), ("'x'",)),
    "zero size with a 2^62 dimension": (raw_tensor(FLOAT64, [0, 2**62 + 1]), ("'x'",)),
    "int32 list value over int32": (raw_tensor(INT32, [1], int_values=[2**40]), ("'x'",)),
}
for index, (name, (tensor, fragments)) in enumerate(bad_feeds.items()):
    rpc = ["F", "G", "C", "GG", "H"][index % 5]
    graph_case(f"feed: {name}", rpc, SUM, {"x": tensor}, INVALID, *fragments)

graph_case("missing feed", "F H", G(X, Y, N("f", "add", "x", "y")), ONE, INVALID, "'y'")
graph_case(
    "feed for a name that is no node",
    "G",
    NEG,
    {"x": t(1.0), "stranger": t(2.0)},
    INVALID,
    "'stranger'",
)
graph_case(
    "feed with a 100 KB name",
    "F",
    NEG,
    {"x": t(1.0), "s" * 100_000: t(2.0)},
    INVALID,
)
graph_case(
    "feed for a node that is not an input",
    "C",
    G(X, N("f", "sum", "x")),
    {"x": t(1.0), "f": t(2.0)},
    INVALID,
    "'f'",
)
graph_case(
    "feed against the declared dtype",
    "F",
    G(N("x", "input", dtype="float32"), N("f", "neg", "x")),
    ONE,
    INVALID,
    "'x'",
    "float32",
)
graph_case(
    "feed against the declared shape",
    "G",
    G(N("x", "input", shape=[2]), N("f", "sum", "x")),
    VEC3,
    INVALID,
    "'x'",
    "[2]",
    "[3]",
)

# -- the request's own fields ------------------------------------------------------------------

case("Gradient without output", "Gradient", lecture("Gradient", output=""), INVALID, "output")
case("output naming no node", "Gradient", lecture("Gradient", output="nowhere"), INVALID, "nowhere")
case(
    "100 KB output name",
    "CheckGradient",
    lecture("CheckGradient", output="o" * 100_000),
    INVALID,
    "output",
)
case(
    "non-scalar output without seed",
    "Gradient",
    request("Gradient", G(X, N("f", "neg", "x")), VEC3, output="f"),
    INVALID,
    "'f'",
    "seed",
)
case(
    "seed of the wrong shape",
    "Gradient",
    request("Gradient", G(X, N("f", "neg", "x")), VEC3, output="f", seed=t(np.ones(4))),
    INVALID,
    "'f'",
    "seed",
)
case(
    "non-scalar seed of a scalar output",
    "Gradient",
    lecture("Gradient", seed=t(np.ones(3))),
    INVALID,
    "seed",
)
case(
    "seed with a bad payload",
    "Gradient",
    lecture("Gradient", seed=raw_tensor(FLOAT64, [], data=b"\0" * 4)),
    INVALID,
    "seed",
)
case(
    "seed claiming 2^40 elements without data",
    "CheckGradient",
    lecture("CheckGradient", seed=raw_tensor(FLOAT64, [1 << 20, 1 << 20])),
    INVALID,
    "seed",
)
case(
    "int output differentiated",
    "Gradient",
    request("Gradient", G(X, N("f", "sum", "x")), {"x": t([1, 2])}, output="f"),
    INVALID,
    "'f'",
    "int64",
)
case(
    "bool output differentiated",
    "HessianVectorProduct",
    request("HessianVectorProduct", G(X, N("f", "greater", "x", "x")), ONE, output="f"),
    INVALID,
    "'f'",
    "bool",
)
case("wrt naming no node", "Gradient", lecture("Gradient", wrt=["ghost"]), INVALID, "'ghost'")
case(
    "wrt naming no node", "GradientGraph", lecture("GradientGraph", wrt=["ghost"]), INVALID, "ghost"
)
case("fetch naming no node", "Forward", lecture("Forward", fetch=["phantom"]), INVALID, "phantom")
case("100 KB fetch name", "Gradient", lecture("Gradient", fetch=["p" * 100_000]), INVALID, "fetch")
for rpc in (
    "Forward",
    "Gradient",
    "CheckGradient",
    "GradientGraph",
    "HessianVectorProduct",
    "JacobianVectorProduct",
    "Jacobian",
):
    case(
        "graph and graph_digest both set",
        rpc,
        lecture(rpc, graph_digest=graph_digest(LECTURE_GRAPH.SerializeToString())),
        INVALID,
        "graph_digest",
    )
    case(
        "an unknown graph digest",
        rpc,
        service_pb2.ForwardRequest(graph_digest="0" * 64)
        if rpc == "Forward"
        else request(rpc, None, LECTURE_INPUTS, output="f", graph_digest="ab" * 32),
        NOT_FOUND,
        "send the graph",
    )
case(
    "a 100 KB graph digest",
    "Gradient",
    request("Gradient", None, LECTURE_INPUTS, output="f", graph_digest="d" * 100_000),
    NOT_FOUND,
)

# -- CheckGradient settings --------------------------------------------------------------------

CUBE = G(X, N("c", "mul", "x", "x"), N("f", "sum", "c"))
for name, settings in {"eps 0": {"eps": 0.0}, "eps negative": {"eps": -1e-6}}.items():
    case(
        f"CheckGradient with {name}",
        "CheckGradient",
        request("CheckGradient", CUBE, VEC3, output="f", **settings),
        INVALID,
        name.split()[0],
    )
case(
    "CheckGradient of 2^62 directions",
    "CheckGradient",
    request("CheckGradient", CUBE, VEC3, output="f", directions=2**62),
    EXHAUSTED,
    "max_check_evaluations",
)
case(
    "CheckGradient of 1000 elements (2000 passes)",
    "CheckGradient",
    request("CheckGradient", CUBE, {"x": t(np.ones(1000))}, output="f"),
    EXHAUSTED,
    "max_check_evaluations",
)
case(
    "CheckGradient of an int output",
    "CheckGradient",
    request("CheckGradient", G(X, N("f", "sum", "x")), {"x": t([1, 2])}, output="f"),
    INVALID,
    "'f'",
)

# -- HessianVectorProduct ----------------------------------------------------------------------

case(
    "HVP of a non-scalar output",
    "HessianVectorProduct",
    request("HessianVectorProduct", G(X, N("f", "mul", "x", "x")), VEC3, output="f"),
    INVALID,
    "'f'",
)
case(
    "HVP vector of the wrong shape",
    "HessianVectorProduct",
    request("HessianVectorProduct", CUBE, VEC3, output="f", vector={"x": t(np.ones(4))}),
    INVALID,
    "'x'",
)
case(
    "HVP vector for no node",
    "HessianVectorProduct",
    lecture("HessianVectorProduct", vector={"ghost": t(1.0)}),
    INVALID,
    "ghost",
)
case(
    "HVP vector for a computed node",
    "HessianVectorProduct",
    lecture("HessianVectorProduct", vector={"q": t(1.0)}),
    INVALID,
    "'q'",
)
case(
    "HVP vector of ints",
    "HessianVectorProduct",
    lecture("HessianVectorProduct", vector={"x": t(1)}),
    INVALID,
    "'x'",
)
case(
    "HVP vector claiming 2^40 elements without data",
    "HessianVectorProduct",
    lecture("HessianVectorProduct", vector={"x": raw_tensor(FLOAT64, [1 << 20, 1 << 20])}),
    INVALID,
    "'x'",
)

# -- JacobianVectorProduct ---------------------------------------------------------------------

JVP = "JacobianVectorProduct"
INT_INPUT = G(X, N("f", "cast", "x", dtype="float64"))  # x fed ints, f float
BATCHED = {"batched_tangents": True}


def jvp(graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, **fields: Any):
    fields.setdefault("output", "f")
    return request(JVP, graph, inputs, **fields)


case(
    "JVP tangent of the wrong shape",
    JVP,
    jvp(CUBE, VEC3, tangents={"x": t(np.ones(4))}),
    INVALID,
    "'x'",
    "[4]",
    "[3]",
)
case("JVP tangent of ints", JVP, jvp(tangents={"x": t(1)}), INVALID, "'x'", "int64")
case("JVP tangent of bools", JVP, jvp(tangents={"y": t(True)}), INVALID, "'y'", "bool")
case(
    "JVP tangent for a computed node",
    JVP,
    jvp(tangents={"q": t(1.0)}),
    INVALID,
    "'q'",
    "not an input",
)
case("JVP tangent for no node", JVP, jvp(tangents={"ghost": t(1.0)}), INVALID, "'ghost'")
case(
    "JVP tangent for an int input",
    JVP,
    jvp(INT_INPUT, {"x": t([1, 2])}, tangents={"x": t([1.0, 1.0])}),
    INVALID,
    "'x'",
    "int64",
)
case(
    "JVP tangent with a short payload",
    JVP,
    jvp(tangents={"x": raw_tensor(FLOAT64, [], data=b"\0" * 4)}),
    INVALID,
    "'x'",
)
case(
    "JVP tangent claiming 2^40 elements without data",
    JVP,
    jvp(tangents={"x": raw_tensor(FLOAT64, [1 << 20, 1 << 20])}),
    INVALID,
    "'x'",
)
case("JVP without output", JVP, jvp(output=""), INVALID, "output")
case("JVP output naming no node", JVP, jvp(output="nowhere"), INVALID, "nowhere")
case(
    "JVP of an int output",
    JVP,
    jvp(G(X, N("f", "sum", "x")), {"x": t([1, 2])}),
    INVALID,
    "'f'",
    "int64",
)
case("JVP tangents_of naming no node", JVP, jvp(tangents_of=["ghost"]), INVALID, "ghost")
case(
    "JVP tangents_of an int node",
    JVP,
    jvp(G(X, N("i", "cast", "x", dtype="int64"), N("f", "neg", "x")), ONE, tangents_of=["i"]),
    INVALID,
    "'i'",
    "int64",
)
case("JVP fetch naming no node", JVP, jvp(fetch=["phantom"]), INVALID, "phantom")
case(
    "JVP batched tangents of different K",
    JVP,
    jvp(tangents={"x": t(np.ones(2)), "y": t(np.ones(3))}, **BATCHED),
    INVALID,
    "disagree on K",
    "2 rows for input 'x'",
    "3 for input 'y'",
)
case(
    "JVP batched tangent without its K axis",
    JVP,
    jvp(tangents={"x": t(1.0)}, **BATCHED),
    INVALID,
    "'x'",
    "[K]",
)
case("JVP batched tangents, none sent", JVP, jvp(**BATCHED), INVALID, "at least one tangent")
case(
    "JVP batched tangents with K = 0: no products",
    JVP,
    jvp(tangents={"x": t(np.ones(0))}, **BATCHED),
    OK,
)
# 400 tangents of x, each making a 400 x 1000 tangent of y: 1.6e8 stacked elements
BROADCAST = G(X, N("y", "broadcast_to", "x", shape=[400, 1000]), N("f", "sum", "y"))
case(
    "JVP of K = 400 stacked tangents of 400,000 elements",
    JVP,
    jvp(
        BROADCAST,
        {"x": t(np.ones(1000))},
        tangents={"x": t(np.ones((400, 1000)), np.float32)},
        tangents_of=["y"],
        **BATCHED,
    ),
    EXHAUSTED,
    "400 stacked results",
    "max_tensor_elements",
)
# 100,000 tangents, each a pass over 100,000 exps: about 1e13 flops
EXPS = G(X, N("y", "broadcast_to", "x", shape=[100, 1000]), N("e", "exp", "y"), N("f", "sum", "e"))
case(
    "JVP of K = 100,000 products over max_flops",
    JVP,
    jvp(EXPS, ONE, tangents={"x": t(np.ones(100_000))}, **BATCHED),
    EXHAUSTED,
    "100000 products",
    "max_flops",
)
# 900 stacked tangents of 6 nodes of 1000 float64 each: 43 MB, each under the element limit
# (exp, so that each node's tangent is a node of its own)
NEGS = G(
    X, *(N(f"n{i}", "exp", "x" if i == 0 else f"n{i - 1}") for i in range(4)), N("f", "exp", "n3")
)
case(
    "JVP of 900 stacked tangents of every node over max_bytes",
    JVP,
    jvp(
        NEGS,
        {"x": t(np.ones(1000))},
        tangents={"x": t(np.ones((900, 1000)), np.float32)},
        all_tangents=True,
        **BATCHED,
    ),
    EXHAUSTED,
    "max_bytes",
)

# -- Jacobian ----------------------------------------------------------------------------------


def jac(graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, **fields: Any):
    fields.setdefault("output", "f")
    return request("Jacobian", graph, inputs, **fields)


REVERSE, FORWARD = service_pb2.JACOBIAN_MODE_REVERSE, service_pb2.JACOBIAN_MODE_FORWARD
case("Jacobian of an unknown mode", "Jacobian", jac(mode=7), INVALID, "mode", "7")
case("Jacobian wrt a computed node", "Jacobian", jac(wrt=["q"]), INVALID, "'q'", "input")
case("Jacobian wrt no node", "Jacobian", jac(wrt=["ghost"]), INVALID, "ghost")
case(
    "Jacobian wrt an int input",
    "Jacobian",
    jac(
        G(X, Y, N("c", "cast", "y", dtype="float64"), N("f", "add", "x", "c")),
        {"x": t(1.0), "y": t(2)},
        wrt=["y"],
    ),
    INVALID,
    "'y'",
    "int64",
)
case(
    "Jacobian of an int output",
    "Jacobian",
    jac(G(X, N("f", "sum", "x")), {"x": t([1, 2])}),
    INVALID,
    "'f'",
    "int64",
)
case("Jacobian without output", "Jacobian", jac(output=""), INVALID, "output")
case("Jacobian output naming no node", "Jacobian", jac(output="nowhere"), INVALID, "nowhere")
case(
    "Jacobian of 400,000 outputs by reverse mode",
    "Jacobian",
    jac(BROADCAST, {"x": t(np.ones(1000))}, output="y", mode=REVERSE),
    EXHAUSTED,
    "reverse mode",
    "400000 products",
    "max_tensor_elements",
)
case(
    "Jacobian of 100,000 inputs by forward mode",
    "Jacobian",
    jac(SUM, {"x": t(np.ones(100_000))}, mode=FORWARD),
    EXHAUSTED,
    "forward mode",
    "100000 products",
    "max_tensor_elements",
)
case(
    "Jacobian of 400,000 outputs by 1000 inputs",
    "Jacobian",
    jac(BROADCAST, {"x": t(np.ones(1000))}, output="y"),
    EXHAUSTED,
    "forward mode",
    "'x'",
    "max_tensor_elements",
)
# five 900 x 900 blocks and the 900 x 900 seeds, each under the element limit: 39 MB
FIVE = G(
    *(N(v, "input") for v in "abcde"),
    N("s", "add", "a", "b"),
    N("u", "add", "s", "c"),
    N("w", "add", "u", "d"),
    N("f", "add", "w", "e"),
)
case(
    "Jacobian of five 900 x 900 blocks over max_bytes",
    "Jacobian",
    jac(FIVE, {v: t(np.ones(900)) for v in "abcde"}),
    EXHAUSTED,
    "reverse mode",
    "max_bytes",
)
case("Jacobian of no elements", "Jacobian", jac(SUM, {"x": t(np.ones(0))}), OK)

# -- Gradient with batched seeds ---------------------------------------------------------------

STACKED = {"batched_seed": True}
case("batched_seed without a seed", "Gradient", lecture("Gradient", **STACKED), INVALID, "no seed")
case(
    "int seeds with batched_seed",
    "Gradient",
    lecture("Gradient", seed=t([1, 2]), **STACKED),
    INVALID,
    "seed",
    "int64",
)
case(
    "batched seed without its K axis",
    "Gradient",
    lecture("Gradient", seed=t(1.0), **STACKED),
    INVALID,
    "seed",
    "[K]",
)
case(
    "batched seeds of the wrong shape",
    "Gradient",
    request("Gradient", NEG, VEC3, output="f", seed=t(np.ones((2, 4))), **STACKED),
    INVALID,
    "seed",
    "[2, 4]",
    "[K] + [3]",
)
case(
    "batched seeds claiming 2^40 elements without data",
    "Gradient",
    lecture("Gradient", seed=raw_tensor(FLOAT64, [1 << 20, 1 << 20]), **STACKED),
    INVALID,
    "seed",
)
case(
    "batched_seed together with batch_axes",
    "Gradient",
    request(
        "Gradient",
        SUM,
        {"x": t(np.ones((2, 3)))},
        output="f",
        seed=t(np.ones(2)),
        batch_axes={"x": 0},
        **STACKED,
    ),
    INVALID,
    "batch_axes and batched_seed",
)
case(
    "batched seeds with K = 0: no products",
    "Gradient",
    lecture("Gradient", seed=t(np.ones(0)), **STACKED),
    OK,
)
case(
    "K = 100,000 batched seeds over max_flops",
    "Gradient",
    request("Gradient", EXPS, ONE, output="f", wrt=["x"], seed=t(np.ones(100_000)), **STACKED),
    EXHAUSTED,
    "100000 products",
    "max_flops",
)

# -- Gradient with per-example batch axes ------------------------------------------------------

MATVEC = G(X, N("w", "input"), N("q", "matmul", "w", "x"), N("f", "sum", "q"))
PAIR = {"x": t(np.ones((4, 3))), "w": t(np.ones((2, 3)))}


def per_example(graph=MATVEC, inputs=PAIR, **fields: Any):
    fields.setdefault("output", "f")
    return request("Gradient", graph, inputs, **fields)


case(
    "batch_axes naming no node",
    "Gradient",
    per_example(batch_axes={"ghost": 0}),
    INVALID,
    "'ghost'",
)
case(
    "batch_axes naming a computed node",
    "Gradient",
    per_example(batch_axes={"q": 0}),
    INVALID,
    "'q'",
    "not an input",
)
case(
    "batch_axes naming an input not fed",
    "Gradient",
    per_example(inputs={"x": PAIR["x"]}, batch_axes={"w": 0}),
    INVALID,
    "'w'",
    "not fed",
)
case(
    "batch axis out of range",
    "Gradient",
    per_example(batch_axes={"x": 2}),
    INVALID,
    "'x'",
    "out of range",
)
case(
    "batch axis -2^31",
    "Gradient",
    per_example(batch_axes={"x": -(2**31)}),
    INVALID,
    "'x'",
    "out of range",
)
case(
    "batched inputs of different batch sizes",
    "Gradient",
    per_example(batch_axes={"x": 0, "w": 0}),
    INVALID,
    "disagree on the batch size",
    "'x'",
    "'w'",
)
case(
    "a batch of B = 0 examples",
    "Gradient",
    per_example(inputs={**PAIR, "x": t(np.ones((0, 3)))}, batch_axes={"x": 0}),
    INVALID,
    "'x'",
    "no examples",
)
case(
    "per-example outputs of several elements without seeds",
    "Gradient",
    per_example(output="q", batch_axes={"x": 0}),
    INVALID,
    "'q'",
    "seed",
)
case(
    "per-example seeds of the wrong shape",
    "Gradient",
    per_example(output="q", batch_axes={"x": 0}, seed=t(np.ones((3, 2)))),
    INVALID,
    "seed",
    "[3, 2]",
    "[4] + [2]",
)
case(
    "per-example seeds of ints",
    "Gradient",
    per_example(output="q", batch_axes={"x": 0}, seed=t(np.ones((4, 2), np.int64))),
    INVALID,
    "seed",
    "int64",
)
case(
    "per-example gradients of a shared 200 x 3 input tiled 100,000 times",
    "Gradient",
    per_example(
        inputs={"x": t(np.ones((100_000, 3)), np.float32), "w": t(np.ones((200, 3)), np.float32)},
        batch_axes={"x": 0},
    ),
    EXHAUSTED,
    "'w' (600 elements) is shared by the 100000 examples",
    "max_tensor_elements",
)

# -- bytes that do not parse -------------------------------------------------------------------

UNARY_TYPES = {
    "Forward": service_pb2.ForwardRequest,
    "Gradient": service_pb2.GradientRequest,
    "CheckGradient": service_pb2.CheckGradientRequest,
    "GradientGraph": service_pb2.GradientGraphRequest,
    "HessianVectorProduct": service_pb2.HessianVectorProductRequest,
    "JacobianVectorProduct": service_pb2.JacobianVectorProductRequest,
    "Jacobian": service_pb2.JacobianRequest,
}
for seed, (rpc, kind) in enumerate(UNARY_TYPES.items()):
    case("random bytes", rpc, garbage(seed, 200, kind), INVALID)
    case("truncated in a tensor", rpc, truncated(lecture(rpc), 0.9), INVALID)
    case("10,000 nested groups", rpc, nested_groups(10_000), INVALID)
case("random kilobytes", "Forward", garbage(100, 10_000, service_pb2.ForwardRequest), INVALID)
case("truncated in the graph", "Gradient", truncated(lecture("Gradient"), 0.2), INVALID)
case("0xff bytes (a varint over 10 bytes)", "Forward", b"\xff" * 32, INVALID)
case("field number 0", "Gradient", b"\x02\x00" + LECTURE_REQUEST, INVALID)
case("wire type 7", "Forward", b"\x0f" + b"\0" * 8, INVALID)
case("a length past the end", "Forward", tag(1, LEN) + varint(1 << 20) + b"\0" * 10, INVALID)
case("a 6-byte length prefix", "Gradient", tag(1, LEN) + b"\x80" * 5 + b"\x00", INVALID)
case("graph as a varint", "Forward", tag(1, 0) + varint(5), INVALID)
case(
    "an inputs map entry as a fixed64",
    "Gradient",
    LECTURE_REQUEST + tag(2, 1) + b"\0" * 8,
    INVALID,
)
case("an unterminated group", "Forward", tag(99, START_GROUP) + b"\x08\x01", INVALID)
case(
    "a group closed by another number",
    "Forward",
    tag(99, START_GROUP) + tag(98, END_GROUP),
    INVALID,
)
case(
    "10,000 nested groups in the graph",
    "Forward",
    field_bytes(1, nested_groups(10_000)),
    INVALID,
)
case(
    "10,000 nested groups in a node",
    "Gradient",
    field_bytes(1, field_bytes(1, nested_groups(10_000))) + field_bytes(3, b"f"),
    INVALID,
)
case(
    "10,000 nested groups in a fed tensor",
    "Forward",
    service_pb2.ForwardRequest(graph=NEG).SerializeToString()
    + field_bytes(2, field_bytes(1, b"x") + field_bytes(2, nested_groups(10_000))),
    INVALID,
)
case(
    "invalid UTF-8 in output",
    "Gradient",
    lecture("Gradient", output="").SerializeToString() + field_bytes(3, b"f\xff\xfe"),
    INVALID,
)
case(
    "invalid UTF-8 in fetch",
    "Forward",
    lecture("Forward").SerializeToString() + field_bytes(3, b"\xc3\x28"),
    INVALID,
)
case(
    "invalid UTF-8 in a feed's name",
    "Forward",
    service_pb2.ForwardRequest(graph=NEG).SerializeToString()
    + field_bytes(2, field_bytes(1, b"\xed\xa0\x80") + field_bytes(2, t(1.0).SerializeToString())),
    INVALID,
    "UTF-8",
)
case(
    "invalid UTF-8 in a node's name",
    "GradientGraph",
    field_bytes(1, field_bytes(1, field_bytes(1, b"x\x80") + field_bytes(2, b"input")))
    + field_bytes(3, b"x"),
    INVALID,
)
case(
    "invalid UTF-8 in a string attribute",
    "Forward",
    field_bytes(
        1,
        G(X).SerializeToString()
        + field_bytes(
            1,
            field_bytes(1, b"f")
            + field_bytes(2, b"cast")
            + field_bytes(3, b"x")
            + field_bytes(4, field_bytes(1, b"dtype") + field_bytes(2, field_bytes(3, b"\xfe"))),
        ),
    )
    + service_pb2.ForwardRequest(inputs=ONE).SerializeToString(),
    INVALID,
)
case(
    "invalid UTF-8 in a digest",
    "Gradient",
    request("Gradient", None, LECTURE_INPUTS, output="f").SerializeToString()
    + field_bytes(8, b"\xff" * 64),
    INVALID,
)


# -- Session -----------------------------------------------------------------------------------


def start(graph=LECTURE_GRAPH, **fields: Any) -> bytes:
    message = service_pb2.SessionRequest(start=service_pb2.SessionStart(**fields))
    if graph is not None:
        message.start.graph.CopyFrom(graph)
    return message.SerializeToString()


def steps(*step_messages: service_pb2.SessionStep, chunks=()) -> bytes:
    return service_pb2.SessionRequest(steps=step_messages, chunks=chunks).SerializeToString()


def step(inputs=None, **fields: Any) -> service_pb2.SessionStep:
    return service_pb2.SessionStep(inputs=LECTURE_INPUTS if inputs is None else inputs, **fields)


def chunk(name: str, index: int, data: bytes, **fields: Any) -> service_pb2.TensorChunk:
    fields.setdefault("target", service_pb2.CHUNK_TARGET_INPUT)
    return service_pb2.TensorChunk(name=name, index=index, data=data, **fields)


def session(id_: str, messages: list[bytes], code, *fragments: str, step_error=False) -> None:
    case(id_, "Session", messages, code, *fragments, step=step_error)


GOOD_STEP = steps(step())
session("steps before start", [GOOD_STEP], INVALID, "start")
session("a second start", [start(output="f"), start(output="f")], INVALID, "one start")
session("unparseable first message", [b"\xff" * 16], INVALID, "does not parse")
session("unparseable after a good start", [start(output="f"), GOOD_STEP, b"\x0f"], INVALID, "parse")
session("truncated first message", [start(output="f")[:-3]], INVALID, "parse")
session("10,000 nested groups in the start's graph", [unparseable_session_start_graph()], INVALID)
session("start with an unknown digest", [start(None, graph_digest="0" * 64)], NOT_FOUND)
session(
    "start with graph and digest",
    [start(graph_digest=graph_digest(LECTURE_GRAPH.SerializeToString()))],
    INVALID,
    "graph_digest",
)
session(
    "start with a cyclic graph",
    lambda: [start(cycle(2000), output="n0")],
    INVALID,
    "'n0'",
    "cycle",
)
session("start with a 100 KB op name", [start(G(N("a", "o" * 100_000)))], INVALID, "'a'")
session("start with wrt naming no node", [start(output="f", wrt=["ghost"])], INVALID, "ghost")
session("start with output naming no node", [start(output="nowhere")], INVALID, "nowhere")
session("start with fetch naming no node", [start(fetch=["phantom"])], INVALID, "phantom")
session("start over max_nodes", lambda: [start(chain(10_000)[0])], EXHAUSTED, "max_nodes")
session(
    "invalid UTF-8 in the start's output",
    [field_bytes(1, field_bytes(1, LECTURE_GRAPH.SerializeToString()) + field_bytes(3, b"\xff"))],
    INVALID,
)
session(
    "stop_on_error with a failing step",
    [start(output="f", stop_on_error=True), steps(step({"x": t(1.0)}))],
    INVALID,
    "'y'",
)
# Per-step problems: a StepError, and the stream goes on (and ends OK)
session(
    "a step missing a feed",
    [start(output="f"), steps(step({"x": t(1.0)}))],
    INVALID,
    "'y'",
    step_error=True,
)
session(
    "a step with a bad payload",
    [start(output="f"), steps(step({**LECTURE_INPUTS, "x": raw_tensor(FLOAT64, [2])}))],
    INVALID,
    "'x'",
    step_error=True,
)
session(
    "a step claiming 2^40 elements without data",
    [start(output="f"), steps(step({**LECTURE_INPUTS, "x": raw_tensor(FLOAT64, [1 << 20] * 2)}))],
    INVALID,
    "'x'",
    step_error=True,
)
session(
    "a step over max_tensor_elements",
    [
        start(G(X, N("f", "broadcast_to", "x", shape=[100_000, 100_000])), output="f"),
        steps(step({"x": t(1.0)}, kind=service_pb2.STEP_KIND_FORWARD)),
    ],
    EXHAUSTED,
    "max_tensor_elements",
    step_error=True,
)
session(
    "a step of kind 7",
    [start(output="f"), steps(step(kind=7))],
    INVALID,
    "kind",
    step_error=True,
)
session(
    "a gradient step without an output",
    [start(), steps(step())],
    INVALID,
    "output",
    step_error=True,
)
session(
    "a step with a seed of the wrong shape",
    [start(output="f"), steps(step(seed=t(np.ones(3))))],
    INVALID,
    "seed",
    step_error=True,
)
session(
    "a step feeding an unknown name",
    [start(output="f"), steps(step({**LECTURE_INPUTS, "w": t(1.0)}))],
    INVALID,
    "'w'",
    step_error=True,
)
session(
    "a chunk without its chunk 0",
    [start(output="f"), steps(step(), chunks=[chunk("x", 1, b"\0" * 8)])],
    INVALID,
    "chunk 0",
    step_error=True,
)
session(
    "chunks out of order",
    [
        start(output="f"),
        steps(
            step({"y": t(5.0), "z": t(-4.0)}),
            chunks=[
                chunk("x", 0, b"\0" * 8, dtype=FLOAT64, shape=[2]),
                chunk("x", 2, b"\0" * 8),
            ],
        ),
    ],
    INVALID,
    "chunk 2",
    step_error=True,
)
session(
    "a chunk running past its tensor",
    [
        start(output="f"),
        steps(
            step({"y": t(5.0), "z": t(-4.0)}),
            chunks=[chunk("x", 0, b"\0" * 16, dtype=FLOAT64, shape=[])],
        ),
    ],
    INVALID,
    "runs past",
    step_error=True,
)
session(
    "an incomplete chunked tensor",
    [
        start(output="f"),
        steps(
            step({"y": t(5.0), "z": t(-4.0)}),
            chunks=[chunk("x", 0, b"\0" * 8, dtype=FLOAT64, shape=[2])],
        ),
    ],
    INVALID,
    "incomplete",
    step_error=True,
)
session(
    "a chunk claiming 2^40 elements",
    [
        start(output="f"),
        steps(step(), chunks=[chunk("w", 0, b"", dtype=FLOAT64, shape=[1 << 20, 1 << 20])]),
    ],
    EXHAUSTED,
    "max_tensor_elements",
    step_error=True,
)
session(
    "a chunk with no target",
    [start(output="f"), steps(step(), chunks=[chunk("x", 0, b"", target=0)])],
    INVALID,
    "target",
    step_error=True,
)
session(
    "a chunk with dtype 99",
    [start(output="f"), steps(step(), chunks=[chunk("w", 0, b"", dtype=99, shape=[1])])],
    INVALID,
    step_error=True,
)
session(
    "a chunk of a value (a response target)",
    [
        start(output="f"),
        steps(
            step(),
            chunks=[chunk("x", 0, b"\0" * 8, dtype=FLOAT64, target=service_pb2.CHUNK_TARGET_VALUE)],
        ),
    ],
    INVALID,
    step_error=True,
)


# -- concurrency limits ------------------------------------------------------------------------


def _hold_sessions(server: ServerProcess, count: int) -> tuple[list, threading.Event]:
    """`count` open sessions (each has answered one step); set the event to close them."""
    release = threading.Event()
    calls = []
    for _ in range(count):

        def messages() -> Iterator[bytes]:
            yield start(output="f")
            yield GOOD_STEP
            release.wait(30)

        responses = server.stream()(messages(), timeout=30)
        next(responses)  # the step's result: the session is open
        calls.append(responses)
    return calls, release


def _close(calls: list, release: threading.Event) -> None:
    release.set()
    for responses in calls:
        for _ in responses:
            pass


def too_many_sessions(server: ServerProcess) -> tuple[grpc.StatusCode, str]:
    calls, release = _hold_sessions(server, MAX_SESSIONS)
    try:
        code, details, _ = call_session(server, [start(output="f"), GOOD_STEP], timeout=10)
    finally:
        _close(calls, release)
    return code, details


def too_many_calls(server: ServerProcess) -> tuple[grpc.StatusCode, str]:
    """On a server of its own whose call limit is below its session limit: sessions (which
    hold their call while open) fill every slot, and one more call is refused."""
    with tempfile.TemporaryDirectory() as directory:
        flags = ("--max-concurrent-rpcs=2", "--max-sessions=4", "--threads=2")
        with ServerProcess(Path(directory) / "server.log", *flags) as own:
            calls, release = _hold_sessions(own, 2)
            try:
                code, details, _ = call_unary(own, "Gradient", LECTURE_REQUEST, timeout=10)
            finally:
                _close(calls, release)
            assert_lecture(own)
    return code, details


case(
    "more sessions than max_sessions",
    "Session",
    None,
    EXHAUSTED,
    "max_sessions",
    run=too_many_sessions,
)
case(
    "more calls than max_concurrent_rpcs",
    "Gradient",
    None,
    EXHAUSTED,
    "oncurrent",
    run=too_many_calls,
)

# -- found by this corpus, fixed -----------------------------------------------------------------

case(
    "broadcast_to 2^64 elements",
    "Forward",
    request("Forward", G(X, N("f", "broadcast_to", "x", shape=[2**32, 2**32])), ONE),
    EXHAUSTED,
    "'f'",
    "max_tensor_elements",
)
for _setting, _value in {
    "eps NaN": float("nan"),
    "eps inf": float("inf"),
    "atol NaN": float("nan"),
    "rtol NaN": float("nan"),
    "rtol -inf": float("-inf"),
}.items():
    _field = _setting.split()[0]
    case(
        f"CheckGradient with {_setting}",
        "CheckGradient",
        request("CheckGradient", CUBE, VEC3, output="f", **{_field: _value}),
        INVALID,
        _field,
    )
session(
    "a session asking for messages of 1 byte",
    [start(output="f", max_message_bytes=1), GOOD_STEP],
    INVALID,
    "max_message_bytes",
)


# -- deadlines ---------------------------------------------------------------------------------

case(
    "a 4,000-node chain under a 1 ms deadline",
    "Forward",
    lambda: request("Forward", chain(4000, "exp")[0], {"x": t(np.zeros(1000))}),
    DEADLINE,
    timeout=0.001,
)


# ---------------------------------------------------------------------------------------------
# Running it


@dataclass
class Hostile:
    server: ServerProcess
    rss_after_warm_up: int


def warm_up(server: ServerProcess) -> None:
    """Good requests of every RPC, and of the sizes the corpus sends (a feed near the message
    limit, a graph of thousands of nodes), from several threads at once so that each of the
    server's threads has grown its share of the allocator's working set before the memory is
    read."""
    for rpc in UNARY_TYPES:
        code, details, _ = call_unary(server, rpc, lecture(rpc).SerializeToString())
        assert code == OK, details
    big = request("Forward", G(X, N("f", "sum", "x")), {"x": t(np.ones(450_000))})
    long, last = chain(4000)
    calls = [("Forward", big), ("Gradient", request("Gradient", long, ONE, output=last))]
    calls += [(rpc, lecture(rpc)) for rpc in UNARY_TYPES]

    def worker(failures: list) -> None:
        for _ in range(3):
            for rpc, message in calls:
                code, details, _ = call_unary(server, rpc, message.SerializeToString())
                if code != OK:
                    failures.append((rpc, code, details))
        code, details, _ = call_session(server, [start(output="f"), GOOD_STEP, GOOD_STEP])
        if code != OK:
            failures.append(("Session", code, details))

    failures: list = []
    threads = [threading.Thread(target=worker, args=(failures,)) for _ in range(MAX_SESSIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert_lecture(server)


def settled_rss(server: ServerProcess) -> int:
    """The server's RSS after a few good requests that allocate many small objects (so that
    its garbage collector has run)."""
    long, last = chain(4000)
    message = request("Gradient", long, ONE, output=last).SerializeToString()
    for _ in range(3):
        code, details, _ = call_unary(server, "Gradient", message)
        assert code == OK, details
    assert_lecture(server)
    return server.rss()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Iterator[Hostile]:
    """The server under test, warmed up, and its RSS then."""
    log_path = tmp_path_factory.mktemp("hostile") / "server.log"
    with ServerProcess(log_path, *FLAGS, env=ALLOCATOR) as server:
        warm_up(server)
        yield Hostile(server, settled_rss(server))
    log = server.log()
    assert "Traceback" not in log, log[-4000:]


def _serialized(request_: Any) -> bytes:
    return request_ if isinstance(request_, bytes) else request_.SerializeToString()


def _step_errors(responses: list[bytes]) -> list[service_pb2.StepError]:
    errors = []
    for data in responses:
        for result in service_pb2.SessionResponse.FromString(data).results:
            if result.HasField("error"):
                errors.append(result.error)
    return errors


def run_case(server: ServerProcess, c: Case) -> tuple[grpc.StatusCode, str]:
    """Send the case's request; (code, details) of the call, or of its failed step."""
    if c.run is not None:
        return c.run(server)
    request_ = c.request() if callable(c.request) else c.request
    if c.rpc != "Session":
        code, details, _ = call_unary(server, c.rpc, _serialized(request_), c.timeout)
        return code, details
    code, details, responses = call_session(server, map(_serialized, request_), c.timeout)
    if not c.step or code != OK:
        return code, details
    errors = _step_errors(responses)
    assert len(errors) == 1, f"expected one failed step, got {errors}"
    codes = {status.value[0]: status for status in grpc.StatusCode}
    return codes[errors[0].code], errors[0].message


def check(c: Case, code: grpc.StatusCode, details: str) -> None:
    """The case got its exact code and a short, clean message naming what it should."""
    assert code == c.code, f"{c.id}: got {code.name}, expected {c.code.name}: {details!r}"
    if c.code is not OK:
        assert details.strip(), "an error must say what went wrong"
    assert len(details.encode()) <= 1024, f"{len(details.encode())} bytes: {details[:200]!r}"
    assert "Traceback" not in details and 'File "' not in details, details
    for fragment in c.fragments:
        assert fragment in details, (fragment, details)


SHORT = {
    "Forward": "F",
    "Gradient": "G",
    "CheckGradient": "C",
    "GradientGraph": "GG",
    "HessianVectorProduct": "H",
    "JacobianVectorProduct": "JV",
    "Jacobian": "J",
    "Session": "S",
}


def ids(cases: list[Case]) -> list[str]:
    """Each case's test id: its description and the RPC's initials."""
    return [c.id if c.id.endswith("]") else f"{c.id} [{SHORT[c.rpc]}]" for c in cases]


@pytest.mark.parametrize("c", CASES, ids=ids(CASES))
def test_hostile_request_gets_its_exact_status(hostile, c: Case):
    check(c, *run_case(hostile.server, c))
    assert hostile.server.alive(), hostile.server.log()[-4000:]


def test_the_corpus_is_large_and_spread_over_every_rpc():
    everything = CASES
    names = ids(everything)
    assert len(set(names)) == len(names) >= 100, sorted(n for n in names if names.count(n) > 1)
    by_rpc = {rpc: sum(c.rpc == rpc for c in everything) for rpc in (*UNARY_TYPES, "Session")}
    assert min(by_rpc.values()) >= 8, by_rpc


def test_afterwards_the_lecture_answers_and_memory_is_back(hostile):
    """After the corpus (pytest keeps the file's order): the same server still answers the
    lecture exactly, is alive, and holds at most 10% more memory than after its warm-up."""
    server = hostile.server
    for rpc in UNARY_TYPES:
        code, details, _ = call_unary(server, rpc, lecture(rpc).SerializeToString())
        assert code == OK, details
    assert_lecture(server)
    assert server.alive()
    rss = settled_rss(server)
    print(f"RSS: {hostile.rss_after_warm_up / MiB:.1f} MiB after warm-up, {rss / MiB:.1f} now")
    assert rss <= hostile.rss_after_warm_up * (1 + RSS_TOLERANCE), (
        f"RSS grew from {hostile.rss_after_warm_up / MiB:.1f} MiB after warm-up to "
        f"{rss / MiB:.1f} MiB"
    )


def test_distinct_graphs_with_huge_attribute_lists_do_not_pin_memory(hostile):
    """Five distinct graphs, each with a reshape whose shape lists 3M entries (INVALID_ARGUMENT
    each): the server (--cache-mb=8) holds none of them afterwards."""
    server = hostile.server
    before = settled_rss(server)
    for i in range(5):
        graph = G(X, N(f"f{i}", "reshape", "x", shape=[1] * 3_000_000))
        c = Case(f"reshape {i}", "Forward", request("Forward", graph, VEC3), INVALID, (f"'f{i}'",))
        check(c, *run_case(server, c))
    after = settled_rss(server)
    assert after <= before * (1 + RSS_TOLERANCE), (
        f"RSS grew from {before / MiB:.1f} MiB to {after / MiB:.1f} MiB"
    )
