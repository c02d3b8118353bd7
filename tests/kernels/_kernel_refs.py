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


# -- int8 oracles, written from the documented quantization scheme (kernels/quantize.py's docstring), not from the
# -- kernels' own quantized arrays: a quantize or pack bug that is consistent with itself still shows up here.

QMAX = 127


def activate64(h: np.ndarray, activation: str) -> np.ndarray:
    """float64 activations, written out here (independent of kernels.activations)."""
    if activation == "linear":
        return h
    if activation == "relu":
        return np.maximum(h, 0.0)
    if activation == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * h))  # = 1 / (1 + exp(-h)), without overflow
    if activation == "tanh":
        return np.tanh(h)
    if activation == "softmax":
        e = np.exp(h - h.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(activation)


def quantize_weights_ref(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (column): ``s = max|w| / 127`` in float32 (1 for an all-zero column),
    ``q = rint(w / s)`` clipped to [-127, 127]."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0)
    s = np.where(amax > 0, amax / np.float32(QMAX), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / s), -QMAX, QMAX).astype(np.int8)
    return q, s


def quantize_rows_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ``s = max|x| / 127`` in float32 (1 for a zero row), ``q = rint(x * (1 / s))`` clipped."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1)
    s = np.where(amax > 0, amax / np.float32(QMAX), np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / s).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, s


def int8_accumulators_ref(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """Exact ``xq @ wq`` in int64, checked to fit the kernels' int32 accumulators."""
    acc = xq.astype(np.int64) @ wq.astype(np.int64)
    assert np.abs(acc).max(initial=0) < 2**31
    return acc


#: a quantized value is within STEP quantization steps of the value it stands for. Exact rounding to nearest
#: gives 1/2; the quotient ``w / s`` (or ``x * (1 / s)``) is formed in float32 first, with a relative error of at
#: most 2**-23 (two roundings for x), i.e. at most 127 * 2**-23 < 2**-16 of a step on a value of at most 127 steps.
STEP = 0.5 + 2.0**-16


def int8_error_bound(x: np.ndarray, w: np.ndarray, b: np.ndarray, activation: str) -> np.ndarray:
    """The largest ``|y - y_ref|`` an int8 layer may show, per output ``[B, N]``, where ``y_ref = act(x @ w + b)``
    in float64 on the ORIGINAL fp32 weights ``w`` and ``y`` the int8 kernel's float32 output.

    Derivation. With per-channel weight scale ``s_w[n] = max_k |w[k, n]| / 127`` and per-row activation scale
    ``s_x[r] = max_k |x[r, k]| / 127``, the kernel computes with ``ŵ = s_w q_w`` and ``x̂ = s_x q_x`` where
    ``|Δw| = |w - ŵ| <= STEP s_w`` and ``|Δx| = |x - x̂| <= STEP s_x`` (rounding to nearest; no value is clipped,
    since ``|w| / s_w <= 127`` and ``|x| / s_x <= 127``). Per product,

        x w - x̂ ŵ = x Δw + w Δx - Δx Δw,  so  |x w - x̂ ŵ| <= |x| STEP s_w + |w| STEP s_x + STEP² s_x s_w,

    and summed over k the pre-activation error is at most ``Σ_k (|x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4)`` (with
    STEP in place of 1/2). A zero weight is stored as exactly 0 (``Δw = 0`` and ``ŵ = 0``), so its term vanishes:
    only nonzero weights are summed. The int32 accumulation of ``q_x q_w`` is exact; the float32 epilogue
    (``float32(acc) * (s_x s_w) + b``) rounds at most four times: ``<= 2**-21 (Σ_k |x̂_k ŵ_k| + |b|)``.
    The activations are 1-Lipschitz elementwise (relu, tanh; sigmoid 1/4); softmax moves each probability by at
    most half the largest pre-activation change of its row (its Jacobian ``diag(p) - p pᵀ`` has absolute row sums
    ``2 p_i (1 - p_i) <= 1/2``). Nonlinear activations evaluated in float32 add at most 2e-7 (a few ulp of a value
    of magnitude <= 1); 1e-6 is allowed.
    """
    x64 = np.abs(np.asarray(x, np.float64))
    w32 = np.asarray(w, np.float32)
    nz = (w32 != 0).astype(np.float64)
    aw = np.abs(w32.astype(np.float64))
    _, s_w = quantize_weights_ref(w32)
    _, s_x = quantize_rows_ref(np.asarray(x, np.float32))
    s_w64, s_x64 = s_w.astype(np.float64), s_x.astype(np.float64)[:, None]
    pre = (STEP * (x64 @ nz) * s_w64 + STEP * s_x64 * (np.ones_like(x64) @ aw)
           + STEP**2 * s_x64 * s_w64 * (np.ones_like(x64) @ nz))
    magnitude = (x64 + STEP * s_x64) @ (aw + STEP * s_w64 * nz)  # >= Σ_k |x̂_k ŵ_k|
    pre = pre + 2.0**-21 * (magnitude + np.abs(np.asarray(b, np.float64)))
    if activation == "linear" or activation == "relu":
        return pre
    if activation == "softmax":
        return 0.5 * pre.max(axis=1, keepdims=True) + 1e-6
    if activation in ("tanh", "sigmoid"):
        return pre + 1e-6
    raise ValueError(activation)
