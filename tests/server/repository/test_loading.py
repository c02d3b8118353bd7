"""Loading a stored version trusts nothing in its folder: weights are read only once they are a regular file inside
the folder of the size their header declares and the manifest's layers allow (never /dev/zero or a sparse giant),
a manifest that is not JSON is named in the error, and a manifest whose signature is not what the layers (or the
TensorFlow model) compute is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import artifacts, loading
from leanserve.server.repository.manifest import Manifest
from leanserve.server.repository.s3 import S3Repository
from leanserve.server.repository.s3_bucket import parse_s3_uri
from leanserve.server.repository.store import MANIFEST, Repository
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.conftest import make_settings
from tests.s3server import S3Server


def _plan():
    rng = np.random.default_rng(0)
    specs = [
        LayerSpec("a", rng.normal(size=(12, 7)).astype(np.float32), rng.normal(size=7).astype(np.float32), "relu"),
        LayerSpec("b", rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32), "softmax"),
    ]
    return build_plan((3, 4), specs)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Repository, Path]:
    """A repository holding model "m" version 1 (a good Plan), and a copy of its folder as version 2."""
    repo = Repository(tmp_path / "repo")
    manifest, blob = artifacts.plan_manifest(_plan())
    with repo.staging() as staged:
        (staged / artifacts.WEIGHTS).write_bytes(blob)
        (staged / MANIFEST).write_text(manifest.with_fields(runtime="plan").to_json())
        repo.commit("m", staged)
    v2 = tmp_path / "repo" / "m" / "2"
    shutil.copytree(repo.path("m", 1), v2)
    return repo, v2


def _load(repo: Repository, version: int = 2):
    settings = make_settings(repo.root)
    return loading.load_version("m", version, repo.path("m", version), repo.manifest("m", version), settings)


def test_the_good_version_loads(stored) -> None:
    repo, _ = stored
    model = _load(repo, 1)
    assert model.output.shape == (3,) and model.runner(np.ones((2, 3, 4), np.float32)).shape == (2, 3)


def test_weights_linked_to_a_device_are_refused_unread(stored) -> None:
    repo, v2 = stored
    (v2 / artifacts.WEIGHTS).unlink()
    (v2 / artifacts.WEIGHTS).symlink_to("/dev/zero")
    with pytest.raises(InvalidArgument, match="weights.safetensors.*symlink leading out"):
        _load(repo)


def test_a_sparse_giant_is_refused_by_its_size(stored) -> None:
    repo, v2 = stored
    with open(v2 / artifacts.WEIGHTS, "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB that takes no disk: reading it whole would exhaust memory
    with pytest.raises(InvalidArgument, match=r"weights.safetensors.* is 1099511627776 bytes, more than"):
        _load(repo)


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_weights_must_be_the_size_their_header_declares(stored, change: str) -> None:
    repo, v2 = stored
    weights = v2 / artifacts.WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-10] if change == "truncate" else data + b"\0" * 10)
    with pytest.raises(InvalidArgument, match="weights.safetensors.*header declares"):
        _load(repo)


def test_symlinks_inside_the_folder_are_followed_outside_refused(stored, tmp_path: Path) -> None:
    repo, v2 = stored
    weights = v2 / artifacts.WEIGHTS
    weights.rename(v2 / "real.bin")
    weights.symlink_to("real.bin")
    assert _load(repo).version == 2
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(v2 / "real.bin", outside)
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(InvalidArgument, match="symlink leading out"):
        _load(repo)
    weights.unlink()
    os.mkfifo(weights)  # would block a plain open
    with pytest.raises(InvalidArgument, match="not a regular file"):
        _load(repo)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_malformed_manifest_is_named(stored, text: str) -> None:
    repo, v2 = stored
    (v2 / MANIFEST).write_text(text)
    with pytest.raises(InvalidArgument, match=MANIFEST):
        _load(repo)


def test_a_malformed_manifest_is_named_on_s3(uri: str, s3: S3Server, tmp_path: Path) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "c")
    with repo.staging() as staged:
        (staged / MANIFEST).write_text("{}")
        repo.commit("m", staged)
    bucket, prefix = parse_s3_uri(uri)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/m/1/{MANIFEST}", Body=b"{not json")
    reader = S3Repository(uri, cache_dir=tmp_path / "r")
    with pytest.raises(InvalidArgument, match=f"m/1/{MANIFEST}"):
        reader.manifest("m", 1)


@pytest.mark.parametrize("role,field,value,match", [
    ("output", "dtype", "int8", "output dtype is int8"),
    ("output", "shape", [11], r"output shape \[11\] differs"),
    ("output", "shape", [1, 3], r"output shape \[1, 3\] differs"),
    ("input", "dtype", "int64", "input dtype is int64"),
])
def test_a_signature_the_layers_do_not_compute_is_refused(stored, role: str, field: str, value: object,
                                                          match: str) -> None:
    """Finding: an edited manifest (output INT8 [11] on a FP32 [10] plan) was served and its metadata lied."""
    repo, v2 = stored
    manifest = json.loads((v2 / MANIFEST).read_text())
    manifest[role][field] = value
    (v2 / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InvalidArgument, match=match):
        _load(repo)


def test_a_tensorflow_signature_must_be_the_models_own() -> None:
    manifest = Manifest.parse({"runtime": "tensorflow", "source": {"format": "h5", "file": "model.h5"},
                               "input": {"name": "x", "dtype": "float32", "shape": [4]},
                               "output": {"name": "y", "dtype": "float32", "shape": [-1, 3]}})
    runtime = SimpleNamespace(signature={"input": {"name": "x", "dtype": "float32", "shape": [4]},
                                         "output": {"name": "y", "dtype": "float32", "shape": [None, 3]}})
    loading._check_tf_signature("m", 1, manifest, runtime)
    runtime.signature["output"]["dtype"] = "int64"
    with pytest.raises(InvalidArgument, match="manifest's output is float32"):
        loading._check_tf_signature("m", 1, manifest, runtime)
    runtime.signature["output"]["dtype"] = "float32"
    runtime.signature["input"]["shape"] = [5]
    with pytest.raises(InvalidArgument, match="manifest's input"):
        loading._check_tf_signature("m", 1, manifest, runtime)
