"""The optimization pipeline on scikit-learn digits, with the served kernels (no transport)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanserve.server.repository import artifacts
from leanserve.server.errors import Cancelled
from leanserve.server.serving.model import ServedModel
from leanserve.server.optimize import pipeline
from leanserve.server.optimize.data import OptimizeData
from leanserve.server.optimize.options import OptimizeOptions
from leanserve.server.settings import Settings
from tests.server.optimize.conftest import Digits

SETTINGS = Settings(autotune_batch_sizes=(1, 16), optimize_latency_repeats=5)


def _run(served: ServedModel, digits: Digits, **kwargs: object) -> dict:
    opts = OptimizeOptions("digits", data_size_bytes=1, **kwargs)  # type: ignore[arg-type]
    data = OptimizeData(digits.x, digits.y, digits.x_val, digits.y_val)
    events: list[tuple[str, float, str]] = []
    control = pipeline.JobControl(lambda s, f, m: events.append((s, f, m)), lambda: False)
    result = pipeline.run(served, digits.path.parent, opts, data, SETTINGS, control)
    fractions = [f for _, f, _ in events]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    return {"report": result.report, "plan": result.plan, "events": events}


def test_int8_alone_stays_within_half_a_point(digits_served: ServedModel, digits: Digits) -> None:
    out = _run(digits_served, digits, quantize="int8", max_accuracy_drop=0.005)
    r = out["report"]
    assert r["metric"] == "accuracy" and r["eval_source"] == "x_val"
    assert r["before"]["metric"] == pytest.approx(digits.val_accuracy, abs=1e-9)  # Plan == Keras on digits
    assert r["before"]["metric"] - r["after"]["metric"] <= 0.005 and r["within_budget"]
    assert {layer["format"] for layer in r["after"]["layers"]} <= {"int8", "csr_int8", "bsr_int8"}
    assert r["after"]["size_bytes"] < 0.35 * r["before"]["size_bytes"]  # int8 weights + scales vs fp32


@pytest.mark.slow
def test_pruned_90_int8_with_fine_tuning_within_one_and_a_half_points(digits_served: ServedModel,
                                                                      digits: Digits) -> None:
    out = _run(digits_served, digits, target_sparsity=0.9, quantize="int8", epochs=15, max_accuracy_drop=0.015)
    r, plan = out["report"], out["plan"]
    assert r["before"]["metric"] - r["after"]["metric"] <= 0.015 and r["within_budget"]
    assert any(stage == "finetune" for stage, _, _ in out["events"])
    assert r["fine_tuning"]["model"].startswith("source file")

    # the report describes what is stored: reload the plan from its files and measure again
    manifest, blob = artifacts.plan_to_files(plan)
    stored = artifacts.plan_from_files(manifest, blob)
    for layer, entry in zip(stored.layers, r["after"]["layers"]):
        w = layer.dense_weights()
        assert entry["sparsity"] == pytest.approx(1 - np.count_nonzero(w) / w.size) == pytest.approx(0.9, abs=0.01)
        assert entry["format"] == layer.format and layer.format in ("csr_int8", "bsr_int8")
        assert entry["bytes"] == layer.nbytes
    # the reported size is the stored weights' bytes: the safetensors file is an 8-byte header length, the JSON
    # header, then exactly those bytes
    array_bytes = sum(a.nbytes for layer in stored.layers for a in layer.arrays().values())
    header_bytes = 8 + int.from_bytes(blob[:8], "little")
    assert r["after"]["size_bytes"] == stored.nbytes == array_bytes == len(blob) - header_bytes
    assert r["after"]["size_bytes"] < 0.2 * r["before"]["size_bytes"]
    for side in ("before", "after"):
        assert set(r[side]["latency_seconds"]) == {"1", "32"}
        assert all(np.isfinite(t) and t > 0 for t in r[side]["latency_seconds"].values())
    # int8 activations are quantized per row: small differences from TF on the same dequantized weights
    assert 0 < r["tf_reference"]["max_abs_error"] < 0.1 and r["tf_reference"]["top1_agreement"] > 0.98
    # ... while the kernels compute exactly that quantization scheme (the stored reference check)
    assert r["reference_check"]["within_tolerance"] and r["reference_check"]["max_abs_error"] < 1e-5


def test_one_shot_global_fp32_without_labels_uses_agreement(digits_served: ServedModel, digits: Digits) -> None:
    opts = OptimizeOptions("digits", target_sparsity=0.5, granularity="global", max_accuracy_drop=0.05,
                           data_size_bytes=1, epochs=0)  # one-shot: fine-tuning is the default with data
    control = pipeline.JobControl(lambda *a: None, lambda: False)
    r = pipeline.run(digits_served, Path("/nonexistent"), opts, OptimizeData(digits.x_val, None), SETTINGS,
                     control).report
    assert r["metric"] == "agreement" and r["before"]["metric"] == 1.0
    assert r["after"]["metric"] == pytest.approx(r["after"]["agreement_with_original"])
    total = sum(layer["nonzero"] for layer in r["after"]["layers"])
    assert total / sum(np.prod(layer["shape"]) for layer in r["after"]["layers"]) == pytest.approx(0.5, abs=0.01)
    assert r["tf_reference"]["max_abs_error"] < 1e-4  # fp32 sparse kernels vs TF on the same weights
    assert r["reference_check"]["within_tolerance"] and r["reference_check"]["max_abs_error"] < 1e-5
    assert r["reference_check"]["reference"] == "numpy float64 (same pruned weights)"


def test_search_keeps_the_smallest_candidate_within_budget(digits_served: ServedModel, digits: Digits) -> None:
    out = _run(digits_served, digits, target_sparsity=0.95, quantize="int8", search=True, max_accuracy_drop=0.1,
               epochs=0)  # one-shot: fine-tuning is the default with labels
    r = out["report"]
    within = [c for c in r["candidates"] if c["within_budget"]]
    assert 1 <= len(r["candidates"]) <= 10
    levels = sorted({c["sparsity"] for c in r["candidates"]})
    assert levels[:1] == [0.5] and all(c["within_budget"] for c in r["candidates"] if c["sparsity"] < levels[-1])
    assert within and r["chosen"]["sparsity"] == min(within, key=lambda c: c["size_bytes"])["sparsity"]
    assert r["within_budget"]


def test_cancel_stops_the_pipeline(digits_served: ServedModel, digits: Digits) -> None:
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    opts = OptimizeOptions("digits", target_sparsity=0.9, epochs=50, data_size_bytes=1)
    control = pipeline.JobControl(lambda *a: None, cancelled)
    with pytest.raises(Cancelled):
        pipeline.run(digits_served, digits.path.parent, opts, OptimizeData(digits.x, digits.y), SETTINGS, control)
