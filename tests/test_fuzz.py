"""Property-based fuzzing of the gRPC API against the error contract (DESIGN.md section 5).

Random, op-aware requests to every compute RPC (JacobianVectorProduct with plain and batched
tangents and Jacobian in every mode among them; Gradient with K stacked seeds or per-example
batch axes too) either succeed or fail with INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, with a non-empty message and no Python traceback;
never INTERNAL or UNKNOWN. A call stays within the server's configured memory limit, and
afterwards the same server still answers the lecture's f = (x + y) * z exactly.

The fuzzed server runs in this process with small limits and one worker thread: no example
can allocate much or run long, the memory a call allocates can be traced, and a call that
goes on working after its deadline holds up the next request (which then fails).

FUZZ_EXAMPLES=5000 runs a longer bug hunt than the default.
"""

from __future__ import annotations

import math
import os
import tracemalloc
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient.v1 import graph_pb2, tensor_pb2
from gradient_client.tensors import from_proto, to_proto
from gradient_server.engine import Limits
from gradient_server.ops import OPS
from gradient_server.ops.base import REQUIRED
from gradient_server.service import create_server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
CALL_TIMEOUT = 5.0
"""Deadline of each fuzzed call (ample: tiny requests take milliseconds)."""
LECTURE_TIMEOUT = 5.0
"""How long the lecture's request may take after a fuzzed call."""
LIMITS = Limits(max_tensor_elements=100_000, max_bytes=8 << 20, max_check_evaluations=2000)
MEMORY_BUDGET = 2 * LIMITS.max_bytes + (2 << 20)
"""Most a call may allocate: the byte limit is an estimate (values, plus the largest scratch
space of one op), so allow twice it plus the request's own objects."""
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@pytest.fixture(scope="module")
def stub() -> Iterator[service_grpc.GradientServiceStub]:
    """The raw stub on a server of its own: small limits, one worker, allocations traced."""
    server, port = create_server("127.0.0.1:0", limits=LIMITS, threads=1)
    server.start()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield service_grpc.GradientServiceStub(channel)
    finally:
        if not tracing:
            tracemalloc.stop()
        server.stop(0)


# ---------------------------------------------------------------------------------------------
# Strategies

# How wild this example is: every rare() chance is scaled by it. Drawn first by requests(), so
# a third of the examples are clean (well-formed, reaching type inference, the backward pass
# and numpy) and the rest are corrupted in a few places or in many.
_chaos = [1.0]


def rare(draw, percent: int) -> bool:
    """True about `percent`% of the time (scaled by the chaos level); shrinks to False."""
    return draw(st.integers(0, 99)) >= 100 - percent * _chaos[0]


FLOAT32, FLOAT64, INT32, INT64, BOOL = (
    tensor_pb2.DTYPE_FLOAT32,
    tensor_pb2.DTYPE_FLOAT64,
    tensor_pb2.DTYPE_INT32,
    tensor_pb2.DTYPE_INT64,
    tensor_pb2.DTYPE_BOOL,
)
NUMPY = {FLOAT32: "<f4", FLOAT64: "<f8", INT32: "<i4", INT64: "<i8", BOOL: "bool"}

# Shapes that broadcast with each other, and 4-d ones for convolutions and pooling.
GOOD_SHAPES = [
    (),
    (3,),
    (2, 3),
    (1, 3),
    (2, 1),
    (1,),
    (0,),
    (2, 0),
    (3, 3),
    (2, 2, 2),
    (1, 1, 1, 1),
    (1, 1, 3, 3),
    (1, 2, 4, 4),
]
# Shapes claimed without a payload: huge, negative, too many dimensions, or zero-size but with
# enormous other dimensions.
HUGE_SHAPES = [
    (2**40,),
    (100_000, 100_000),
    (2**62, 2**62),
    (-1,),
    (2**63 - 1,),
    (1,) * 33,
    (0, 2**62),
    (2**62, 2**62, 0),
    (2**31, 2**31, 0),
    (-5, 0),
    (0, -1),
]
# Huge values for tensor elements and int attributes (int32 overflow, int64 extremes).
HUGE_INTS = [2**31, -(2**31) - 1, 2**40, 2**62, 2**63 - 1, -(2**63)]
# Huge values for elements of list attributes (sizes, windows, paddings). Never in the range a
# machine could actually allocate (2**12..2**36): an op that forgets to charge them must fail
# to allocate, not exhaust the test machine's memory.
HUGE_LIST_INTS = [-1, 2**40, 2**62, 2**63 - 1, -(2**63), -(2**40)]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-300]

small_floats = st.one_of(
    st.floats(-5, 5, allow_nan=False, width=32),
    st.sampled_from(SPECIAL_FLOATS),
)
any_floats = st.one_of(small_floats, st.floats())
small_ints = st.one_of(st.integers(-3, 5), st.sampled_from(HUGE_INTS))

# Window geometries whose results are tiny but whose padded intermediates are not: enormous
# (no machine can allocate them) or some 25-30 MB per channel (over the fuzzed server's byte
# limit, so refused if the server accounts for them; under 1 GB for the most channels a fed
# tensor has here).
CONV_OPS = {"conv2d", "conv2d_input_grad", "conv2d_weight_grad"}
POOL_OPS = {"avg_pool2d", "avg_pool2d_grad", "max_pool2d", "max_pool2d_grad", "max_pool2d_gather"}
GEOMETRIES = {
    "conv": [
        {"padding": [2**40], "stride": [2**62]},
        {"padding": [1000], "stride": [10_000]},
    ],
    "max_pool": [
        {"kernel": [2**40], "padding": [2**39]},
        {"kernel": [1800], "padding": [900], "stride": [1800]},
    ],
    # avg_pool2d_grad steps through the kernel's offsets in Python, so a kernel big enough to
    # overrun the byte limit takes minutes here; test_known_bad_requests covers that one.
    "avg_pool": [{"kernel": [2**40], "padding": [2**39]}],
}


@st.composite
def wire_dtypes(draw) -> int:
    if rare(draw, 4):
        return draw(st.sampled_from([0, 6, 99]))  # unset or unknown enum values
    return draw(st.sampled_from([FLOAT64, FLOAT64, FLOAT32, INT64, INT32, BOOL]))


@st.composite
def shapes(draw) -> tuple[int, ...]:
    if rare(draw, 35):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        while math.prod(shape) > 50:
            shape = shape[1:]
        return shape
    return draw(st.sampled_from(GOOD_SHAPES))


@st.composite
def tensors(draw, shape: tuple[int, ...] | None = None, dtype: int | None = None):
    """A Tensor message: mostly well-formed and tiny, sometimes malformed in one way."""
    dtype = draw(wire_dtypes()) if dtype is None else dtype
    if shape is None and rare(draw, 4):
        # A claimed-huge (or invalid) shape, with no payload or a token one.
        tensor = tensor_pb2.Tensor(dtype=dtype, shape=draw(st.sampled_from(HUGE_SHAPES)))
        if rare(draw, 30):
            tensor.data = draw(st.binary(max_size=16))
        return tensor
    shape = draw(shapes()) if shape is None else shape
    count = math.prod(shape)
    kind = np.dtype(NUMPY.get(dtype, "<f8")).kind
    if kind == "f":
        values = draw(st.lists(small_floats, min_size=count, max_size=count))
    elif kind == "i":
        values = draw(st.lists(small_ints, min_size=count, max_size=count))
    else:
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    with np.errstate(all="ignore"):  # float32 overflows to inf, int32 wraps: both are fine
        wide = np.array(values, dtype={"f": np.float64, "i": np.int64, "b": np.bool_}[kind])
        array = wide.astype(NUMPY.get(dtype, "<f8"))
    tensor = tensor_pb2.Tensor(dtype=dtype, shape=shape)
    form = draw(
        st.sampled_from(
            ["data", "data", "data", "lists", "lists"]
            + ["wrong_list", "both", "short", "long", "none", "garbage", "bad_bool"]
            * rare(draw, 15)
        )
    )
    list_field = {"f": "float_values", "i": "int_values", "b": "bool_values"}[kind]
    if form in ("data", "both"):
        tensor.data = array.tobytes()
    if form in ("lists", "both"):
        getattr(tensor, list_field).extend(values)
    if form == "wrong_list":
        others = sorted({"float_values", "int_values", "bool_values"} - {list_field})
        other = draw(st.sampled_from(others))
        getattr(tensor, other).extend(
            {"float_values": [1.5], "int_values": [3], "bool_values": [True]}[other] * max(count, 1)
        )
    if form == "short":
        tensor.data = array.tobytes()[:-1]
    if form == "long":
        tensor.data = array.tobytes() + b"\x00"
    if form == "garbage":
        tensor.data = draw(st.binary(min_size=1, max_size=64))
    if form == "bad_bool":
        tensor.data = bytes([2]) * count if count else b"\x02"
    return tensor


def int_list(values) -> graph_pb2.AttrValue:
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


@st.composite
def attr_values(draw, kind: str, name: str = "", shape=()) -> graph_pb2.AttrValue:
    """An AttrValue of `kind`, with values fitting attribute `name` most of the time (shape
    attributes often take `shape`, the shape most feeds have)."""
    if kind == "int":
        if name in ("axis", "start_axis", "end_axis"):
            good = st.integers(-3, 3)
        elif name in ("depth", "ddof"):
            good = st.integers(0, 4)
        else:
            good = st.integers(-3, 5)
        value = draw(st.sampled_from(HUGE_INTS)) if rare(draw, 8) else draw(good)
        return graph_pb2.AttrValue(i=value)
    if kind == "float":
        if rare(draw, 15):
            return graph_pb2.AttrValue(i=draw(small_ints))  # an int is accepted for a float
        return graph_pb2.AttrValue(f=draw(any_floats))
    if kind == "string":
        text = draw(
            st.one_of(
                st.sampled_from(["mean", "sum", "none", "", "MEAN", "\x00", "mean "]),
                st.text(max_size=8),
            )
        )
        return graph_pb2.AttrValue(s=text)
    if kind == "bool":
        return graph_pb2.AttrValue(b=draw(st.booleans()))
    if kind in ("ints", "axes"):
        if kind == "axes" and not rare(draw, 50):
            return graph_pb2.AttrValue(i=draw(st.integers(-3, 3)))
        if name in ("shape", "input_shape", "weight_shape"):
            if draw(st.integers(0, 99)) < 40:
                return int_list(list(shape))
            element, sizes = st.integers(0, 4), (0, 4)
        elif name in ("kernel", "stride", "dilation"):
            element, sizes = st.integers(1, 3), (1, 2)
        elif name in ("padding", "pads"):
            element, sizes = st.integers(0, 2), (1, 8)
        else:
            element, sizes = st.integers(-3, 4), (0, 4)
        if rare(draw, 10):
            element = st.one_of(element, st.sampled_from(HUGE_LIST_INTS))
        if rare(draw, 10):
            sizes = (0, 6)
        return int_list(draw(st.lists(element, min_size=sizes[0], max_size=sizes[1])))
    if kind == "floats":
        return graph_pb2.AttrValue(
            floats=graph_pb2.FloatList(values=draw(st.lists(any_floats, max_size=4)))
        )
    if kind == "tensor":
        return graph_pb2.AttrValue(tensor=draw(tensors()))
    assert kind == "dtype", kind
    if rare(draw, 6):
        weird = ["", "float16", "FLOAT32", "complex128", "object", "f8", "<f8", "float64 "]
        weird += ["\x00", "uint8", "str", "datetime64", "DTYPE_FLOAT64", "Float64", "None"]
        return graph_pb2.AttrValue(s=draw(st.one_of(st.sampled_from(weird), st.text(max_size=6))))
    names = ["float64", "float32", "int64", "int32", "bool"]
    return graph_pb2.AttrValue(s=draw(st.sampled_from(names)))


KINDS = ["int", "float", "string", "bool", "ints", "floats", "tensor", "axes", "dtype"]


@st.composite
def any_attr(draw, name: str = "") -> graph_pb2.AttrValue:
    """An attribute of a random kind, or an AttrValue with nothing set."""
    if rare(draw, 10):
        return graph_pb2.AttrValue()
    return draw(attr_values(draw(st.sampled_from(KINDS)), name))


NAMES = ["x", "y", "z", "q", "f", "g"]
ODD_NAMES = ["", "grad/x", "grad", "seed", "x ", "∂x", "n" * 200, "missing"]
SOURCE_OPS = ["input", "input", "input", "constant", "zeros"]
REAL_OPS = sorted(OPS)
BAD_OPS = ["", "Add", "nope", "input ", "ADD", "grad"]


@st.composite
def nodes(draw, index: int, names: list[str], is_source: bool, shape, focus: str) -> graph_pb2.Node:
    name = names[index]
    if rare(draw, 2):
        op = draw(st.sampled_from(BAD_OPS))
    elif is_source:
        op = draw(st.sampled_from(SOURCE_OPS))
    else:
        # Half the time the example's focus op, else any op.
        op = draw(st.sampled_from(REAL_OPS)) if draw(st.booleans()) else focus
    opdef = OPS.get(op)
    arity = len(opdef.inputs) if opdef else draw(st.integers(0, 2))
    if opdef is not None and opdef.variadic:
        arity += draw(st.integers(0, 2))
    if rare(draw, 3):
        arity = max(arity + draw(st.sampled_from([-1, 1])), 0)
    earlier = names[:index]
    inputs = []
    for _ in range(arity):
        if earlier and not rare(draw, 8):
            inputs.append(draw(st.sampled_from(earlier)))
        else:  # a later node (maybe a cycle), itself, or a name no node has
            inputs.append(draw(st.sampled_from([*names, name, "missing", ""])))
    node = graph_pb2.Node(name=name, op=op, inputs=inputs)
    for spec in opdef.attrs if opdef else ():
        required = spec.default is REQUIRED
        chance = 98 if required else 10 if op == "input" else 30
        if draw(st.integers(0, 99)) < chance:
            if rare(draw, 10):
                node.attrs[spec.name].CopyFrom(draw(any_attr(spec.name)))
            else:
                node.attrs[spec.name].CopyFrom(draw(attr_values(spec.kind, spec.name, shape)))
    # Well-formed but adversarial, so clean examples get these too.
    if op in CONV_OPS | POOL_OPS and draw(st.integers(0, 99)) < 25:
        family = "conv" if op in CONV_OPS else "avg_pool" if op.startswith("avg") else "max_pool"
        for key, values in draw(st.sampled_from(GEOMETRIES[family])).items():
            node.attrs[key].CopyFrom(int_list(values))
    if rare(draw, 3) or (opdef is None and rare(draw, 50)):
        node.attrs[draw(st.sampled_from(["bogus", "axis", "value", ""]))].CopyFrom(draw(any_attr()))
    return node


@st.composite
def graphs(draw, shape, focus: str) -> tuple[graph_pb2.Graph, list[str]]:
    """A graph of 1-6 nodes, sources first, many of them `focus` ops; returns it and the node
    names."""
    count = draw(st.integers(1, 6))
    names = NAMES[:count]
    if rare(draw, 10):
        names = list(names)
        names[draw(st.integers(0, count - 1))] = draw(st.sampled_from([*ODD_NAMES, *NAMES]))
    sources = draw(st.integers(1, min(3, count)))
    graph = graph_pb2.Graph(
        nodes=[draw(nodes(i, names, i < sources, shape, focus)) for i in range(count)]
    )
    if rare(draw, 5):  # the order of nodes is free
        order = draw(st.permutations(range(count)))
        graph = graph_pb2.Graph(nodes=[graph.nodes[i] for i in order])
    return graph, names


@st.composite
def feeds(draw, graph: graph_pb2.Graph, shape) -> dict[str, tensor_pb2.Tensor]:
    """A tensor for most input nodes, often float64 of the shared shape; sometimes one for a
    non-input or a missing node."""
    result = {}
    for node in graph.nodes:
        if node.op == "input" and not rare(draw, 8):
            result[node.name] = draw(
                tensors(
                    shape=draw(st.sampled_from([shape, None])),
                    dtype=draw(st.sampled_from([FLOAT64, None])),
                )
            )
    if rare(draw, 5):
        extra = draw(st.sampled_from([*(n.name for n in graph.nodes), "missing", ""]))
        result[extra] = draw(tensors())
    return result


@st.composite
def window_graphs(draw) -> tuple[graph_pb2.Graph, list[str], dict[str, tensor_pb2.Tensor]]:
    """A well-formed conv2d or pooling of a fed 4-d input, summed to a scalar, with ordinary or
    adversarial geometry; differentiating it runs the windows' gradient ops."""
    op = draw(st.sampled_from(["conv2d", "avg_pool2d", "max_pool2d"]))
    n, c, h, w = draw(st.sampled_from([s for s in GOOD_SHAPES if len(s) == 4]))
    inputs = {"x": draw(tensors(shape=(n, c, h, w), dtype=FLOAT64))}
    operands = ["x"]
    if op == "conv2d":
        k = draw(st.sampled_from([1, h]))
        inputs["w"] = draw(tensors(shape=(draw(st.integers(1, 2)), c, k, k), dtype=FLOAT64))
        operands.append("w")
    window = graph_pb2.Node(name="q", op=op, inputs=operands)
    if draw(st.booleans()):
        family = "conv" if op == "conv2d" else op.split("2d")[0]
        geometry = draw(st.sampled_from(GEOMETRIES[family]))
    elif op == "conv2d":
        geometry = {"padding": [draw(st.integers(0, 2))], "stride": [draw(st.integers(1, 3))]}
    else:
        geometry = {"kernel": [draw(st.integers(1, min(h, w)))]}
    for key, values in geometry.items():
        window.attrs[key].CopyFrom(int_list(values))
    graph = graph_pb2.Graph(
        nodes=[
            *(graph_pb2.Node(name=name, op="input") for name in operands),
            window,
            graph_pb2.Node(name="f", op="sum", inputs=["q"]),
        ]
    )
    return graph, [*operands, "q", "f"], inputs


@st.composite
def node_names(draw, names: list[str]) -> str:
    """A node name (the last node most often), or sometimes an empty or unknown one."""
    if rare(draw, 6):
        return draw(st.sampled_from(["", "missing", "grad/x"]))
    return draw(st.sampled_from(names[::-1]))


@st.composite
def name_lists(draw, names: list[str]) -> list[str]:
    if not rare(draw, 30):
        return []
    return draw(st.lists(node_names(names), max_size=4))


@st.composite
def seeds(draw, request, shape) -> None:
    """No seed, a float64 one of the shared shape, or any tensor."""
    choice = draw(st.sampled_from(["none", "shared", "shared"] + ["any"] * rare(draw, 30)))
    if choice == "shared":
        request.seed.CopyFrom(draw(tensors(shape=shape, dtype=FLOAT64)))
    elif choice == "any":
        request.seed.CopyFrom(draw(tensors()))


def payload_forms(draw) -> int:
    return draw(st.sampled_from([0, 1] + [7] * rare(draw, 3)))


def tolerance(draw) -> float | None:
    if not rare(draw, 25):
        return None
    return draw(st.one_of(st.sampled_from([1e-6, 1e-3, 0.0, -1e-6, 1e-300, 1e300]), st.floats()))


def _fits(shape) -> tuple[int, ...] | None:
    """`shape` if tensors() can fill it (a few small dimensions), else None."""
    shape = tuple(shape)
    if len(shape) > 8 or any(not 0 <= d <= 5 for d in shape):
        return None
    return shape


@st.composite
def stacked_tensors(draw, shape, rows: int):
    """Mostly a float64 tensor of `rows` stacked tensors of `shape` ([rows] + shape), else
    any tensor."""
    shape = None if shape is None else _fits(shape)
    if shape is None or rare(draw, 15):
        return draw(tensors())
    return draw(tensors(shape=(rows, *shape), dtype=None if rare(draw, 10) else FLOAT64))


@st.composite
def vectors(draw, inputs, names: list[str], rows: int | None = None) -> dict:
    """Per-input vectors (an HVP's vector, a JVP's tangents): mostly a float tensor of the
    input's shape (with `rows` stacked along a new leading axis when given), sometimes
    anything, sometimes for a node that is no input or none at all."""
    vector = {}
    for name, tensor in inputs.items():
        if not rare(draw, 30):
            same_shape = None if rare(draw, 15) else _fits(tensor.shape)
            if rows is not None:
                # Now and then one input disagrees on K.
                k = rows if not rare(draw, 8) else draw(st.integers(0, 3))
                vector[name] = draw(stacked_tensors(same_shape, k))
            else:
                dtype = None if rare(draw, 15) else FLOAT64
                vector[name] = draw(tensors(shape=same_shape, dtype=dtype))
    if rare(draw, 5):
        vector[draw(st.sampled_from(["missing", "", *names]))] = draw(tensors())
    return vector


@st.composite
def batch_axes(draw, inputs, names: list[str]) -> dict[str, int]:
    """batch_axes: an axis (mostly 0 or -1, sometimes out of range or extreme) for some fed
    inputs, sometimes for a node that is no input or none at all."""
    axes = {}
    for name in inputs:
        if draw(st.booleans()):
            extreme = st.sampled_from([-(2**31), 2**31 - 1, 7, -9])
            axes[name] = draw(extreme) if rare(draw, 10) else draw(st.sampled_from([0, 0, -1, 1]))
    if not axes or rare(draw, 5):
        axes[draw(st.sampled_from(["missing", "", *names]))] = draw(st.integers(-1, 1))
    return axes


METHODS = [
    "Gradient",
    "Forward",
    "CheckGradient",
    "GradientGraph",
    "HessianVectorProduct",
    "JacobianVectorProduct",
    "Jacobian",
]


@st.composite
def requests(draw) -> tuple[str, object]:
    """One request to one of the seven compute RPCs."""
    _chaos[0] = draw(st.sampled_from([0.0, 1.0, 2.5]))
    method = draw(st.sampled_from(METHODS))
    # An op that most non-source nodes of this example use, so chains of it get built; the
    # window ops get 4-d operands.
    focus = draw(st.sampled_from(REAL_OPS))
    if focus in CONV_OPS | POOL_OPS and draw(st.integers(0, 99)) < 80:
        shape = draw(st.sampled_from([s for s in GOOD_SHAPES if len(s) == 4]))
    else:
        shape = draw(st.sampled_from(GOOD_SHAPES))
    if draw(st.integers(0, 99)) < 15:
        graph, names, inputs = draw(window_graphs())
    else:
        graph, names = draw(graphs(shape, focus))
        inputs = draw(feeds(graph, shape))
    if method == "Forward":
        return method, service_pb2.ForwardRequest(
            graph=graph,
            inputs=inputs,
            fetch=draw(name_lists(names)),
            response_payload=payload_forms(draw),
        )
    if method == "Gradient":
        request = service_pb2.GradientRequest(
            graph=graph,
            inputs=inputs,
            output=draw(node_names(names)),
            wrt=draw(name_lists(names)),
            fetch=draw(name_lists(names)),
            response_payload=payload_forms(draw),
        )
        kind = draw(st.sampled_from(["plain", "plain", "batched_seed", "batch_axes"]))
        if kind == "plain" or rare(draw, 10):
            draw(seeds(request, shape))
        if kind == "batched_seed" or rare(draw, 5):
            # K seeds of the output's shape (the shared one most often) stacked, or none
            request.batched_seed = True
            if not rare(draw, 10):
                rows = draw(st.sampled_from([1, 2, 3, 0]))
                seed_shape = draw(st.sampled_from([shape, ()]))
                request.seed.CopyFrom(draw(stacked_tensors(seed_shape, rows)))
        if kind == "batch_axes" or rare(draw, 5):
            request.batch_axes.update(draw(batch_axes(inputs, names)))
            if not request.HasField("seed") and rare(draw, 30):
                # B per-example seeds: B is the size of the shared shape's first axis
                rows = shape[0] if shape else 1
                request.seed.CopyFrom(
                    draw(stacked_tensors(draw(st.sampled_from([(), shape[1:]])), rows))
                )
        return method, request
    if method == "CheckGradient":
        request = service_pb2.CheckGradientRequest(
            graph=graph,
            inputs=inputs,
            output=draw(node_names(names)),
            wrt=draw(name_lists(names)),
            random_seed=draw(st.one_of(st.just(0), st.integers(0, 2**64 - 1))),
        )
        for field in ("eps", "atol", "rtol"):
            value = tolerance(draw)
            if value is not None:
                setattr(request, field, value)
        for field in ("max_elements", "directions"):
            if rare(draw, 30):
                value = draw(st.one_of(st.integers(-2, 4), st.sampled_from(HUGE_INTS[2:])))
                setattr(request, field, value)
        draw(seeds(request, shape))
        return method, request
    if method == "GradientGraph":
        return method, service_pb2.GradientGraphRequest(
            graph=graph,
            inputs=inputs,
            output=draw(node_names(names)),
            wrt=draw(name_lists(names)),
        )
    if method == "JacobianVectorProduct":
        batched = draw(st.booleans())
        rows = draw(st.sampled_from([1, 2, 3, 0])) if batched else None
        return method, service_pb2.JacobianVectorProductRequest(
            graph=graph,
            inputs=inputs,
            output=draw(node_names(names)),
            tangents=draw(vectors(inputs, names, rows)),
            tangents_of=draw(name_lists(names)),
            all_tangents=rare(draw, 25),
            fetch=draw(name_lists(names)),
            batched_tangents=batched != rare(draw, 5),
            response_payload=payload_forms(draw),
        )
    if method == "Jacobian":
        return method, service_pb2.JacobianRequest(
            graph=graph,
            inputs=inputs,
            output=draw(node_names(names)),
            wrt=draw(name_lists(names)),
            mode=draw(st.sampled_from([0, 1, 2] + [3, 99] * rare(draw, 5))),
            response_payload=payload_forms(draw),
        )
    return method, service_pb2.HessianVectorProductRequest(
        graph=graph,
        inputs=inputs,
        output=draw(node_names(names)),
        vector=draw(vectors(inputs, names)),
        response_payload=payload_forms(draw),
    )


# ---------------------------------------------------------------------------------------------
# Checks


def scalar(value: float) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=FLOAT64, data=np.float64(value).tobytes())


LECTURE = service_pb2.GradientRequest(
    graph=graph_pb2.Graph(
        nodes=[
            graph_pb2.Node(name="x", op="input"),
            graph_pb2.Node(name="y", op="input"),
            graph_pb2.Node(name="z", op="input"),
            graph_pb2.Node(name="q", op="add", inputs=["x", "y"]),
            graph_pb2.Node(name="f", op="mul", inputs=["q", "z"]),
        ]
    ),
    inputs={"x": scalar(-2.0), "y": scalar(5.0), "z": scalar(-4.0)},
    output="f",
)


def assert_serves_lecture(stub: service_grpc.GradientServiceStub, timeout: float) -> None:
    """The server still answers f = (x + y) * z at (-2, 5, -4) exactly."""
    try:
        response, error = stub.Gradient(LECTURE, timeout=timeout), None
    except grpc.RpcError as e:
        response, error = None, e.code()
    if error is not None:
        pytest.fail(f"the server stopped serving: the lecture's request got {error.name}")
    values = {name: float(from_proto(t)) for name, t in response.values.items()}
    gradients = {name: float(from_proto(t)) for name, t in response.gradients.items()}
    assert values == {"x": -2.0, "y": 5.0, "z": -4.0, "q": 3.0, "f": -12.0}
    assert gradients == {"f": 1.0, "q": -4.0, "z": 3.0, "x": -4.0, "y": -4.0}


def call(stub: service_grpc.GradientServiceStub, method: str, request) -> object | None:
    """Make the call and check it against the contract; the response, or None on an error."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        response, error = getattr(stub, method)(request, timeout=CALL_TIMEOUT), None
    except grpc.RpcError as e:
        response, error = None, e
    allocated = tracemalloc.get_traced_memory()[1] - before
    if error is not None:
        code, details = error.code(), error.details()
        assert code in ALLOWED, f"{method} answered {code.name}: {details!r}"
        assert details, f"{method} answered {code.name} with no message"
        assert "Traceback" not in details and 'File "' not in details, details
    assert allocated <= MEMORY_BUDGET, (
        f"{method} allocated {allocated >> 20} MiB; the server's limit (max_bytes) is "
        f"{LIMITS.max_bytes >> 20} MiB"
    )
    return response


TENSOR_FIELDS = {
    "Forward": ("values",),
    "Gradient": ("values", "gradients"),
    "HessianVectorProduct": ("products",),
    "JacobianVectorProduct": ("values", "tangents"),
    "Jacobian": ("jacobians",),
}


def assert_decodes(method: str, response) -> None:
    """Every tensor of a successful response is well-formed."""
    for field in TENSOR_FIELDS.get(method, ()):
        for tensor in getattr(response, field).values():
            from_proto(tensor)


def _shape(tensor: tensor_pb2.Tensor) -> tuple[int, ...]:
    return tuple(from_proto(tensor).shape)


def assert_shapes(stub: service_grpc.GradientServiceStub, method: str, request, response) -> None:
    """The products of the new RPCs and fields have the shapes their contracts give: a
    tangent its node's (after [K] when batched), a Jacobian output's + input's, a gradient of
    K stacked seeds [K] + its node's, a per-example gradient its stacked value's ([B] + the
    node's)."""
    if method == "JacobianVectorProduct":
        rows = ()
        if request.batched_tangents:
            rows = tuple(_shape(next(iter(request.tangents.values())))[:1])
        for name, tangent in response.tangents.items():
            if name in response.values:
                assert _shape(tangent) == rows + _shape(response.values[name]), name
    elif method == "Jacobian":
        forward = call(
            stub,
            "Forward",
            service_pb2.ForwardRequest(
                graph=request.graph, inputs=request.inputs, fetch=[request.output]
            ),
        )
        if forward is not None:
            out_shape = _shape(forward.values[request.output])
            for name, jacobian in response.jacobians.items():
                assert _shape(jacobian) == out_shape + _shape(request.inputs[name]), name
    elif method == "Gradient" and (request.batched_seed or request.batch_axes):
        rows = tuple(_shape(request.seed)[:1]) if request.batched_seed else ()
        for name, gradient in response.gradients.items():
            if name in response.values:
                assert _shape(gradient) == rows + _shape(response.values[name]), name


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(drawn=requests())
def test_random_requests_get_clean_statuses_and_the_server_keeps_serving(stub, drawn):
    method, request = drawn
    # Start from an idle server: wait out anything an earlier example left running.
    assert_serves_lecture(stub, timeout=600)
    response = call(stub, method, request)
    if response is not None:
        assert_decodes(method, response)
        if method == "GradientGraph":
            # The backward graph is itself a request for Forward, fed ones as the seed.
            note(f"gradient graph: {response}")
            output = call(
                stub,
                "Forward",
                service_pb2.ForwardRequest(
                    graph=request.graph, inputs=request.inputs, fetch=[request.output]
                ),
            )
            if output is not None:
                value = from_proto(output.values[request.output])
                inputs = dict(request.inputs)
                inputs[response.seed] = to_proto(np.ones_like(value))
                forward = call(
                    stub, "Forward", service_pb2.ForwardRequest(graph=response.graph, inputs=inputs)
                )
                if forward is not None:
                    assert_decodes("Forward", forward)
        else:
            assert_shapes(stub, method, request, response)
    assert_serves_lecture(stub, timeout=LECTURE_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# Requests the fuzzer found, kept as fixed cases so they are checked on every run


def _node(name: str, op: str, *inputs: str, **ints: list[int]) -> graph_pb2.Node:
    node = graph_pb2.Node(name=name, op=op, inputs=inputs)
    for key, values in ints.items():
        node.attrs[key].CopyFrom(int_list(values))
    return node


def _feed(*shape: int) -> tensor_pb2.Tensor:
    return to_proto(np.ones(shape))


def _forward(*nodes: graph_pb2.Node, **inputs: tensor_pb2.Tensor) -> service_pb2.ForwardRequest:
    return service_pb2.ForwardRequest(graph=graph_pb2.Graph(nodes=nodes), inputs=inputs)


# A zero-size tensor whose other dimensions are huge: numpy refuses to make it.
ZERO_SIZE_HUGE = tensor_pb2.Tensor(dtype=FLOAT64, shape=[0, 2**62])
X, W = _node("x", "input"), _node("w", "input")
KNOWN_CASES = {
    "zero-size tensor with a huge dimension, fed": _forward(X, x=ZERO_SIZE_HUGE),
    "zero-size tensor with a huge dimension, as a constant": service_pb2.ForwardRequest(
        graph=graph_pb2.Graph(
            nodes=[
                graph_pb2.Node(
                    name="c",
                    op="constant",
                    attrs={"value": graph_pb2.AttrValue(tensor=ZERO_SIZE_HUGE)},
                )
            ]
        )
    ),
    "conv2d with a huge padding and stride": _forward(
        X,
        W,
        _node("q", "conv2d", "x", "w", padding=[2**40], stride=[2**62]),
        x=_feed(1, 1, 1, 1),
        w=_feed(1, 1, 1, 1),
    ),
    "avg_pool2d with a huge kernel": _forward(
        X, _node("q", "avg_pool2d", "x", kernel=[2**40], padding=[2**39]), x=_feed(1, 1, 1, 1)
    ),
    "conv2d padding over the byte limit": _forward(
        X,
        W,
        _node("q", "conv2d", "x", "w", padding=[1500], stride=[10_000]),
        x=_feed(1, 1, 3, 3),
        w=_feed(1, 1, 3, 3),
    ),
    "max_pool2d padding over the byte limit": _forward(
        X, _node("q", "max_pool2d", "x", kernel=[2000], padding=[1000]), x=_feed(1, 1, 1, 1)
    ),
    "avg_pool2d_grad window scatter over the byte limit": _forward(
        _node("g", "input"),
        _node(
            "q",
            "avg_pool2d_grad",
            "g",
            input_shape=[1, 1000, 1, 1],
            kernel=[5000, 1],
            padding=[2500, 0],
        ),
        g=_feed(1, 1000, 1, 1),
    ),
    # avg_pool2d_grad adds each kernel offset's share in turn: millions of rows were millions
    # of steps inside one op, which no deadline interrupts, and 64 MB of uncharged padding.
    "avg_pool2d_grad with a kernel of millions of rows": _forward(
        _node("g", "input"),
        _node(
            "q",
            "avg_pool2d_grad",
            "g",
            input_shape=[1, 1, 1, 1],
            kernel=[8_000_000, 1],
            padding=[4_000_000, 0],
        ),
        g=_feed(1, 1, 1, 1),
    ),
}


@pytest.mark.parametrize("request_", KNOWN_CASES.values(), ids=KNOWN_CASES.keys())
def test_known_bad_requests(stub, request_):
    assert_serves_lecture(stub, timeout=600)
    response = call(stub, "Forward", request_)
    if response is not None:
        assert_decodes("Forward", response)
    assert_serves_lecture(stub, timeout=LECTURE_TIMEOUT)


# Found by the fuzzer in the new RPCs, fixed; each must succeed with shapes as contracted.
TWO_INPUTS = graph_pb2.Graph(nodes=[_node("x", "input"), _node("y", "input")])
KNOWN_PRODUCTS = {
    # the tangent of x reaches no requested node: KeyError (INTERNAL) in building the graph
    "JVP with a tangent of an input the output does not depend on": (
        "JacobianVectorProduct",
        service_pb2.JacobianVectorProductRequest(
            graph=TWO_INPUTS,
            inputs={"x": scalar(0.0), "y": scalar(0.0)},
            output="y",
            tangents={"x": scalar(1.0), "y": scalar(2.0)},
        ),
    ),
    "batched JVP with only such a tangent": (
        "JacobianVectorProduct",
        service_pb2.JacobianVectorProductRequest(
            graph=TWO_INPUTS,
            inputs={"x": scalar(0.0), "y": scalar(0.0)},
            output="y",
            tangents={"x": _feed(3)},
            batched_tangents=True,
        ),
    ),
    # the same through Jacobian, which runs forward mode as a batched JVP
    "forward-mode Jacobian wrt an input the output does not depend on": (
        "Jacobian",
        service_pb2.JacobianRequest(
            graph=TWO_INPUTS,
            inputs={"x": _feed(2), "y": scalar(0.0)},
            output="y",
            mode=service_pb2.JACOBIAN_MODE_FORWARD,
        ),
    ),
    # np.ascontiguousarray made the 0-d block of shape [1]
    "forward-mode Jacobian of a scalar by a scalar": (
        "Jacobian",
        service_pb2.JacobianRequest(
            graph=graph_pb2.Graph(nodes=[X, _node("f", "exp", "x")]),
            inputs={"x": scalar(0.5)},
            output="f",
            mode=service_pb2.JACOBIAN_MODE_FORWARD,
        ),
    ),
}


@pytest.mark.parametrize("case", KNOWN_PRODUCTS.values(), ids=KNOWN_PRODUCTS.keys())
def test_known_requests_of_the_new_rpcs(stub, case):
    method, request_ = case
    assert_serves_lecture(stub, timeout=600)
    response = call(stub, method, request_)
    assert response is not None, method
    assert_decodes(method, response)
    assert_shapes(stub, method, request_, response)
    assert_serves_lecture(stub, timeout=LECTURE_TIMEOUT)
