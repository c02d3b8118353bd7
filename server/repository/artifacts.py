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
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from leanserve.kernels import KernelInputError, get_format
from leanserve.server.errors import InvalidArgument
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
    for entry in manifest.layers:
        missing = sorted(set(entry.tensors.values()) - set(tensors))
        if missing:
            raise InvalidArgument(f"layer {entry.name!r} names tensors the weights file lacks: {missing[:5]}")
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

