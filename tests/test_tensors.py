"""The tensor wire format: bit-exact round trips through the SDK codec and through the server,
the JSON-friendly list form, and rejection of malformed payloads (DESIGN.md section 2)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradient.v1 import gradient_service_pb2 as service_pb2
from gradient.v1 import gradient_service_pb2_grpc as service_grpc
from gradient.v1 import graph_pb2, tensor_pb2
from gradient_client import Graph, from_proto, to_proto
from gradient_client.tensors import TensorFormatError

DTYPES = ["float32", "float64", "int32", "int64", "bool"]
WIRE = {
    "float32": tensor_pb2.DTYPE_FLOAT32,
    "float64": tensor_pb2.DTYPE_FLOAT64,
    "int32": tensor_pb2.DTYPE_INT32,
    "int64": tensor_pb2.DTYPE_INT64,
    "bool": tensor_pb2.DTYPE_BOOL,
}
ITEMSIZE = {"float32": 4, "float64": 8, "int32": 4, "int64": 8, "bool": 1}

# Float bit patterns that a value comparison would not tell apart.
SPECIAL_BITS_64 = [
    0x0000000000000000,  # +0.0
    0x8000000000000000,  # -0.0
    0x7FF0000000000000,  # +inf
    0xFFF0000000000000,  # -inf
    0x7FF8000000000000,  # quiet NaN
    0xFFF8000000000000,  # negative quiet NaN
    0x7FF8DEADBEEF0001,  # NaN with a payload
    0x7FF0000000000001,  # signalling NaN
    0x0000000000000001,  # smallest subnormal
    0x7FEFFFFFFFFFFFFF,  # largest finite
]
SPECIAL_BITS_32 = [
    0x00000000,
    0x80000000,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0xFFC00000,
    0x7FC0BEEF,
    0x7F800001,
    0x00000001,
    0x7F7FFFFF,
]


def same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """Same dtype (byte order aside), same shape, same bytes."""
    assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("="), (a.dtype, b.dtype)
    assert a.shape == b.shape
    little = a.astype(a.dtype.newbyteorder("<"))
    assert little.tobytes() == np.ascontiguousarray(b.astype(b.dtype.newbyteorder("<"))).tobytes()


def special_floats() -> list[np.ndarray]:
    return [
        np.array(SPECIAL_BITS_64, dtype=np.uint64).view(np.float64),
        np.array(SPECIAL_BITS_32, dtype=np.uint32).view(np.float32),
    ]


arrays = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype=np.dtype(dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    )
)
"""Arrays of every wire dtype, ranks 0 to 4, zero-size dimensions included; float elements
include NaN, infinities and -0.0."""

byte_orders = st.sampled_from(["<", ">", "="])


# ---------------------------------------------------------------------------------------------
# The SDK codec


@settings(max_examples=300, deadline=None)
@given(arrays, byte_orders)
def test_codec_round_trip_is_bit_exact(array, order):
    source = array.astype(array.dtype.newbyteorder(order))
    message = to_proto(source)
    assert message.dtype == WIRE[array.dtype.name]
    assert list(message.shape) == list(array.shape)
    # The wire is little-endian, row-major, itemsize bytes per element; no payload if empty.
    assert message.data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    assert len(message.data) == array.size * ITEMSIZE[array.dtype.name]
    assert not message.float_values and not message.int_values and not message.bool_values
    decoded = from_proto(message)
    same_bits(array, decoded)
    assert decoded.dtype.byteorder in ("=", "|", "<")
    writable = from_proto(message, writeable=True)
    same_bits(array, writable)
    assert writable.flags.writeable
    # Re-encoding the decoded array gives the same message.
    assert to_proto(decoded).SerializeToString() == message.SerializeToString()


@settings(max_examples=100, deadline=None)
@given(arrays)
def test_codec_round_trip_after_the_wire(array):
    """The serialized message, parsed again, still decodes to the same bits."""
    wire = to_proto(array).SerializeToString()
    parsed = tensor_pb2.Tensor.FromString(wire)
    same_bits(array, from_proto(parsed))


@pytest.mark.parametrize("array", special_floats(), ids=["float64", "float32"])
def test_special_float_bit_patterns_survive(array):
    decoded = from_proto(to_proto(array))
    bits = np.uint64 if array.dtype == np.float64 else np.uint32
    assert np.array_equal(decoded.view(bits), array.view(bits))
    # The same, big-endian on the way in.
    decoded = from_proto(to_proto(array.astype(array.dtype.newbyteorder(">"))))
    assert np.array_equal(decoded.view(bits), array.view(bits))


def test_big_endian_input_goes_on_the_wire_little_endian():
    value = np.array([1.0, -2.5], dtype=">f8")
    message = to_proto(value)
    assert message.data == struct.pack("<2d", 1.0, -2.5)
    assert from_proto(message).tolist() == [1.0, -2.5]
    assert to_proto(np.array([1, -2], dtype=">i4")).data == struct.pack("<2i", 1, -2)


def test_row_major_order_of_non_contiguous_arrays():
    base = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    for view in (base.T, base[:, ::2, 1:], np.asfortranarray(base), base[..., ::-1]):
        message = to_proto(view)
        assert list(message.shape) == list(view.shape)
        assert message.data == np.ascontiguousarray(view).astype("<i8").tobytes()
        assert np.array_equal(from_proto(message), view)


def test_scalars_and_python_values():
    assert from_proto(to_proto(2.5)).dtype == np.float64
    assert from_proto(to_proto(2.5)).shape == ()
    assert from_proto(to_proto(7)).dtype == np.int64
    assert from_proto(to_proto(True)).dtype == np.bool_
    assert from_proto(to_proto([[1.0, 2.0]])).shape == (1, 2)
    assert to_proto(np.float32(1.5)).data == struct.pack("<f", 1.5)


def test_zero_size_tensors_set_no_payload():
    for dtype in DTYPES:
        for shape in [(0,), (3, 0), (0, 0, 2), (1, 2, 0, 3)]:
            message = to_proto(np.zeros(shape, dtype))
            assert message.data == b""
            decoded = from_proto(message)
            assert decoded.shape == shape and decoded.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "complex128", "uint8", "int8", "U3", "O"])
def test_unsupported_dtypes_are_refused(dtype):
    with pytest.raises(TensorFormatError):
        to_proto(np.zeros(2, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# The list form


def test_list_form_float64():
    t = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2, 2], float_values=[1.5, -2.0, 1e300, -0.0]
    )
    value = from_proto(t)
    assert value.dtype == np.float64 and value.shape == (2, 2)
    assert value.tolist() == [[1.5, -2.0], [1e300, -0.0]]
    assert np.signbit(value[1, 1])


def test_list_form_float32_rounds_like_numpy():
    doubles = [0.1, 1 / 3, 1e-40, 3.4e38]
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], float_values=doubles)
    value = from_proto(t)
    assert value.dtype == np.float32
    assert value.tobytes() == np.array(doubles, dtype=np.float64).astype(np.float32).tobytes()


def test_list_form_special_floats():
    t = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT64,
        shape=[3],
        float_values=[float("inf"), float("-inf"), float("nan")],
    )
    value = from_proto(t)
    assert value[0] == np.inf and value[1] == -np.inf and np.isnan(value[2])


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("int32", [-(2**31), 2**31 - 1, 0, -1]),
        ("int64", [-(2**63), 2**63 - 1, 0, 123456789012345]),
    ],
)
def test_list_form_ints_at_their_limits(dtype, values):
    t = tensor_pb2.Tensor(dtype=WIRE[dtype], shape=[2, 2], int_values=values)
    value = from_proto(t)
    assert value.dtype == np.dtype(dtype)
    assert value.ravel().tolist() == values


def test_list_form_bool():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[3], bool_values=[True, False, True])
    value = from_proto(t)
    assert value.dtype == np.bool_ and value.tolist() == [True, False, True]


def test_list_form_scalar():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, float_values=[4.25])
    value = from_proto(t)
    assert value.shape == () and float(value) == 4.25


def test_list_form_from_json_as_the_proto_documents():
    t = json_format.Parse(
        '{"dtype": "DTYPE_FLOAT64", "shape": [2], "floatValues": [1.5, -2]}', tensor_pb2.Tensor()
    )
    assert from_proto(t).tolist() == [1.5, -2.0]
    t = json_format.Parse(
        '{"dtype": "DTYPE_INT64", "shape": ["2", 1], "intValues": ["-9007199254740993", 4]}',
        tensor_pb2.Tensor(),
    )
    assert from_proto(t).tolist() == [[-9007199254740993], [4]]


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**63 - 1, -(2**63)])
def test_int_values_out_of_int32_range_are_rejected(value):
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[2], int_values=[1, value])
    with pytest.raises(TensorFormatError, match="int32"):
        from_proto(t)


@pytest.mark.parametrize("byte", [2, 0x7F, 0xFF])
def test_bool_data_bytes_other_than_0_and_1_are_rejected(byte):
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[3], data=bytes([1, byte, 0]))
    with pytest.raises(TensorFormatError):
        from_proto(t)


@pytest.mark.parametrize(
    "tensor",
    [
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3], float_values=[1.0, 2.0]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1], float_values=[1.0, 2.0]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[3], int_values=[1]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[2], bool_values=[True]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2], int_values=[1, 2]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[2], float_values=[1, 2]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[1], int_values=[1]),
        tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1], data=b"\0" * 8, float_values=[1.0]
        ),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2], data=b"\0" * 15),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[], data=b"\0" * 8),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[-2]),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[0], float_values=[1.0]),
        tensor_pb2.Tensor(shape=[1], float_values=[1.0]),
        tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0"),
    ],
    ids=[
        "float-list-short",
        "float-list-long",
        "int-list-short",
        "bool-list-short",
        "float-takes-no-ints",
        "int-takes-no-floats",
        "bool-takes-no-ints",
        "two-forms",
        "data-short",
        "scalar-data-long",
        "no-payload",
        "negative-dim",
        "payload-for-empty",
        "no-dtype",
        "unknown-dtype",
    ],
)
def test_malformed_tensors_are_rejected(tensor, stub):
    with pytest.raises(TensorFormatError):
        from_proto(tensor)
    # The server refuses them too, naming the input.
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(identity_request(tensor), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in info.value.details()
    assert "Traceback" not in info.value.details()


def test_huge_claimed_shape_is_rejected_without_allocating():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 30, 1 << 30], data=b"\0" * 8)
    with pytest.raises(TensorFormatError):
        from_proto(t)
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 30, 1 << 30])
    with pytest.raises(TensorFormatError):
        from_proto(t)


# ---------------------------------------------------------------------------------------------
# Through the server


@pytest.fixture(scope="module")
def stub(server_address) -> Iterator[service_grpc.GradientServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield service_grpc.GradientServiceStub(channel)


def identity_request(tensor: tensor_pb2.Tensor) -> service_pb2.ForwardRequest:
    graph = graph_pb2.Graph(nodes=[graph_pb2.Node(name="x", op="input")])
    return service_pb2.ForwardRequest(graph=graph, inputs={"x": tensor})


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(arrays, byte_orders)
def test_server_returns_a_fed_tensor_bit_exact(client, array, order):
    g = Graph()
    g.input("x")
    result = client.forward(g, {"x": array.astype(array.dtype.newbyteorder(order))})
    assert set(result.values) == {"x"}
    same_bits(array, result["x"])


@pytest.mark.parametrize("array", special_floats(), ids=["float64", "float32"])
def test_server_keeps_special_float_bits(client, stub, array):
    g = Graph()
    g.input("x")
    bits = np.uint64 if array.dtype == np.float64 else np.uint32
    for fed in (array, array.reshape(2, 5), array.astype(array.dtype.newbyteorder(">"))):
        returned = client.forward(g, {"x": fed})["x"]
        assert returned.dtype == array.dtype and returned.shape == fed.shape
        assert np.array_equal(returned.ravel().view(bits), array.view(bits))
    # Raw bytes out are the raw bytes in.
    response = stub.Forward(identity_request(to_proto(array)), timeout=30)
    assert response.values["x"].data == to_proto(array).data


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (
            tensor_pb2.Tensor(
                dtype=tensor_pb2.DTYPE_FLOAT64, shape=[2, 2], float_values=[1.5, -2, 0.25, 1e300]
            ),
            np.array([[1.5, -2.0], [0.25, 1e300]]),
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3], float_values=[0.1, 2, 3]),
            np.array([0.1, 2, 3], dtype=np.float32),
        ),
        (
            tensor_pb2.Tensor(
                dtype=tensor_pb2.DTYPE_INT32, shape=[2], int_values=[-(2**31), 2**31 - 1]
            ),
            np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        ),
        (
            tensor_pb2.Tensor(
                dtype=tensor_pb2.DTYPE_INT64, shape=[1, 2], int_values=[-(2**63), 2**63 - 1]
            ),
            np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[2], bool_values=[False, True]),
            np.array([False, True]),
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, float_values=[-7.5]),
            np.array(-7.5),
        ),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[0, 3]), np.zeros((0, 3), np.int64)),
    ],
    ids=["float64", "float32", "int32", "int64", "bool", "scalar", "empty"],
)
def test_server_decodes_the_list_form(stub, tensor, expected):
    response = stub.Forward(identity_request(tensor), timeout=30)
    returned = response.values["x"]
    # Answers always use the raw form.
    assert returned.data == to_proto(expected).data
    assert not returned.float_values and not returned.int_values and not returned.bool_values
    same_bits(expected, from_proto(returned))


def test_server_computes_on_list_form_inputs(stub):
    """A hand-written JSON request, as from grpcurl, computes the right value."""
    request = json_format.Parse(
        """{
          "graph": {"nodes": [
            {"name": "x", "op": "input"},
            {"name": "w", "op": "constant",
             "attrs": {"value": {"tensor": {"dtype": "DTYPE_FLOAT64", "shape": [2],
                                            "floatValues": [0.5, -4]}}}},
            {"name": "y", "op": "mul", "inputs": ["x", "w"]}
          ]},
          "inputs": {"x": {"dtype": "DTYPE_FLOAT64", "shape": [2], "floatValues": [3, 0.25]}},
          "fetch": ["y"]
        }""",
        service_pb2.ForwardRequest(),
    )
    response = stub.Forward(request, timeout=30)
    assert from_proto(response.values["y"]).tolist() == [1.5, -1.0]


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1])
def test_server_rejects_int_values_out_of_int32_range(stub, value):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[1], int_values=[value])
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(identity_request(tensor), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in info.value.details() and "int32" in info.value.details()


def test_server_rejects_bool_bytes_other_than_0_and_1(stub):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[2], data=b"\x01\x02")
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(identity_request(tensor), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in info.value.details()


def test_float_values_beyond_float32_are_rejected_but_inf_and_nan_pass():
    too_big = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2], float_values=[1e308, 1])
    with pytest.raises(TensorFormatError, match="do not fit in float32"):
        from_proto(too_big)
    special = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3], float_values=[float("inf"), float("nan"), 1.5]
    )
    decoded = from_proto(special)
    assert decoded.dtype == np.float32 and np.isinf(decoded[0]) and np.isnan(decoded[1])
