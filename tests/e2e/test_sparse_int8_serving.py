"""A model whose layers are 90 % sparse or int8 is served by the sparse / int8 kernels (GetModel names the format
per layer) and its predictions match the numpy reference of the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import create_server
from leanserve.kernels import get_format
from leanserve.kernels import prune_magnitude
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import Plan
from leanserve.server.runtime.tuning import FP32_FAMILY, INT8_FAMILY
from tests.conftest import make_settings
from tests.kernels._kernel_refs import quantize_weights_ref


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Plan, list[np.ndarray]]:
    """A 1024-1024-256-10 model stored as block-sparse fp32, int8 and sparse int8 layers."""
    rng = np.random.default_rng(0)
    w1 = prune_magnitude(rng.normal(size=(1024, 1024)).astype(np.float32), 0.9, block=(16, 1))
    w2 = rng.normal(size=(1024, 256)).astype(np.float32) / 32
    w3 = prune_magnitude(rng.normal(size=(256, 10)).astype(np.float32), 0.9)
    layers = [
        get_format("bsr_f32").from_dense(w1, rng.normal(size=1024).astype(np.float32), "relu", block=(16, 1)),
        get_format("int8").from_dense(w2, np.zeros(256, np.float32), "relu"),
        get_format("csr_int8").from_dense(w3, np.zeros(10, np.float32), "softmax"),
    ]
    plan = Plan(input_shape=(1024,), layers=layers, layer_names=["sparse", "int8", "sparse_int8"])
    manifest, blob = artifacts.plan_to_files(plan)
    path = tmp_path_factory.mktemp("compressed") / "m.leanserve"
    artifacts.write_zip(path, manifest, blob)
    return path, plan, [w1, w2, w3]


def test_stored_formats_are_served_as_stored_without_tuning(compressed, tmp_path: Path) -> None:
    path, plan, (w1, w2, w3) = compressed
    handle = create_server(make_settings(tmp_path / "models", autotune=False))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as c:
            info = c.upload(path, "compressed")
            assert [layer.format for layer in info.layers] == ["bsr_f32", "int8", "csr_int8"]
            zeros = [np.mean(w1 == 0), np.mean(quantize_weights_ref(w2)[0] == 0), np.mean(w3 == 0)]
            assert [layer.sparsity for layer in info.layers] == pytest.approx(zeros, abs=1e-6)
            assert info.served_size_bytes == plan.nbytes < 0.5 * (w1.nbytes + w2.nbytes + w3.nbytes)
            x = np.random.default_rng(1).normal(size=(32, 1024)).astype(np.float32)
            np.testing.assert_allclose(c.predict("compressed", x).output, plan.reference(x), atol=1e-5)
    finally:
        handle.stop(0.5)


def test_the_tuner_measures_equivalent_formats_and_keeps_the_numbers(client: Client, compressed) -> None:
    """Which format wins is the machine's business (bench/, not a test): each layer stays in its family (fp32
    layers never become int8), every candidate was measured, and the answers are the stored weights'."""
    path, plan, _ = compressed
    info = client.upload(path, "compressed")
    formats = [layer.format for layer in info.layers]
    assert info.runtime == "plan" and info.reference.passed
    assert formats[0] in FP32_FAMILY and formats[1] in INT8_FAMILY and formats[2] in INT8_FAMILY, formats
    assert {t.format.split("[")[0] for t in info.layers[0].timings} >= {"dense_f32", "csr_f32", "bsr_f32"}
    assert {t.format.split("[")[0] for t in info.layers[2].timings} >= {"int8", "csr_int8", "bsr_int8"}
    x = np.random.default_rng(2).normal(size=(32, 1024)).astype(np.float32)
    # the reference: float64 numpy on the same (dequantized) weights, int8 layers' inputs quantized per row as the
    # kernels do; what remains is float rounding
    np.testing.assert_allclose(client.predict("compressed", x).output, plan.reference(x), atol=1e-5)
