"""A model whose layers are 90 % sparse or int8 is served by the sparse / int8 kernels (GetModel names the format
per layer) and its predictions match the numpy reference of the same weights."""

from __future__ import annotations

import numpy as np

from leanserve.client import Client
from leanserve.kernels import get_format
from leanserve.kernels import prune_magnitude
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import Plan
from leanserve.server.runtime.tuning import FP32_FAMILY, INT8_FAMILY


def test_sparse_and_int8_layers_are_served_by_their_kernels(client: Client, tmp_path) -> None:
    rng = np.random.default_rng(0)
    w1 = prune_magnitude(rng.normal(size=(1024, 1024)).astype(np.float32), 0.9, block=(16, 1))
    w2 = rng.normal(size=(1024, 256)).astype(np.float32) / 32
    w3 = prune_magnitude(rng.normal(size=(256, 10)).astype(np.float32), 0.9)
    layers = [
        get_format("dense_f32").from_dense(w1, rng.normal(size=1024).astype(np.float32), "relu"),
        get_format("int8").from_dense(w2, np.zeros(256, np.float32), "relu"),
        get_format("csr_int8").from_dense(w3, np.zeros(10, np.float32), "softmax"),
    ]
    plan = Plan(input_shape=(1024,), layers=layers, layer_names=["sparse", "int8", "sparse_int8"])
    manifest, blob = artifacts.plan_to_files(plan)
    path = tmp_path / "m.leanserve"
    artifacts.write_zip(path, manifest, blob)

    info = client.upload(path, "compressed")
    formats = [layer.format for layer in info.layers]
    sparsity = [layer.sparsity for layer in info.layers]
    assert info.runtime == "plan" and info.reference.passed
    # the 90 % sparse fp32 layer left the dense kernel (the tuner measured it; its timings are reported)
    assert formats[0] in FP32_FAMILY and formats[0] != "dense_f32", formats
    assert {t.format.split("[")[0] for t in info.layers[0].timings} >= {"dense_f32", "csr_f32", "bsr_f32"}
    assert formats[1] in INT8_FAMILY and formats[2] in INT8_FAMILY
    assert abs(sparsity[0] - 0.9) < 0.01 and abs(sparsity[2] - 0.9) < 0.05
    assert info.served_size_bytes < 0.5 * (w1.nbytes + w2.nbytes + w3.nbytes)

    x = rng.normal(size=(32, 1024)).astype(np.float32)
    served = client.predict("compressed", x).output
    # the reference: float64 numpy on the same (dequantized) weights, int8 layers' inputs quantized per row as the
    # kernels do; what remains is float rounding
    np.testing.assert_allclose(served, plan.reference(x), atol=1e-5)
