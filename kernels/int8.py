"""Format ``int8``: per-output-channel symmetric int8 weights, activations quantized per row on each call.

``y = act(sx[r] * sw[n] * sum_k qx[r, k] * qw[k, n] + b[n])`` with exact int32 accumulation (see
``kernels/quantize.py`` for the quantization choices). Two interchangeable paths compute the int32 accumulators:

* ``vnni``: AVX-512 VNNI ``vpdpbusd`` (u8 x s8 -> i32, 64 MACs per instruction) through an LLVM intrinsic
  (``_simd.vnni_tile``), weights packed 4 k's per 32-bit lane, 16 channels per vector, panels of 64 channels;
  activations are offset by +128 to be unsigned and ``128 * sum_k qw[k, n]`` is subtracted afterwards.
* ``avx2``: the same register tiles on CPUs without VNNI (``_simd.madd_tile``): weights packed 2 k's per channel
  and sign-extended to int16 as they are loaded, activations quantized straight into int16, ``pmaddwd`` sums each
  pair of products into int32 exactly (``pmaddubsw``, u8 x s8, would saturate at 2 * 255 * 127); panels of 16
  channels, tiles of up to 4 rows x 64 channels, the weights read once per tile as in ``dense_f32``.
* ``portable``: plain Numba with explicit int32 casts, weights stored transposed ``[N, K]`` so each output is a
  contiguous dot product over 4 rows at once (any CPU; several times slower than ``avx2`` where both run).

The path is picked per kernel: ``path="auto"`` (default) uses VNNI when the CPU has it, else AVX2, else portable,
unless ``set_default_path`` chose one; ``path="vnni"`` / ``"avx2"`` / ``"portable"`` force one. All give identical
int32 accumulators, hence bit-identical outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from leanserve.kernels._simd import (AVX2_TILE_NV, LANES, MAX_MR, PANEL, has_avx2, has_avx512_vnni, madd_tile,
                                      pack_panels, vnni_tile)
from leanserve.kernels.activations import activate_row, activation_code
from leanserve.kernels.formats import (KernelInputError, LayerKernel, check_activation, meta_activation, meta_int,
                                       stored_array)
from leanserve.kernels.quantize import quantize_rows, quantize_rows_u8, quantize_weights_per_channel

PATHS = ("auto", "vnni", "avx2", "portable")
_default_path = "auto"


def set_default_path(path: str) -> None:
    """Choose what ``path="auto"`` resolves to for kernels built afterwards: "auto" (CPU features), "vnni", "avx2"
    or "portable"."""
    global _default_path
    if path not in PATHS:
        raise KernelInputError(f"unknown int8 path {path!r}; choose one of {PATHS}")
    _default_path = path


def resolve_path(path: str = "auto") -> str:
    """The concrete path ("vnni", "avx2" or "portable") a kernel built with ``path`` will use on this machine."""
    if path not in PATHS:
        raise KernelInputError(f"unknown int8 path {path!r}; choose one of {PATHS}")
    if path == "auto":
        path = _default_path
    if path == "auto":
        return "vnni" if has_avx512_vnni() else "avx2" if has_avx2() else "portable"
    if path == "vnni" and not has_avx512_vnni():
        raise KernelInputError("int8 path 'vnni' needs a CPU with AVX512_VNNI")
    if path == "avx2" and not has_avx2():
        raise KernelInputError("int8 path 'avx2' needs a CPU with AVX2")
    return path


@njit(nogil=True, cache=True)
def vnni_accumulate(x: np.ndarray, wp: np.ndarray, wsum128: np.ndarray, acc: np.ndarray, xscale: np.ndarray) -> None:
    """Quantize ``x`` per row (u8 + 128) and write exact signed int32 accumulators ``acc[B, N]`` using vpdpbusd.

    ``wp`` is ``pack_panels(qw padded to Kp = ceil(K/4)*4 rows, group=4)`` (int8); ``wsum128[n] = 128 * sum_k
    qw[k, n]``. Only compile this on a CPU with AVX512_VNNI."""
    B, K = x.shape
    N = acc.shape[1]
    kp = (K + 3) // 4 * 4
    kg = kp // 4
    xu = np.empty((B, kp), dtype=np.uint8)
    quantize_rows_u8(x, xu, xscale)
    tile = np.empty(MAX_MR * PANEL, dtype=np.int32)
    for n0 in range(0, N, PANEL):
        width = min(PANEL, N - n0)
        nv = (width + LANES - 1) // LANES
        w_off = n0 * kg  # int32 words before this panel (earlier panels are full)
        for r0 in range(0, B, MAX_MR):
            mr = min(MAX_MR, B - r0)
            vnni_tile(xu, r0 * kg, kg, wp, w_off, nv * LANES, LANES, tile, kg, mr, nv)
            for r in range(mr):
                base = r * nv * LANES
                for j in range(width):
                    acc[r0 + r, n0 + j] = tile[base + j] - wsum128[n0 + j]


@njit(nogil=True, cache=True)
def avx2_accumulate(x: np.ndarray, wp: np.ndarray, acc: np.ndarray, xscale: np.ndarray) -> None:
    """Quantize ``x`` per row (into int16) and write exact int32 accumulators ``acc[B, N]`` with pmaddwd tiles.

    ``wp`` is ``pack_panels(qw padded to Kp = ceil(K/2)*2 rows, group=2, panel=LANES)`` (int8): one 16-channel
    panel per tile vector. Only compile this on a CPU with AVX2."""
    B, K = x.shape
    N = acc.shape[1]
    kg = (K + 1) // 2
    xs = np.empty((B, 2 * kg), dtype=np.int16)
    quantize_rows(x, xs, xscale)  # the int8 values, held as int16 (the tail is zeroed)
    tile = np.empty(MAX_MR * PANEL, dtype=np.int32)
    vectors = (N + LANES - 1) // LANES
    width = AVX2_TILE_NV[min(MAX_MR, B)]
    vstride = LANES * kg  # int16 words per panel
    v0 = 0
    while v0 < vectors:
        nv = min(width, vectors - v0)
        c0 = v0 * LANES
        cols = min(nv * LANES, N - c0)
        for r0 in range(0, B, MAX_MR):
            mr = min(MAX_MR, B - r0)
            madd_tile(xs, r0 * kg, kg, wp, v0 * vstride, LANES, vstride, tile, kg, mr, nv)
            for r in range(mr):
                base = r * nv * LANES
                for j in range(cols):
                    acc[r0 + r, c0 + j] = tile[base + j]
        v0 += nv


@njit(nogil=True, cache=True)
def portable_accumulate(x: np.ndarray, qt: np.ndarray, acc: np.ndarray, xscale: np.ndarray) -> None:
    """Quantize ``x`` per row (signed int8) and write exact int32 accumulators ``acc[B, N]`` against the
    transposed int8 weights ``qt[N, K]`` (portable Numba; 4 rows share each weight load)."""
    B, K = x.shape
    N = qt.shape[0]
    xq = np.empty((B, K), dtype=np.int8)
    quantize_rows(x, xq, xscale)
    r0 = 0
    while r0 + 4 <= B:
        x0, x1, x2, x3 = xq[r0], xq[r0 + 1], xq[r0 + 2], xq[r0 + 3]
        for n in range(N):
            w = qt[n]
            a0 = np.int32(0)
            a1 = np.int32(0)
            a2 = np.int32(0)
            a3 = np.int32(0)
            for k in range(K):
                wk = np.int32(w[k])
                a0 = np.int32(a0 + np.int32(x0[k]) * wk)
                a1 = np.int32(a1 + np.int32(x1[k]) * wk)
                a2 = np.int32(a2 + np.int32(x2[k]) * wk)
                a3 = np.int32(a3 + np.int32(x3[k]) * wk)
            acc[r0, n] = a0
            acc[r0 + 1, n] = a1
            acc[r0 + 2, n] = a2
            acc[r0 + 3, n] = a3
        r0 += 4
    for r in range(r0, B):
        xr = xq[r]
        for n in range(N):
            w = qt[n]
            a = np.int32(0)
            for k in range(K):
                a = np.int32(a + np.int32(xr[k]) * np.int32(w[k]))
            acc[r, n] = a


@njit(nogil=True, cache=True)
def dequant_epilogue(
    acc: np.ndarray, xscale: np.ndarray, wscale: np.ndarray, bias: np.ndarray, code: int, out: np.ndarray
) -> None:
    """``out[r, n] = act(acc[r, n] * xscale[r] * wscale[n] + bias[n])``."""
    B, N = acc.shape
    for r in range(B):
        s = xscale[r]
        row = out[r]
        for n in range(N):
            row[n] = np.float32(acc[r, n]) * (s * wscale[n]) + bias[n]
        activate_row(row, code)


@njit(nogil=True, cache=True)
def _buffers(rows: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The int32 accumulators ``[rows, channels]`` and per-row activation scales every path fills."""
    return np.empty((rows, channels), dtype=np.int32), np.empty(rows, dtype=np.float32)


@njit(nogil=True, cache=True)
def _dequantized(acc: np.ndarray, xscale: np.ndarray, wscale: np.ndarray, bias: np.ndarray, code: int) -> np.ndarray:
    """The shared epilogue as a new float32 array: ``act(acc * xscale * wscale + bias)``."""
    out = np.empty(acc.shape, dtype=np.float32)
    dequant_epilogue(acc, xscale, wscale, bias, code, out)
    return out


@njit(nogil=True, cache=True)
def vnni_forward(x, wp, wsum128, wscale, bias, code):  # type: ignore[no-untyped-def]
    """Fused int8 layer on the VNNI path: quantize, vpdpbusd accumulate, dequantize + bias + activation."""
    acc, xscale = _buffers(x.shape[0], wscale.shape[0])
    vnni_accumulate(x, wp, wsum128, acc, xscale)
    return _dequantized(acc, xscale, wscale, bias, code)


@njit(nogil=True, cache=True)
def avx2_forward(x, wp, wscale, bias, code):  # type: ignore[no-untyped-def]
    """Fused int8 layer on the AVX2 path."""
    acc, xscale = _buffers(x.shape[0], wscale.shape[0])
    avx2_accumulate(x, wp, acc, xscale)
    return _dequantized(acc, xscale, wscale, bias, code)


@njit(nogil=True, cache=True)
def portable_forward(x, qt, wscale, bias, code):  # type: ignore[no-untyped-def]
    """Fused int8 layer on the portable path."""
    acc, xscale = _buffers(x.shape[0], wscale.shape[0])
    portable_accumulate(x, qt, acc, xscale)
    return _dequantized(acc, xscale, wscale, bias, code)


class Int8(LayerKernel):
    """int8 dense layer: per-channel weight scales, per-row dynamic activation scales, int32 accumulation."""

    format = "int8"

    def __init__(self, q: np.ndarray, scales: np.ndarray, bias: np.ndarray, activation: str, path: str = "auto"):
        q = np.ascontiguousarray(q, dtype=np.int8)
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if q.ndim != 2 or scales.shape != (q.shape[1],) or bias.shape != (q.shape[1],):
            raise KernelInputError(f"q [K, N], scales [N], bias [N] expected; got {q.shape}, {scales.shape}, {bias.shape}")
        self.activation = check_activation(activation)
        self.in_features, self.out_features = (int(d) for d in q.shape)
        self.requested_path = path
        self.path = resolve_path(path)
        self._q, self._scales, self._bias = q, scales, bias
        self._code = activation_code(activation)
        if self.path == "vnni":
            kp = -(-self.in_features // 4) * 4
            padded = np.zeros((kp, self.out_features), dtype=np.int8)
            padded[: self.in_features] = q
            self._packed = pack_panels(padded, group=4)
            self._wsum128 = (128 * q.astype(np.int32).sum(axis=0)).astype(np.int32)
        elif self.path == "avx2":
            padded = np.zeros((-(-self.in_features // 2) * 2, self.out_features), dtype=np.int8)
            padded[: self.in_features] = q
            self._packed = pack_panels(padded, group=2, panel=LANES)
        else:
            self._qt = np.ascontiguousarray(q.T)

    @classmethod
    def from_dense(cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any) -> "Int8":
        """Quantize fp32 ``weights[K, N]`` per output channel. Option: ``path`` ("auto", "vnni", "portable")."""
        q, scales = quantize_weights_per_channel(weights)
        return cls(q, scales, bias, activation, **options)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "Int8":
        k, n = meta_int(meta, "in_features"), meta_int(meta, "out_features")
        path = meta.get("path", "auto")
        if not isinstance(path, str):
            raise KernelInputError(f"layer meta 'path' must be one of {PATHS}, got {path!r}")
        q = stored_array(arrays, "q", (np.int8,), (k, n))
        scales = stored_array(arrays, "scales", (np.float32,), (n,))
        bias = stored_array(arrays, "bias", (np.float32,), (n,))
        return cls(q, scales, bias, meta_activation(meta), path)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"q": self._q, "scales": self._scales, "bias": self._bias}

    def meta(self) -> dict[str, Any]:
        # The requested path, not the resolved one: a model saved on a VNNI machine must load elsewhere.
        return {
            "activation": self.activation,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "path": self.requested_path,
        }

    def dense_weights(self) -> np.ndarray:
        return self._q.astype(np.float32) * self._scales

    def bias_vector(self) -> np.ndarray:
        return self._bias

    def accumulators(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact int32 accumulators ``[B, N]`` and per-row activation scales ``[B]`` for C-contiguous
        float32 ``x`` (for tests: they must equal ``quantized_x.astype(int32) @ q.astype(int32)``)."""
        acc = np.empty((x.shape[0], self.out_features), dtype=np.int32)
        xscale = np.empty(x.shape[0], dtype=np.float32)
        if self.path == "vnni":
            vnni_accumulate(x, self._packed, self._wsum128, acc, xscale)
        elif self.path == "avx2":
            avx2_accumulate(x, self._packed, acc, xscale)
        else:
            portable_accumulate(x, self._qt, acc, xscale)
        return acc, xscale

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.path == "vnni":
            return vnni_forward(x, self._packed, self._wsum128, self._scales, self._bias, self._code)
        if self.path == "avx2":
            return avx2_forward(x, self._packed, self._scales, self._bias, self._code)
        return portable_forward(x, self._qt, self._scales, self._bias, self._code)
