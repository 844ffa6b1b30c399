"""The wire codec of the service's messages: every copy a tensor makes on the way is made here.

protobuf copies a bytes field when it is set, serialized, parsed and read: four copies of each
tensor per hop. Here a message is split in two. Its plain fields stay a protobuf message,
serialized and parsed by protobuf as usual; the fields that carry tensors are encoded and
decoded by this module in the Tensor's own wire format (protos/gradient/v1/tensor.proto), so
that a tensor's bytes are written once, straight into the outgoing message, and read back as
a read-only numpy view of the incoming bytes. The bytes on the wire are exactly what protobuf
reads and writes: clients in other languages, and grpcurl, see ordinary messages.

Which fields travel by hand follows from the messages of gradient_service.proto: a `Tensor`
field, a `map<string, Tensor>` field, a `Graph` field (kept as the bytes received: the server
hashes them to find a cached graph and parses them only on a miss), a `bytes` field of
TensorChunk (the pieces of large tensors), and a message field of the service whose type holds
any of these. Tensors inside a Graph (constants) go through protobuf with the graph.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from gradient.v1 import gradient_service_pb2, graph_pb2, tensor_pb2

from .tensors import (
    TensorFormatError,
    aligned_copy,
    array_from_data,
    dtype_and_count,
    from_proto,
    to_proto,
    wire_array,
)

__all__ = [
    "ChunkAssembler",
    "WireFormatError",
    "WireGraph",
    "WireMessage",
    "chunk_budget",
    "chunks_of",
    "decode",
    "encode",
    "graph_digest",
    "payload_bytes",
    "split_oversized",
]


class WireFormatError(ValueError):
    """Bytes that do not parse as the expected message."""


@dataclass
class WireMessage:
    """A message split for the wire.

    `fields` is a protobuf message holding every plain field; the other fields are here:
    `tensors` maps a Tensor field's name to a numpy array, and a map<string, Tensor> field's
    name to a dict of arrays; `nested` maps a message field whose type carries tensors to its
    occurrences (a list: one per element of a repeated field); `raw` maps a Graph or chunk
    bytes field to its bytes. Decoded arrays are read-only views of the received bytes.

    A nested message whose tensors do not decode is kept with the TensorFormatError in
    `error` (and no tensors), so that the receiver can fail that part alone (one step of a
    session, say); at the top level the error is raised.
    """

    fields: Any  # the protobuf message of the plain fields
    tensors: dict[str, Any] = field(default_factory=dict)
    nested: dict[str, list[WireMessage]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    error: TensorFormatError | None = None


def graph_digest(serialized_graph: bytes | memoryview) -> str:
    """The digest naming a graph in `graph_digest` fields: the lowercase hex SHA-256 of the
    Graph message's bytes as sent."""
    return hashlib.sha256(serialized_graph).hexdigest()


@dataclass(frozen=True)
class WireGraph:
    """A Graph message as a client sends it: its bytes, their digest, and the dtypes that its
    input nodes declare (the client casts fed values to them)."""

    data: bytes
    digest: str
    input_dtypes: dict[str, str]

    @classmethod
    def of(cls, message: graph_pb2.Graph) -> WireGraph:
        data = message.SerializeToString(deterministic=True)
        declared = {
            node.name: node.attrs["dtype"].s
            for node in message.nodes
            if node.op == "input" and "dtype" in node.attrs
        }
        return cls(data, graph_digest(data), declared)


# ---------------------------------------------------------------------------------------------
# Which fields travel by hand

_TENSOR = tensor_pb2.Tensor.DESCRIPTOR
_GRAPH = graph_pb2.Graph.DESCRIPTOR
_SERVICE_FILE = gradient_service_pb2.DESCRIPTOR

_TENSOR_FIELD, _TENSOR_MAP, _NESTED, _RAW_MESSAGE, _RAW_BYTES = range(5)


@dataclass(frozen=True)
class _Field:
    name: str
    kind: int
    repeated: bool
    message_type: Any = None  # the protobuf class of a nested field


def _kind(descriptor: FieldDescriptor) -> int | None:
    message_type = descriptor.message_type
    if message_type is None:
        container = descriptor.containing_type
        in_service = container is not None and container.file is _SERVICE_FILE
        return _RAW_BYTES if in_service and descriptor.type == FieldDescriptor.TYPE_BYTES else None
    if message_type is _TENSOR:
        return _TENSOR_FIELD
    if message_type is _GRAPH:
        return _RAW_MESSAGE
    if message_type.GetOptions().map_entry:
        return _TENSOR_MAP if message_type.fields_by_name["value"].message_type is _TENSOR else None
    if message_type.file is _SERVICE_FILE and _schema(message_type):
        return _NESTED
    return None


@functools.cache
def _schema(descriptor: Descriptor) -> dict[int, _Field]:
    """The fields of a message type that travel by hand, by field number."""
    schema = {}
    for number, descriptor_field in descriptor.fields_by_number.items():
        kind = _kind(descriptor_field)
        if kind is None:
            continue
        repeated = descriptor_field.is_repeated
        message_type = None
        if kind == _NESTED:
            message_type = message_factory.GetMessageClass(descriptor_field.message_type)  # type: ignore[arg-type]
        schema[number] = _Field(descriptor_field.name, kind, repeated, message_type)
    return schema


# ---------------------------------------------------------------------------------------------
# Encoding

_LEN = 2
_ONE_BYTE = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.cache
def _tag(number: int, wire_type: int = _LEN) -> bytes:
    return _varint(number << 3 | wire_type)


_SMALL = 1024
"""Below this many bytes a payload is copied with tobytes(): cheaper than making a view."""

_CACHED = 4096
"""Entries of each small cache of this module (shapes and names repeat from call to call)."""

_prefixes: dict[tuple, bytes] = {}


def _tensor_prefix(
    number: int, key: str | None, wire: int, shape: tuple[int, ...], nbytes: int, start: int
) -> bytes:
    """The bytes of a Tensor field (or of a map entry holding one) that precede its payload:
    tag and length, the key, then the Tensor's fields 1 (dtype), 2 (shape), 7 (padding, when
    needed) and 3's tag and length. The padding makes the payload start, `start` being where
    the prefix starts in the message, at an offset that is a multiple of the item size."""
    header = b"\x08" + _ONE_BYTE[wire]
    if shape:
        dims = b"".join(_varint(d) for d in shape)
        header += b"\x12" + _varint(len(dims)) + dims
    align = _ITEM_SIZE[wire] if nbytes else 1
    padding: int | None = None  # bytes in the padding field, if it is there
    for _ in range(8):  # each try settles the lengths that the padding may lengthen
        prefix = _assemble(number, key, header, padding, nbytes)
        short = -(start + len(prefix)) % align
        if not short:
            break
        padding = (short - 2) % align if padding is None else padding + short
    return prefix


_ITEM_SIZE: dict[int, int] = {
    tensor_pb2.DTYPE_FLOAT32: 4,
    tensor_pb2.DTYPE_FLOAT64: 8,
    tensor_pb2.DTYPE_INT32: 4,
    tensor_pb2.DTYPE_INT64: 8,
    tensor_pb2.DTYPE_BOOL: 1,
}


def _assemble(
    number: int, key: str | None, header: bytes, padding: int | None, nbytes: int
) -> bytes:
    fields = header
    if padding is not None:
        fields += b"\x3a" + _varint(padding) + bytes(padding)
    if nbytes:
        fields += b"\x1a" + _varint(nbytes)
    tensor = _varint(len(fields) + nbytes) + fields
    if key is None:
        return _tag(number) + tensor
    raw_key = key.encode()
    entry = b"\x0a" + _varint(len(raw_key)) + raw_key + b"\x12" + tensor
    return _tag(number) + _varint(len(entry) + nbytes) + entry


def _tensor_field(number: int, key: str | None, value: Any, start: int) -> tuple[bytes, Any]:
    """A Tensor field (or map entry) starting at offset `start` of the message, as (prefix,
    payload): the payload is the array's memory, copied once by the join that builds the
    message (an array that is not little-endian and C-contiguous is first made so, the one
    copy numpy needs), and lands aligned for its dtype."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    cache_key = (number, key, array.dtype, array.shape, start % 8)
    prefix = _prefixes.get(cache_key)
    if prefix is None or not array.flags.c_contiguous:
        wire, ready = wire_array(array)
        prefix = _tensor_prefix(number, key, wire, ready.shape, ready.nbytes, start)
        if ready is array:  # the prefix holds for every array of this dtype and shape
            if len(_prefixes) >= _CACHED:
                _prefixes.clear()
            _prefixes[cache_key] = prefix
        array = ready
    if array.nbytes < _SMALL:
        return prefix, array.tobytes()
    return prefix, array.data.cast("B")


def _parts(message: WireMessage, as_lists: bool, start: int = 0) -> tuple[list[Any], int]:
    """The buffers whose concatenation is the message, and their total length; `start` is
    where the message begins in the bytes sent (payloads are aligned in those)."""
    fields_by_name = message.fields.DESCRIPTOR.fields_by_name
    plain = message.fields
    if as_lists and message.tensors:
        plain = type(plain)()
        plain.CopyFrom(message.fields)
        for name, value in message.tensors.items():
            target = getattr(plain, name)
            if isinstance(value, Mapping):
                for key, array in value.items():
                    target[key].CopyFrom(to_proto(array, as_lists=True))
            else:
                target.CopyFrom(to_proto(value, as_lists=True))
    head = plain.SerializeToString()
    parts: list[Any] = [head]
    position = start + len(head)
    if not as_lists:
        for name, value in message.tensors.items():
            number = fields_by_name[name].number
            entries = value.items() if isinstance(value, Mapping) else [(None, value)]
            for key, array in entries:
                prefix, payload = _tensor_field(number, key, array, position)
                parts += (prefix, payload)
                position += len(prefix) + len(payload)
    for name, occurrences in message.nested.items():
        tag = _tag(fields_by_name[name].number)
        for occurrence in occurrences:
            length_bytes = 1
            for _ in range(4):  # the inner payloads' alignment depends on the length's size
                inner, inner_size = _parts(occurrence, as_lists, position + len(tag) + length_bytes)
                length = _varint(inner_size)
                if len(length) == length_bytes:
                    break
                length_bytes = len(length)
            parts.append(tag + length)
            parts += inner
            position += len(tag) + len(length) + inner_size
    for name, value in message.raw.items():
        prefix = _tag(fields_by_name[name].number) + _varint(len(value))
        parts += (prefix, value)
        position += len(prefix) + len(value)
    return parts, position - start


def encode(message: WireMessage, *, as_lists: bool = False) -> bytes:
    """The message's bytes on the wire. Each tensor's bytes are copied once, into the result.

    With as_lists=True tensors take the plain list form (float_values, ...) instead of raw
    bytes, for readers such as grpcurl.
    """
    parts, _ = _parts(message, as_lists)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Decoding

_VARINT, _I64, _START_GROUP, _END_GROUP, _I32 = 0, 1, 3, 4, 5
_MAX_GROUP_DEPTH = 100


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value = byte & 0x7F
    shift = 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7
        if shift > 63:
            raise WireFormatError("a varint runs over 10 bytes")


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    """A length prefix: a varint of at most 5 bytes below 2**31, as protobuf requires."""
    length, after = _read_varint(data, pos)
    if after - pos > 5 or length >= 1 << 31:
        raise WireFormatError("a length prefix is longer than protobuf allows")
    return length, after


_MAX_FIELD_NUMBER = (1 << 29) - 1


def _read_key(data: bytes, pos: int) -> tuple[int, int, int]:
    """A field's key: (field number, wire type, position after it). Protobuf's field numbers
    run from 1 to 2**29 - 1."""
    key, pos = _read_varint(data, pos)
    number = key >> 3
    if not 0 < number <= _MAX_FIELD_NUMBER:
        raise WireFormatError(f"field number {number} is not valid")
    return number, key & 7, pos


def _skip(data: bytes, pos: int, wire_type: int, end: int, number: int = 0) -> int:
    """The position after a field's value (wire types other than LEN)."""
    if wire_type == _VARINT:
        return _read_varint(data, pos)[1]
    if wire_type == _I64:
        return pos + 8
    if wire_type == _I32:
        return pos + 4
    if wire_type == _START_GROUP:  # a deprecated group in an unknown field: skip to its end
        open_groups = [number]
        while open_groups:
            inner_number, inner, pos = _read_key(data, pos)
            if inner == _START_GROUP:
                open_groups.append(inner_number)
                if len(open_groups) > _MAX_GROUP_DEPTH:
                    raise WireFormatError("groups are nested too deeply")
            elif inner == _END_GROUP:
                if open_groups.pop() != inner_number:
                    raise WireFormatError("a group ends with another field number")
            elif inner == _LEN:
                length, pos = _read_length(data, pos)
                pos += length
            else:
                pos = _skip(data, pos, inner, end)
            if pos > end:
                raise WireFormatError("the message is truncated")
        return pos
    raise WireFormatError(f"wire type {wire_type} is not valid here")


def _scan(data: bytes, spans: list[tuple[int, int]]):
    """Each field of the concatenated spans: (number, wire type, field start, value start, end).

    For a LEN field the value is data[value start:end]; otherwise it is read by the caller.
    """
    for start, end in spans:
        pos = start
        while pos < end:
            field_start = pos
            number, wire_type, pos = _read_key(data, pos)
            if wire_type == _LEN:
                length, pos = _read_length(data, pos)
                value_start, pos = pos, pos + length
            else:
                value_start, pos = pos, _skip(data, pos, wire_type, end, number)
            if pos > end:
                raise WireFormatError("the message is truncated")
            yield number, wire_type, field_start, value_start, pos


def _canonical_tensor(data: bytes, pos: int, end: int) -> tuple | None:
    """(dtype, shape, payload offset, payload length) of a Tensor laid out as the SDK and
    protobuf write it (fields 1, 2 packed, 7 and 3, in order, each at most once, nothing
    else), else None."""
    dtype, offset, nbytes = 0, 0, 0
    shape: tuple[int, ...] = ()
    if pos < end and data[pos] == 0x08:
        dtype = data[pos + 1]
        if dtype >= 0x80:
            return None
        pos += 2
    if pos < end and data[pos] == 0x12:
        length = data[pos + 1]
        pos += 2
        stop = pos + length
        if length >= 0x80 or stop > end:
            return None
        dims = data[pos:stop]
        if dims and max(dims) >= 0x80:  # a dimension of two or more bytes
            return None
        shape, pos = tuple(dims), stop
    if pos < end and data[pos] == 0x3A:  # padding, which aligns the payload
        length = data[pos + 1]
        if length >= 0x80:
            return None
        pos += 2 + length
    if pos < end and data[pos] == 0x1A:
        nbytes = data[pos + 1]
        if nbytes < 0x80:
            offset = pos + 2
        else:
            nbytes, offset = _read_length(data, pos + 1)
        pos = offset + nbytes
    return (dtype, shape, offset, nbytes) if pos == end else None


def _tensor_fields(data: bytes, spans: list[tuple[int, int]], where: str) -> tuple | None:
    """(dtype, shape, payload offset, payload length) of a Tensor in any valid layout, or None
    if it uses a list form."""
    dtype = 0
    shape: list[int] = []
    offset = nbytes = 0
    for number, wire_type, _, value_start, end in _scan(data, spans):
        if number == 1 and wire_type == _VARINT:
            dtype = _read_varint(data, value_start)[0] & 0xFFFFFFFF  # an enum is 32 bits
        elif number == 2 and wire_type == _LEN:
            pos = value_start
            while pos < end:
                dimension, pos = _read_varint(data, pos)
                if pos > end:
                    raise WireFormatError(f"{where}: a packed dimension runs past its field")
                shape.append(dimension)
        elif number == 2 and wire_type == _VARINT:
            shape.append(_read_varint(data, value_start)[0])
        elif number == 3 and wire_type == _LEN:
            offset, nbytes = value_start, end - value_start
        elif number == 7 and wire_type == _LEN:
            pass  # padding, which aligns the payload
        elif number in (1, 2, 3, 7):
            raise WireFormatError(f"{where}: tensor field {number} has wire type {wire_type}")
        elif number in (4, 5, 6):
            return None
    if dtype >= 1 << 31:
        dtype -= 1 << 32
    shape = [d & 0xFFFFFFFFFFFFFFFF for d in shape]  # int64 on the wire, two's complement
    signed = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in shape)
    return dtype, signed, offset, nbytes


def _decode_tensor(
    data: bytes, spans: list[tuple[int, int]], where: str, key: str | None = None
) -> np.ndarray:
    fields = _canonical_tensor(data, *spans[0]) if len(spans) == 1 else None
    if fields is None:
        fields = _tensor_fields(data, spans, where)
    try:
        if fields is None:  # the list forms: rare and small, left to protobuf
            try:
                tensor = tensor_pb2.Tensor.FromString(b"".join(data[s:e] for s, e in spans))
            except DecodeError as e:
                raise WireFormatError(f"{where}: {e}") from None
            array = from_proto(tensor)
            array.flags.writeable = False
            return array
        return array_from_data(*fields, buffer=data)
    except TensorFormatError as e:
        # an entry of map `inputs` is named "input 'x'"
        name = where if key is None else f"{where.removesuffix('s')} {key!r}"
        raise TensorFormatError(f"{name}: {e}") from None


def _map_entry(data: bytes, pos: int, end: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The key and the value's spans of a map entry."""
    if data[pos] == 0x0A and data[pos + 1] < 0x80:  # the usual layout: key, then value
        key_end = pos + 2 + data[pos + 1]
        if key_end + 1 < end and data[key_end] == 0x12:
            length = data[key_end + 1]
            if length < 0x80:
                value_start = key_end + 2
            else:
                length, value_start = _read_length(data, key_end + 1)
            if value_start + length == end:
                return data[pos + 2 : key_end], [(value_start, end)]
    key = b""
    value: list[tuple[int, int]] = []
    for number, wire_type, _, value_start, stop in _scan(data, [(pos, end)]):
        if number == 1 and wire_type == _LEN:
            key = data[value_start:stop]
        elif number == 2 and wire_type == _LEN:
            value.append((value_start, stop))
    return key, value


def _decode_map_entries(
    data: bytes, entries: list[tuple[int, int]], where: str
) -> dict[str, np.ndarray]:
    latest: dict[bytes, list[tuple[int, int]]] = {}
    for start, end in entries:  # a later entry for a key replaces the earlier one
        key, value = _map_entry(data, start, end) if start < end else (b"", [])
        latest.pop(key, None)
        latest[key] = value
    tensors = {}
    for key, value in latest.items():
        try:
            name = key.decode()
        except UnicodeDecodeError:
            raise WireFormatError(f"a key of {where} is not valid UTF-8") from None
        tensors[name] = _decode_tensor(data, value, where, name)
    return tensors


def _decode(data: bytes, message_type: Any, spans: list[tuple[int, int]]) -> WireMessage:
    schema = _schema(message_type.DESCRIPTOR)
    plain: list[Any] = []
    hand: dict[int, list[tuple[int, int]]] = {}
    for number, wire_type, field_start, value_start, end in _scan(data, spans):
        spec = schema.get(number)
        if spec is None:
            if plain and plain[-1][1] == field_start:  # extend a run of plain fields
                plain[-1] = (plain[-1][0], end)
            else:
                plain.append((field_start, end))
        elif wire_type != _LEN:
            raise WireFormatError(f"field {spec.name!r} has wire type {wire_type}")
        else:
            hand.setdefault(number, []).append((value_start, end))
    view = memoryview(data)
    try:
        if len(plain) == 1 and plain[0] == (0, len(data)):
            fields = message_type.FromString(data)
        else:
            fields = message_type.FromString(b"".join(view[s:e] for s, e in plain))
    except DecodeError as e:
        raise WireFormatError(f"{message_type.DESCRIPTOR.name}: {e}") from None
    message = WireMessage(fields)
    for number, occurrences in hand.items():
        spec = schema[number]
        if spec.kind == _TENSOR_MAP:
            message.tensors[spec.name] = _decode_map_entries(data, occurrences, spec.name)
        elif spec.kind == _TENSOR_FIELD:  # a repeated singular field merges: read them all
            message.tensors[spec.name] = _decode_tensor(data, occurrences, spec.name)
        elif spec.kind == _NESTED:
            groups = [[span] for span in occurrences] if spec.repeated else [occurrences]
            message.nested[spec.name] = [
                _decode_nested(data, spec.message_type, group) for group in groups
            ]
        elif spec.kind == _RAW_MESSAGE:  # occurrences merge: concatenate them
            if len(occurrences) == 1:
                start, end = occurrences[0]
                message.raw[spec.name] = view[start:end]
            else:
                message.raw[spec.name] = b"".join(view[s:e] for s, e in occurrences)
        else:  # a bytes field: the last occurrence wins
            start, end = occurrences[-1]
            message.raw[spec.name] = view[start:end]
    return message


def _decode_nested(data: bytes, message_type: Any, spans: list[tuple[int, int]]) -> WireMessage:
    try:
        return _decode(data, message_type, spans)
    except TensorFormatError as e:
        return WireMessage(message_type(), error=e)


def decode(data: bytes, message_type: Any) -> WireMessage:
    """Split received bytes into a WireMessage of `message_type` (a generated message class).

    Tensors are read-only views of `data`; Graph and chunk fields are memoryviews of it. The
    `fields` message may be shared with earlier messages of the same layout: do not modify
    it. WireFormatError if the bytes do not parse; TensorFormatError (naming the field and
    key) if a tensor is inconsistent.
    """
    layout = _layouts.get((message_type, len(data)))
    if layout is not None and _skeleton(data, layout.keeps) == layout.skeleton:
        if not any(_bad_bools(data, offset, length) for offset, length in layout.bools):
            return _rebuild(layout.template, data)
        # else decoded afresh below, to report the error as a first decode does
    try:
        message = _decode(data, message_type, [(0, len(data))])
    except IndexError:
        raise WireFormatError("the message is truncated") from None
    _remember_layout(data, message_type, message)
    return message


# ---------------------------------------------------------------------------------------------
# Layouts: a message with the same bytes as an earlier one, but for its tensors' payloads,
# has the same fields and the same tensors at the same places. Calls in a loop send such
# messages; they are decoded by checking those bytes and viewing the payloads.


def _bad_bools(data: bytes, offset: int, length: int) -> bool:
    return bool(np.frombuffer(data, np.uint8, length, offset).max() > 1)


@dataclass(frozen=True)
class _Layout:
    keeps: tuple[tuple[int, int], ...]  # the spans of the message that are not payloads
    skeleton: bytes  # their bytes
    template: tuple  # (fields, tensors, nested, raw) of the decoded message, see _template
    bools: tuple[tuple[int, int], ...]  # (offset, length) of bool payloads, to check


_layouts: dict[tuple[Any, int], _Layout] = {}

_LAYOUT_TENSORS = 64
"""Messages with more tensors than this are not remembered (their layouts rarely repeat, and
remembering costs more than it saves)."""


def _skeleton(data: bytes, keeps: tuple[tuple[int, int], ...]) -> bytes:
    view = memoryview(data)
    return b"".join([view[start:end] for start, end in keeps])


def _offset(buffer: Any, base: int) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0] - base


def _template(
    message: WireMessage, data: bytes, base: int, payloads: list, bools: list
) -> tuple | None:
    """The message with each tensor and raw field replaced by where it lies in `data` (its
    payload appended to `payloads`), or None if some part is not a view of `data` (list-form
    tensors, merged fields) or a nested part failed."""
    if message.error is not None:
        return None
    tensors = []
    for name, value in message.tensors.items():
        single = not isinstance(value, dict)
        entries = []
        for key, array in [(None, value)] if single else value.items():
            offset = array.__array_interface__["data"][0] - base if array.nbytes else 0
            if not 0 <= offset <= len(data) - array.nbytes or not array.flags.c_contiguous:
                return None
            if array.nbytes:
                payloads.append((offset, offset + array.nbytes))
                if array.dtype.kind == "b":
                    bools.append((offset, array.nbytes))
            entries.append((key, offset, array.dtype, array.shape))
        tensors.append((name, single, tuple(entries)))
    nested = []
    for name, occurrences in message.nested.items():
        templates = [_template(part, data, base, payloads, bools) for part in occurrences]
        if any(t is None for t in templates):
            return None
        nested.append((name, templates))
    raw = []
    for name, value in message.raw.items():
        if not isinstance(value, memoryview):
            return None
        offset = _offset(value, base) if len(value) else 0
        if len(value):
            payloads.append((offset, offset + len(value)))
        raw.append((name, offset, offset + len(value)))
    return (message.fields, tuple(tensors), tuple(nested), tuple(raw))


def _tensor_count(message: WireMessage) -> int:
    count = sum(len(v) if isinstance(v, dict) else 1 for v in message.tensors.values())
    for occurrences in message.nested.values():
        count += sum(_tensor_count(occurrence) for occurrence in occurrences)
    return count + len(message.raw)


def _remember_layout(data: bytes, message_type: Any, message: WireMessage) -> None:
    if not data or _tensor_count(message) > _LAYOUT_TENSORS:
        return
    payloads: list[tuple[int, int]] = []
    bools: list[tuple[int, int]] = []
    template = _template(message, data, _offset(data, 0), payloads, bools)
    if template is None:
        return
    keeps = []
    position = 0
    for start, end in sorted(payloads):
        if start < position:
            return  # overlapping payloads cannot come from a valid parse; be safe
        keeps.append((position, start))
        position = end
    keeps.append((position, len(data)))
    if len(_layouts) >= _CACHED:
        _layouts.clear()
    layout = _Layout(tuple(keeps), _skeleton(data, tuple(keeps)), template, tuple(bools))
    _layouts[(message_type, len(data))] = layout


def _view(data: bytes, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    array = np.ndarray(shape, dtype, data, offset)
    return array if array.flags.aligned else aligned_copy(array)


def _rebuild(template: tuple, data: bytes) -> WireMessage:
    fields, tensors, nested, raw = template
    message = WireMessage(fields)
    for name, single, entries in tensors:
        if single:
            _, offset, dtype, shape = entries[0]
            message.tensors[name] = _view(data, offset, dtype, shape)
        else:
            message.tensors[name] = {
                key: _view(data, offset, dtype, shape) for key, offset, dtype, shape in entries
            }
    for name, templates in nested:
        message.nested[name] = [_rebuild(t, data) for t in templates]
    if raw:
        view = memoryview(data)
        for name, start, end in raw:
            message.raw[name] = view[start:end]
    return message


# ---------------------------------------------------------------------------------------------
# Tensors larger than one message: TensorChunks

_CHUNK_TARGETS: dict[int, str] = {
    gradient_service_pb2.CHUNK_TARGET_INPUT: "input {!r}",
    gradient_service_pb2.CHUNK_TARGET_SEED: "the seed",
    gradient_service_pb2.CHUNK_TARGET_VALUE: "the value of {!r}",
    gradient_service_pb2.CHUNK_TARGET_GRADIENT: "the gradient of {!r}",
}

MESSAGE_OVERHEAD = 1 << 16
"""Bytes kept free in a message beside its tensors' payloads, for names and other fields."""


def chunk_budget(max_message_bytes: int) -> int:
    """The tensor payload bytes one message of this size limit carries, chunks included."""
    return max(max_message_bytes - MESSAGE_OVERHEAD, max_message_bytes // 2)


_LIST_ITEM_BYTES = {"f": 8, "i": 10, "b": 1}  # the most a list-form element takes


def payload_bytes(tensors: Mapping[str, Any], *, as_lists: bool = False) -> int:
    """About how many bytes these tensors take in a message (payloads and names); in the
    list form when as_lists (a float32 element is written as a double there)."""
    total = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        size = array.size * _LIST_ITEM_BYTES[array.dtype.kind] if as_lists else array.nbytes
        total += size + len(name) + 32
    return total


def split_oversized(
    tensors: Mapping[str, Any], budget: int, *, as_lists: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inline, chunked): the tensors that fit in one message of `budget` payload bytes, in
    order, and the rest, which travel as chunks."""
    inline: dict[str, Any] = {}
    chunked: dict[str, Any] = {}
    used = 0
    for name, value in tensors.items():
        size = payload_bytes({name: value}, as_lists=as_lists)
        if used + size <= budget:
            inline[name] = value
            used += size
        else:
            chunked[name] = value
    return inline, chunked


def chunks_of(target: int, name: str, value: Any, budget: int) -> list[WireMessage]:
    """The TensorChunks carrying a tensor, each at most `budget` bytes of it (views, no copy)."""
    wire, array = wire_array(value)
    payload = array.data.cast("B") if array.nbytes else memoryview(b"")
    chunks = []
    for index, offset in enumerate(range(0, max(len(payload), 1), budget)):
        fields = gradient_service_pb2.TensorChunk(name=name, index=index)
        fields.target = target  # type: ignore[assignment]
        if index == 0:
            fields.dtype = wire
            fields.shape.extend(array.shape)
        chunks.append(WireMessage(fields, raw={"data": payload[offset : offset + budget]}))
    return chunks


class ChunkAssembler:
    """Rebuilds the tensors of one step from its TensorChunks, checking order and size.

    Each chunk is copied once, into an array allocated when the tensor's first chunk arrives
    (after `check_size(what, dtype, shape)`, which may raise, e.g. over a limit). The first
    error is kept and raised by the next take(); the chunks after it are ignored until then.
    """

    def __init__(self, check_size: Callable[[str, np.dtype, tuple[int, ...]], None] | None = None):
        self._check_size = check_size
        self._done: dict[tuple[int, str], np.ndarray] = {}
        self._open: list[Any] | None = None  # [key, array, bytes view, bytes filled, next index]
        self._error: Exception | None = None

    @staticmethod
    def _what(key: tuple[int, str]) -> str:
        target, name = key
        return _CHUNK_TARGETS.get(target, "chunk target {!r}").format(name)

    def add(self, chunk: WireMessage) -> None:
        """Take one TensorChunk."""
        if self._error is None:
            try:
                self._add(chunk)
            except Exception as e:  # noqa: BLE001 - kept for take()
                self._error = e
                self._open = None

    def _add(self, chunk: WireMessage) -> None:
        fields = chunk.fields
        data = chunk.raw.get("data", b"")
        key = (fields.target, fields.name)
        what = self._what(key)
        if fields.target not in _CHUNK_TARGETS:
            raise TensorFormatError(f"a chunk has no valid target ({fields.target})")
        if fields.index == 0:
            if self._open is not None:
                raise TensorFormatError(
                    f"{self._what(self._open[0])} is incomplete ({self._open[3]} of "
                    f"{self._open[2].nbytes} bytes) when {what} begins"
                )
            if key in self._done:
                raise TensorFormatError(f"{what} was sent twice")
            shape = tuple(fields.shape)
            dtype, _ = dtype_and_count(fields.dtype, shape)
            if self._check_size is not None:
                self._check_size(what, dtype, shape)
            array = np.empty(shape, dtype)
            self._open = [key, array, array.reshape(-1).view(np.uint8), 0, 0]
        elif self._open is None or self._open[0] != key:
            raise TensorFormatError(f"chunk {fields.index} of {what} comes without its chunk 0")
        state = self._open
        _, array, view, filled, expected = state
        if fields.index != expected:
            raise TensorFormatError(
                f"chunk {fields.index} of {what} came where chunk {expected} was expected "
                "(a chunk is missing, repeated or out of order)"
            )
        end = filled + len(data)
        if end > view.nbytes:
            raise TensorFormatError(
                f"chunk {fields.index} of {what} runs past the tensor's {view.nbytes} bytes"
            )
        view[filled:end] = np.frombuffer(data, np.uint8)  # the one copy of the chunk
        state[3], state[4] = end, expected + 1
        if end == view.nbytes:
            if array.dtype.kind == "b" and view.size and view.max() > 1:
                raise TensorFormatError(f"{what}: bool data holds bytes other than 0 and 1")
            array.flags.writeable = False
            self._done[key] = array
            self._open = None

    def take(self) -> dict[tuple[int, str], np.ndarray]:
        """The tensors completed since the last take(), by (target, name); raises the first
        error since then, or TensorFormatError if a tensor is still incomplete."""
        done, error, state = self._done, self._error, self._open
        self._done, self._error, self._open = {}, None, None
        if error is not None:
            raise error
        if state is not None:
            raise TensorFormatError(
                f"{self._what(state[0])} is incomplete: {state[3]} of {state[2].nbytes} bytes "
                "arrived (chunks are missing)"
            )
        return done
