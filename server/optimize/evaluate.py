"""Measuring a candidate with the served kernels: quality (accuracy or agreement), size, latency, the kernels'
error against an exact numpy simulation of their arithmetic (the stored reference check), and the int8
quantization error against TensorFlow running the same dequantized weights (information)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from leanserve.kernels import QUANTIZED_INPUT_FORMATS, activate_numpy
from leanserve.server.runtime.plan import Plan

EVAL_BATCH = 256
RANDOM_EVAL_ROWS = 512


@dataclass(frozen=True)
class EvalSet:
    """Rows to judge candidates on; ``y`` None means "compare with the original model" (agreement)."""

    x: np.ndarray
    y: np.ndarray | None
    source: str  # "x_val" | "split" | "x" | "random"

    @property
    def metric(self) -> str:
        if self.y is not None:
            return "accuracy"
        return "agreement_random" if self.source == "random" else "agreement"


def random_eval_set(input_shape: tuple[int, ...], seed: int = 0) -> EvalSet:
    """Seeded standard-normal rows: the only judge available when the caller sent no data."""
    x = np.random.default_rng(seed).standard_normal((RANDOM_EVAL_ROWS, *input_shape), dtype=np.float32)
    return EvalSet(x, None, "random")


def run_plan(plan: Plan, x: np.ndarray) -> np.ndarray:
    return np.concatenate([plan(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def quality(outputs: np.ndarray, ev: EvalSet, original: np.ndarray) -> float:
    """Accuracy against labels, else top-1 agreement with the original model's outputs."""
    target = ev.y if ev.y is not None else np.argmax(original, axis=1)
    return float(np.mean(np.argmax(outputs, axis=1) == target))


def output_error(outputs: np.ndarray, original: np.ndarray) -> dict[str, float]:
    """How far the candidate's outputs moved from the original model's on the same rows."""
    err = np.abs(outputs.astype(np.float64) - original.astype(np.float64))
    return {"max_abs_output_change": float(err.max(initial=0.0)),
            "mean_abs_output_change": float(err.mean()) if err.size else 0.0,
            "top1_agreement": float(np.mean(outputs.argmax(1) == original.argmax(1))) if len(outputs) else 1.0}


def latency(plan: Plan, batch: int, repeats: int, seed: int = 0) -> float:
    """Median seconds of one ``plan(x)`` call on a ``[batch, ...]`` input (after one warm-up call)."""
    x = np.random.default_rng(seed).standard_normal((batch, *plan.input_shape), dtype=np.float32)
    plan(x)
    inner = max(1, int(2e-4 / max(_once(plan, x), 1e-9)))  # each sample lasts >= 0.2 ms (timer, call overhead)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            plan(x)
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))


def _once(plan: Plan, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    plan(x)
    return time.perf_counter() - t0


def tf_reference_error(plan: Plan, x: np.ndarray) -> dict[str, float]:
    """Max |served - TF| where TF runs a Keras model built from the plan's effective (pruned, dequantized)
    weights: what remains is the kernels' arithmetic, including the int8 activation quantization, which is
    intended and can move a probability by several hundredths on a row whose top two logits nearly tie. Reported
    for information; the pass/fail check is ``simulation_check``."""
    from leanserve.server.ingest.reference import keras_reference
    from leanserve.server.optimize.keras_model import keras_of_plan

    ref = keras_reference(keras_of_plan(plan))
    served = run_plan(plan, x).astype(np.float64)
    want = np.concatenate([ref(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]).astype(np.float64)
    err = np.abs(served - want)
    return {"max_abs_error": float(err.max(initial=0.0)), "mean_abs_error": float(err.mean()) if err.size else 0.0,
            "rows": int(len(x)), "top1_agreement": float(np.mean(served.argmax(1) == want.argmax(1)))}


# -- the stored reference check: served kernels vs an exact simulation of their arithmetic --------------------
#: batch sizes the check feeds first (then EVAL_BATCH rows at a time), so a batch-size-dependent defect shows up
CHECK_BATCHES = (1, 3, 64)
QMAX = 127


def quantize_rows_sim(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 activation quantization as ``kernels/quantize.py`` specifies it, in plain numpy:
    ``scale_r = max|x_r| / 127`` in float32 (1 for a zero row, NaN for a row holding a NaN), ``q = clip(rint(x *
    (1 / scale_r)), -127, 127)`` with the product in float32. Returns (``q`` float64 integers, ``scale`` float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
    scale = np.where(np.isnan(amax) | (amax > 0), amax / np.float32(QMAX), np.float32(1.0)).astype(np.float32)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(x * inv[:, None]), -QMAX, QMAX)
    return q.astype(np.float64), scale


def simulate(plan: Plan, x: np.ndarray) -> np.ndarray:
    """What ``plan(x)`` must compute, in numpy float64, independently of the kernels' code.

    An int8 layer (int8, csr_int8, bsr_int8) is simulated exactly: its input rows quantized per row
    (``quantize_rows_sim``), its per-channel int8 weights recovered from the effective weights and the scales, the
    integer products summed exactly (float64 holds every int32 accumulator exactly), then the kernels' float32
    epilogue ``float32(acc) * (x_scale * w_scale) + bias`` in the kernels' order, so the next layer quantizes the
    very same values. An fp32 layer is a float64 matmul. Activations in float64. What remains between the served
    outputs and this is float32 rounding (about 1e-7 on probabilities), not the quantization error: a defect in a
    kernel shows, the intended int8 error does not."""
    h = np.asarray(x).reshape(len(x), -1).astype(np.float32)
    out = h.astype(np.float64)
    for layer in plan.layers:
        w = layer.dense_weights()
        bias = np.asarray(layer.bias_vector(), dtype=np.float32)
        if layer.format in QUANTIZED_INPUT_FORMATS:
            w_scale = np.asarray(layer.arrays()["scales"], dtype=np.float32)
            q_w = np.rint(w.astype(np.float64) / w_scale.astype(np.float64))
            q_x, x_scale = quantize_rows_sim(h)
            acc = q_x @ q_w  # integers below 2**53: exact
            with np.errstate(invalid="ignore", over="ignore"):
                z = (acc.astype(np.float32) * (x_scale[:, None] * w_scale[None, :]) + bias).astype(np.float64)
        else:
            z = out @ w.astype(np.float64) + bias.astype(np.float64)
        out = activate_numpy(z, layer.activation)
        h = out.astype(np.float32)
    return out


def served_in_batches(plan: Plan, x: np.ndarray) -> np.ndarray:
    """``plan`` on ``x`` fed in batches of 1, 3, 64 rows, then EVAL_BATCH rows at a time."""
    bounds, at = [0], 0
    for size in CHECK_BATCHES:
        at = min(at + size, len(x))
        bounds.append(at)
    bounds += list(range(at + EVAL_BATCH, len(x), EVAL_BATCH)) + [len(x)]
    bounds = sorted(set(bounds))
    parts = [plan(np.ascontiguousarray(x[a:b])) for a, b in itertools.pairwise(bounds)]
    return np.concatenate(parts) if parts else np.zeros((0, plan.out_features), np.float32)


def reference_name(plan: Plan) -> str:
    if any(layer.format in QUANTIZED_INPUT_FORMATS for layer in plan.layers):
        return ("numpy float64 simulation of the int8 kernels (same weights, per-row int8 activations, "
                "exact integer products)")
    return "numpy float64 (same pruned weights)"


def simulation_check(plan: Plan, x: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Served outputs vs ``simulate`` on ``x`` with the upload check's rule (``numpy.allclose``: every element
    within ``atol + rtol * |reference|``; NaN only where the simulation has NaN too). ``max_rel_error`` is
    ``max |served - reference| / max(|reference|, atol)``, as at upload."""
    served = served_in_batches(plan, x).astype(np.float64)
    want = simulate(plan, x)
    if served.shape != want.shape:
        raise ValueError(f"served output shape {list(served.shape)} != simulated {list(want.shape)}")
    both_nan = np.isnan(served) & np.isnan(want)
    served, want = np.where(both_nan, 0.0, served), np.where(both_nan, 0.0, want)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(served - want)
        diff[~np.isfinite(diff)] = np.inf  # NaN or infinity on one side only
        ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
        rel = np.nan_to_num(diff / np.maximum(np.abs(want), atol), nan=np.inf)
    return {"reference": reference_name(plan), "n": len(x), "max_abs_error": float(diff.max(initial=0.0)),
            "max_rel_error": float(rel.max(initial=0.0)), "within_tolerance": ok, "atol": float(atol),
            "rtol": float(rtol)}
