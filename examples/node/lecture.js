#!/usr/bin/env node
// The lecture's two examples against a gradient service, from Node.js with @grpc/grpc-js and
// @grpc/proto-loader (docs/other-languages.md explains each step).
//
//   node lecture.js [HOST:PORT]
//
// The target is the first argument, else $GRADIENT_TARGET, else localhost:50051. The protos are
// read from ../../protos (the repository's), or from $GRADIENT_PROTOS. Prints one JSON object per
// line: the scalar lecture (tensors as lists), the vectorized one (raw float64 bytes, aligned),
// the vectorized one again by its graph digest, and two failures with their status details.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const TARGET = process.argv[2] || process.env.GRADIENT_TARGET || 'localhost:50051';
const PROTOS = process.env.GRADIENT_PROTOS || path.join(__dirname, '..', '..', 'protos');
const SERVICE = 'gradient.v1.GradientService';

const definition = protoLoader.loadSync('gradient/v1/gradient_service.proto', {
  includeDirs: [PROTOS],
  keepCase: true, // field names as in the .proto: float_values, graph_digest
  longs: Number, // int64 fields (shape, int_values) as numbers; String keeps all 64 bits
  enums: String, // dtype: 'DTYPE_FLOAT64' rather than 2
  defaults: true, // absent fields read as their defaults ('', 0, empty Buffer)
  arrays: true, // absent repeated fields read as []
  oneofs: true, // AttrValue says which member is set: value: 'i' | 'f' | 's' | ...
});
const { GradientService } = grpc.loadPackageDefinition(definition).gradient.v1;
const client = new GradientService(TARGET, grpc.credentials.createInsecure(), {
  'grpc.max_receive_message_length': 256 * 1024 * 1024, // grpc-js accepts 4 MB by default
});

// One unary call as a promise, with a deadline.
function call(method, request) {
  const deadline = Date.now() + 10000;
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

// --- Tensors ----------------------------------------------------------------------------------

const ITEM_SIZE = { DTYPE_FLOAT32: 4, DTYPE_FLOAT64: 8, DTYPE_INT32: 4, DTYPE_INT64: 8, DTYPE_BOOL: 1 };
const DTYPE_NUMBER = { DTYPE_FLOAT32: 1, DTYPE_FLOAT64: 2, DTYPE_INT32: 3, DTYPE_INT64: 4, DTYPE_BOOL: 5 };

const count = (shape) => shape.reduce((a, b) => a * b, 1);

// A float64 tensor in list form: readable, fine for small tensors.
function listTensor(values, shape = []) {
  return { dtype: 'DTYPE_FLOAT64', shape, float_values: values };
}

// A float64 tensor as raw little-endian bytes, for proto-loader to serialize (the payload lands
// wherever protobufjs puts it: the server copies a payload that is not aligned).
function rawTensor(values, shape) {
  const data = Buffer.alloc(8 * values.length);
  values.forEach((v, i) => data.writeDoubleLE(v, 8 * i));
  return { dtype: 'DTYPE_FLOAT64', shape, data };
}

// The elements of a received Tensor, flat, in row-major order, in either form. A raw `data`
// arrives as a Buffer at any byte offset of the message: `new Float64Array(data.buffer,
// data.byteOffset, n)` throws when that offset is not a multiple of 8. A DataView reads at any
// offset, in little-endian order whatever the host's.
function elements(tensor) {
  const n = count(tensor.shape);
  const { data } = tensor;
  if (data.length === 0) {
    const lists = [tensor.float_values, tensor.int_values, tensor.bool_values];
    return lists.find((list) => list.length === n) || [];
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const read = {
    DTYPE_FLOAT32: (i) => view.getFloat32(4 * i, true),
    DTYPE_FLOAT64: (i) => view.getFloat64(8 * i, true),
    DTYPE_INT32: (i) => view.getInt32(4 * i, true),
    DTYPE_INT64: (i) => Number(view.getBigInt64(8 * i, true)),
    DTYPE_BOOL: (i) => view.getUint8(i) !== 0,
  }[tensor.dtype];
  return Array.from({ length: n }, (_, i) => read(i));
}

// A received Tensor as nested arrays (a number for a scalar).
function toNested(tensor) {
  const flat = elements(tensor);
  const nest = (offset, dims) => {
    if (dims.length === 0) return flat[offset];
    const inner = count(dims.slice(1));
    return Array.from({ length: dims[0] }, (_, i) => nest(offset + i * inner, dims.slice(1)));
  };
  return nest(0, tensor.shape);
}

const nested = (tensors) =>
  Object.fromEntries(Object.entries(tensors).map(([name, t]) => [name, toNested(t)]));

// --- Aligned raw inputs, written by hand ----------------------------------------------------------
//
// protobufjs writes a message's fields in field-number order, so Tensor.padding (7) would come
// after Tensor.data (3). To make each payload start at a multiple of its item size from the start
// of the message (the server then computes on the received bytes without copying them), the
// `inputs` map entries are written here, in the Tensor's wire format, after the request's other
// fields serialized by proto-loader. Protobuf allows fields in any order.

function varint(value) {
  const bytes = [];
  while (value >= 0x80) {
    bytes.push((value % 0x80) | 0x80);
    value = Math.floor(value / 0x80);
  }
  bytes.push(value);
  return Buffer.from(bytes);
}

const lengthDelimited = (tag, body) => Buffer.concat([Buffer.from([tag]), varint(body.length), body]);

// A map<string, Tensor> entry of field `number` holding a raw tensor, as [prefix, payload], the
// prefix padded so that the payload starts at a multiple of the item size after `start`.
function alignedEntry(number, key, dtype, shape, payload, start) {
  const align = ITEM_SIZE[dtype];
  const head = [Buffer.from([0x08, DTYPE_NUMBER[dtype]])]; // field 1: dtype
  if (shape.length) head.push(lengthDelimited(0x12, Buffer.concat(shape.map(varint)))); // 2: shape
  const prefixWith = (padding) => {
    const fields = [...head];
    if (padding !== null) fields.push(lengthDelimited(0x3a, Buffer.alloc(padding))); // 7: padding
    fields.push(Buffer.from([0x1a]), varint(payload.length)); // 3: data (its tag and length)
    const tensorFields = Buffer.concat(fields);
    const tensor = Buffer.concat([varint(tensorFields.length + payload.length), tensorFields]);
    const entry = Buffer.concat([lengthDelimited(0x0a, Buffer.from(key)), Buffer.from([0x12]), tensor]);
    return Buffer.concat([varint((number << 3) | 2), varint(entry.length + payload.length), entry]);
  };
  let padding = null;
  for (;;) { // each try settles the lengths that the padding may lengthen
    const prefix = prefixWith(padding);
    const short = (align - ((start + prefix.length) % align)) % align;
    if (short === 0) return [prefix, payload];
    padding = padding === null ? (short + align - 2) % align : padding + short;
  }
}

// A serializer for GradientRequest whose `inputs` are {name: {dtype, shape, data}} with raw
// little-endian `data`, written aligned.
const gradientMethod = definition[SERVICE].Gradient;
function serializeAligned(request) {
  const { inputs, ...plain } = request;
  const parts = [gradientMethod.requestSerialize(plain)];
  let offset = parts[0].length;
  for (const [name, tensor] of Object.entries(inputs)) {
    const entry = alignedEntry(2, name, tensor.dtype, tensor.shape, tensor.data, offset);
    parts.push(...entry);
    offset += entry[0].length + entry[1].length;
  }
  return Buffer.concat(parts);
}

function gradientAligned(request) {
  const deadline = Date.now() + 10000;
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(`/${SERVICE}/Gradient`, serializeAligned,
      gradientMethod.responseDeserialize, request, { deadline },
      (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// --- Errors ---------------------------------------------------------------------------------------
//
// A failure is an Error with `code` (a number: grpc.status[code] names it) and `details` (the
// server's message). Its trailing metadata holds `grpc-status-details-bin`, a google.rpc.Status
// whose `details` include an ErrorInfo (reason; metadata naming the node and op, or the limit).
// These three messages are enough to read it (Any as google.protobuf.Any is on the wire).
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;

function describeError(error) {
  const out = { code: error.code, status: grpc.status[error.code], details: error.details };
  const [bin] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (bin) {
    const status = rpc.lookupType('google.rpc.Status').decode(bin);
    for (const any of status.details) {
      if (any.type_url === 'type.googleapis.com/google.rpc.ErrorInfo') {
        const info = rpc.lookupType('google.rpc.ErrorInfo').decode(any.value);
        out.reason = info.reason;
        out.metadata = info.metadata;
      }
    }
  }
  return out;
}

// --- The lecture ------------------------------------------------------------------------------------

const print = (record) => console.log(JSON.stringify(record));

// f = (x + y) * z, as in examples/lecture_scalar.json
const scalarGraph = {
  nodes: [
    { name: 'x', op: 'input' },
    { name: 'y', op: 'input' },
    { name: 'z', op: 'input' },
    { name: 'q', op: 'add', inputs: ['x', 'y'] },
    { name: 'f', op: 'mul', inputs: ['q', 'z'] },
  ],
};

// f = ||W x||^2, as in examples/lecture_vectorized.json
const vectorizedGraph = {
  nodes: [
    { name: 'W', op: 'input' },
    { name: 'x', op: 'input' },
    { name: 'q', op: 'matmul', inputs: ['W', 'x'] },
    { name: 'q_squared', op: 'square', inputs: ['q'] },
    { name: 'f', op: 'sum', inputs: ['q_squared'] },
  ],
};
const W = [0.1, 0.5, -0.3, 0.8]; // 2 x 2, row-major
const X = [0.2, 0.4];

async function main() {
  // 1. The scalar lecture: inputs as lists, and lists back.
  const scalar = await call('Gradient', {
    graph: scalarGraph,
    inputs: { x: listTensor([-2]), y: listTensor([5]), z: listTensor([-4]) },
    output: 'f',
    response_payload: 'PAYLOAD_FORM_LISTS',
  });
  print({ example: 'scalar', values: nested(scalar.values), gradients: nested(scalar.gradients) });

  // 2. The vectorized lecture: inputs as raw float64 bytes, written aligned; raw bytes back.
  const inputs = { W: rawTensor(W, [2, 2]), x: rawTensor(X, [2]) };
  const vectorized = await gradientAligned({ graph: vectorizedGraph, inputs, output: 'f' });
  print({
    example: 'vectorized',
    values: nested(vectorized.values),
    gradients: nested(vectorized.gradients),
    graph_digest: vectorized.graph_digest,
  });

  // 3. The same graph by its digest alone (no graph sent), the inputs serialized by proto-loader.
  // A server that does not hold the digest answers NOT_FOUND: then send the graph again.
  const byDigest = { graph_digest: vectorized.graph_digest, inputs, output: 'f', wrt: ['W', 'x'] };
  let again;
  try {
    again = await call('Gradient', byDigest);
  } catch (error) {
    if (error.code !== grpc.status.NOT_FOUND) throw error;
    again = await call('Gradient', { ...byDigest, graph_digest: '', graph: vectorizedGraph });
  }
  print({ example: 'vectorized-by-digest', values: nested(again.values), gradients: nested(again.gradients) });

  // 4. A digest the server does not hold.
  try {
    await call('Gradient', { graph_digest: '0'.repeat(64), inputs, output: 'f' });
  } catch (error) {
    print({ example: 'unknown-digest', ...describeError(error) });
  }

  // 5. A shape mismatch: W is 2 x 2, x has 3 elements.
  try {
    await call('Gradient', { graph: vectorizedGraph, inputs: { ...inputs, x: listTensor([1, 2, 3], [3]) }, output: 'f' });
  } catch (error) {
    print({ example: 'shape-mismatch', ...describeError(error) });
  }
}

main()
  .catch((error) => {
    console.error(error.code !== undefined ? `${grpc.status[error.code]}: ${error.details}` : error);
    process.exitCode = 1;
  })
  .finally(() => client.close());
