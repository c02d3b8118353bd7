"""Uploading leanserve's own format (manifest + safetensors, no pickle): checked against numpy, served by Plan."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, build_plan


def _zip(tmp_path, plan):
    manifest, blob = artifacts.plan_to_files(plan, "features", "scores")
    path = tmp_path / "m.leanserve"
    artifacts.write_zip(path, manifest, blob)
    return path


def test_upload_own_format(client: Client, tmp_path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(40, 30)).astype(np.float32)
    w1[np.abs(w1) < 1.2] = 0  # ~77 % zeros: the tuner may pick a sparse format; results must not change
    specs = [LayerSpec("h", w1, rng.normal(size=30).astype(np.float32), "tanh"),
             LayerSpec("o", rng.normal(size=(30, 4)).astype(np.float32), np.zeros(4, np.float32), "linear")]
    plan = build_plan((40,), specs)
    info = client.upload(_zip(tmp_path, plan), "own")
    assert info.runtime == "plan" and info.reference.reference == "numpy" and info.reference.passed
    assert info.inputs[0].name == "features" and info.outputs[0].name == "scores"
    assert info.layers[0].sparsity == pytest.approx(np.mean(w1 == 0))
    x = rng.normal(size=(10, 40)).astype(np.float32)
    np.testing.assert_allclose(client.predict("own", x).outputs["scores"], plan.reference(x), atol=1e-5)


def test_tampered_own_format_refused(client: Client, tmp_path) -> None:
    rng = np.random.default_rng(1)
    plan = build_plan((3,), [LayerSpec("o", rng.normal(size=(3, 2)).astype(np.float32), np.zeros(2, np.float32), "relu")])
    manifest, blob = artifacts.plan_to_files(plan)
    manifest["weights_sha256"] = hashlib.sha256(b"other").hexdigest()
    path = tmp_path / "t.leanserve"
    artifacts.write_zip(path, manifest, blob)
    with pytest.raises(grpc.RpcError) as err:
        client.upload(path, "t")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "weights_sha256" in err.value.details()
