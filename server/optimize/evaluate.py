"""Measuring a candidate with the served kernels: quality (accuracy or agreement), size, latency, and the
kernels' error against TensorFlow running the same weights."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

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
    weights: what remains is the kernels' arithmetic, including int8 activation quantization."""
    from leanserve.server.ingest.reference import keras_reference
    from leanserve.server.optimize.keras_model import keras_of_plan

    ref = keras_reference(keras_of_plan(plan))
    served = run_plan(plan, x).astype(np.float64)
    want = np.concatenate([ref(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]).astype(np.float64)
    err = np.abs(served - want)
    return {"max_abs_error": float(err.max(initial=0.0)), "mean_abs_error": float(err.mean()) if err.size else 0.0,
            "rows": int(len(x)), "top1_agreement": float(np.mean(served.argmax(1) == want.argmax(1)))}
