"""Load-time format choice (server/runtime/tuning.py): which candidates compete, and that a tuned Plan computes the
same numbers, records what it measured and never turns fp32 into int8 (or back)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leanserve.kernels import get_format, prune_magnitude
from leanserve.server.runtime.plan import Plan, build_plan
from leanserve.server.runtime.tuning import (BSR_BLOCKS, FP32_FAMILY, INT8_FAMILY, MIN_SPARSITY_FOR_SPARSE,
                                             NUMPY_MIN_BATCHES, candidates_for, jsonable_options, tune_plan)
from leanserve.server.runtime.plan import LayerSpec


def _formats(cands: list) -> list[str]:
    return [f for f, _ in cands]


@pytest.mark.parametrize("layer_format", FP32_FAMILY + INT8_FAMILY)
def test_a_dense_layer_is_only_measured_in_its_own_dense_format(layer_format: str) -> None:
    family = INT8_FAMILY if layer_format in INT8_FAMILY else FP32_FAMILY
    cands = candidates_for(layer_format, 0.0)
    # below the sparsity threshold the family's dense format, plus the layer's own format if it is another one
    assert set(_formats(cands)) == ({family[0]} if layer_format == family[0] else {layer_format, family[0]})
    crossovers = [(family[0], {"numpy_min_batch": m}) for m in NUMPY_MIN_BATCHES] if family is FP32_FAMILY else []
    assert [c for c in cands if c[1]] == crossovers  # fp32 dense: also on BLAS GEMM from a few batch sizes on
    assert (family[0], {}) in cands


@pytest.mark.parametrize("layer_format", FP32_FAMILY + INT8_FAMILY)
@pytest.mark.parametrize("sparsity", [MIN_SPARSITY_FOR_SPARSE, 0.9], ids=lambda s: f"sparsity{s:g}")
def test_a_sparse_layer_is_measured_in_every_format_of_its_family(layer_format: str, sparsity: float) -> None:
    family = INT8_FAMILY if layer_format in INT8_FAMILY else FP32_FAMILY
    cands = candidates_for(layer_format, sparsity)
    assert set(_formats(cands)) == set(family)  # never across families: fp32 never becomes int8
    blocks = [tuple(o["block"]) for f, o in cands if f == family[2]]
    assert blocks == list(BSR_BLOCKS[family[2]])


def test_an_extra_block_shape_is_measured_when_its_kernel_exists() -> None:
    cands = candidates_for("bsr_f32", 0.9, block=(4, 4))
    assert ("bsr_f32", {"block": (4, 4)}) in cands
    assert ("bsr_int8", {"block": (2, 2)}) not in candidates_for("int8", 0.9, block=(2, 2))  # no such kernel
    assert len(candidates_for("bsr_f32", 0.9, block=(16, 1))) == len(candidates_for("bsr_f32", 0.9))  # no dup


def _plan(rng: np.random.Generator) -> Plan:
    """Three layers: dense fp32, 90 % sparse fp32 and 90 % sparse int8."""
    w1 = rng.normal(size=(64, 128)).astype(np.float32)
    w2 = prune_magnitude(rng.normal(size=(128, 64)).astype(np.float32), 0.9, block=(16, 1))
    w3 = prune_magnitude(rng.normal(size=(64, 10)).astype(np.float32), 0.9)
    layers = [get_format("dense_f32").from_dense(w1, rng.normal(size=128).astype(np.float32), "relu"),
              get_format("dense_f32").from_dense(w2, rng.normal(size=64).astype(np.float32), "tanh"),
              get_format("csr_int8").from_dense(w3, np.zeros(10, np.float32), "softmax")]
    return Plan(input_shape=(8, 8), layers=layers, layer_names=["a", "b", "c"])


def test_tune_plan_keeps_the_numbers_and_records_the_measurements() -> None:
    rng = np.random.default_rng(0)
    plan = _plan(rng)
    tuned = tune_plan(plan, (1, 4))
    assert tuned.layer_names == plan.layer_names and tuned.input_shape == plan.input_shape
    x = rng.normal(size=(5, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(tuned(x), plan.reference(x), atol=1e-5)
    np.testing.assert_allclose(tuned.reference(x), plan.reference(x), atol=1e-6)  # the same effective weights
    for before, after, record in zip(plan.layers, tuned.layers, tuned.tuning):
        family = INT8_FAMILY if before.format in INT8_FAMILY else FP32_FAMILY
        assert after.format in family and record["chosen"] == after.format
        np.testing.assert_array_equal(after.dense_weights(), before.dense_weights())
        json.dumps(record)  # stored in the manifest as it is
    # a dense fp32 layer: the panel kernel against BLAS GEMM from each crossover batch size on
    crossovers = {f"dense_f32[numpy_min_batch={m}]" for m in NUMPY_MIN_BATCHES}
    assert set(tuned.tuning[0]["timings"]) == {"dense_f32[]", *crossovers}
    assert tuned.layers[0].format == "dense_f32"
    for record in tuned.tuning[1:]:
        assert set(record["timings"]) >= {"dense_f32[]", "csr_f32[]"} or set(record["timings"]) >= {
            "int8[]", "csr_int8[]"}
        assert all(set(t) == {1, 4} for t in record["timings"].values())


def test_stay_sparse_keeps_pruned_layers_in_compact_sparse_formats() -> None:
    rng = np.random.default_rng(1)
    plan = _plan(rng)
    tuned = tune_plan(plan, (1,), stay_sparse=True)
    assert tuned.layers[1].format in ("csr_f32", "bsr_f32") and tuned.layers[2].format in ("csr_int8", "bsr_int8")
    for before, after in zip(plan.layers[1:], tuned.layers[1:]):
        assert after.nbytes < 0.5 * before.dense_weights().size * (4 if before.format in FP32_FAMILY else 1)


def test_jsonable_options() -> None:
    assert jsonable_options({"block": (16, 1), "path": "portable"}) == {"block": [16, 1], "path": "portable"}


def test_a_plan_built_from_specs_is_tuned_the_same_way() -> None:
    rng = np.random.default_rng(2)
    spec = LayerSpec("o", rng.normal(size=(6, 3)).astype(np.float32), np.zeros(3, np.float32), "linear")
    tuned = tune_plan(build_plan((6,), [spec]), (1,))
    assert [layer.format for layer in tuned.layers] == ["dense_f32"]


def test_the_gemm_crossover_the_tuner_picks_is_stored_and_loaded_back() -> None:
    rng = np.random.default_rng(3)
    spec = LayerSpec("o", rng.normal(size=(96, 40)).astype(np.float32), np.zeros(40, np.float32), "relu")
    tuned = tune_plan(build_plan((96,), [spec]), (1, 8, 32))
    layer, record = tuned.layers[0], tuned.tuning[0]
    chosen = record["options"].get("numpy_min_batch")
    assert layer.meta()["numpy_min_batch"] == chosen  # what the manifest stores
    again = get_format("dense_f32").from_arrays(layer.arrays(), layer.meta())
    x = rng.normal(size=(33, 96)).astype(np.float32)
    np.testing.assert_allclose(again(x), tuned(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tuned(x), tuned.reference(x), rtol=1e-4, atol=1e-5)
