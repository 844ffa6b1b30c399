"""Byte-level fuzzing: mutated valid requests, sent as raw bytes, never get INTERNAL or UNKNOWN.

Valid serialized requests of every RPC (tensors as raw bytes and as lists, float32, ints and
bools, constants, list attributes, a graph named by its digest, Gradient with K stacked seeds
(batched_seed) and per-example batch_axes, JacobianVectorProduct with tangents, batched
tangents, tangents_of and all_tangents, Jacobian in both modes, Session streams with steps and
chunks) are mutated at the byte level by hypothesis: bit flips, bytes overwritten, inserted,
deleted or duplicated, truncation, two requests spliced, varints corrupted. The server runs as
a process of its own (a crash shows as the process gone). Every answer must be OK or
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, with a short message and
no traceback (for a Session, the stream's status and each failed step's); after each example
and at the end the server still answers the lecture's f = (x + y) * z exactly.

FUZZ_EXAMPLES sets the number of examples per RPC (CI runs the default; `make fuzz` runs many
more).
"""

from __future__ import annotations

import copy
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from server_process import (
    LECTURE_GRAPH,
    LECTURE_INPUTS,
    UNARY,
    ServerProcess,
    assert_lecture,
    call_session,
    call_unary,
)

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2, tensor_pb2
from gradient_client.tensors import to_proto
from gradient_client.wire import graph_digest

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
CALL_TIMEOUT = 10.0
FLAGS = (
    "--max-nodes=1000",
    "--max-tensor-elements=100000",
    f"--max-bytes={64 << 20}",
    "--max-check-evaluations=200",
    "--max-message-mb=4",
    "--max-sessions=4",
    "--cache-mb=16",
    "--threads=2",
)
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CODES = {status.value[0]: status for status in grpc.StatusCode}


# ---------------------------------------------------------------------------------------------
# Valid requests to mutate


def _node(name: str, op: str, *inputs: str, **attrs: graph_pb2.AttrValue) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op=op, inputs=list(inputs), attrs=attrs)


def _ints(*values: int) -> graph_pb2.AttrValue:
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


def _lists(array: np.ndarray) -> tensor_pb2.Tensor:
    """A tensor in the list form (float_values / int_values / bool_values)."""
    tensor = tensor_pb2.Tensor(dtype=to_proto(array).dtype, shape=array.shape)
    if array.dtype.kind == "f":
        tensor.float_values.extend(array.ravel().tolist())
    elif array.dtype.kind == "b":
        tensor.bool_values.extend(array.ravel().tolist())
    else:
        tensor.int_values.extend(array.ravel().tolist())
    return tensor


# ||W x||^2, the lecture's vectorized example
NORM_GRAPH = graph_pb2.Graph(
    nodes=[
        _node("W", "input"),
        _node("x", "input"),
        _node("q", "matmul", "W", "x"),
        _node("s", "square", "q"),
        _node("f", "sum", "s"),
    ]
)
NORM_INPUTS = {
    "W": to_proto(np.array([[0.1, 0.5], [-0.3, 0.8]])),
    "x": to_proto(np.array([0.2, 0.4])),
}
# A small classifier: conv2d, relu, max_pool2d, reshape, cross_entropy against int labels,
# with a bool mask and a constant.
NET_GRAPH = graph_pb2.Graph(
    nodes=[
        _node("img", "input"),
        _node("k", "input"),
        _node("labels", "input"),
        _node("mask", "input"),
        _node("c", "conv2d", "img", "k", padding=_ints(1), stride=_ints(1)),
        _node("r", "relu", "c"),
        _node("p", "max_pool2d", "r", kernel=_ints(2)),
        _node("flat", "reshape", "p", shape=_ints(2, -1)),
        _node("zero", "constant", value=graph_pb2.AttrValue(tensor=to_proto(np.float32(0)))),
        _node("m", "where", "mask", "flat", "zero"),
        _node("f", "cross_entropy", "m", "labels"),
    ]
)
NET_INPUTS = {
    "img": to_proto(np.linspace(-1, 1, 2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)),
    "k": to_proto(np.ones((2, 1, 3, 3), np.float32) / 9),
    "labels": to_proto(np.array([0, 5])),
    "mask": _lists(np.array([[True, False, True, True] * 2] * 2)),
}
LECTURE_LISTS = {name: _lists(np.array(v)) for name, v in (("x", -2.0), ("y", 5.0), ("z", -4.0))}
LECTURE_DIGEST = graph_digest(LECTURE_GRAPH.SerializeToString())


def _seeds() -> dict[str, list[bytes]]:
    """Valid requests of each unary RPC, serialized."""
    lists = service_pb2.PAYLOAD_FORM_LISTS
    seeds: dict[str, list] = {
        "Forward": [
            service_pb2.ForwardRequest(graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS),
            service_pb2.ForwardRequest(
                graph=NET_GRAPH, inputs=NET_INPUTS, fetch=["f", "p"], response_payload=lists
            ),
            service_pb2.ForwardRequest(graph_digest=LECTURE_DIGEST, inputs=LECTURE_LISTS),
        ],
        "Gradient": [
            service_pb2.GradientRequest(graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, output="f"),
            service_pb2.GradientRequest(
                graph=NORM_GRAPH, inputs=NORM_INPUTS, output="q", seed=to_proto(np.ones(2))
            ),
            service_pb2.GradientRequest(
                graph=NET_GRAPH, inputs=NET_INPUTS, output="f", wrt=["k"], fetch=["f"]
            ),
            service_pb2.GradientRequest(
                graph_digest=LECTURE_DIGEST, inputs=LECTURE_LISTS, output="f", response_payload=1
            ),
            # K = 3 stacked seeds of the output q, one forward pass
            service_pb2.GradientRequest(
                graph=NORM_GRAPH,
                inputs=NORM_INPUTS,
                output="q",
                seed=to_proto(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])),
                batched_seed=True,
                wrt=["W"],
            ),
            # per-example gradients: x holds B = 3 examples along axis 0, W shared
            service_pb2.GradientRequest(
                graph=NORM_GRAPH,
                inputs={**NORM_INPUTS, "x": to_proto(np.array([[0.2, 0.4], [1.0, -1.0], [0, 3]]))},
                output="f",
                batch_axes={"x": 0},
                fetch=["f"],
            ),
            # per-example over axis 1 (B = 2) with per-example seeds stacked
            service_pb2.GradientRequest(
                graph=NORM_GRAPH,
                inputs={**NORM_INPUTS, "x": to_proto(np.array([[0.2, 0.4], [1.0, -1.0]]))},
                output="q",
                batch_axes={"x": -1},
                seed=_lists(np.array([[1.0, 0.5], [-1.0, 2.0]])),
            ),
        ],
        "CheckGradient": [
            service_pb2.CheckGradientRequest(
                graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, output="f", eps=1e-6
            ),
            service_pb2.CheckGradientRequest(
                graph=NORM_GRAPH, inputs=NORM_INPUTS, output="f", max_elements=2, random_seed=7
            ),
        ],
        "GradientGraph": [
            service_pb2.GradientGraphRequest(
                graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, output="f", wrt=["x"]
            ),
            service_pb2.GradientGraphRequest(graph=NET_GRAPH, inputs=NET_INPUTS, output="f"),
        ],
        "HessianVectorProduct": [
            service_pb2.HessianVectorProductRequest(
                graph=NORM_GRAPH,
                inputs=NORM_INPUTS,
                output="f",
                vector={"x": to_proto(np.array([1.0, -1.0]))},
            ),
            service_pb2.HessianVectorProductRequest(
                graph=LECTURE_GRAPH,
                inputs=LECTURE_INPUTS,
                output="f",
                vector={"x": to_proto(np.float64(1.0))},
            ),
        ],
        "JacobianVectorProduct": [
            service_pb2.JacobianVectorProductRequest(
                graph=LECTURE_GRAPH,
                inputs=LECTURE_INPUTS,
                output="f",
                tangents={"x": to_proto(np.float64(1.0)), "z": to_proto(np.float64(-0.5))},
            ),
            service_pb2.JacobianVectorProductRequest(
                graph=NORM_GRAPH,
                inputs=NORM_INPUTS,
                output="f",
                tangents={
                    "x": to_proto(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, -0.5]])),
                    "W": to_proto(np.zeros((3, 2, 2))),
                },
                batched_tangents=True,
                tangents_of=["q"],
                fetch=["s"],
            ),
            service_pb2.JacobianVectorProductRequest(
                graph=NET_GRAPH,
                inputs=NET_INPUTS,
                output="f",
                tangents={"k": _lists(np.full((2, 1, 3, 3), 0.1, np.float32))},
                all_tangents=True,
                response_payload=lists,
            ),
            service_pb2.JacobianVectorProductRequest(
                graph_digest=LECTURE_DIGEST,
                inputs=LECTURE_LISTS,
                output="q",
                tangents={"y": _lists(np.array(2.0))},
            ),
        ],
        "Jacobian": [
            service_pb2.JacobianRequest(graph=LECTURE_GRAPH, inputs=LECTURE_INPUTS, output="f"),
            service_pb2.JacobianRequest(
                graph=NORM_GRAPH,
                inputs=NORM_INPUTS,
                output="q",
                wrt=["W", "x"],
                mode=service_pb2.JACOBIAN_MODE_REVERSE,
            ),
            service_pb2.JacobianRequest(
                graph=NORM_GRAPH,
                inputs=NORM_INPUTS,
                output="s",
                wrt=["x"],
                mode=service_pb2.JACOBIAN_MODE_FORWARD,
                response_payload=lists,
            ),
            service_pb2.JacobianRequest(
                graph_digest=LECTURE_DIGEST, inputs=LECTURE_LISTS, output="f", wrt=["y"]
            ),
        ],
    }
    return {rpc: [m.SerializeToString() for m in messages] for rpc, messages in seeds.items()}


SEEDS = _seeds()
ALL_SEEDS = [data for messages in SEEDS.values() for data in messages]


def _session_seeds() -> list[list[bytes]]:
    """Valid Session streams: each a list of serialized SessionRequests."""
    start = service_pb2.SessionRequest(
        start=service_pb2.SessionStart(graph=LECTURE_GRAPH, output="f", fetch=["f", "q"])
    )
    step = service_pb2.SessionRequest(steps=[service_pb2.SessionStep(inputs=LECTURE_INPUTS)])
    forward = service_pb2.SessionStep(kind=service_pb2.STEP_KIND_FORWARD, inputs=NORM_INPUTS)
    norm_start = service_pb2.SessionRequest(
        start=service_pb2.SessionStart(graph=NORM_GRAPH, output="f", max_message_bytes=1 << 20)
    )
    # x arrives in two chunks; W inline
    data = np.array([0.2, 0.4]).tobytes()
    chunked = service_pb2.SessionRequest(
        steps=[service_pb2.SessionStep(inputs={"W": NORM_INPUTS["W"]})],
        chunks=[
            service_pb2.TensorChunk(
                target=service_pb2.CHUNK_TARGET_INPUT,
                name="x",
                index=0,
                dtype=tensor_pb2.DTYPE_FLOAT64,
                shape=[2],
                data=data[:8],
            ),
            service_pb2.TensorChunk(
                target=service_pb2.CHUNK_TARGET_INPUT, name="x", index=1, data=data[8:]
            ),
        ],
    )
    streams = [
        [start, step, step],
        [norm_start, service_pb2.SessionRequest(steps=[forward]), chunked],
        [
            service_pb2.SessionRequest(
                start=service_pb2.SessionStart(graph_digest=LECTURE_DIGEST, output="f"),
                steps=[service_pb2.SessionStep(inputs=LECTURE_LISTS)],
            )
        ],
    ]
    return [[m.SerializeToString() for m in stream] for stream in streams]


SESSION_SEEDS = _session_seeds()


# ---------------------------------------------------------------------------------------------
# Mutations

INTERESTING_VARINTS = [
    b"\x00",
    b"\x7f",
    b"\x80\x01",
    b"\xff\xff\xff\xff\x0f",  # 2^32 - 1
    b"\xff\xff\xff\xff\x07",  # 2^31 - 1
    b"\x80\x80\x80\x80\x08",  # 2^31
    b"\xff" * 9 + b"\x01",  # 2^64 - 1 (or -1)
    b"\xff" * 10 + b"\x01",  # runs over 10 bytes
    b"\x80" * 9 + b"\x00",  # 0, padded to 10 bytes
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # 2^63 - 1
]


@st.composite
def raw_mutations(draw, data: bytes) -> bytes:
    """`data` after one to three mutations of its bytes, blind to its fields."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["flip", "set", "insert", "delete", "duplicate", "truncate", "splice", "varint"]
            )
        )
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        elif kind == "duplicate":
            span = bytes(data[position : position + draw(st.integers(1, 64))])
            at = draw(st.integers(0, len(data)))
            data[at:at] = span
        elif kind == "truncate":
            del data[position:]
        elif kind == "splice":
            other = draw(st.sampled_from(ALL_SEEDS))
            cut = draw(st.integers(0, len(other)))
            data[position:] = other[cut:]
        elif kind == "varint":
            # Replace the varint at `position` (or the byte there) by an interesting one.
            end = position
            while end < len(data) and data[end] & 0x80:
                end += 1
            data[position : end + 1] = draw(st.sampled_from(INTERESTING_VARINTS))
    return bytes(data)


# Structure-aware mutations: the bytes are read as protobuf wire fields (a length-delimited
# field that parses as fields is taken for a submessage), one field is changed, and the message
# is written back with every enclosing length fixed, so that the change reaches the server's
# checks behind the parser.


@dataclass
class _Field:
    number: int
    wire_type: int
    value: Any  # int (varint), bytes (fixed and leaf LEN), or list[_Field] (submessage)


def _varint_at(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    return None


def _fields(data: bytes, depth: int = 0) -> list[_Field] | None:
    fields, pos = [], 0
    while pos < len(data):
        read = _varint_at(data, pos)
        if read is None or read[0] >> 3 == 0:
            return None
        key, pos = read
        number, wire_type = key >> 3, key & 7
        value: Any
        if wire_type == 0:
            read = _varint_at(data, pos)
            if read is None:
                return None
            value, pos = read
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == 2:
            read = _varint_at(data, pos)
            if read is None:
                return None
            length, pos = read
            value, pos = data[pos : pos + length], pos + length
            nested = _fields(value, depth + 1) if value and depth < 10 else None
            value = nested if nested is not None else value
        else:
            return None
        if pos > len(data):
            return None
        fields.append(_Field(number, wire_type, value))
    return fields


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _serialize(fields: list[_Field]) -> bytes:
    out = bytearray()
    for f in fields:
        out += _varint(f.number << 3 | f.wire_type)
        if f.wire_type == 0:
            out += _varint(f.value)
        elif f.wire_type == 2:
            payload = _serialize(f.value) if isinstance(f.value, list) else f.value
            out += _varint(len(payload)) + payload
        else:
            out += f.value
    return bytes(out)


def _all_fields(fields: list[_Field]) -> list[tuple[list[_Field], int]]:
    """(list, index) of every field, nested ones included."""
    found = []
    for index, f in enumerate(fields):
        found.append((fields, index))
        if isinstance(f.value, list):
            found += _all_fields(f.value)
    return found


INTERESTING_INTS = [0, 1, 2, 3, 5, 6, 7, 99, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1]
INTERESTING_DOUBLES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324, -1.0]
ODD_STRINGS = [b"", b"\xff\xfe", b"\xc3\x28", b"\x00", b"x" * 5000, b"grad/x", b"f", b"x"]


@st.composite
def field_mutations(draw, data: bytes) -> bytes:
    """`data` with one to three of its fields changed, lengths kept consistent."""
    fields = _fields(data)
    if not fields:
        return draw(raw_mutations(data))
    for _ in range(draw(st.integers(1, 3))):
        places = _all_fields(fields)
        if not places:
            break
        owner, index = draw(st.sampled_from(places))
        f = owner[index]
        kind = draw(
            st.sampled_from(["value", "value", "value", "delete", "repeat", "renumber", "swap"])
        )
        if kind == "delete":
            del owner[index]
        elif kind == "repeat":
            owner.insert(index, copy.deepcopy(f))
        elif kind == "renumber":
            f.number = max(1, f.number + draw(st.sampled_from([-1, 1, 2, 100])))
        elif kind == "swap":
            other = draw(st.integers(0, len(owner) - 1))
            owner[index], owner[other] = owner[other], owner[index]
        elif f.wire_type == 0:
            f.value = draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, 2**64 - 1)))
        elif f.wire_type == 1:
            f.value = struct.pack("<d", draw(st.sampled_from(INTERESTING_DOUBLES)))
        elif isinstance(f.value, list):
            if draw(st.booleans()):
                # another submessage of the same field number, from any valid request
                pool = [
                    g.value
                    for seed in ALL_SEEDS
                    for owner_, i in _all_fields(_fields(seed) or [])
                    for g in [owner_[i]]
                    if g.number == f.number and isinstance(g.value, list)
                ]
                f.value = copy.deepcopy(draw(st.sampled_from(pool))) if pool else []
            else:
                f.value = []
        else:
            f.value = draw(
                st.one_of(
                    st.sampled_from(ODD_STRINGS),
                    raw_mutations(f.value),
                    st.binary(max_size=24),
                    st.just(f.value * 64),
                )
            )
    return _serialize(fields)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` mutated, field-aware most of the time, blindly the rest."""
    if draw(st.integers(0, 9)) < 7:
        return draw(field_mutations(data))
    return draw(raw_mutations(data))


@st.composite
def unary_requests(draw) -> tuple[str, bytes]:
    rpc = draw(st.sampled_from(UNARY))
    seed = draw(st.sampled_from(SEEDS[rpc]))
    return rpc, draw(mutated(seed))


@st.composite
def session_streams(draw) -> list[bytes]:
    stream = list(draw(st.sampled_from(SESSION_SEEDS)))
    for index in draw(st.sets(st.integers(0, len(stream) - 1), min_size=1)):
        stream[index] = draw(mutated(stream[index]))
    return stream


# ---------------------------------------------------------------------------------------------
# The server and the checks


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("byte-fuzz") / "server.log"
    with ServerProcess(log_path, *FLAGS) as running:
        # The lecture graph is cached, so that requests naming it by digest find it.
        for rpc in UNARY:
            code, details, _ = call_unary(running, rpc, SEEDS[rpc][0])
            assert code == grpc.StatusCode.OK, (rpc, details)
        yield running
    log = running.log()
    assert "Traceback" not in log, log[-4000:]


def assert_clean(what: str, code: grpc.StatusCode, details: str) -> None:
    assert code in ALLOWED, f"{what} answered {code.name}: {details!r}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{what} answered {code.name} with no message"
    assert len(details.encode()) <= 1024, f"{what}: {len(details.encode())} bytes of details"
    assert "Traceback" not in details and 'File "' not in details, details


def assert_serving(server: ServerProcess) -> None:
    assert server.alive(), f"the server died:\n{server.log()[-4000:]}"
    assert_lecture(server, timeout=CALL_TIMEOUT)


@pytest.mark.parametrize(
    "rpc, data", [(rpc, data) for rpc, messages in SEEDS.items() for data in messages]
)
def test_the_requests_mutated_are_valid(server, rpc, data):
    code, details, _ = call_unary(server, rpc, data, CALL_TIMEOUT)
    assert code == grpc.StatusCode.OK, (rpc, details)


@pytest.mark.parametrize("stream", SESSION_SEEDS)
def test_the_session_streams_mutated_are_valid(server, stream):
    code, details, responses = call_session(server, stream, CALL_TIMEOUT)
    assert code == grpc.StatusCode.OK, details
    results = [
        r for data in responses for r in service_pb2.SessionResponse.FromString(data).results
    ]
    assert results and not any(r.HasField("error") for r in results), results


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ_SETTINGS
@given(drawn=unary_requests())
def test_mutated_unary_requests_get_clean_statuses(server, drawn):
    rpc, data = drawn
    note(f"{rpc} {data!r}")
    code, details, _ = call_unary(server, rpc, data, CALL_TIMEOUT)
    assert_clean(rpc, code, details)
    assert_serving(server)


@FUZZ_SETTINGS
@given(stream=session_streams())
def test_mutated_session_streams_get_clean_statuses(server, stream):
    note(repr(stream))
    code, details, responses = call_session(server, stream, CALL_TIMEOUT)
    assert_clean("Session", code, details)
    for data in responses:
        for result in service_pb2.SessionResponse.FromString(data).results:
            if result.HasField("error"):
                step_code = CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
                assert_clean("a Session step", step_code, result.error.message)
    assert_serving(server)


def test_the_server_still_serves_after_the_fuzzing(server):
    assert_serving(server)
    for rpc in UNARY:
        code, details, _ = call_unary(server, rpc, SEEDS[rpc][0])
        assert code == grpc.StatusCode.OK, (rpc, details)
