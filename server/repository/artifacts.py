"""leanserve's own model format: a manifest (JSON) and the weights (safetensors). No pickle anywhere.

The same two files make a stored Plan version in the repository and, zipped, an uploadable ``.leanserve`` file.
The manifest names every layer's kernel format, its options and which safetensors keys hold its arrays, and
records the SHA-256 of the weights file so corruption is caught at load.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from leanserve.kernels import KernelInputError, get_format
from leanserve.server.errors import InvalidArgument
from leanserve.server.runtime.plan import Plan

FORMAT_NAME = "leanserve"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def plan_to_files(plan: Plan, input_name: str = "input", output_name: str = "output") -> tuple[dict[str, Any], bytes]:
    """Serialise ``plan`` into (manifest, safetensors bytes)."""
    tensors: dict[str, np.ndarray] = {}
    layers = []
    for i, (name, layer) in enumerate(zip(plan.layer_names, plan.layers)):
        keys = {}
        for key, arr in layer.arrays().items():
            tensors[f"layers.{i}.{key}"] = np.ascontiguousarray(arr)
            keys[key] = f"layers.{i}.{key}"
        layers.append(
            {
                "name": name,
                "format": layer.format,
                "meta": layer.meta(),
                "tensors": keys,
                "tuning": plan.tuning[i] if i < len(plan.tuning) else {},
            }
        )
    blob = st_save(tensors)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "input": {"name": input_name, "dtype": "float32", "shape": list(plan.input_shape)},
        "output": {"name": output_name, "dtype": "float32", "shape": [plan.out_features]},
        "layers": layers,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    return manifest, blob


def plan_from_files(manifest: dict[str, Any], blob: bytes) -> Plan:
    """Rebuild a Plan from a manifest and its safetensors bytes, checking integrity and consistency."""
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidArgument(
            f"not a leanserve v{FORMAT_VERSION} manifest (format={manifest.get('format')!r}, "
            f"format_version={manifest.get('format_version')!r})"
        )
    expected = manifest.get("weights_sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        raise InvalidArgument("weights file does not match the manifest's weights_sha256 (corrupt or altered)")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise InvalidArgument(f"weights are not a valid safetensors file: {exc}") from None
    try:
        input_shape = tuple(int(d) for d in manifest["input"]["shape"])
        layers, names, tuning = [], [], []
        for i, entry in enumerate(manifest["layers"]):
            arrays = {key: tensors[tkey] for key, tkey in entry["tensors"].items()}
            layers.append(get_format(entry["format"]).from_arrays(arrays, entry.get("meta", {})))
            names.append(str(entry.get("name", f"layer_{i}")))
            tuning.append(entry.get("tuning", {}))
    except (KeyError, TypeError, ValueError, KernelInputError) as exc:
        raise InvalidArgument(f"inconsistent leanserve manifest: {exc}") from None
    if not layers:
        raise InvalidArgument("a leanserve model needs at least one layer")
    expected_in = int(np.prod(input_shape))
    for name, layer in zip(names, layers):
        if layer.in_features != expected_in:
            raise InvalidArgument(
                f"layer {name!r} expects {layer.in_features} inputs but the previous layer gives {expected_in}"
            )
        expected_in = layer.out_features
    return Plan(input_shape=input_shape, layers=layers, layer_names=names, tuning=tuning)


def write_zip(path: Path, manifest: dict[str, Any], blob: bytes) -> None:
    """Write an uploadable ``.leanserve`` zip."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        zf.writestr(WEIGHTS, blob)


def read_zip(path: Path, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Read an uploaded ``.leanserve`` zip: exactly a manifest and a weights file, with bounded sizes."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if names != {MANIFEST, WEIGHTS}:
                raise InvalidArgument(f"a leanserve file holds exactly {MANIFEST} and {WEIGHTS}; found {sorted(names)}")
            info_m, info_w = zf.getinfo(MANIFEST), zf.getinfo(WEIGHTS)
            if info_m.file_size > _MAX_MANIFEST_BYTES or info_w.file_size > max_bytes:
                raise InvalidArgument("leanserve file members exceed the size limit (zip bomb?)")
            manifest = json.loads(zf.read(MANIFEST))
            blob = zf.read(WEIGHTS)
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InvalidArgument(f"not a valid leanserve file: {exc}") from None
    if not isinstance(manifest, dict):
        raise InvalidArgument("not a valid leanserve file: manifest is not a JSON object")
    return manifest, blob


def is_leanserve_zip(head: bytes, path: Path) -> bool:
    """True when ``path`` is a zip whose members include the leanserve manifest."""
    if not head.startswith(b"PK"):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist() and WEIGHTS in zf.namelist()
    except zipfile.BadZipFile:
        return False


def zip_bytes(manifest: dict[str, Any], blob: bytes) -> bytes:
    """The bytes of a ``.leanserve`` zip (used by tests and the client)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        zf.writestr(WEIGHTS, blob)
    return buf.getvalue()
