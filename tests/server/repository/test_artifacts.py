"""leanserve's own format: manifest + safetensors round trip, integrity and consistency checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leanserve.server.repository import artifacts
from leanserve.server.errors import InvalidArgument
from leanserve.server.runtime.plan import LayerSpec, build_plan


def _plan(rng: np.random.Generator):
    specs = [
        LayerSpec("a", rng.normal(size=(12, 7)).astype(np.float32), rng.normal(size=7).astype(np.float32), "relu"),
        LayerSpec("b", rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32), "softmax"),
    ]
    return build_plan((3, 4), specs)


def test_round_trip_keeps_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    plan = _plan(rng)
    manifest, blob = artifacts.plan_to_files(plan)
    artifacts.write_zip(tmp_path / "m.leanserve", manifest, blob)
    m2, b2 = artifacts.read_zip(tmp_path / "m.leanserve", max_bytes=1 << 20)
    again = artifacts.plan_from_files(m2, b2)
    x = rng.normal(size=(5, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(plan(x), again(x))
    np.testing.assert_allclose(again(x), again.reference(x), atol=1e-6)
    assert again.input_shape == (3, 4) and again.layer_names == ["a", "b"]
    assert b"pickle" not in blob


def test_altered_weights_are_refused() -> None:
    manifest, blob = artifacts.plan_to_files(_plan(np.random.default_rng(1)))
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    with pytest.raises(InvalidArgument, match="weights_sha256"):
        artifacts.plan_from_files(manifest, bytes(tampered))


def test_inconsistent_manifest_is_refused() -> None:
    manifest, blob = artifacts.plan_to_files(_plan(np.random.default_rng(2)))
    bad = json.loads(json.dumps(manifest))
    bad["input"]["shape"] = [11]
    with pytest.raises(InvalidArgument, match="expects 12 inputs"):
        artifacts.plan_from_files(bad, blob)
    bad = json.loads(json.dumps(manifest))
    bad["layers"][0]["format"] = "nonsense"
    with pytest.raises(InvalidArgument, match="unknown layer format"):
        artifacts.plan_from_files(bad, blob)
    bad = json.loads(json.dumps(manifest))
    bad["format_version"] = 99
    with pytest.raises(InvalidArgument, match="not a leanserve v1 manifest"):
        artifacts.plan_from_files(bad, blob)


def test_zip_with_extra_members_is_refused(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "evil.leanserve"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", "{}")
        zf.writestr("weights.safetensors", b"")
        zf.writestr("payload.pkl", b"\x80\x04")
    with pytest.raises(InvalidArgument, match="exactly"):
        artifacts.read_zip(path, max_bytes=1 << 20)
