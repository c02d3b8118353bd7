"""Shared oracles for the kernel tests (the rng fixture lives in conftest.py)."""

import numpy as np

from kernels.activations import activate_numpy


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, activation: str) -> np.ndarray:
    """float64 numpy oracle of act(x @ w + b)."""
    return activate_numpy(x.astype(np.float64) @ w.astype(np.float64) + b, activation)


def assert_close_f32(out: np.ndarray, ref: np.ndarray, k: int) -> None:
    """fp32 accumulation error grows ~sqrt(K); scale the tolerance with K and the output magnitude."""
    assert out.dtype == np.float32 and out.shape == ref.shape and out.flags.c_contiguous
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6 * np.sqrt(k) * scale + 1e-6)
