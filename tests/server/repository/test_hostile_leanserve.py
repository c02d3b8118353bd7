"""Attacks on the own ``.leanserve`` format through a real server with autotuning off (the setting under which the
kernels used to run on file-borne arrays unchecked): each ends with its status code, nothing is stored, and the
server keeps serving."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import ServerHandle, create_server
from leanserve.server.repository import artifacts
from tests.conftest import make_settings
from tests.fuzz import hostile

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, Client, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    handle = create_server(make_settings(root / "models", autotune=False, reference_samples=16))
    with Client(f"127.0.0.1:{handle.port}", timeout=120) as client:
        manifest, tensors = hostile.files(hostile.plan("dense_f32"))
        assert hostile.upload_code(client, hostile.leanserve_zip(manifest, tensors), "good") == grpc.StatusCode.OK
        yield handle, client, root
    handle.stop(0.5)


def _alive_and_clean(client: Client, root: Path) -> None:
    """The good model still answers, and no attack left a model or a file outside the repository."""
    x = np.ones((2, 24), np.float32)
    assert client.predict("good", x).outputs["y"].shape == (2, 6)
    assert client.models() == {"good": [1]}
    assert sorted(p.name for p in root.iterdir()) == ["models"]


def _big_sparse(fmt: str) -> tuple[dict, dict[str, np.ndarray]]:
    # large enough that a kernel reading past its arrays would leave the mapped pages
    return hostile.files(hostile.plan(fmt, k=1000, n=512, sparsity=0.5, **({"block": (16, 1)} if fmt == "bsr_int8"
                                                                            else {})))


@pytest.mark.parametrize("fmt,key", [("csr_f32", "values"), ("csr_int8", "values"), ("csr_int8", "scales"),
                                     ("bsr_int8", "values"), ("bsr_int8", "scales"), ("csr_f32", "bias")])
def test_short_arrays_never_reach_a_kernel(served, fmt: str, key: str) -> None:
    """Finding: values/scales lengths were unchecked; with LEANSERVE_AUTOTUNE=false such an upload crashed the
    server (segfault). Now refused before any kernel sees the arrays."""
    _, client, root = served
    manifest, tensors = _big_sparse(fmt)
    tensors[f"layers.0.{key}"] = tensors[f"layers.0.{key}"][:1].copy()
    assert hostile.upload_code(client, hostile.leanserve_zip(manifest, tensors)) == INVALID
    _alive_and_clean(client, root)


def test_negative_csr_index(served) -> None:
    """Finding: a negative index (signed dtype) passed the max() check and was read out of bounds."""
    _, client, root = served
    manifest, tensors = _big_sparse("csr_f32")
    indices = tensors["layers.0.indices"].astype(np.int32)
    indices[len(indices) // 2] = -1000
    tensors["layers.0.indices"] = indices
    assert hostile.upload_code(client, hostile.leanserve_zip(manifest, tensors)) == INVALID
    _alive_and_clean(client, root)


@pytest.mark.parametrize("field,value", [
    ("input.shape", [-24]), ("input.shape", [2**32, 2**32]), ("input.shape", [2**64 + 24]),
    ("layers.0.meta.in_features", -24), ("layers.0.meta.out_features", 2**63 + 6),
    ("layers.0.tensors", ["layers.0.weights", "layers.0.bias"]), ("layers.0.tuning", ["dense_f32"]),
    ("layers.0.tuning", "fast"), ("layers", {"0": "dense"}), ("input.dtype", "string"),
    ("layers.0.meta.activation", "__import__('os').system('true')"),
])
def test_malformed_manifest_fields(served, field: str, value: object) -> None:
    """Finding: negative or int64-overflowing dims and a non-dict tensors/tuning were INTERNAL (with autotune off a
    bad tuning was even stored and served). Now INVALID_ARGUMENT at parse, nothing stored."""
    _, client, root = served
    manifest, tensors = hostile.files(hostile.plan("dense_f32"))
    node = manifest
    *parents, last = field.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
    assert hostile.upload_code(client, hostile.leanserve_zip(manifest, tensors)) == INVALID
    _alive_and_clean(client, root)


def test_archive_bombs_and_lying_directories(served) -> None:
    """Finding: archives were inflated trusting their declared sizes. Now every byte is counted while inflating."""
    _, client, root = served
    manifest, _ = hostile.files(hostile.plan("dense_f32"))
    text = json.dumps(manifest).encode()
    bomb = hostile.bomb_zip({artifacts.MANIFEST: text, artifacts.WEIGHTS: 256 << 20})
    assert len(bomb) < 1 << 20
    assert hostile.upload_code(client, bomb) == EXHAUSTED
    # the same bomb whose directory claims a few bytes: refused (never inflated past what it claims)
    assert hostile.upload_code(client, hostile.declare_size(bomb, artifacts.WEIGHTS, 64)) == INVALID
    # a manifest member that inflates past its own cap
    assert hostile.upload_code(client, hostile.bomb_zip({artifacts.MANIFEST: 64 << 20, artifacts.WEIGHTS: b""})) \
        in (INVALID, EXHAUSTED)
    _alive_and_clean(client, root)


@pytest.mark.parametrize("names", [
    ["../manifest.json", artifacts.WEIGHTS], [artifacts.MANIFEST, "../../weights.safetensors"],
    [artifacts.MANIFEST, artifacts.WEIGHTS, "/tmp/leanserve-escape"], [artifacts.MANIFEST, artifacts.WEIGHTS,
                                                                      "payload.pkl"],
])
def test_member_paths_write_nothing(served, names: list[str]) -> None:
    """What held: path traversal writes nothing outside the repository (members are read, never extracted)."""
    _, client, root = served
    manifest, tensors = hostile.files(hostile.plan("dense_f32"))
    blobs = {artifacts.MANIFEST: json.dumps(manifest).encode(), artifacts.WEIGHTS: hostile.blob_of(tensors)}
    members = {name: blobs.get(Path(name).name, b"\x80\x04K\x01.") for name in names}
    assert hostile.upload_code(client, hostile.zip_of(members)) == INVALID
    assert not Path("/tmp/leanserve-escape").exists()
    _alive_and_clean(client, root)


def test_encrypted_and_duplicate_members(served) -> None:
    _, client, root = served
    manifest, tensors = hostile.files(hostile.plan("dense_f32"))
    good = hostile.leanserve_zip(manifest, tensors)
    encrypted = bytearray(good)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = 0
        while (pos := encrypted.find(sig, pos)) >= 0:
            encrypted[pos + offset] |= 1
            pos += 4
    assert hostile.upload_code(client, bytes(encrypted)) == INVALID
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        zf.writestr(artifacts.MANIFEST, json.dumps(manifest))
        zf.writestr(artifacts.WEIGHTS, hostile.blob_of(tensors))
        zf.writestr(artifacts.WEIGHTS, b"")  # a second member of the same name: which one would a reader take?
    assert hostile.upload_code(client, buf.getvalue()) == INVALID
    _alive_and_clean(client, root)


def test_layers_sharing_one_tensor_are_refused(served) -> None:
    """Finding: 128 layers naming one 1024x1024 tensor (a 4 MiB file) took 1 GiB of memory, each layer preparing
    its own copy, past every limit meant to tie memory to the bytes received."""
    _, client, root = served
    manifest, tensors = hostile.files(hostile.plan("dense_f32", k=24, n=24))
    layer = manifest["layers"][0]
    manifest["layers"] = [{**layer, "name": f"copy{i}"} for i in range(8)]
    manifest["output"]["shape"] = [24]
    assert hostile.upload_code(client, hostile.leanserve_zip(manifest, tensors)) == INVALID
    _alive_and_clean(client, root)
