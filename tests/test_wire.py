"""The hand-written wire codec (gradient_client.wire) checked against protobuf's own parser."""

from __future__ import annotations

import hashlib

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import graph_pb2, tensor_pb2
from gradient_client.tensors import TensorFormatError, from_proto
from gradient_client.wire import (
    ChunkAssembler,
    WireFormatError,
    WireGraph,
    WireMessage,
    chunk_budget,
    chunks_of,
    decode,
    encode,
    graph_digest,
    payload_bytes,
    split_oversized,
)

DTYPES = ["float32", "float64", "int32", "int64", "bool"]
WIRE = {
    "float32": tensor_pb2.DTYPE_FLOAT32,
    "float64": tensor_pb2.DTYPE_FLOAT64,
    "int32": tensor_pb2.DTYPE_INT32,
    "int64": tensor_pb2.DTYPE_INT64,
    "bool": tensor_pb2.DTYPE_BOOL,
}


def unpadded(message):
    """The message with the padding of every Tensor in it cleared (padding only aligns a
    payload: readers ignore it), so that it compares equal to one protobuf builds."""
    if message.DESCRIPTOR is tensor_pb2.Tensor.DESCRIPTOR:
        message.ClearField("padding")
        return message
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for entry in value.values():
                    unpadded(entry)
        elif field.is_repeated:
            for item in value:
                unpadded(item)
        else:
            unpadded(value)
    return message


SHAPES = [(), (0,), (3,), (2, 3), (1, 2, 0)]
ANY_SHAPE = st.sampled_from(SHAPES)
LAYOUTS = ["contiguous", "big-endian", "transposed", "strided", "reversed", "big-endian strided"]
# Float bit patterns that a value comparison would not tell apart (NaN payloads among them).
SPECIAL_BITS = {
    8: [0, 1 << 63, 0x7FF0 << 48, 0xFFF0 << 48, 0x7FF8 << 48, 0x7FF8DEADBEEF0001, 0x7FF0 << 48 | 1],
    4: [0, 1 << 31, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FC0BEEF, 0x7F800001, 1],
}
BOTH_ERRORS = (WireFormatError, TensorFormatError)

GradientRequest = service_pb2.GradientRequest
GradientResponse = service_pb2.GradientResponse
MESSAGE_TYPES = [
    GradientRequest,
    GradientResponse,
    service_pb2.ForwardRequest,
    service_pb2.HessianVectorProductRequest,
]


# ---------------------------------------------------------------------------------------------
# Protobuf wire format by hand


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as protobuf writes them
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field_varint(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def entry(name: bytes | str, value: bytes) -> bytes:
    """A map entry's bytes: key, then value."""
    raw = name.encode() if isinstance(name, str) else name
    return field_bytes(1, raw) + field_bytes(2, value)


def tensor(dtype: int, shape=(), data: bytes = b"", *, packed: bool = True) -> bytes:
    """A Tensor's bytes in protobuf's field order, empty fields left out as protobuf does."""
    out = field_varint(1, dtype) if dtype else b""
    if packed and shape:
        out += field_bytes(2, b"".join(varint(d) for d in shape))
    elif shape:
        out += b"".join(field_varint(2, d) for d in shape)
    return out + (field_bytes(3, data) if data else b"")


FLOAT64_2 = tensor(WIRE["float64"], [2], np.array([1.5, -2.0]).tobytes())
INT32_3 = tensor(WIRE["int32"], [3], np.array([7, -8, 9], "<i4").tobytes())

UNKNOWN_FIELDS = {
    "varint": field_varint(100, 300),
    "fixed64": key(101, 1) + bytes(range(8)),
    "fixed32": key(102, 5) + bytes(range(4)),
    "length-delimited": field_bytes(103, b"\x08\x01 not a message"),
    "group": key(104, 3) + field_varint(1, 5) + field_bytes(2, b"xy") + key(104, 4),
    "nested groups": key(105, 3) + key(106, 3) + key(7, 5) + bytes(4) + key(106, 4) + key(105, 4),
    "largest field number": field_varint(2**29 - 1, 1),
}


# ---------------------------------------------------------------------------------------------
# Arrays and messages to send


def same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype (little-endian on the wire side), same shape, same bytes in row-major order."""
    assert actual.dtype == np.dtype(expected.dtype.name), (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape
    little = expected.astype(np.dtype(expected.dtype.name))  # a byte swap, no float conversion
    assert actual.tobytes() == little.tobytes()


def proto_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """The Tensor protobuf would carry for a little-endian array (built without the SDK)."""
    return tensor_pb2.Tensor(dtype=WIRE[array.dtype.name], shape=array.shape, data=array.tobytes())


def lay_out(array: np.ndarray, layout: str) -> np.ndarray:
    """The same values in another memory layout; done on the bits so no float is converted."""
    bits = array.view(f"u{array.dtype.itemsize}")
    if "strided" in layout and array.ndim:
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), bits.dtype)
        wide[..., ::2] = bits
        bits = wide[..., ::2]
    elif layout == "transposed":
        bits = bits.T.copy().T  # (ascontiguousarray would make a 0-d array 1-d)
    elif layout == "reversed" and array.ndim:
        bits = bits[::-1].copy()[::-1]
    if "big-endian" in layout:
        return bits.byteswap().view(array.dtype.newbyteorder(">"))
    return bits.view(array.dtype)


@st.composite
def arrays(draw, shapes=ANY_SHAPE) -> np.ndarray:
    """A little-endian C-contiguous array of a wire dtype; floats from arbitrary bit patterns."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(shapes)
    if dtype.kind != "f":
        return draw(hnp.arrays(dtype, shape))
    bits = st.sampled_from(SPECIAL_BITS[dtype.itemsize]) | st.integers(
        0, 2 ** (8 * dtype.itemsize) - 1
    )
    return draw(hnp.arrays(np.dtype(f"<u{dtype.itemsize}"), shape, elements=bits)).view(dtype)


@st.composite
def sent_arrays(draw) -> tuple[np.ndarray, np.ndarray]:
    """(truth, what is sent): the same values, the second in any layout or byte order."""
    truth = draw(arrays())
    return truth, lay_out(truth, draw(st.sampled_from(LAYOUTS)))


names = st.text(max_size=6)  # any unicode, the empty string included
texts = st.text(max_size=12)


@st.composite
def graphs(draw) -> graph_pb2.Graph:
    graph = graph_pb2.Graph()
    for name in draw(st.lists(names, max_size=3)):
        node = graph.nodes.add(name=name, op=draw(st.sampled_from(["input", "add", "cast"])))
        node.inputs.extend(draw(st.lists(names, max_size=2)))
        if draw(st.booleans()):
            node.attrs["dtype"].s = draw(st.sampled_from(DTYPES))
    return graph


def is_tensor_map(descriptor: FieldDescriptor) -> bool:
    entry_type = descriptor.message_type
    return (
        entry_type is not None
        and entry_type.GetOptions().map_entry
        and entry_type.fields_by_name["value"].message_type is tensor_pb2.Tensor.DESCRIPTOR
    )


def hand_fields(message_type) -> list[str]:
    """The fields the codec carries itself: tensors, tensor maps, graphs."""
    special = (tensor_pb2.Tensor.DESCRIPTOR, graph_pb2.Graph.DESCRIPTOR)
    return [
        f.name
        for f in message_type.DESCRIPTOR.fields
        if is_tensor_map(f) or f.message_type in special
    ]


def plain_part(message):
    """A copy of a message without its hand-carried fields and unknown fields."""
    plain = type(message)()
    plain.CopyFrom(message)
    for name in hand_fields(type(message)):
        plain.ClearField(name)
    plain.DiscardUnknownFields()
    return plain


def is_int32_map(f) -> bool:
    """Whether a field is a map<string, int32> (GradientRequest.batch_axes)."""
    entry = f.message_type
    return (
        entry is not None
        and entry.GetOptions().map_entry
        and entry.fields_by_name["value"].type == FieldDescriptor.TYPE_INT32
    )


@st.composite
def messages(draw, message_type):
    """(protobuf message, the same as a WireMessage, the truth of its tensors)."""
    truth = message_type()
    sent = WireMessage(message_type())
    arrays_by_field: dict = {}
    for f in message_type.DESCRIPTOR.fields:
        if f.message_type is graph_pb2.Graph.DESCRIPTOR:
            if draw(st.booleans()):
                graph = draw(graphs())
                truth.graph.CopyFrom(graph)
                sent.raw[f.name] = graph.SerializeToString()
        elif is_tensor_map(f):
            drawn = draw(st.dictionaries(names, sent_arrays(), max_size=3))
            if drawn:
                sent.tensors[f.name] = {k: layout for k, (_, layout) in drawn.items()}
                arrays_by_field[f.name] = {k: array for k, (array, _) in drawn.items()}
                for k, (array, _) in drawn.items():
                    getattr(truth, f.name)[k].CopyFrom(proto_tensor(array))
        elif f.message_type is tensor_pb2.Tensor.DESCRIPTOR:
            if draw(st.booleans()):
                array, layout = draw(sent_arrays())
                sent.tensors[f.name] = layout
                arrays_by_field[f.name] = array
                getattr(truth, f.name).CopyFrom(proto_tensor(array))
        elif f.message_type is service_pb2.SkippedNode.DESCRIPTOR:
            for name, reason in draw(st.lists(st.tuples(names, texts), max_size=2)):
                getattr(truth, f.name).add(name=name, reason=reason)
        elif f.type == FieldDescriptor.TYPE_STRING and f.is_repeated:
            getattr(truth, f.name).extend(draw(st.lists(names, max_size=3)))
        elif f.type == FieldDescriptor.TYPE_STRING:
            setattr(truth, f.name, draw(texts))
        elif f.type == FieldDescriptor.TYPE_ENUM:
            setattr(truth, f.name, draw(st.sampled_from([v.number for v in f.enum_type.values])))
        elif f.type == FieldDescriptor.TYPE_BOOL:
            setattr(truth, f.name, draw(st.booleans()))
        elif is_int32_map(f):
            int32s = st.integers(-(2**31), 2**31 - 1)
            getattr(truth, f.name).update(draw(st.dictionaries(names, int32s, max_size=3)))
        else:
            raise AssertionError(f"no strategy for {message_type.__name__}.{f.name}")
    sent.fields.CopyFrom(plain_part(truth))
    return truth, sent, arrays_by_field


any_message = st.sampled_from(MESSAGE_TYPES).flatmap(messages)


def assert_tensors(decoded: dict, expected: dict, *, read_only: bool = True) -> None:
    """decode()'s tensors equal the expected arrays, bit for bit (read-only views unless some
    come from the list form, which from_proto builds anew)."""
    assert decoded.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, dict):
            assert decoded[name].keys() == value.keys()
            pairs = [(decoded[name][k], v) for k, v in value.items()]
        else:
            pairs = [(decoded[name], value)]
        for actual, truth in pairs:
            same_bits(actual, truth)
            assert not (read_only and actual.flags.writeable)


def protobuf_tensors(message) -> tuple[dict, bool]:
    """The tensors of a parsed protobuf message through from_proto, as decode() returns them,
    and whether any of them takes a list form."""
    out: dict = {}
    messages = []
    for f in message.DESCRIPTOR.fields:
        if is_tensor_map(f) and len(getattr(message, f.name)):
            out[f.name] = {k: from_proto(v) for k, v in getattr(message, f.name).items()}
            messages += getattr(message, f.name).values()
        elif f.message_type is tensor_pb2.Tensor.DESCRIPTOR and message.HasField(f.name):
            out[f.name] = from_proto(getattr(message, f.name))
            messages.append(getattr(message, f.name))
    lists = any(t.float_values or t.int_values or t.bool_values for t in messages)
    return out, lists


def assert_decodes_like_protobuf(data: bytes, message_type) -> WireMessage:
    """decode(data) holds what protobuf parses from the same bytes: plain fields, tensors
    (through from_proto) and the graph."""
    parsed = unpadded(message_type.FromString(data))
    decoded = decode(data, message_type)
    assert decoded.error is None
    assert plain_part(decoded.fields) == plain_part(parsed)
    expected, lists = protobuf_tensors(parsed)
    assert_tensors(decoded.tensors, expected, read_only=not lists)
    if "graph" in message_type.DESCRIPTOR.fields_by_name:
        assert ("graph" in decoded.raw) == parsed.HasField("graph")
        if parsed.HasField("graph"):
            assert graph_pb2.Graph.FromString(bytes(decoded.raw["graph"])) == parsed.graph
    return decoded


# ---------------------------------------------------------------------------------------------
# 1. Round trips against protobuf


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_encode_gives_the_bytes_protobuf_parses_back_to_the_same_message(drawn):
    truth, sent, arrays_by_field = drawn
    parsed = unpadded(type(truth).FromString(encode(sent)))
    assert parsed == truth  # Tensor.data compares as bytes: bit-exact, NaN payloads included
    for name, value in arrays_by_field.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for k, array in pairs:
            message = getattr(parsed, name) if k is None else getattr(parsed, name)[k]
            same_bits(from_proto(message), array)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_decode_of_protobuf_bytes_gives_the_same_arrays_and_fields(drawn):
    truth, _, arrays_by_field = drawn
    data = truth.SerializeToString()
    decoded = decode(data, type(truth))
    assert decoded.error is None and not decoded.nested
    assert plain_part(decoded.fields) == plain_part(truth)
    assert_tensors(decoded.tensors, arrays_by_field)
    if "graph" in truth.DESCRIPTOR.fields_by_name and truth.HasField("graph"):
        assert graph_pb2.Graph.FromString(bytes(decoded.raw["graph"])) == truth.graph
    else:
        assert "graph" not in decoded.raw


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_decode_of_encode_gives_the_truth_back(drawn):
    truth, sent, arrays_by_field = drawn
    data = encode(sent)
    decoded = decode(data, type(truth))
    assert plain_part(decoded.fields) == plain_part(truth)
    assert_tensors(decoded.tensors, arrays_by_field)
    assert {k: bytes(v) for k, v in decoded.raw.items()} == sent.raw


@pytest.mark.parametrize("layout", LAYOUTS + ["fortran", "size-1 axis with a large stride"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_of_tensors_larger_than_the_copy_threshold(dtype, layout):
    """Payloads of 1 KiB and more are written from a view of the array, not with tobytes()."""
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 2, (40, 70)) if dtype == "bool" else rng.normal(size=(40, 70)) * 1e3
    truth = truth.astype(dtype)
    if layout == "fortran":
        sent = np.asfortranarray(truth)
    elif layout.startswith("size-1"):  # C-contiguous all the same: a view on the wire path
        truth = truth.reshape(1, -1)
        wide = np.zeros((3, truth.size), truth.dtype)
        wide[1] = truth[0]
        sent = wide[1::5]
        assert sent.flags.c_contiguous and sent.strides[0] == 5 * wide.strides[0]
    else:
        sent = lay_out(truth, layout)
    assert np.array_equal(sent, truth)
    message = WireMessage(
        GradientRequest(output="f"), tensors={"seed": sent, "inputs": {"x": sent}}
    )
    data = encode(message)
    parsed = unpadded(GradientRequest.FromString(data))
    assert parsed.seed == proto_tensor(truth) and parsed.inputs["x"] == proto_tensor(truth)
    assert_tensors(decode(data, GradientRequest).tensors, {"seed": truth, "inputs": {"x": truth}})


@pytest.mark.parametrize("shape", [(200,), (130, 2), (1, 128, 0), (3, 0, 1000)])
def test_dimensions_of_several_varint_bytes(shape):
    truth = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    data = GradientRequest(seed=proto_tensor(truth)).SerializeToString()
    assert_tensors(decode(data, GradientRequest).tensors, {"seed": truth})
    encoded = encode(WireMessage(GradientRequest(), tensors={"seed": truth}))
    assert unpadded(GradientRequest.FromString(encoded)).seed == proto_tensor(truth)


def test_encode_of_python_values_and_an_empty_message():
    assert encode(WireMessage(GradientResponse())) == b""
    assert decode(b"", GradientResponse) == WireMessage(GradientResponse())
    sent = WireMessage(GradientRequest(), tensors={"inputs": {"x": 2.5, "n": 3, "b": True}})
    parsed = unpadded(GradientRequest.FromString(encode(sent)))
    assert {k: from_proto(v).item() for k, v in parsed.inputs.items()} == {"x": 2.5, "n": 3, "b": 1}
    assert parsed.inputs["n"].dtype == tensor_pb2.DTYPE_INT64


# ---------------------------------------------------------------------------------------------
# 2. Every valid layout, not only protobuf's own


def test_fields_in_reverse_order():
    reversed_tensor = field_bytes(3, np.array([1.5, -2.0]).tobytes()) + field_bytes(2, b"\x02")
    reversed_tensor += field_varint(1, WIRE["float64"])
    data = (
        field_bytes(5, b"b")
        + field_bytes(5, b"a")
        + field_bytes(4, reversed_tensor)
        + field_bytes(3, "ŷ".encode())
        + field_bytes(2, field_bytes(2, INT32_3) + field_bytes(1, "é".encode()))
        + field_bytes(2, field_bytes(2, reversed_tensor) + field_bytes(1, b"x"))
        + field_bytes(1, graph_pb2.Graph(nodes=[graph_pb2.Node(name="x")]).SerializeToString())
    )
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.fields.output == "ŷ" and list(decoded.fields.wrt) == ["b", "a"]
    assert set(decoded.tensors["inputs"]) == {"é", "x"}
    assert decoded.tensors["seed"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("packed", [False, True], ids=["repeated varints", "packed"])
def test_shape_packed_or_not(packed):
    data = field_bytes(4, tensor(WIRE["int64"], [2, 1, 3], bytes(48), packed=packed))
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.tensors["seed"].shape == (2, 1, 3)


def test_shape_split_between_packed_and_unpacked_runs():
    seed = field_bytes(2, b"\x02") + field_varint(2, 3) + field_bytes(2, b"\x01\x01")
    seed += field_varint(1, WIRE["bool"]) + field_bytes(3, bytes(6))
    decoded = assert_decodes_like_protobuf(field_bytes(4, seed), GradientRequest)
    assert decoded.tensors["seed"].shape == (2, 3, 1, 1)


def overlong(value: int, extra: int = 2) -> bytes:
    """A varint with `extra` redundant bytes (0x82 0x80 0x00 for 2): valid protobuf."""
    short = bytearray(varint(value))
    short[-1] |= 0x80
    return bytes(short) + b"\x80" * (extra - 1) + b"\x00"


def test_varints_with_redundant_continuation_bytes():
    dimensions = overlong(2) + overlong(1, 4)
    seed = b"\x08" + overlong(WIRE["float64"]) + b"\x12" + overlong(len(dimensions)) + dimensions
    seed += b"\x1a" + overlong(16, 4) + bytes(16)  # (protobuf takes lengths of 5 bytes at most)
    decoded = assert_decodes_like_protobuf(field_bytes(4, seed), GradientRequest)
    assert decoded.tensors["seed"].shape == (2, 1)
    value = FLOAT64_2[:-18] + b"\x1a" + overlong(16) + FLOAT64_2[-16:]
    entry_bytes = b"\x0a" + overlong(1) + b"x" + b"\x12" + overlong(len(value)) + value
    data = key(2, 2) + overlong(len(entry_bytes), 3) + entry_bytes + key(3, 2) + overlong(0)
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.tensors["inputs"]["x"].tolist() == [1.5, -2.0]


def test_the_same_map_key_twice_keeps_the_last():
    data = field_bytes(2, entry("x", FLOAT64_2)) + field_bytes(2, entry("y", INT32_3))
    data += field_bytes(2, entry("x", INT32_3))
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.tensors["inputs"]["x"].tolist() == [7, -8, 9]


def test_a_map_entry_written_twice_merges_like_protobuf():
    """Within one entry, a repeated key keeps the last and a repeated value merges."""
    value_1 = tensor(WIRE["float64"], [2])
    value_2 = tensor(0, [], np.array([1.5, -2.0]).tobytes())
    data = field_bytes(
        2,
        field_bytes(1, b"a")
        + field_bytes(2, value_1)
        + field_bytes(1, b"b")
        + field_bytes(2, value_2),
    )
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert list(decoded.tensors["inputs"]) == ["b"]


def test_a_map_entry_missing_its_key_or_value():
    data = field_bytes(2, field_bytes(2, FLOAT64_2))  # no key: the key is ""
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert list(decoded.tensors["inputs"]) == [""]
    for entry_bytes in [field_bytes(1, b"x"), b""]:  # no value: an empty Tensor (no dtype)
        data = field_bytes(2, entry_bytes)
        GradientRequest.FromString(data)
        with pytest.raises(TensorFormatError, match="^input '.*': .*dtype 0"):
            decode(data, GradientRequest)


def test_a_singular_tensor_sent_twice_merges_like_protobuf():
    """A second occurrence of `seed` merges into the first: dtype and data replaced, shape
    dimensions appended."""
    first = tensor(WIRE["int32"], [2], np.array([1, 2], "<i4").tobytes())
    second = tensor(WIRE["float64"], [3], np.arange(6.0).tobytes())
    data = field_bytes(4, first) + field_bytes(3, b"f") + field_bytes(4, second)
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.tensors["seed"].shape == (2, 3)
    assert decoded.tensors["seed"].dtype == np.float64


def test_a_graph_sent_twice_is_the_concatenation():
    first = graph_pb2.Graph(nodes=[graph_pb2.Node(name="x", op="input")]).SerializeToString()
    second = graph_pb2.Graph(nodes=[graph_pb2.Node(name="y", op="input")]).SerializeToString()
    data = field_bytes(1, first) + field_bytes(3, b"f") + field_bytes(1, second)
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert bytes(decoded.raw["graph"]) == first + second


@pytest.mark.parametrize("unknown", UNKNOWN_FIELDS.values(), ids=UNKNOWN_FIELDS.keys())
def test_unknown_fields_at_the_top_level(unknown):
    data = unknown + field_bytes(2, entry("x", FLOAT64_2)) + unknown + field_bytes(3, b"f")
    data += unknown + field_bytes(4, INT32_3) + unknown
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.fields.output == "f"


@pytest.mark.parametrize("unknown", UNKNOWN_FIELDS.values(), ids=UNKNOWN_FIELDS.keys())
def test_unknown_fields_inside_a_tensor(unknown):
    value = unknown + FLOAT64_2[:2] + unknown + FLOAT64_2[2:5] + unknown + FLOAT64_2[5:] + unknown
    data = field_bytes(2, entry("x", value)) + field_bytes(4, value)
    decoded = assert_decodes_like_protobuf(data, GradientRequest)
    assert decoded.tensors["seed"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("unknown", UNKNOWN_FIELDS.values(), ids=UNKNOWN_FIELDS.keys())
def test_unknown_fields_inside_a_map_entry(unknown):
    """The oracle is protobuf parsing the entry as its entry message: a map is a repeated
    entry message on the wire. (upb, protobuf's default Python backend, moves an entry that
    holds unknown fields out of the map into the parent's unknown fields; protobuf's
    pure-Python parser and the encoding spec keep the entry.)"""
    entry_bytes = unknown + field_bytes(1, b"x") + unknown + field_bytes(2, FLOAT64_2) + unknown
    data = field_bytes(2, entry_bytes) + field_bytes(2, entry("y", INT32_3))
    GradientRequest.FromString(data)  # valid bytes
    parsed_entry = GradientRequest.InputsEntry.FromString(entry_bytes)
    decoded = decode(data, GradientRequest)
    assert list(decoded.tensors["inputs"]) == [parsed_entry.key, "y"]
    same_bits(decoded.tensors["inputs"]["x"], from_proto(parsed_entry.value))


# ---------------------------------------------------------------------------------------------
# 3. The list form


LIST_FORMS = {
    "float64": tensor_pb2.Tensor(
        dtype=WIRE["float64"], shape=[2, 2], float_values=[1.5, -0.0, 1e300, float("nan")]
    ),
    "float32": tensor_pb2.Tensor(
        dtype=WIRE["float32"], shape=[3], float_values=[0.1, 1 / 3, -1e-40]
    ),
    "int32": tensor_pb2.Tensor(dtype=WIRE["int32"], shape=[2], int_values=[-(2**31), 2**31 - 1]),
    "int64": tensor_pb2.Tensor(dtype=WIRE["int64"], shape=[1, 2], int_values=[-(2**63), 2**63 - 1]),
    "bool": tensor_pb2.Tensor(dtype=WIRE["bool"], shape=[3], bool_values=[True, False, True]),
    "scalar": tensor_pb2.Tensor(dtype=WIRE["float64"], float_values=[4.25]),
}


@pytest.mark.parametrize("value", LIST_FORMS.values(), ids=LIST_FORMS.keys())
def test_list_form_tensors_decode_as_protobuf_and_from_proto_do(value):
    message = GradientRequest(seed=value, output="f")
    message.inputs["x"].CopyFrom(value)
    message.inputs["raw"].CopyFrom(proto_tensor(np.arange(3.0)))
    assert_decodes_like_protobuf(message.SerializeToString(), GradientRequest)


def test_list_form_unpacked_and_before_dtype_and_shape():
    """float_values as separate fixed64 fields, placed before dtype and shape."""
    value = b"".join(key(4, 1) + np.float64(v).tobytes() for v in [1.0, 2.0, 3.0])
    value += field_varint(1, WIRE["float64"]) + field_varint(2, 3)
    decoded = assert_decodes_like_protobuf(field_bytes(4, value), GradientRequest)
    assert decoded.tensors["seed"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "value",
    [
        tensor_pb2.Tensor(dtype=WIRE["float64"], shape=[2], int_values=[1, 2]),
        tensor_pb2.Tensor(dtype=WIRE["float64"], shape=[3], float_values=[1.0, 2.0]),
        tensor_pb2.Tensor(dtype=WIRE["int32"], shape=[1], int_values=[2**31]),
        tensor_pb2.Tensor(dtype=WIRE["float64"], shape=[1], data=bytes(8), float_values=[1.0]),
        tensor_pb2.Tensor(dtype=WIRE["float32"], shape=[1], float_values=[1e300]),
    ],
    ids=["wrong form", "wrong count", "int32 overflow", "two forms", "float32 overflow"],
)
def test_bad_list_form_tensors_are_tensor_format_errors_naming_the_field(value):
    message = GradientRequest()
    message.inputs["x"].CopyFrom(value)
    with pytest.raises(TensorFormatError):
        from_proto(GradientRequest.FromString(message.SerializeToString()).inputs["x"])
    with pytest.raises(TensorFormatError, match="^input 'x': "):
        decode(message.SerializeToString(), GradientRequest)
    with pytest.raises(TensorFormatError, match="^seed: "):
        decode(GradientRequest(seed=value).SerializeToString(), GradientRequest)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_encode_as_lists_writes_the_list_form(drawn):
    truth, sent, arrays_by_field = drawn
    data = encode(sent, as_lists=True)
    parsed = unpadded(type(truth).FromString(data))
    assert plain_part(parsed) == plain_part(truth)
    decoded = decode(data, type(truth))
    for name, value in arrays_by_field.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for k, array in pairs:
            message = getattr(parsed, name) if k is None else getattr(parsed, name)[k]
            assert message.dtype == WIRE[array.dtype.name]
            assert tuple(message.shape) == array.shape and not message.data
            flat = array.reshape(-1)
            if array.dtype.kind == "f":
                with np.errstate(invalid="ignore"):  # float32 signalling NaNs become quiet
                    widened = flat.astype(np.float64)
                doubles = np.array(message.float_values, np.float64)
                assert doubles.view(np.uint64).tolist() == widened.view(np.uint64).tolist()
                assert not message.int_values and not message.bool_values
            elif array.dtype.kind == "i":
                assert list(message.int_values) == flat.tolist()
                assert not message.float_values and not message.bool_values
            else:
                assert list(message.bool_values) == flat.tolist()
                assert not message.float_values and not message.int_values
            got = decoded.tensors[name] if k is None else decoded.tensors[name][k]
            same_bits(got, from_proto(message))  # protobuf + from_proto is the oracle
            assert np.array_equal(got, array, equal_nan=array.dtype.kind == "f")


# ---------------------------------------------------------------------------------------------
# 4. Views, not copies


def test_decoded_tensors_are_read_only_aligned_and_views_of_what_encode_writes():
    message = GradientRequest(output="f")
    message.graph.nodes.add(name="x", op="input")
    for dtype in DTYPES:
        message.inputs[dtype].CopyFrom(proto_tensor(np.ones((2, 3), dtype)))
    message.seed.CopyFrom(proto_tensor(np.array(2.5)))
    by_protobuf = message.SerializeToString()  # payloads wherever they fall
    by_encode = encode(decode(by_protobuf, GradientRequest))  # payloads aligned by padding
    for data in (by_protobuf, by_encode):
        received = np.frombuffer(data, np.uint8)
        decoded = decode(data, GradientRequest)
        arrays = [*decoded.tensors["inputs"].values(), decoded.tensors["seed"]]
        assert len(arrays) == 6
        for array in arrays:
            # numpy computes on aligned data only (an unaligned payload is copied, once)
            assert not array.flags.writeable and array.flags.aligned
            if data is by_encode:
                assert np.shares_memory(array, received)
            with pytest.raises(ValueError, match="read-only"):
                array[...] = 0
        assert np.shares_memory(np.frombuffer(decoded.raw["graph"], np.uint8), received)


@pytest.mark.parametrize("field", ["inputs", "seed"])
def test_a_1_mib_tensor_is_written_once_and_decoded_without_a_copy(field):
    array = np.random.default_rng(1).normal(size=1 << 17)  # 1 MiB of float64
    payload = array.tobytes()
    sent = WireMessage(GradientRequest(output="f"))
    sent.tensors[field] = {"x": array} if field == "inputs" else array
    data = encode(sent)
    assert data.count(payload) == 1
    assert len(data) - len(payload) < 64
    decoded = decode(data, GradientRequest)
    got = decoded.tensors[field]["x"] if field == "inputs" else decoded.tensors[field]
    assert np.shares_memory(got, np.frombuffer(data, np.uint8))
    assert not got.flags.writeable and got.tobytes() == payload
    # protobuf's own bytes (which do not align the payload) decode to the same values
    data = GradientRequest.FromString(data).SerializeToString()
    got = decode(data, GradientRequest).tensors[field]
    got = got["x"] if field == "inputs" else got
    assert got.flags.aligned and not got.flags.writeable and got.tobytes() == payload


# ---------------------------------------------------------------------------------------------
# 5. Bad bytes


def valid_request() -> bytes:
    message = GradientRequest(output="f", wrt=["x", "y"], fetch=["ŷ"], graph_digest="d" * 64)
    message.graph.nodes.add(name="x", op="input").attrs["dtype"].s = "float64"
    message.inputs["x"].CopyFrom(proto_tensor(np.arange(200.0)))
    message.inputs["y"].CopyFrom(proto_tensor(np.array([[True], [False]])))
    message.inputs["z"].CopyFrom(proto_tensor(np.zeros((150, 0), np.int32)))
    message.seed.CopyFrom(proto_tensor(np.array(1.0, np.float32)))
    return message.SerializeToString()


def test_every_truncation_protobuf_rejects_is_rejected():
    data = valid_request()
    rejected = 0
    for end in range(len(data)):
        prefix = data[:end]
        try:
            GradientRequest.FromString(prefix)
        except DecodeError:
            rejected += 1
            with pytest.raises(WireFormatError):
                decode(prefix, GradientRequest)
        else:  # a prefix that ends between fields is a valid message
            assert_decodes_like_protobuf(prefix, GradientRequest)
    assert rejected > len(data) - 20


BAD_BYTES = {
    "varint of 11 bytes as a key": b"\x80" * 10 + b"\x01",
    "varint of 11 bytes in a plain field": key(7, 0) + b"\xff" * 10 + b"\x01",
    "varint of 11 bytes as a length": key(3, 2) + b"\x80" * 10 + b"\x01",
    "varint of 11 bytes as a length in a tensor": field_bytes(4, b"\x1a" + b"\x80" * 10 + b"\x00"),
    "varint of 11 bytes as a dtype": field_bytes(4, b"\x08" + b"\x82" + b"\x80" * 9 + b"\x00"),
    "varint cut by the end": key(7, 0) + b"\xff",
    "length past the end": field_bytes(3, b"abc")[:-1],
    "tensor past the end": field_bytes(4, FLOAT64_2)[:-1],
    "tensor data past the tensor": field_bytes(4, FLOAT64_2[:-18] + b"\x1a\x11" + FLOAT64_2[-16:])
    + field_bytes(3, b"f"),
    "tensor data past the map entry": field_bytes(2, b"\x0a\x01x\x12\x14" + FLOAT64_2)
    + field_bytes(3, b"f"),
    "map entry past the end": field_bytes(2, entry("x", FLOAT64_2))[:-1],
    "map key past the entry": field_bytes(2, b"\x0a\x05x") + field_bytes(3, b"f"),
    "fixed64 past the end": key(9, 1) + bytes(7),
    "fixed32 past the end": key(9, 5) + bytes(3),
    "fixed32 past a tensor": field_bytes(4, key(9, 5) + bytes(3)) + field_bytes(3, b"f"),
    "group never ended": key(9, 3) + field_varint(1, 1),
    "group never ended in a tensor": field_bytes(4, key(9, 3) + field_varint(1, 1))
    + field_bytes(3, b"ff"),
    "end of a group never started": key(9, 4),
    "wire type 6": key(9, 6),
    "wire type 7 in a tensor": field_bytes(4, key(9, 7)),
    "field number 0": b"\x02\x00",
    "field number 0 in a tensor": field_bytes(4, b"\x00\x00"),
    "field number 0 in a map entry": field_bytes(2, b"\x00\x00" + entry("x", FLOAT64_2)),
    "invalid UTF-8 in a map key": field_bytes(2, entry(b"\xff\xfex", FLOAT64_2)),
    "invalid UTF-8 in a string field": field_bytes(3, b"\xc3"),
    "lone surrogate in a map key": field_bytes(2, entry(b"\xed\xa0\x80", FLOAT64_2)),
}


@pytest.mark.parametrize("data", BAD_BYTES.values(), ids=BAD_BYTES.keys())
def test_bytes_protobuf_rejects_are_wire_format_errors(data):
    with pytest.raises(DecodeError):
        GradientRequest.FromString(data)
    with pytest.raises(WireFormatError):
        decode(data, GradientRequest)


WRONG_WIRE_TYPES = {
    "seed as a varint": (field_varint(4, 1), "seed"),
    "inputs as fixed32": (key(2, 5) + bytes(4), "inputs"),
    "graph as fixed64": (key(1, 1) + bytes(8), "graph"),
    "seed as a group": (key(4, 3) + key(4, 4), "seed"),
    "tensor dtype as bytes": (field_bytes(4, field_bytes(1, b"\x02") + FLOAT64_2[2:]), "seed"),
    "tensor data as a varint": (
        field_bytes(2, entry("x", b"\x08\x05" + field_varint(3, 1))),
        "inputs",
    ),
    "tensor shape as fixed32": (field_bytes(4, key(2, 5) + bytes(4)), "seed"),
}


@pytest.mark.parametrize(("data", "where"), WRONG_WIRE_TYPES.values(), ids=WRONG_WIRE_TYPES.keys())
def test_a_tensor_field_with_the_wrong_wire_type_is_a_wire_format_error(data, where):
    """protobuf would keep such a field as an unknown field; the codec refuses it."""
    with pytest.raises(WireFormatError, match=where):
        decode(data, GradientRequest)


BAD_TENSORS = {
    "data too short": tensor(WIRE["float64"], [2], bytes(15)),
    "data too long": tensor(WIRE["int32"], [2], bytes(9)),
    "data of an empty tensor": tensor(WIRE["int32"], [0], bytes(4)),
    "no data": tensor(WIRE["float32"], [2]),
    "no data for a scalar": tensor(WIRE["bool"]),
    "no dtype": tensor(0, [1], bytes(8)),
    "unknown dtype": tensor(9, [1], bytes(8)),
    "negative dtype": tensor(-2, [1], bytes(8)),
    "bool byte 2": tensor(WIRE["bool"], [3], b"\x01\x02\x00"),
    "bool byte 0xff": tensor(WIRE["bool"], [], b"\xff"),
    "negative dimension": tensor(WIRE["float64"], [-1], bytes(8)),
    "negative dimension unpacked": tensor(WIRE["float64"], [2, -1], packed=False),
    "negative dimension of an empty tensor": tensor(WIRE["bool"], [0, -3]),
    "rank 33": tensor(WIRE["float64"], [1] * 33, bytes(8)),
    "rank 33 unpacked": tensor(WIRE["float64"], [1] * 33, bytes(8), packed=False),
    "rank 33 of an empty tensor": tensor(WIRE["bool"], [0] * 33),
    "zero-size shape too large for numpy": tensor(WIRE["bool"], [0, 2**40, 2**40]),
}
TENSOR_PLACES = {
    "inputs": (GradientRequest, "input 'x'"),
    "seed": (GradientRequest, "seed"),
    "values": (GradientResponse, "value 'x'"),
    "gradients": (GradientResponse, "gradient 'x'"),
    "vector": (service_pb2.HessianVectorProductRequest, "vector 'x'"),
}


@pytest.mark.parametrize("place", TENSOR_PLACES, ids=TENSOR_PLACES.keys())
@pytest.mark.parametrize("value", BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_a_bad_tensor_is_a_tensor_format_error_naming_it(value, place):
    message_type, name = TENSOR_PLACES[place]
    number = message_type.DESCRIPTOR.fields_by_name[place].number
    data = field_bytes(number, value if place == "seed" else entry("x", value))
    parsed = message_type.FromString(data)  # valid protobuf; from_proto refuses the tensor
    with pytest.raises(TensorFormatError):
        from_proto(parsed.seed if place == "seed" else getattr(parsed, place)["x"])
    with pytest.raises(TensorFormatError) as raised:
        decode(data, message_type)
    assert str(raised.value).startswith(f"{name}: ")


def test_a_ten_byte_varint_is_read_in_full():
    """-1 as int64 takes ten bytes: a valid varint, then a negative dimension."""
    data = field_bytes(4, b"\x08\x02" + field_varint(2, -1))
    assert list(GradientRequest.FromString(data).seed.shape) == [-1]
    with pytest.raises(TensorFormatError, match="negative"):
        decode(data, GradientRequest)


# A small copy of GradientResponse with its maps written as what they are on the wire, repeated
# entry messages, so that protobuf's parser gives every entry as sent (see
# test_unknown_fields_inside_a_map_entry for why the map itself cannot serve as the oracle).
_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(tensor_pb2.DESCRIPTOR.serialized_pb)
_POOL.AddSerializedFile(graph_pb2.DESCRIPTOR.serialized_pb)


def _repeated_entries_type():
    file = descriptor_pb2.FileDescriptorProto(
        name="test_wire/entries.proto",
        package="test_wire",
        syntax="proto3",
        dependency=["gradient/v1/tensor.proto"],
    )
    optional, repeated = FieldDescriptor.LABEL_OPTIONAL, FieldDescriptor.LABEL_REPEATED
    entry_type = file.message_type.add(name="Entry")
    entry_type.field.add(name="key", number=1, type=FieldDescriptor.TYPE_STRING, label=optional)
    entry_type.field.add(
        name="value",
        number=2,
        type=FieldDescriptor.TYPE_MESSAGE,
        type_name=".gradient.v1.Tensor",
        label=optional,
    )
    response = file.message_type.add(name="Response")
    for name, number in [("values", 1), ("gradients", 2)]:
        response.field.add(
            name=name,
            number=number,
            type=FieldDescriptor.TYPE_MESSAGE,
            type_name=".test_wire.Entry",
            label=repeated,
        )
    _POOL.Add(file)
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName("test_wire.Response"))


RepeatedEntries = _repeated_entries_type()


@st.composite
def mutated(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "insert", "delete", "truncate", "repeat"]))
        if action == "set" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=3))
        elif action == "delete":
            del data[where : where + draw(st.integers(1, 3))]
        elif action == "truncate":
            del data[where:]
        elif action == "repeat":
            data[where:where] = data[where : where + draw(st.integers(1, 12))]
    return bytes(data)


response_bytes = messages(GradientResponse).map(lambda drawn: drawn[0].SerializeToString())
fuzzed_responses = st.binary(max_size=60) | response_bytes.flatmap(mutated)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzzed_responses)
# A field number of 2**29 (one past protobuf's largest), once accepted as an unknown field.
@example(
    b"\x12\x12\x08\x00\x08\x00\x80\x80\x80\x80\x10\x00\x08\x00\x1a\x04\x00\x00\x00\x00"
    b"\x12\x0c\x08\x00\x12\x08\x08\x01\x1a\x04\x00\x00\x00\x00"
)
def test_decode_of_arbitrary_bytes_fails_cleanly_or_agrees_with_protobuf(data):
    try:
        decoded = decode(data, GradientResponse)
    except BOTH_ERRORS:
        return
    parsed = GradientResponse.FromString(data)  # decode succeeded: protobuf must parse too
    assert plain_part(decoded.fields) == plain_part(parsed)
    entries = RepeatedEntries.FromString(data)
    for name in ["values", "gradients"]:
        expected = {}
        for each in getattr(entries, name):  # the last entry of a key wins
            expected[each.key] = tensor_pb2.Tensor.FromString(each.value.SerializeToString())
        got = decoded.tensors.get(name, {})
        assert got.keys() == expected.keys()
        for k, value in expected.items():
            same_bits(got[k], from_proto(value))


def session_request_bytes() -> bytes:
    message = service_pb2.SessionRequest()
    message.start.output = "f"
    message.start.graph.nodes.add(name="x", op="input")
    step = message.steps.add(kind=service_pb2.STEP_KIND_FORWARD)
    step.inputs["x"].CopyFrom(proto_tensor(np.arange(3.0)))
    step.seed.CopyFrom(proto_tensor(np.array([True, False])))
    message.steps.add().inputs["y"].CopyFrom(proto_tensor(np.arange(4, dtype=np.int64)))
    message.chunks.add(target=1, name="z", dtype=WIRE["int32"], shape=[2], data=bytes(8))
    return message.SerializeToString()


def _session_request_with_graphs_as_bytes():
    """SessionRequest from a copy of gradient_service.proto where every Graph field is declared
    as bytes: the codec keeps graphs as received and does not parse them."""
    file = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = "test_wire/service.proto", "test_wire.service"
    file.ClearField("service")
    own = {m.name for m in file.message_type} | {e.name for e in file.enum_type}
    for message in file.message_type:
        for f in [*message.field, *(f for nested in message.nested_type for f in nested.field)]:
            name = f.type_name.removeprefix(".gradient.v1.")
            if name == "Graph":
                f.type = FieldDescriptor.TYPE_BYTES
                f.ClearField("type_name")
            elif name.split(".")[0] in own:
                f.type_name = ".test_wire.service." + name
    _POOL.Add(file)
    return message_factory.GetMessageClass(
        _POOL.FindMessageTypeByName("test_wire.service.SessionRequest")
    )


SessionRequestWithRawGraphs = _session_request_with_graphs_as_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(session_request_bytes()) | st.binary(max_size=40))
def test_decode_of_mangled_nested_messages_fails_cleanly(data):
    try:
        decode(data, service_pb2.SessionRequest)
    except BOTH_ERRORS:
        return
    SessionRequestWithRawGraphs.FromString(data)  # decode succeeded: protobuf must parse too


# ---------------------------------------------------------------------------------------------
# Bugs: bytes protobuf handles one way and decode() another


def test_decode_rejects_a_packed_dimension_running_past_its_field():
    """The last dimension of a packed shape (0x81: a varint continued) runs out of its field;
    protobuf rejects the message."""
    seed = b"\x08\x05" + b"\x12\x01\x81" + b"\x1a" + varint(3329) + b"\x01" * 3329
    data = field_bytes(4, seed)
    with pytest.raises(DecodeError):
        GradientRequest.FromString(data)
    with pytest.raises(WireFormatError):
        decode(data, GradientRequest)


GROUPS_ENDED_BY_ANOTHER_NUMBER = {
    "top level": key(9, 3) + key(10, 4) + field_bytes(4, FLOAT64_2),
    "in a tensor": field_bytes(4, FLOAT64_2 + key(9, 3) + key(10, 4)),
    "in a map entry": field_bytes(2, entry("x", FLOAT64_2) + key(9, 3) + key(10, 4)),
}


@pytest.mark.parametrize(
    "data", GROUPS_ENDED_BY_ANOTHER_NUMBER.values(), ids=GROUPS_ENDED_BY_ANOTHER_NUMBER.keys()
)
def test_decode_rejects_a_group_ended_by_another_field_number(data):
    with pytest.raises(DecodeError):
        GradientRequest.FromString(data)
    with pytest.raises(WireFormatError):
        decode(data, GradientRequest)


LENGTHS_OF_SIX_BYTES = {
    "seed field": key(4, 2) + overlong(len(FLOAT64_2), 5) + FLOAT64_2,
    "tensor data": field_bytes(4, FLOAT64_2[:-18] + b"\x1a" + overlong(16, 5) + FLOAT64_2[-16:]),
    "packed shape": field_bytes(4, b"\x08\x02\x12" + overlong(1, 5) + b"\x02\x1a\x10" + bytes(16)),
    "map entry value": field_bytes(2, b"\x0a\x01x\x12" + overlong(len(FLOAT64_2), 5) + FLOAT64_2),
    "map entry key": field_bytes(2, b"\x0a" + overlong(1, 5) + b"x" + field_bytes(2, FLOAT64_2)),
}


@pytest.mark.parametrize("data", LENGTHS_OF_SIX_BYTES.values(), ids=LENGTHS_OF_SIX_BYTES.keys())
def test_decode_rejects_a_length_of_more_than_five_bytes(data):
    """protobuf reads a length as a varint of 5 bytes at most (upb and C++ alike)."""
    with pytest.raises(DecodeError):
        GradientRequest.FromString(data)
    with pytest.raises(WireFormatError):
        decode(data, GradientRequest)


def test_decode_reports_a_corrupt_list_form_tensor_as_a_wire_format_error():
    """bool_values, then a data field cut short: protobuf's DecodeError must not escape."""
    data = field_bytes(4, field_varint(1, WIRE["bool"]) + field_varint(6, 1) + b"\x1a\x05")
    with pytest.raises(DecodeError):
        GradientRequest.FromString(data)
    with pytest.raises(BOTH_ERRORS):
        decode(data, GradientRequest)


def test_decode_keeps_the_last_value_of_a_key_even_after_a_bad_one():
    """protobuf keeps only the last entry of a key: an earlier, malformed tensor is gone."""
    bad = tensor(WIRE["float64"], [], bytes(7))
    data = field_bytes(2, entry("x", bad)) + field_bytes(2, entry("x", FLOAT64_2))
    assert_decodes_like_protobuf(data, GradientRequest)


def test_decode_truncates_an_enum_varint_to_32_bits_as_protobuf_does():
    """An enum is an int32: protobuf keeps the low 32 bits of a wider varint."""
    seed = field_varint(1, (1 << 32) + WIRE["float64"]) + FLOAT64_2[2:]
    data = field_bytes(4, seed)
    assert GradientRequest.FromString(data).seed.dtype == WIRE["float64"]
    assert_decodes_like_protobuf(data, GradientRequest)


# ---------------------------------------------------------------------------------------------
# Messages whose bytes differ from an earlier one's only in tensor payloads (decode() reuses
# what it learnt from the earlier one)


def address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]


def payload_regions(decoded: WireMessage, data: bytes) -> list[tuple[int, int, bool]]:
    """(offset, length, is bool) of each non-empty decoded tensor within `data`."""
    regions = []
    for value in decoded.tensors.values():
        for array in value.values() if isinstance(value, dict) else [value]:
            if array.nbytes:
                offset = address(array) - address(data)
                regions.append((offset, array.nbytes, array.dtype.kind == "b"))
    return regions


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message, st.data())
def test_a_message_of_a_known_layout_decodes_its_own_payloads(drawn, data):
    truth = drawn[0]
    first = encode(decode(truth.SerializeToString(), type(truth)))  # aligned payloads: views
    regions = payload_regions(decode(first, type(truth)), first)
    second = bytearray(first)
    for offset, length, is_bool in regions:
        payload = data.draw(st.binary(min_size=length, max_size=length))
        second[offset : offset + length] = bytes(b & 1 for b in payload) if is_bool else payload
    second = bytes(second)
    decoded = assert_decodes_like_protobuf(second, type(truth))
    received = np.frombuffer(second, np.uint8)
    for offset, _, _ in regions:
        assert any(
            address(a) == address(second) + offset and np.shares_memory(a, received)
            for value in decoded.tensors.values()
            for a in (value.values() if isinstance(value, dict) else [value])
        )


def test_a_message_of_the_same_length_but_another_layout_is_decoded_afresh():
    def request(name: str, array: np.ndarray, output: str = "f") -> bytes:
        message = GradientRequest(output=output)
        message.inputs[name].CopyFrom(proto_tensor(array))
        return message.SerializeToString()

    row, column = np.array([[1.5, 2.5]]), np.array([[1.5], [2.5]])
    versions = [
        request("x", row),
        request("y", row),
        request("x", row, output="g"),
        request("x", row.astype(np.int64)),
        request("x", column),
        request("x", column.astype(np.int64)),
    ]
    assert len({len(v) for v in versions}) == 1
    for data in versions + versions[::-1]:
        assert_decodes_like_protobuf(data, GradientRequest)


def test_a_bad_bool_byte_in_a_known_layout_names_the_tensor():
    message = GradientRequest(output="f")
    message.inputs["x"].CopyFrom(proto_tensor(np.array([True, False, True])))
    good = message.SerializeToString()
    bad = good.replace(b"\x01\x00\x01", b"\x01\x02\x01")
    with pytest.raises(TensorFormatError, match="^input 'x': "):
        decode(bad, GradientRequest)
    decode(good, GradientRequest)
    with pytest.raises(TensorFormatError, match="^input 'x': "):
        decode(bad, GradientRequest)


def test_a_bad_bool_byte_in_one_step_of_a_known_layout_fails_that_step_alone():
    message = service_pb2.SessionRequest()
    for _ in range(3):
        message.steps.add().inputs["x"].CopyFrom(proto_tensor(np.array([True, False, True])))
    good = message.SerializeToString()
    cut = good.rfind(b"\x01\x00\x01")
    bad = good[:cut] + b"\x01\x07\x01" + good[cut + 3 :]
    for data in [bad, good, bad]:  # the last one has the layout of the one before
        steps = decode(data, service_pb2.SessionRequest).nested["steps"]
        assert [step.error is None for step in steps] == [True, True, data == good]
        assert_tensors(steps[0].tensors, {"inputs": {"x": np.array([True, False, True])}})


# ---------------------------------------------------------------------------------------------
# 6. Nested messages


def test_a_malformed_step_keeps_its_error_and_the_other_steps_decode():
    message = service_pb2.SessionRequest()
    message.start.output = "f"
    message.start.graph_digest = "ab" * 32
    graph = graph_pb2.Graph(nodes=[graph_pb2.Node(name="x", op="input")])
    message.start.graph.CopyFrom(graph)
    first = message.steps.add()
    first.inputs["x"].CopyFrom(proto_tensor(np.arange(3.0)))
    bad = message.steps.add(kind=service_pb2.STEP_KIND_FORWARD)
    bad.inputs["x"].CopyFrom(proto_tensor(np.arange(3.0)))
    bad.seed.CopyFrom(tensor_pb2.Tensor(dtype=WIRE["float64"], shape=[2], data=bytes(15)))
    last = message.steps.add(kind=service_pb2.STEP_KIND_FORWARD)
    last.inputs["y"].CopyFrom(proto_tensor(np.array([[True, False]])))
    last.seed.CopyFrom(proto_tensor(np.array(1.0, np.float32)))
    message.chunks.add(target=service_pb2.CHUNK_TARGET_SEED, index=2, data=b"abc")
    data = message.SerializeToString()

    decoded = decode(data, service_pb2.SessionRequest)
    assert decoded.error is None and not decoded.tensors
    (start,) = decoded.nested["start"]
    assert start.fields.output == "f" and start.fields.graph_digest == "ab" * 32
    assert graph_pb2.Graph.FromString(bytes(start.raw["graph"])) == graph
    steps = decoded.nested["steps"]
    assert len(steps) == 3
    assert isinstance(steps[1].error, TensorFormatError)
    assert str(steps[1].error).startswith("seed: ")
    assert not steps[1].tensors
    assert steps[0].error is None and steps[2].error is None
    assert steps[0].fields.kind == service_pb2.STEP_KIND_GRADIENT
    assert steps[2].fields.kind == service_pb2.STEP_KIND_FORWARD
    assert_tensors(steps[0].tensors, {"inputs": {"x": np.arange(3.0)}})
    assert_tensors(
        steps[2].tensors,
        {"inputs": {"y": np.array([[True, False]])}, "seed": np.array(1.0, np.float32)},
    )
    (chunk,) = decoded.nested["chunks"]
    assert chunk.fields.index == 2 and chunk.fields.target == service_pb2.CHUNK_TARGET_SEED
    assert bytes(chunk.raw["data"]) == b"abc"
    assert np.shares_memory(
        np.frombuffer(chunk.raw["data"], np.uint8), np.frombuffer(data, np.uint8)
    )


def test_a_nested_wire_format_error_fails_the_whole_message():
    step = field_bytes(2, entry(b"\xff", FLOAT64_2))
    with pytest.raises(WireFormatError):
        decode(field_bytes(2, step), service_pb2.SessionRequest)


def test_session_messages_encode_to_what_protobuf_builds():
    graph = graph_pb2.Graph(nodes=[graph_pb2.Node(name="x", op="input")])
    x, seed = np.arange(6.0).reshape(2, 3), np.array([True, False])
    start = WireMessage(
        service_pb2.SessionStart(output="f", wrt=["x"]), raw={"graph": graph.SerializeToString()}
    )
    steps = [
        WireMessage(service_pb2.SessionStep(), tensors={"inputs": {"x": x.T.T}, "seed": seed}),
        WireMessage(service_pb2.SessionStep(kind=service_pb2.STEP_KIND_FORWARD)),
    ]
    chunks = chunks_of(service_pb2.CHUNK_TARGET_INPUT, "w", np.arange(5, dtype=np.int32), 8)
    sent = WireMessage(
        service_pb2.SessionRequest(), nested={"start": [start], "steps": steps, "chunks": chunks}
    )

    truth = service_pb2.SessionRequest()
    truth.start.output = "f"
    truth.start.wrt.append("x")
    truth.start.graph.CopyFrom(graph)
    first = truth.steps.add()
    first.inputs["x"].CopyFrom(proto_tensor(x))
    first.seed.CopyFrom(proto_tensor(seed))
    truth.steps.add(kind=service_pb2.STEP_KIND_FORWARD)
    payload = np.arange(5, dtype="<i4").tobytes()
    truth.chunks.add(target=1, name="w", index=0, dtype=WIRE["int32"], shape=[5], data=payload[:8])
    truth.chunks.add(target=1, name="w", index=1, data=payload[8:16])
    truth.chunks.add(target=1, name="w", index=2, data=payload[16:])
    for as_lists in [False, True]:
        parsed = unpadded(service_pb2.SessionRequest.FromString(encode(sent, as_lists=as_lists)))
        assert parsed.start == truth.start and parsed.chunks == truth.chunks
        assert len(parsed.steps) == 2 and parsed.steps[1] == truth.steps[1]
        assert from_proto(parsed.steps[0].inputs["x"]).tolist() == x.tolist()
        assert from_proto(parsed.steps[0].seed).tolist() == [True, False]
    assert unpadded(service_pb2.SessionRequest.FromString(encode(sent))) == truth


# ---------------------------------------------------------------------------------------------
# 7. Chunks


def chunk(index: int, data: bytes = b"", *, name="x", target=1, dtype=0, shape=()) -> WireMessage:
    fields = service_pb2.TensorChunk(
        target=target, name=name, index=index, dtype=dtype, shape=shape
    )
    return WireMessage(fields, raw={"data": data})


def through_the_wire(message: WireMessage) -> WireMessage:
    return decode(encode(message), service_pb2.TensorChunk)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sent_arrays(), st.integers(1, 20), st.sampled_from([1, 2, 3, 4]), names)
def test_chunks_of_splits_a_tensor_into_budget_sized_pieces(drawn, budget, target, name):
    truth, sent = drawn
    chunks = chunks_of(target, name, sent, budget)
    payload = truth.tobytes()
    assert len(chunks) == max(1, -(-len(payload) // budget))
    pieces = []
    for index, each in enumerate(chunks):
        parsed = service_pb2.TensorChunk.FromString(encode(each))
        assert (parsed.target, parsed.name, parsed.index) == (target, name, index)
        if index == 0:
            assert parsed.dtype == WIRE[truth.dtype.name]
            assert tuple(parsed.shape) == truth.shape
        else:
            assert parsed.dtype == 0 and not parsed.shape
        assert len(parsed.data) <= budget
        assert len(parsed.data) == budget or index == len(chunks) - 1
        pieces.append(parsed.data)
    assert b"".join(pieces) == payload
    if sent is truth and truth.size:  # a little-endian contiguous array is cut, not copied
        assert all(np.shares_memory(np.frombuffer(c.raw["data"], np.uint8), truth) for c in chunks)

    assembler = ChunkAssembler()
    for each in chunks:
        assembler.add(through_the_wire(each))
    (got,) = assembler.take().items()
    assert got[0] == (target, name)
    same_bits(got[1], truth)
    assert not got[1].flags.writeable
    assert assembler.take() == {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5, 0, 2), (7,), (3, 5)])
def test_chunk_assembler_rebuilds_every_dtype_and_shape(dtype, shape):
    truth = (np.arange(int(np.prod(shape))) % 2).astype(dtype).reshape(shape)
    assembler = ChunkAssembler()
    for each in chunks_of(1, "x", truth, 3):
        assembler.add(through_the_wire(each))
    result = assembler.take()
    assert result.keys() == {(1, "x")}
    same_bits(result[(1, "x")], truth)
    assert not result[(1, "x")].flags.writeable


def test_chunk_assembler_takes_several_tensors_and_calls_check_size():
    checked = []
    assembler = ChunkAssembler(lambda what, dtype, shape: checked.append((what, dtype, shape)))
    x, seed, value = np.arange(10.0), np.array(2.5, np.float32), np.ones((2, 2), np.int64)
    for target, name, array in [(1, "x", x), (2, "", seed), (3, "v", value), (4, "v", value)]:
        for each in chunks_of(target, name, array, 16):
            assembler.add(each)
    result = assembler.take()
    assert list(result) == [(1, "x"), (2, ""), (3, "v"), (4, "v")]
    same_bits(result[(1, "x")], x)
    same_bits(result[(2, "")], seed)
    same_bits(result[(4, "v")], value)
    assert checked == [
        ("input 'x'", np.dtype("float64"), (10,)),
        ("the seed", np.dtype("float32"), ()),
        ("the value of 'v'", np.dtype("int64"), (2, 2)),
        ("the gradient of 'v'", np.dtype("int64"), (2, 2)),
    ]
    # The same tensors again, after take(): a new step.
    for each in chunks_of(1, "x", x, 80):
        assembler.add(each)
    assert list(assembler.take()) == [(1, "x")]


class TooLarge(Exception):
    pass


def refuse(what, dtype, shape):
    if shape == (99,):
        raise TooLarge(what)


F8 = WIRE["float64"]
TWO_CHUNKS = [chunk(0, bytes(8), dtype=F8, shape=[2]), chunk(1, bytes(8))]
CHUNK_ERRORS = {
    "a missing chunk": (
        [chunk(0, bytes(8), dtype=F8, shape=[3]), chunk(2, bytes(8))],
        "chunk 2 of input 'x' came where chunk 1 was expected",
    ),
    "a repeated chunk": (
        [chunk(0, bytes(8), dtype=F8, shape=[3]), chunk(1, bytes(8)), chunk(1, bytes(8))],
        "chunk 1 of input 'x' came where chunk 2",
    ),
    "chunks out of order": (
        [chunk(0, bytes(8), dtype=F8, shape=[3]), chunk(2, bytes(8)), chunk(1, bytes(8))],
        "came where chunk 1 was expected",
    ),
    "a chunk without its chunk 0": (
        [chunk(1, bytes(8))],
        "chunk 1 of input 'x' comes without its chunk 0",
    ),
    "a chunk of another tensor mid-way": (
        [chunk(0, bytes(8), dtype=F8, shape=[2]), chunk(1, bytes(8), name="y")],
        "chunk 1 of input 'y' comes without its chunk 0",
    ),
    "data beyond the declared size": (
        [chunk(0, bytes(8), dtype=F8, shape=[2]), chunk(1, bytes(9))],
        "runs past the tensor's 16 bytes",
    ),
    "a chunk after the tensor is complete": (
        [*TWO_CHUNKS, chunk(2, bytes(8))],
        "chunk 2 of input 'x' comes without its chunk 0",
    ),
    "a tensor left incomplete": (
        [chunk(0, bytes(8), dtype=F8, shape=[2])],
        "input 'x' is incomplete: 8 of 16 bytes",
    ),
    "a tensor sent twice": ([*TWO_CHUNKS, *TWO_CHUNKS], "input 'x' was sent twice"),
    "a second tensor beginning before the first is complete": (
        [
            chunk(0, bytes(8), dtype=F8, shape=[2]),
            chunk(0, bytes(8), name="y", dtype=F8, shape=[1]),
        ],
        "input 'x' is incomplete (8 of 16 bytes) when input 'y' begins",
    ),
    "target 0": ([chunk(0, bytes(8), target=0, dtype=F8, shape=[1])], "no valid target"),
    "target 9": ([chunk(0, bytes(8), target=9, dtype=F8, shape=[1])], "no valid target"),
    "bool bytes other than 0 and 1": (
        [chunk(0, b"\x01\x00", dtype=WIRE["bool"], shape=[3]), chunk(1, b"\x02")],
        "input 'x': bool data holds bytes other than 0 and 1",
    ),
    "no dtype": ([chunk(0, bytes(8), shape=[1])], "dtype 0"),
    "a negative dimension": ([chunk(0, dtype=F8, shape=[2, -1])], "negative"),
    "rank 33": ([chunk(0, bytes(8), dtype=F8, shape=[1] * 33)], "33 dimensions"),
}


@pytest.mark.parametrize(("chunks", "message"), CHUNK_ERRORS.values(), ids=CHUNK_ERRORS.keys())
def test_chunk_errors_are_raised_by_take_which_then_resets(chunks, message):
    assembler = ChunkAssembler(refuse)
    for each in chunks:
        assembler.add(through_the_wire(each))
    with pytest.raises(TensorFormatError) as raised:
        assembler.take()
    assert message in str(raised.value)
    assert assembler.take() == {}
    for each in TWO_CHUNKS:
        assembler.add(each)
    assert assembler.take()[(1, "x")].tolist() == [0.0, 0.0]


def test_chunks_after_an_error_are_ignored_until_take():
    assembler = ChunkAssembler()
    assembler.add(chunk(1, bytes(8)))  # without its chunk 0
    for each in TWO_CHUNKS:
        assembler.add(each)
    with pytest.raises(TensorFormatError, match="without its chunk 0"):
        assembler.take()
    assert assembler.take() == {}


def test_an_exception_of_check_size_surfaces_from_take():
    assembler = ChunkAssembler(refuse)
    for each in TWO_CHUNKS:
        assembler.add(each)  # completed before the error: discarded with the step
    assembler.add(chunk(0, bytes(8), name="big", dtype=F8, shape=[99]))
    assembler.add(chunk(1, bytes(8), name="big"))
    with pytest.raises(TooLarge, match="input 'big'"):
        assembler.take()
    for each in TWO_CHUNKS:
        assembler.add(each)
    assert list(assembler.take()) == [(1, "x")]


def test_chunk_budget_and_split_oversized():
    assert chunk_budget(4 << 20) == (4 << 20) - (1 << 16)
    assert chunk_budget(100_000) == 50_000
    x, y, z = np.zeros(100), np.zeros(10), np.zeros(1000, np.float32)
    assert payload_bytes({"x": x, "yy": y}) == 800 + 1 + 32 + 80 + 2 + 32
    inline, chunked = split_oversized({"x": x, "z": z, "yy": y}, 1000)
    assert list(inline) == ["x", "yy"] and list(chunked) == ["z"]
    assert inline["x"] is x and chunked["z"] is z
    assert split_oversized({"x": x}, 833) == ({"x": x}, {})
    assert split_oversized({"x": x}, 832) == ({}, {"x": x})


# ---------------------------------------------------------------------------------------------
# 8. Graph digests


def test_graph_digest_is_the_sha256_hex_of_the_bytes():
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert graph_digest(b"") == empty
    data = bytes(range(256)) * 3
    assert graph_digest(data) == hashlib.sha256(data).hexdigest()
    assert graph_digest(memoryview(data)[10:20]) == hashlib.sha256(data[10:20]).hexdigest()


def test_wire_graph_of_a_graph():
    graph = graph_pb2.Graph()
    x = graph.nodes.add(name="x", op="input")
    x.attrs["shape"].ints.values.extend([2, 3])
    x.attrs["dtype"].s = "float32"
    graph.nodes.add(name="n", op="input")  # no declared dtype
    graph.nodes.add(name="c", op="cast", inputs=["x"]).attrs["dtype"].s = "int64"
    graph.nodes.add(name="é", op="input").attrs["dtype"].s = "bool"
    wire_graph = WireGraph.of(graph)
    assert wire_graph.data == graph.SerializeToString(deterministic=True)
    assert graph_pb2.Graph.FromString(wire_graph.data) == graph
    assert wire_graph.digest == hashlib.sha256(wire_graph.data).hexdigest()
    assert wire_graph.input_dtypes == {"x": "float32", "é": "bool"}

    # The same graph with its attributes set in another order has the same bytes.
    again = graph_pb2.Graph()
    again.CopyFrom(graph)
    again.nodes[0].ClearField("attrs")
    again.nodes[0].attrs["dtype"].s = "float32"
    again.nodes[0].attrs["shape"].ints.values.extend([2, 3])
    assert WireGraph.of(again) == wire_graph


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_wire_graph_of_random_graphs(graph):
    wire_graph = WireGraph.of(graph)
    assert graph_pb2.Graph.FromString(wire_graph.data) == graph
    assert (
        wire_graph.digest == hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()
    )
    declared = {}
    for node in graph.nodes:
        if node.op == "input" and "dtype" in node.attrs:
            declared[node.name] = node.attrs["dtype"].s
    assert wire_graph.input_dtypes == declared
