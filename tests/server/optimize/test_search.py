"""The budget search (issue 13): which candidates are tried in which order, which rows judge them, the time budget,
the report when nothing fits, and the options and wire fields that drive it. No training here except where marked
slow; the pipeline runs with the served kernels on the digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanserve.server.errors import InvalidArgument
from leanserve.server.grpc.optimize_converters import optimize_options
from leanserve.server.optimize import finetune, pipeline, rows, search
from leanserve.server.optimize.data import OptimizeData
from leanserve.server.optimize.options import OptimizeOptions, validate
from leanserve.server.serving.model import ServedModel
from leanserve.server.settings import Settings
from leanserve.v1 import optimize_service_pb2 as pb
from tests.server.optimize.conftest import Digits

SETTINGS = Settings(autotune_batch_sizes=(1, 16), optimize_latency_repeats=3, warmup_batch_sizes=(1,))


def _labels(ladder: list[search.Recipe]) -> list[str]:
    return [r.label for r in ladder]


def test_budget_ladder_goes_from_what_was_asked_towards_what_is_safe() -> None:
    opts = OptimizeOptions("m", target_sparsity=0.9, quantize="int8")
    assert _labels(search.budget_ladder(opts, trainable=True)) == [
        "0.90 unstructured int8 one-shot", "0.90 unstructured int8 fine-tune",
        "0.90 unstructured int8 fine-tune longer",
        "0.90 1x16 int8 one-shot", "0.90 1x16 int8 fine-tune",  # the faster block shape first
        "0.90 16x1 int8 one-shot", "0.90 16x1 int8 fine-tune",
        "0.80 unstructured int8 one-shot", "0.80 unstructured int8 fine-tune",
        "0.70 unstructured int8 one-shot", "0.70 unstructured int8 fine-tune",
        "0.60 unstructured int8 one-shot", "0.60 unstructured int8 fine-tune",
        "0.50 unstructured int8 one-shot", "0.50 unstructured int8 fine-tune",
        "unpruned int8 quantize only",  # the last resort
    ]


def test_budget_ladder_variants() -> None:
    # epochs given: fine-tuning is what was asked for, no one-shot detours; a block given: no other shapes
    explicit = OptimizeOptions("m", target_sparsity=0.8, block=(4, 16), epochs=5)
    assert _labels(search.budget_ladder(explicit, trainable=True)) == [
        "0.80 4x16 fp32 fine-tune", "0.80 4x16 fp32 fine-tune longer", "0.70 4x16 fp32 fine-tune",
        "0.60 4x16 fp32 fine-tune", "0.50 4x16 fp32 fine-tune"]
    # nothing to train with: one-shot candidates only
    untrained = search.budget_ladder(OptimizeOptions("m", target_sparsity=0.95, quantize="int8"), trainable=False)
    assert {r.method for r in untrained} == {search.ONE_SHOT, search.QUANTIZE}
    assert [r.sparsity for r in untrained if r.block is None] == [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0]
    assert _labels(search.budget_ladder(OptimizeOptions("m", quantize="int8"), trainable=True)) == [
        "unpruned int8 quantize only"]


def test_sweep_levels_ascend_to_the_target() -> None:
    levels = search.sweep_levels(OptimizeOptions("m", target_sparsity=0.9, quantize="int8", search=True), False)
    assert [[r.label for r in level] for level in levels] == [
        ["0.50 unstructured int8 one-shot", "0.50 unstructured fp32 one-shot"],
        ["0.80 unstructured int8 one-shot", "0.80 unstructured fp32 one-shot"],
        ["0.90 unstructured int8 one-shot", "0.90 unstructured fp32 one-shot"]]


def _rows(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32).reshape(n, 1) * np.ones((1, 4), np.float32)


def test_held_out_rows_are_set_aside_before_anything_else() -> None:
    x, y = _rows(200), np.arange(200) % 10
    sets = rows.split_sets(OptimizeData(x, y), OptimizeOptions("m", target_sparsity=0.9), (4,), 0.2, "softmax")
    assert sets.held_out and sets.verdict.source == "split" and sets.select.source == "split"
    ids = [set(a[:, 0].astype(int)) for a in (sets.verdict.x, sets.select.x, sets.train_x)]
    assert sum(map(len, ids)) == 200 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0]) == 40 and len(ids[1]) == 32
    # x_val, when sent, is the held-out verdict; without labels fine-tuning distils the original's outputs
    xv = _rows(30) + 1000
    sets = rows.split_sets(OptimizeData(x, None, None, None), OptimizeOptions("m", target_sparsity=0.5), (4,),
                               0.2, "linear")
    assert sets.train_x is not None and sets.train_y is None and sets.verdict.metric == "agreement"
    sets = rows.split_sets(OptimizeData(x, y, xv, np.zeros(30, np.int64)),
                               OptimizeOptions("m", target_sparsity=0.5), (4,), 0.2, "softmax")
    assert sets.verdict.source == sets.select.source == "x_val" and len(sets.train_x) == 200
    halves = [set(a[:, 0].astype(int)) for a in (sets.verdict.x, sets.select.x)]
    assert len(halves[0]) == len(halves[1]) == 15 and not halves[0] & halves[1]
    # one-shot only (epochs 0, or an output fine-tuning cannot train): no training rows, nothing else changes
    for opts, act in ((OptimizeOptions("m", target_sparsity=0.5, epochs=0), "softmax"),
                      (OptimizeOptions("m", target_sparsity=0.5), "sigmoid")):
        sets = rows.split_sets(OptimizeData(x, y), opts, (4,), 0.2, act)
        assert sets.train_x is None and len(sets.select.x) == 160 and sets.held_out
    with pytest.raises(InvalidArgument, match="needs data"):
        rows.split_sets(None, OptimizeOptions("m", target_sparsity=0.5, epochs=3), (4,), 0.2, "softmax")


def test_auto_epochs_learning_rate_and_transfer_set() -> None:
    assert finetune.auto_epochs(1) == finetune.MAX_AUTO_EPOCHS
    assert finetune.auto_epochs(10_000_000) == finetune.MIN_AUTO_EPOCHS
    assert finetune.auto_epochs(1600) >= finetune.auto_epochs(3200) >= finetune.auto_epochs(100_000)
    small, wide = [np.full((64, 128), 0.1, np.float32)], [np.full((4096, 4096), 0.015, np.float32)]
    assert finetune.learning_rate(wide) < finetune.learning_rate(small) / 5  # the step follows the weights' scale
    x, y = _rows(20), np.arange(20) % 3

    def teacher(rows: np.ndarray) -> np.ndarray:
        return finetune.probabilities(np.stack([rows[:, 0], -rows[:, 0], rows[:, 1] * 0], axis=1), "linear")

    t = finetune.transfer_set(x, y, teacher, x[:5], y[:5], 3, seed=0)
    assert len(t.x) == 20 * (1 + finetune.MIXUP_FACTOR) == len(t.targets) and t.mixup_rows == 20 * finetune.MIXUP_FACTOR
    np.testing.assert_allclose(t.targets.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(t.targets[:20][np.arange(20), y] >= finetune.LABEL_WEIGHT)  # labelled rows keep their label


def _run(served: ServedModel, data: OptimizeData | None, **kwargs: object) -> tuple[dict, list[str]]:
    opts = OptimizeOptions("digits", data_size_bytes=1 if data else 0, **kwargs)  # type: ignore[arg-type]
    messages: list[str] = []
    control = pipeline.JobControl(lambda s, f, m: messages.append(m), lambda: False)
    return pipeline.run(served, Path("/nonexistent"), opts, data, SETTINGS, control).report, messages


def test_nothing_fits_names_the_best_candidate_found(digits_served: ServedModel, digits: Digits) -> None:
    # no data: judged by agreement on random inputs, where any pruning flips a few of 512 rows
    r, messages = _run(digits_served, None, target_sparsity=0.95, max_accuracy_drop=0.0)
    assert not r["within_budget"] and r["search"]["stopped"] == "every candidate tried"
    tried = [c["label"] for c in r["candidates"]]
    assert tried[:3] == ["0.95 unstructured fp32 one-shot", "0.95 1x16 fp32 one-shot", "0.95 16x1 fp32 one-shot"]
    assert tried[3:] == [f"{s:.2f} unstructured fp32 one-shot" for s in (0.9, 0.8, 0.7, 0.6, 0.5)]
    best = min(r["candidates"], key=lambda c: (c["drop"], c["size_bytes"]))
    assert r["chosen"]["label"] == best["label"] and best["held_out_metric"] is not None
    assert r["summary"].startswith("OVER budget") and best["label"] in r["summary"]
    assert all(c["size_bytes"] > 0 and c["latency_b1_seconds"] > 0 for c in r["candidates"])
    # progress names the running candidate
    assert any(m.startswith("[1/8 0.95 unstructured fp32 one-shot]") for m in messages)


def test_stops_at_the_first_candidate_within_budget_on_held_out_rows(digits_served: ServedModel,
                                                                     digits: Digits) -> None:
    data = OptimizeData(digits.x, digits.y, digits.x_val, digits.y_val)
    r, _ = _run(digits_served, data, target_sparsity=0.9, quantize="int8", epochs=0, max_accuracy_drop=0.02)
    within = [c for c in r["candidates"] if c["within_budget"]]
    assert r["within_budget"] and r["eval_source"] == "x_val" and r["held_out"]
    assert within and within[-1] is r["candidates"][-1] and r["candidates"][-1]["held_out_within_budget"]
    assert r["chosen"]["label"] == r["candidates"][-1]["label"]
    assert r["before"]["metric"] - r["after"]["metric"] <= 0.02 + 1e-9  # the verdict: the held-out x_val
    assert r["candidates"][0]["label"] == "0.90 unstructured int8 one-shot" and not r["candidates"][0]["within_budget"]


def test_time_budget_bounds_the_search(digits_served: ServedModel, digits: Digits) -> None:
    r, _ = _run(digits_served, None, target_sparsity=0.95, time_budget_seconds=1e-6, max_accuracy_drop=0.0)
    assert len(r["candidates"]) == 1 and r["search"]["stopped"] == "time budget reached"
    assert r["search"]["time_budget_seconds"] == 1e-6 and not r["within_budget"]
    assert "time budget reached" in r["summary"]


@pytest.mark.parametrize("kwargs, match", [
    ({"target_sparsity": 0.5, "time_budget_seconds": -1.0}, "time_budget_seconds"),
    ({"target_sparsity": 0.5, "time_budget_seconds": 1e9}, "time_budget_seconds"),
    ({"target_sparsity": 0.5, "time_budget_seconds": float("nan")}, "time_budget_seconds"),
])
def test_validate_refuses_bad_time_budgets(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate(OptimizeOptions("m", **kwargs), max_epochs=200, max_data_bytes=1000, max_time_budget_seconds=3600)


def test_wire_epochs_unset_means_the_server_decides() -> None:
    unset = optimize_options(pb.OptimizeOptions(model_name="m", target_sparsity=0.5, time_budget_seconds=60))
    assert unset.epochs is None and unset.time_budget_seconds == 60
    assert optimize_options(pb.OptimizeOptions(model_name="m", epochs=0)).epochs == 0
    assert optimize_options(pb.OptimizeOptions(model_name="m", epochs=7)).epochs == 7


@pytest.mark.slow
def test_without_labels_it_distils_and_judges_by_agreement(digits_served: ServedModel, digits: Digits) -> None:
    r, messages = _run(digits_served, OptimizeData(digits.x, None), target_sparsity=0.8, quantize="int8",
                       max_accuracy_drop=0.03)
    assert r["metric"] == "agreement" and r["held_out"] and r["before"]["metric"] == 1.0
    tuned = [c for c in r["candidates"] if c["fine_tuning"]]
    assert tuned and tuned[0]["fine_tuning"]["targets"] == "original's probabilities (distillation)"
    assert all("max_abs_output_change" in c and "top1_agreement" in c for c in r["candidates"])
    assert r["within_budget"] and r["after"]["agreement_with_original"] >= 0.97
    assert any("epoch" in m and "0.80 unstructured int8 fine-tune" in m for m in messages)
