"""leanserve's own model format: a manifest (JSON, ``repository.manifest.Manifest``) and the weights (safetensors).
No pickle anywhere.

The same two files make a stored Plan version in the repository and, zipped, an uploadable ``.leanserve`` file.
The manifest names every layer's kernel format, its options and which safetensors keys hold its arrays, and
records the SHA-256 of the weights file so corruption is caught at load. Every array goes through its kernel's
checked ``from_arrays`` before any kernel runs on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from leanserve.kernels import KernelInputError, get_format
from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.ingest.archives import BoundedZip
from leanserve.server.repository.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, ManifestLimits, jsonable
from leanserve.server.runtime.plan import Plan

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: a safetensors header beyond this is refused before it is parsed (a real one takes ~100 bytes per tensor)
MAX_WEIGHTS_HEADER_BYTES = 16 * 1024 * 1024


def plan_manifest(plan: Plan, input_name: str = "input", output_name: str = "output") -> tuple[Manifest, bytes]:
    """Serialise ``plan`` into (its manifest, the safetensors bytes)."""
    tensors: dict[str, np.ndarray] = {}
    layers = []
    for i, (name, layer) in enumerate(zip(plan.layer_names, plan.layers)):
        keys = {}
        for key, arr in layer.arrays().items():
            tensors[f"layers.{i}.{key}"] = np.ascontiguousarray(arr)
            keys[key] = f"layers.{i}.{key}"
        layers.append({"name": name, "format": layer.format, "meta": layer.meta(), "tensors": keys,
                       "tuning": plan.tuning[i] if i < len(plan.tuning) else {}})
    blob = st_save(tensors)
    manifest = Manifest.parse(jsonable({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "input": {"name": input_name, "dtype": "float32", "shape": list(plan.input_shape)},
        "output": {"name": output_name, "dtype": "float32", "shape": [plan.out_features]},
        "layers": layers,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }))
    return manifest, blob


def plan_to_files(plan: Plan, input_name: str = "input", output_name: str = "output") -> tuple[dict[str, Any], bytes]:
    """Serialise ``plan`` into (the manifest's JSON object, safetensors bytes): the two files of the format."""
    manifest, blob = plan_manifest(plan, input_name, output_name)
    return manifest.to_dict(), blob


def plan_from_files(manifest: Manifest | Mapping[str, Any], blob: bytes, limits: ManifestLimits | None = None) -> Plan:
    """Rebuild a Plan from a manifest and its safetensors bytes, checking integrity, consistency and ``limits``."""
    if limits is not None or not isinstance(manifest, Manifest):
        manifest = Manifest.parse(manifest.to_dict() if isinstance(manifest, Manifest) else manifest, limits)
    if manifest.layers is None:
        raise InvalidArgument("a leanserve model needs at least one layer (the manifest has no layers)")
    if manifest.weights_sha256 and hashlib.sha256(blob).hexdigest() != manifest.weights_sha256:
        raise InvalidArgument("weights file does not match the manifest's weights_sha256 (corrupt or altered)")
    tensors = _load_weights(blob)
    layers, names, tuning = [], [], []
    used: set[str] = set()
    for entry in manifest.layers:
        missing = sorted(set(entry.tensors.values()) - set(tensors))
        if missing:
            raise InvalidArgument(f"layer {entry.name!r} names tensors the weights file lacks: {missing[:5]}")
        # each tensor serves one layer: a layer prepares its own copy, so tensors shared by many layers would make a
        # small file take many times its size in memory
        shared = sorted(used.intersection(entry.tensors.values()))
        if shared:
            raise InvalidArgument(f"layer {entry.name!r} names tensors another layer already uses: {shared[:5]}")
        used.update(entry.tensors.values())
        arrays = {key: tensors[tkey] for key, tkey in entry.tensors.items()}
        try:
            layer = get_format(entry.format).from_arrays(arrays, entry.meta.model_dump(exclude_none=True))
        except (KernelInputError, ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument(f"inconsistent leanserve manifest: layer {entry.name!r}: {exc}") from None
        if (layer.in_features, layer.out_features) != (entry.meta.in_features, entry.meta.out_features):
            raise InvalidArgument(f"layer {entry.name!r}: its arrays make a {layer.in_features}x{layer.out_features} "
                                  f"layer but its meta says {entry.meta.in_features}x{entry.meta.out_features}")
        layers.append(layer)
        names.append(entry.name)
        tuning.append(entry.tuning.model_dump(mode="json", exclude_none=True))
    return Plan(input_shape=tuple(manifest.input.shape), layers=layers, layer_names=names, tuning=tuning)


def _load_weights(blob: bytes) -> dict[str, np.ndarray]:
    """The safetensors arrays; the header's length is checked before the library parses it."""
    header = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 2 <= header <= min(MAX_WEIGHTS_HEADER_BYTES, len(blob) - 8):
        raise InvalidArgument("weights are not a valid safetensors file (bad header length)")
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise InvalidArgument(f"weights are not a valid safetensors file: {str(exc)[:300]}") from None


def stored_name(folder: Path, name: str) -> str:
    """How errors name a file of a version folder: ``<model>/<version>/<file>`` (no server paths)."""
    return f"{folder.parent.name}/{folder.name}/{name}"


def open_stored_file(folder: Path, name: str) -> int:
    """A read-only descriptor of the regular file ``folder/name`` of a stored version. InvalidArgument (naming the
    file) for a symlink leading out of ``folder``, anything but a regular file (a device such as /dev/zero, a FIFO,
    a folder) or a file that cannot be opened."""
    path, shown = folder / name, stored_name(folder, name)
    try:
        if os.path.islink(path):
            base = os.path.realpath(folder)
            if not os.path.realpath(path).startswith(base + os.sep):
                raise InvalidArgument(f"{shown} is a symlink leading out of its version folder")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"{shown} is missing") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open {shown}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{shown} is not a regular file")
    return fd


def max_weights_bytes(manifest: Manifest) -> int:
    """Most bytes the weights of ``manifest``'s layers can take in any kernel format: 8-byte values and 8-byte
    indices for every (block-padded) weight, 8-byte vectors along each side, plus the largest header."""
    total = 8 + MAX_WEIGHTS_HEADER_BYTES
    for entry in manifest.layers or []:
        k, n = entry.meta.in_features, entry.meta.out_features
        r, c = entry.meta.block or (1, 1)
        total += 16 * (k + r) * (n + c) + 32 * (k + n + r + c + 2)
    return total


def read_weights(folder: Path, manifest: Manifest, max_bytes: int | None = None) -> bytes:
    """The weights file of a stored Plan version, read only once its size is known to be the one its safetensors
    header declares and no more than the manifest's layers can need (nor ``max_bytes``); counted while reading.
    InvalidArgument naming the file otherwise (a symlink out of the folder, a device, a sparse giant, a
    truncated file)."""
    fd, shown = open_stored_file(folder, WEIGHTS), stored_name(folder, WEIGHTS)
    try:
        size = os.fstat(fd).st_size
        bound = max_weights_bytes(manifest) if max_bytes is None else min(max_bytes, max_weights_bytes(manifest))
        if size > bound:
            raise InvalidArgument(f"{shown} is {size} bytes, more than its manifest's "
                                  f"{len(manifest.layers or [])} layer(s) can take ({bound})")
        head = os.pread(fd, 8, 0)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_len <= min(MAX_WEIGHTS_HEADER_BYTES, size - 8):
            raise InvalidArgument(f"{shown} is not a valid safetensors file (bad header length)")
        declared = 8 + header_len + _data_bytes(os.pread(fd, header_len, 8), shown)
        if declared != size:
            raise InvalidArgument(f"{shown} is {size} bytes but its header declares {declared}")
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                blob = f.read(size)
                grew = f.read(1)
        except MemoryError:
            raise ResourceExhausted(f"not enough memory to read {shown} ({size} bytes)") from None
        if len(blob) != size or grew:
            raise InvalidArgument(f"{shown} changed while it was read")
        return blob
    finally:
        os.close(fd)


def _data_bytes(header: bytes, shown: str) -> int:
    """Bytes of tensor data a safetensors header declares (the end of its last tensor)."""
    try:
        entries = json.loads(header)
        ends = [info["data_offsets"][1] for key, info in entries.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise InvalidArgument(f"{shown} is not a valid safetensors file (bad header)") from None
    if not all(isinstance(end, int) and end >= 0 for end in ends):
        raise InvalidArgument(f"{shown} is not a valid safetensors file (bad data offsets)")
    return max(ends, default=0)


def _manifest_text(manifest: Manifest | Mapping[str, Any]) -> str:
    return (manifest if isinstance(manifest, Manifest) else Manifest.parse(manifest)).to_json()


def write_zip(path: Path, manifest: Manifest | Mapping[str, Any], blob: bytes) -> None:
    """Write an uploadable ``.leanserve`` zip."""
    path.write_bytes(zip_bytes(manifest, blob))


def zip_bytes(manifest: Manifest | Mapping[str, Any], blob: bytes) -> bytes:
    """The bytes of a ``.leanserve`` zip (used by tests and the client)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, _manifest_text(manifest))
        zf.writestr(WEIGHTS, blob)
    return buf.getvalue()


def read_zip(path: Path, max_bytes: int, limits: ManifestLimits | None = None) -> tuple[Manifest, bytes]:
    """Read an uploaded ``.leanserve`` zip: exactly a manifest and a weights file. Members are inflated with a
    running count (``ResourceExhausted`` past ``max_bytes`` in all) and checked whole before any is kept; the manifest
    is parsed before the weights are kept."""
    with BoundedZip(path, max_bytes, "the leanserve file") as zf:
        if set(zf.names) != {MANIFEST, WEIGHTS}:
            raise InvalidArgument(f"a leanserve file holds exactly {MANIFEST} and {WEIGHTS}; found "
                                  f"{sorted(zf.names)[:10]}")
        zf.check_all()
        manifest = Manifest.parse(zf.read(MANIFEST, limit=MAX_MANIFEST_BYTES), limits)
        blob = zf.read(WEIGHTS)
    return manifest, blob


def read_manifest(path: Path, limits: ManifestLimits | None = None) -> Manifest:
    """A stored version's ``manifest.json``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path.name}: {exc.strerror}") from None
    return Manifest.parse(raw, limits)

