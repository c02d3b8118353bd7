#!/usr/bin/env node
// Calls a leanserve server from Node.js: reads a model's input signature (ModelService/GetModel), sends an
// all-zeros batch (InferenceService/Predict) and prints the output as one line of JSON:
//
//   node predict.js --server 127.0.0.1:8500 --model seed --rows 3 [--version V] [--token T] [--tls-ca ca.pem]
//   {"shape":[3,10],"output":[[0.0978,...],[...],[...]]}
//
// The .proto files are loaded at run time from the repository's protos/ folder: nothing is generated.
// Exit codes: 0 success, 1 gRPC error (printed as "error <STATUS>: <details>" on stderr), 2 bad usage or a
// model this example cannot feed.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
const MAX_MESSAGE_BYTES = 512 * 1024 * 1024; // as the Python client: large batches fit in one message

// Bytes per element of each leanserve.v1.DataType (tensor.proto).
const DTYPE_BYTES = { FLOAT32: 4, FLOAT64: 8, INT8: 1, INT16: 2, INT32: 4, INT64: 8, UINT8: 1, BOOL: 1, FLOAT16: 2 };

// Reads element i of a little-endian buffer as a JS number (or boolean), by dtype. DataView, not typed arrays:
// the bytes gRPC hands over need not be aligned, and DataView is explicit about the byte order.
const READERS = {
  FLOAT32: (v, i) => v.getFloat32(i * 4, true),
  FLOAT64: (v, i) => v.getFloat64(i * 8, true),
  FLOAT16: (v, i) => halfToNumber(v.getUint16(i * 2, true)),
  INT8: (v, i) => v.getInt8(i),
  INT16: (v, i) => v.getInt16(i * 2, true),
  INT32: (v, i) => v.getInt32(i * 4, true),
  // Exact up to 2**53 (class indices and counts); larger values lose precision as JS numbers.
  INT64: (v, i) => Number(v.getBigInt64(i * 8, true)),
  UINT8: (v, i) => v.getUint8(i),
  BOOL: (v, i) => v.getUint8(i) !== 0,
};

function halfToNumber(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24; // subnormal (or zero)
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

class UsageError extends Error {}

function parseCommandLine() {
  const { values } = parseArgs({
    options: {
      server: { type: 'string' },
      model: { type: 'string' },
      rows: { type: 'string' },
      version: { type: 'string', default: '0' },
      token: { type: 'string' },
      'tls-ca': { type: 'string' },
      timeout: { type: 'string', default: '60' },
    },
  });
  if (!values.server || !values.model || !values.rows) {
    throw new UsageError('usage: node predict.js --server HOST:PORT --model NAME --rows N [--version V] '
      + '[--token T] [--tls-ca FILE] [--timeout SECONDS]');
  }
  const rows = Number(values.rows);
  const version = Number(values.version);
  const timeout = Number(values.timeout);
  if (!Number.isInteger(rows) || rows < 1) throw new UsageError(`--rows must be >= 1, got ${values.rows}`);
  if (!Number.isInteger(version) || version < 0) throw new UsageError(`--version must be >= 0, got ${values.version}`);
  if (!(timeout > 0)) throw new UsageError(`--timeout must be a positive number of seconds, got ${values.timeout}`);
  return { ...values, rows, version, timeout };
}

// The two services, from the .proto files as they are in the repository.
function loadServices() {
  const definition = protoLoader.loadSync(
    ['leanserve/v1/model_service.proto', 'leanserve/v1/inference_service.proto'],
    {
      includeDirs: [PROTO_DIR],
      keepCase: true, // field names as in the .proto (model_name, not modelName)
      longs: String, // int64 fields arrive as decimal strings (exact)
      enums: String, // enum fields arrive as names ("FLOAT32")
      defaults: true, // unset fields arrive as their default (0, "", [])
      oneofs: true,
    },
  );
  return grpc.loadPackageDefinition(definition).leanserve.v1;
}

// Insecure by default; TLS with --tls-ca. A --token goes in every call's metadata (grpc-js refuses call
// credentials on an insecure channel, metadata works for both).
function connect(v1, args) {
  const credentials = args['tls-ca']
    ? grpc.credentials.createSsl(fs.readFileSync(args['tls-ca']))
    : grpc.credentials.createInsecure();
  const options = {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  };
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set('authorization', `Bearer ${args.token}`);
  const models = new v1.ModelService(args.server, credentials, options);
  const inference = new v1.InferenceService(args.server, credentials, options);
  // One promise-returning unary call, with the metadata and a deadline.
  const call = (stub, method, request) => new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + args.timeout * 1000);
    stub[method](request, metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
  return { models, inference, call, close: () => { models.close(); inference.close(); } };
}

// The model's single input, checked to be feedable: a fixed shape after the batch dimension.
function inputSpec(info) {
  if (info.inputs.length !== 1) {
    const names = info.inputs.map((s) => s.name).join(', ');
    throw new UsageError(`model ${info.name} has ${info.inputs.length} inputs (${names}); this example feeds one`);
  }
  const spec = info.inputs[0];
  // TensorSpec.shape includes the batch dimension first (always -1); the rest must be known sizes.
  const dims = spec.shape.map(Number).slice(1);
  if (dims.some((d) => d < 0)) {
    throw new UsageError(`input ${spec.name} has a dynamic dimension (shape [${spec.shape.join(', ')}]): `
      + 'this example builds fixed-size zero rows and cannot choose a size for it');
  }
  if (!(spec.dtype in DTYPE_BYTES)) throw new UsageError(`input ${spec.name} has unsupported dtype ${spec.dtype}`);
  return { name: spec.name, dtype: spec.dtype, dims };
}

// An all-zeros leanserve.v1.Tensor of `rows` rows: Buffer.alloc zero-fills, and zero bytes are 0 / 0.0 / false
// in every dtype.
function zerosTensor(spec, rows) {
  const shape = [rows, ...spec.dims];
  const count = shape.reduce((a, b) => a * b, 1);
  return { name: spec.name, dtype: spec.dtype, shape, data: Buffer.alloc(count * DTYPE_BYTES[spec.dtype]) };
}

// A response tensor as nested arrays following its shape (row-major), plus its shape as numbers. (JSON has no
// NaN or Infinity: JSON.stringify prints them as null.)
function decodeTensor(tensor) {
  const shape = tensor.shape.map(Number);
  const read = READERS[tensor.dtype];
  if (!read) throw new Error(`output ${tensor.name} has unsupported dtype ${tensor.dtype}`);
  const count = shape.reduce((a, b) => a * b, 1);
  if (tensor.data.length !== count * DTYPE_BYTES[tensor.dtype]) {
    throw new Error(`output ${tensor.name}: ${tensor.data.length} bytes for shape [${shape}] of ${tensor.dtype}`);
  }
  const view = new DataView(tensor.data.buffer, tensor.data.byteOffset, tensor.data.length);
  let next = 0;
  const nest = (axis) => {
    if (axis === shape.length) return read(view, next++);
    return Array.from({ length: shape[axis] }, () => nest(axis + 1));
  };
  return { shape, output: nest(0) };
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || `CODE_${code}`;
}

async function main() {
  const args = parseCommandLine();
  const v1 = loadServices();
  const conn = connect(v1, args);
  try {
    // The signature of the version that will answer: with --version 0 the server picks the model's default.
    const info = await conn.call(conn.models, 'GetModel', { name: args.model, version: args.version });
    const spec = inputSpec(info);
    const response = await conn.call(conn.inference, 'Predict', {
      model_name: args.model,
      model_version: info.version, // exactly the version whose signature was read
      inputs: [zerosTensor(spec, args.rows)],
      postprocess: 'RAW',
    });
    if (response.outputs.length === 1) {
      console.log(JSON.stringify(decodeTensor(response.outputs[0])));
    } else {
      // A model with several outputs: one {"shape", "output"} per output name, still one line.
      const outputs = Object.fromEntries(response.outputs.map((t) => [t.name, decodeTensor(t)]));
      console.log(JSON.stringify({ outputs }));
    }
  } finally {
    conn.close();
  }
}

main().catch((err) => {
  if (typeof err.code === 'number' && 'details' in err) {
    // A gRPC status from the server (or the channel: UNAVAILABLE, DEADLINE_EXCEEDED, ...).
    console.error(`error ${statusName(err.code)}: ${err.details}`);
    process.exitCode = 1;
  } else {
    // Bad usage, a model this example cannot feed, or a local failure (unreadable CA file, missing protos, ...).
    console.error(err instanceof UsageError ? err.message : `error: ${err.message}`);
    process.exitCode = 2;
  }
});
