"""Pick the fastest weight format for one layer by timing candidates on this machine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from leanserve.kernels.formats import LayerKernel
from leanserve.kernels.registry import get_format

#: each timed sample runs the kernel enough times to last at least this long (timer resolution, call overhead)
MIN_SAMPLE_SECONDS = 50e-6


def candidate_key(fmt: str, options: dict[str, Any]) -> str:
    """The record key of a candidate, e.g. ``int8[path=portable]``."""
    return f"{fmt}[{','.join(f'{k}={options[k]}' for k in sorted(options))}]"


def _sample(kernel: LayerKernel, x: np.ndarray, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        kernel(x)
    return (time.perf_counter() - t0) / inner


def autotune(
    weights: np.ndarray,
    bias: np.ndarray,
    activation: str,
    candidates: list[tuple[str, dict[str, Any]]],
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 5,
    seed: int = 0,
) -> tuple[str, dict[str, Any], dict[str, dict[int, float]]]:
    """Time each candidate ``(format, options)`` built with ``get_format(format).from_dense(weights, bias,
    activation, **options)`` and return ``(best_format, best_options, record)``.

    ``record`` maps ``candidate_key`` -> {batch: median seconds per call}. Every candidate is warmed first; the
    samples are taken round-robin across candidates so machine noise hits them alike. The winner is the least slow
    relative to the fastest candidate at each batch size, summed over ``batch_sizes`` (every batch size weighs the
    same: a sum of raw times would let the largest batch decide alone, and batch 1 is what a lone request pays).
    Accuracy is the caller's concern (pass only acceptable candidates).
    """
    if not candidates:
        raise ValueError("autotune needs at least one candidate")
    rng = np.random.default_rng(seed)
    inputs = {b: rng.standard_normal((b, weights.shape[0])).astype(np.float32) for b in batch_sizes}
    kernels = []
    for fmt, options in candidates:
        kernel = get_format(fmt).from_dense(weights, bias, activation, **options)
        kernel.warmup(tuple(batch_sizes))
        inner = {}
        for b, x in inputs.items():
            once = _sample(kernel, x, 1)
            inner[b] = max(1, min(1000, int(MIN_SAMPLE_SECONDS / max(once, 1e-9))))
        kernels.append((kernel, inner))
    samples: list[dict[int, list[float]]] = [{b: [] for b in batch_sizes} for _ in candidates]
    for _ in range(repeats):
        for (kernel, inner), per_batch in zip(kernels, samples):
            for b, x in inputs.items():
                per_batch[b].append(_sample(kernel, x, inner[b]))
    record = {
        candidate_key(fmt, options): {b: float(np.median(ts)) for b, ts in per_batch.items()}
        for (fmt, options), per_batch in zip(candidates, samples)
    }
    fastest = {b: min(per_batch[b] for per_batch in record.values()) for b in batch_sizes}
    best = min(range(len(candidates)),
               key=lambda i: sum(t / fastest[b] for b, t in record[candidate_key(*candidates[i])].items()))
    return candidates[best][0], dict(candidates[best][1]), record
