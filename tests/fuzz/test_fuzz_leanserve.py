"""Hypothesis fuzzing of the own ``.leanserve`` format: manifest fields, the arrays of the weights file and the zip
members and bytes. Every outcome is accepted (and the stored version then serves) or refused with INVALID_ARGUMENT /
RESOURCE_EXHAUSTED (FAILED_PRECONDITION only from the reference check); never another error, never a crash. A few
examples go through a real server as well."""

from __future__ import annotations

import copy
import functools
import json
import zipfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from leanserve.client import Client
from leanserve.server.app import create_server
from leanserve.server.repository import artifacts
from tests.conftest import make_settings
from tests.fuzz import hostile, pipeline

FUZZ = settings(derandomize=True, deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CONFIGS = [("dense_f32", {}), ("int8", {}), ("csr_f32", {}), ("csr_int8", {}), ("bsr_f32", {"block": (4, 1)}),
           ("bsr_int8", {"block": (1, 8)})]

INTERESTING: list[Any] = [0, -1, 1, 6, 24, 2**31, 2**32, 2**63, -(2**63), 2**64 + 24, 1.5, True, None, "", "relu",
                          "softmax", "dense_f32", "csr_f32", "bsr_f32", "int8", "layers.0.weights", "layers.0.values",
                          "../../etc/passwd", [1, 16], [16, 1], [24], [-1], {}, [], "float32", "string"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(INTERESTING),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@functools.cache
def _base(index: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    fmt, options = CONFIGS[index]
    return hostile.files(hostile.plan(fmt, **options))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _mutate(manifest: dict[str, Any], path: tuple[Any, ...], op: str, value: Any, key: str) -> Any:
    if not path:
        return value if op == "replace" else manifest
    out = copy.deepcopy(manifest)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    return out


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    return pipeline.settings(tmp_path_factory.mktemp("fuzz-cfg"), max_upload_bytes=1 << 22)


@FUZZ
@given(index=st.integers(0, len(CONFIGS) - 1), where=st.integers(0, 10**6),
       op=st.sampled_from(["replace", "replace", "delete", "add"]), value=json_values, key=st.text(max_size=6))
def test_fuzz_manifest_fields(cfg, tmp_path: Path, index: int, where: int, op: str, value: Any, key: str) -> None:
    manifest, tensors = _base(index)
    paths = _paths(manifest)
    bad = _mutate(manifest, paths[where % len(paths)], op, value, key)
    result = pipeline.outcome(hostile.leanserve_zip(bad, tensors), tmp_path, cfg)
    event(result)
    assert result in pipeline.ACCEPTABLE


DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
          np.bool_]


@FUZZ
@given(index=st.integers(0, len(CONFIGS) - 1), which=st.integers(0, 10), op=st.sampled_from(
    ["entry", "entry", "resize", "dtype", "shape", "drop", "extra"]), position=st.integers(0, 10**6),
    value=st.integers(-(2**31), 2**32) | st.sampled_from([0, -1, 1, 23, 24, 25, 5, 6, 7, 2**16]),
    size=st.integers(0, 80), dtype=st.sampled_from(DTYPES))
def test_fuzz_weight_arrays(cfg, tmp_path: Path, index: int, which: int, op: str, position: int, value: int,
                            size: int, dtype: Any) -> None:
    manifest, tensors = _base(index)
    tensors = {k: v.copy() for k, v in tensors.items()}
    key = sorted(tensors)[which % len(tensors)]
    a = tensors[key]
    if op == "entry" and a.size:
        flat = a.reshape(-1)
        info = np.iinfo(a.dtype) if np.issubdtype(a.dtype, np.integer) else None
        flat[position % a.size] = np.clip(value, info.min, info.max) if info else value
    elif op == "resize":
        tensors[key] = np.resize(a.reshape(-1), size).astype(a.dtype)
    elif op == "dtype":
        tensors[key] = a.astype(dtype)
    elif op == "shape":
        tensors[key] = a.reshape(-1)
    elif op == "drop":
        del tensors[key]
    else:
        tensors["layers.9.extra"] = np.zeros(size, dtype)
    result = pipeline.outcome(hostile.leanserve_zip(manifest, tensors), tmp_path, cfg)
    event(result)
    assert result in pipeline.ACCEPTABLE


@FUZZ
@given(index=st.integers(0, len(CONFIGS) - 1), op=st.sampled_from(["flip", "flip", "truncate", "members", "deflate"]),
       positions=st.lists(st.integers(0, 10**7), min_size=1, max_size=8), byte=st.integers(0, 255),
       names=st.lists(st.sampled_from([artifacts.MANIFEST, artifacts.WEIGHTS, "manifest.json/", "x", "../x",
                                       "/abs", "MANIFEST.JSON", ""]), max_size=4))
def test_fuzz_zip_members_and_bytes(cfg, tmp_path: Path, index: int, op: str, positions: list[int], byte: int,
                                    names: list[str]) -> None:
    manifest, tensors = _base(index)
    good = hostile.leanserve_zip(manifest, tensors)
    if op == "flip":
        data = bytearray(good)
        for pos in positions:
            data[pos % len(data)] = byte
        data = bytes(data)
    elif op == "truncate":
        data = good[: positions[0] % len(good)]
    elif op == "members":
        blobs = {artifacts.MANIFEST: json.dumps(manifest).encode(), artifacts.WEIGHTS: hostile.blob_of(tensors)}
        data = hostile.zip_of({name or "empty": blobs.get(name, b"{}") for name in names})
    else:
        data = hostile.leanserve_zip(manifest, tensors, compression=zipfile.ZIP_DEFLATED)
    result = pipeline.outcome(data, tmp_path, cfg)
    event(result)
    assert result in pipeline.ACCEPTABLE


def test_fuzz_through_the_server(tmp_path: Path) -> None:
    """A sample of manifest mutants through UploadModel: each ends OK or refused, and the server serves on."""
    handle = create_server(make_settings(tmp_path / "models", autotune=False, reference_samples=8))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as client:
            manifest, tensors = _base(0)
            assert hostile.upload_code(client, hostile.leanserve_zip(manifest, tensors), "good") == grpc.StatusCode.OK
            paths = _paths(manifest)

            @settings(derandomize=True, deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
            @given(where=st.integers(0, 10**6), value=json_values)
            def one(where: int, value: Any) -> None:
                bad = _mutate(manifest, paths[where % len(paths)], "replace", value, "")
                code = hostile.upload_code(client, hostile.leanserve_zip(bad, tensors), "mutant")
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION), code
                if code == grpc.StatusCode.OK:
                    client.delete("mutant")
                assert client.predict("good", np.ones((1, 24), np.float32)).outputs["y"].shape == (1, 6)

            one()
    finally:
        handle.stop(0.5)
