"""Shared oracles for the kernel tests (the rng fixture lives in conftest.py)."""

import numpy as np

from leanserve.kernels.activations import activate_numpy


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, activation: str) -> np.ndarray:
    """float64 numpy oracle of act(x @ w + b)."""
    return activate_numpy(x.astype(np.float64) @ w.astype(np.float64) + b, activation)


def assert_close_f32(out: np.ndarray, ref: np.ndarray, k: int, x: np.ndarray | None = None,
                     w: np.ndarray | None = None) -> None:
    """fp32 accumulation error grows ~sqrt(K) times the magnitude of the summed terms. Without ``x``/``w`` that
    magnitude is taken as the output's; with them, per row as max_n sum_k |x[r, k] w[k, n]| (tight even when
    large terms cancel; every fused activation is 1-Lipschitz, softmax over the row)."""
    assert out.dtype == np.float32 and out.shape == ref.shape and out.flags.c_contiguous
    if x is None or w is None:
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6 * np.sqrt(k) * scale + 1e-6)
        return
    terms = (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))).max(axis=1, keepdims=True)
    tol = 1e-5 * np.abs(ref) + 1e-6 * np.sqrt(k) * terms + 1e-6
    assert (np.abs(out - ref) <= tol).all(), f"max excess {(np.abs(out - ref) - tol).max()}"
