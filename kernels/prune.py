"""Magnitude pruning of a dense ``W[K, N]`` (unstructured or by blocks), for the sparse formats."""

from __future__ import annotations

import numpy as np


def prune_magnitude(weights: np.ndarray, sparsity: float, block: tuple[int, int] | None = None,
                    norm: str = "l2") -> np.ndarray:
    """Zero the smallest-magnitude fraction ``sparsity`` of ``weights[K, N]``; returns a pruned copy.

    Unstructured (``block=None``): weights ranked by ``|w|``. With ``block=(r, c)`` (``r`` inputs along K by ``c``
    outputs along N, as in ``bsr_*``): ``r x c`` tiles (edge tiles partial) ranked by their L1 or L2 ``norm`` and
    zeroed whole, so ``from_dense(..., block=(r, c))`` stores only the survivors. Exactly
    ``round(sparsity * count)`` entries / tiles are zeroed (ties broken by position).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    w = np.array(weights, dtype=np.float32, copy=True)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight matrix, got shape {w.shape}")
    K, N = w.shape
    r, c = (1, 1) if block is None else (int(block[0]), int(block[1]))
    if r < 1 or c < 1:
        raise ValueError(f"block dimensions must be positive, got {block}")
    kb, nb = -(-K // r), -(-N // c)
    padded = np.zeros((kb * r, nb * c), dtype=np.float32)
    padded[:K, :N] = w
    tiles = padded.reshape(kb, r, nb, c)
    mag = np.abs(tiles)
    score = (mag.sum(axis=(1, 3)) if norm == "l1" else np.sqrt((mag * mag).sum(axis=(1, 3)))).ravel()
    n_drop = int(round(sparsity * score.size))
    if n_drop:
        drop = np.zeros(score.size, dtype=bool)
        drop[np.argsort(score, kind="stable")[:n_drop]] = True
        tiles[drop.reshape(kb, nb)[:, None, :, None].repeat(r, 1).repeat(c, 3)] = 0.0
    return np.ascontiguousarray(padded[:K, :N])
