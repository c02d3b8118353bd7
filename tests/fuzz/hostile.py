"""Builders of hostile model files for the attack tests: own-format zips with chosen manifests and arrays, zip
bombs, zips whose directory lies about sizes, npz files whose headers lie."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, Plan, build_plan

MB = 1 << 20


def plan(fmt: str = "dense_f32", k: int = 24, n: int = 6, seed: int = 0, sparsity: float = 0.7,
         **options: Any) -> Plan:
    """A one-layer Plan ``k -> n`` in ``fmt`` with seeded weights (zeros where the format is sparse)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if fmt != "dense_f32" and fmt != "int8":
        w[rng.random((k, n)) < sparsity] = 0
    p = build_plan((k,), [LayerSpec("only", w, rng.standard_normal(n).astype(np.float32), "relu")])
    if fmt != "dense_f32":
        from leanserve.kernels import get_format

        layer = p.layers[0]
        p = Plan(p.input_shape, [get_format(fmt).from_dense(w, layer.bias_vector(), "relu", **options)], ["only"])
    return p


def files(p: Plan) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(manifest JSON object, the weights as a dict of arrays) of ``p``, ready to be altered."""
    manifest, blob = artifacts.plan_to_files(p, "x", "y")
    return manifest, dict(st_load(blob))


def blob_of(tensors: dict[str, np.ndarray]) -> bytes:
    return st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip holding exactly ``members`` (no validation of what they hold)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def leanserve_zip(manifest: Any, tensors: dict[str, np.ndarray] | bytes, fix_sha: bool = True,
                  compression: int = zipfile.ZIP_STORED) -> bytes:
    """A ``.leanserve`` zip with this (possibly malformed) manifest and weights; ``fix_sha`` recomputes
    weights_sha256 so that a test reaches the checks after the checksum."""
    blob = tensors if isinstance(tensors, bytes) else blob_of(tensors)
    if fix_sha and isinstance(manifest, dict):
        manifest = {**manifest, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    text = manifest if isinstance(manifest, (bytes, str)) else json.dumps(manifest)
    return zip_of({artifacts.MANIFEST: text.encode() if isinstance(text, str) else text, artifacts.WEIGHTS: blob},
                  compression)


def bomb_zip(members: dict[str, bytes | int]) -> bytes:
    """A deflated zip; an int member is that many zero bytes (about 1000:1 compressed)."""
    return zip_of({name: (b"\0" * data if isinstance(data, int) else data) for name, data in members.items()},
                  zipfile.ZIP_DEFLATED)


def declare_size(data: bytes, name: str, size: int) -> bytes:
    """``data`` (a zip) with member ``name``'s uncompressed size rewritten to ``size`` in both its local header and
    the central directory: a directory that lies."""
    out = bytearray(data)
    encoded = name.encode()
    pos = 0
    while (pos := out.find(b"PK\x01\x02", pos)) >= 0:  # central directory entries
        n_len = struct.unpack_from("<H", out, pos + 28)[0]
        if bytes(out[pos + 46: pos + 46 + n_len]) == encoded:
            struct.pack_into("<I", out, pos + 24, size)
            local = struct.unpack_from("<I", out, pos + 42)[0]
            struct.pack_into("<I", out, local + 22, size)
        pos += 4
    return bytes(out)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def npy_bytes(array: np.ndarray | None = None, *, header: dict[str, Any] | None = None, body: bytes = b"") -> bytes:
    """A .npy file: ``array`` as numpy writes it, or a hand-written ``header`` followed by ``body``."""
    if array is not None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text + b" " * pad + b"\n" + body


def npz_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    return zip_of({f"{k}.npy": v for k, v in members.items()}, compression)


def upload_raw(client: Any, data: bytes, name: str = "attack") -> Any:
    """Upload ``data`` through the raw UploadModel stub (header with its true size and SHA-256, 1 MiB chunks)."""
    from leanserve.v1 import model_service_pb2 as pb

    header = pb.UploadHeader(name=name, format=pb.MODEL_FORMAT_UNSPECIFIED, size_bytes=len(data),
                             sha256=hashlib.sha256(data).hexdigest())
    msgs = [pb.UploadModelRequest(header=header)] + [
        pb.UploadModelRequest(chunk=data[i:i + MB]) for i in range(0, len(data), MB)
    ]
    return client.models_stub.UploadModel(iter(msgs))


def upload_code(client: Any, data: bytes, name: str = "attack") -> Any:
    """The status code an upload of ``data`` ends with (``grpc.StatusCode.OK`` when it is accepted)."""
    import grpc

    try:
        upload_raw(client, data, name)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
