"""Magnitude pruning of a chain of dense layers: per layer or global, unstructured or by blocks, and the
polynomial sparsity schedule of gradual pruning (Zhu & Gupta 2017, as in tfmot's PolynomialDecay)."""

from __future__ import annotations

import numpy as np

from leanserve.kernels import prune_magnitude


def _tile_scores(w: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
    """L2 norm of every ``r x c`` tile of ``w[K, N]`` (edge tiles partial), the ranking prune_magnitude uses."""
    r, c = block or (1, 1)
    K, N = w.shape
    kb, nb = -(-K // r), -(-N // c)
    padded = np.zeros((kb * r, nb * c), dtype=np.float32)
    padded[:K, :N] = w
    return np.sqrt(np.square(padded.reshape(kb, r, nb, c)).sum(axis=(1, 3))).ravel()


def layer_sparsities(weights: list[np.ndarray], target: float, granularity: str,
                     block: tuple[int, int] | None) -> list[float]:
    """Per-layer sparsity reaching ``target``: the same for every layer, or (global) from one threshold over
    every layer's tile scores, so the overall fraction of pruned tiles is ``target``."""
    if granularity != "global" or target == 0.0:
        return [target] * len(weights)
    scores = [_tile_scores(w, block) for w in weights]
    allscores = np.concatenate(scores)
    n_drop = int(round(target * allscores.size))
    if n_drop == 0:
        return [0.0] * len(weights)
    # rank, not a threshold value: ties at the threshold would otherwise overshoot the target
    order = np.argsort(allscores, kind="stable")[:n_drop]
    dropped = np.zeros(allscores.size, dtype=bool)
    dropped[order] = True
    out, start = [], 0
    for s in scores:
        out.append(float(dropped[start:start + s.size].sum() / s.size))
        start += s.size
    return out


def masks(weights: list[np.ndarray], target: float, granularity: str,
          block: tuple[int, int] | None) -> list[np.ndarray]:
    """Float32 0/1 masks keeping the largest weights (or tiles) at ``target`` sparsity."""
    out = []
    for w, s in zip(weights, layer_sparsities(weights, target, granularity, block)):
        # rank on |w| + tiny so exact zeros inside kept tiles stay "kept" (their mask is 1, the value stays 0)
        kept = prune_magnitude(np.abs(w) + np.float32(1e-30), s, block) != 0
        out.append(kept.astype(np.float32))
    return out


def prune(weights: list[np.ndarray], target: float, granularity: str,
          block: tuple[int, int] | None) -> list[np.ndarray]:
    """One-shot: the pruned copies of ``weights``."""
    return [w * m for w, m in zip(weights, masks(weights, target, granularity, block))]


def polynomial_sparsity(step: int, begin: int, end: int, initial: float, final: float, power: float = 3.0) -> float:
    """Sparsity at ``step``: ``final + (initial - final) * (1 - progress) ** power`` between ``begin`` and
    ``end`` (fast at first, when many weights are redundant, slow near the target so training can recover)."""
    if end <= begin:
        return final
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return float(final + (initial - final) * (1.0 - progress) ** power)


def measured_sparsity(w: np.ndarray) -> float:
    """Fraction of exact zeros."""
    return float(1.0 - np.count_nonzero(w) / max(w.size, 1))
