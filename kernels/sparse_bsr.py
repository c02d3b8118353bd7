"""Block-sparse formats: ``bsr_f32`` and ``bsr_int8`` (block rows of ``W^T``; see ``sparse_common`` for axes).

``block=(r, c)``: ``r`` consecutive inputs (K axis) x ``c`` consecutive outputs (N axis).

* ``bsr_f32``: ``c == 1`` with ``r`` in 4, 8, 16 (a block is a contiguous slice of ``x`` dotted with ``r``
  weights: ``_sparse_simd.bsr_dot_f32``), or ``c`` in 4, 8, 16 with any ``r`` (each input broadcast onto ``c``
  output lanes: ``bsr_bcast_f32``). Up to 4 batch rows share every weight load.
* ``bsr_int8``: ``c`` in 4, 8, 16 with any ``r`` (each int8 activation broadcast onto ``c`` output lanes, exact
  int32 accumulation: ``bsr_bcast_i8``), or ``c == 1`` with ``r`` in 4, 8, 16, 32, 64. With AVX512_VNNI, ``c == 1``
  and ``r >= 16`` runs ``vpdpbusd`` on u8
  activations (``q + 128``; the kernel subtracts ``128 * sum(q_w)`` per channel); other shapes and CPUs use the
  portable path (no VNNI): 4-row block dots (``_csr_simd.bsr_dot_i8``: ``pmaddwd`` on AVX2 from 16-byte blocks,
  else sign-extending int32 multiply-adds) up to ``portable_lanes_min_batch(r)`` rows, from there the batch-lane
  kernel shared with csr_int8 (``sparse_csr.int_lanes`` with ``r`` consecutive inputs per stored block).

Which blocks win is measured, not assumed: ``bench/kernels.py`` times every block shape on this machine's CPU, and
the load-time autotuner (``server/runtime/tuning.py``) picks per layer. In those measurements bsr_int8 ``(r, 1)``
on VNNI has been the fastest sparse format; without VNNI ``(16, 1)`` and ``(8, 1)`` are close and ``(4, 1)`` lags at
batch 1. bsr_int8 ``(1, 16)`` (two inputs per ``pmaddwd`` on AVX2) runs about as fast as bsr_f32 ``(1, 16)`` from a
quarter of the bytes (ahead on layers of a few thousand channels, behind on small ones); it is the int8 block for layers
whose inputs must be pruned one by one (e.g. raw features, where ``(16, 1)`` tiles would drop informative inputs in
groups).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from leanserve.kernels._csr_simd import bsr_dot_i8
from leanserve.kernels._simd import has_avx2, has_avx512_vnni, has_avx512f
from leanserve.kernels._sparse_simd import MAX_MR, VNNI_WIDTHS, bsr_bcast_f32, bsr_bcast_i8, bsr_dot_f32, bsr_dot_vnni
from leanserve.kernels.activations import activation_code
from leanserve.kernels.formats import (KernelInputError, LayerKernel, check_activation, meta_activation, meta_int,
                                       meta_value, stored_array)
from leanserve.kernels.quantize import quantize_rows, quantize_rows_u8, quantize_weights_per_channel
from leanserve.kernels.sparse_common import (INDEX_DTYPES, INDPTR_DTYPES, BlockSparse, check_block_arrays, epilogue_f32,
                                             epilogue_int, index_dtype, pack_blocks, unpack_blocks)
from leanserve.kernels.sparse_csr import int_lanes

F32_BLOCKS: tuple[tuple[int, int], ...] = ((4, 1), (8, 1), (16, 1), (1, 4), (1, 8), (1, 16), (4, 4), (4, 16))
INT8_BLOCKS: tuple[tuple[int, int], ...] = ((4, 1), (8, 1), (16, 1), (32, 1), (64, 1), (1, 8), (1, 16), (2, 16))
HAS_VNNI: bool = has_avx512_vnni()
#: "never": batch sizes reach no such number
_NEVER = 1 << 62


def portable_lanes_min_batch(r: int) -> int:
    """Portable bsr_int8 ``(r, 1)``: the batch size from which the batch-lane kernel beats 4-row block dots on this
    CPU (measured crossovers). With AVX-512 the lanes kernel's 16 batch lanes fill one register: from 2 rows. With
    AVX2 only they take two, and block dots of 16 bytes or more multiply with ``pmaddwd`` (1.4-15x the lanes kernel
    at every batch up to 256, 768..4096 channels): those never hand over; narrower blocks do from 32 rows."""
    if has_avx512f():
        return 2
    return _NEVER if r >= 16 and has_avx2() else 32


def f32_block_supported(r: int, c: int) -> bool:
    """Block shapes ``bsr_f32`` has a kernel for (``F32_BLOCKS`` lists the measured ones)."""
    return (c == 1 and r in (4, 8, 16)) or (c in (4, 8, 16) and r >= 1)


def int8_block_supported(r: int, c: int) -> bool:
    """Block shapes ``bsr_int8`` has a kernel for (``INT8_BLOCKS`` lists the measured ones)."""
    return (c == 1 and r in (4, 8, 16, 32, 64)) or (c in (4, 8, 16) and r >= 1)


@njit(nogil=True, cache=True)
def pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` itself if it already has ``width`` columns, else a zero-padded copy."""
    B, K = x.shape
    if K == width:
        return x
    out = np.zeros((B, width), dtype=x.dtype)
    out[:, :K] = x
    return out


@njit(nogil=True, cache=True)
def bsr_f32_accumulate(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, x: np.ndarray, r: int,
                       c: int, acc: np.ndarray) -> None:
    """``acc[B, Np] = x[B, Kp] @ W`` (padded) for fp32 BSR blocks ``(r, c)``, 4 batch rows per register tile."""
    B, ldx = x.shape
    ldo = acc.shape[1]
    for b in range(0, B, MAX_MR):
        mr = min(MAX_MR, B - b)
        xs = x[b:]
        for j in range(indptr.shape[0] - 1):
            if c == 1:
                bsr_dot_f32(indices, values, indptr[j], indptr[j + 1], xs, ldx, mr, r, acc, b * ldo + j, ldo)
            else:
                bsr_bcast_f32(indices, values, indptr[j], indptr[j + 1], xs, ldx, mr, r, c, acc, b * ldo + j * c,
                              ldo)


@njit(nogil=True, cache=True)
def bsr_f32_forward(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, bias: np.ndarray, code: int,
                    x: np.ndarray, r: int, c: int) -> np.ndarray:
    """``act(x @ W + b)`` for fp32 BSR weights."""
    B = x.shape[0]
    nbr = indptr.shape[0] - 1
    kp = (x.shape[1] + r - 1) // r * r
    acc = np.empty((B, nbr * c), dtype=np.float32)
    bsr_f32_accumulate(indptr, indices, values, pad_columns(x, kp), r, c, acc)
    out = np.empty((B, bias.shape[0]), dtype=np.float32)
    epilogue_f32(acc, False, bias, code, out)
    return out


@njit(nogil=True, cache=True)
def bsr_int8_accumulate_portable(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, xq: np.ndarray,
                                 r: int, lanes_min_batch: int) -> np.ndarray:
    """Exact int32 ``xq[B, Kp] @ W`` for int8 ``(r, 1)`` blocks (``values`` flat ``[nblocks * r]``) without VNNI:
    block dots (``bsr_dot_i8``, 4 rows per pass) below ``lanes_min_batch`` rows, batch lanes (``int_lanes``)
    from there on."""
    B, ldx = xq.shape
    N = indptr.shape[0] - 1
    acc = np.empty((B, N), dtype=np.int32)
    if B >= lanes_min_batch:
        acc_t = np.empty((N, (B + 15) // 16 * 16), dtype=np.int32)
        int_lanes(indptr, indices, values, xq, r, acc_t)
        for b in range(B):
            for n in range(N):
                acc[b, n] = acc_t[n, b]
        return acc
    for b in range(0, B, MAX_MR):
        mr = min(MAX_MR, B - b)
        xs = xq[b:]
        for n in range(N):
            bsr_dot_i8(indices, values, indptr[n], indptr[n + 1], xs, ldx, mr, r, acc, b * N + n, N)
    return acc


@njit(nogil=True, cache=True)
def bsr_int8_accumulate_vnni(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, xu8: np.ndarray,
                             r: int, wsum: np.ndarray) -> np.ndarray:
    """Exact int32 ``(xu8 - 128) @ W`` for int8 ``(r, 1)`` blocks, ``r`` in 16/32/64, with ``vpdpbusd``;
    ``wsum[n]`` is the sum of channel ``n``'s stored weights."""
    B, ldx = xu8.shape
    N = indptr.shape[0] - 1
    acc = np.empty((B, N), dtype=np.int32)
    for b in range(0, B, MAX_MR):
        mr = min(MAX_MR, B - b)
        xs = xu8[b:]
        for n in range(N):
            bsr_dot_vnni(indices, values, indptr[n], indptr[n + 1], xs, ldx, mr, r, acc, b * N + n, N)
    for b in range(B):
        for n in range(N):
            acc[b, n] = np.int32(acc[b, n] - np.int32(128) * wsum[n])
    return acc


@njit(nogil=True, cache=True)
def bsr_int8_accumulate_lanes(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, xq: np.ndarray, r: int,
                              c: int) -> np.ndarray:
    """Exact int32 ``xq[B, Kp] @ W`` ``[B, nbr * c]`` (padded) for int8 ``(r, c)`` blocks, ``c`` in 4/8/16."""
    B, ldx = xq.shape
    nbr = indptr.shape[0] - 1
    acc = np.empty((B, nbr * c), dtype=np.int32)
    for b in range(0, B, MAX_MR):
        mr = min(MAX_MR, B - b)
        xs = xq[b:]
        for j in range(nbr):
            bsr_bcast_i8(indices, values, indptr[j], indptr[j + 1], xs, ldx, mr, r, c, acc, b * nbr * c + j * c,
                         nbr * c)
    return acc


@njit(nogil=True, cache=True)
def bsr_int8_forward(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, scales: np.ndarray,
                     bias: np.ndarray, code: int, x: np.ndarray, r: int, c: int, lanes_min_batch: int) -> np.ndarray:
    """``act(dequant(quant(x) @ Wq) + b)`` for int8 ``(r, c)`` BSR weights (dynamic per-row activations),
    portable path (no VNNI); ``(r, 1)`` blocks run the batch-lane kernel from ``lanes_min_batch`` rows."""
    B, K = x.shape
    kp = (K + r - 1) // r * r
    xs = np.empty(B, dtype=np.float32)
    xq = np.empty((B, kp), dtype=np.int8)
    quantize_rows(x, xq, xs)
    if c > 1:
        acc = bsr_int8_accumulate_lanes(indptr, indices, values, xq, r, c)
    else:
        acc = bsr_int8_accumulate_portable(indptr, indices, values, xq, r, lanes_min_batch)
    out = np.empty((B, bias.shape[0]), dtype=np.float32)
    epilogue_int(acc, False, xs, scales, bias, code, out)
    return out


# A separate function, never referenced by the portable one: LLVM cannot lower vpdpbusd on a CPU without
# AVX512_VNNI, so it must only be compiled where ``HAS_VNNI`` holds.
@njit(nogil=True, cache=True)
def bsr_int8_forward_vnni(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, wsum: np.ndarray,
                          scales: np.ndarray, bias: np.ndarray, code: int, x: np.ndarray, r: int) -> np.ndarray:
    """``bsr_int8_forward`` for ``(r, 1)`` blocks with ``vpdpbusd`` (AVX512_VNNI only)."""
    B, K = x.shape
    kp = (K + r - 1) // r * r
    xs = np.empty(B, dtype=np.float32)
    xu8 = np.empty((B, kp), dtype=np.uint8)
    quantize_rows_u8(x, xu8, xs)
    acc = bsr_int8_accumulate_vnni(indptr, indices, values, xu8, r, wsum)
    out = np.empty((B, bias.shape[0]), dtype=np.float32)
    epilogue_int(acc, False, xs, scales, bias, code, out)
    return out


def _block_option(block: Any) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in block)
    except (TypeError, ValueError):
        raise KernelInputError(f"block must be a pair (r, c), got {block!r}") from None
    return r, c


def _stored(arrays: dict[str, np.ndarray], meta: dict[str, Any], value_dtype: type, supported: Any,
            scaled: bool) -> tuple[Any, ...]:
    """The checked arrays of a stored BSR layer: (BlockSparse, [scales,] bias, activation, in_features)."""
    k, n = meta_int(meta, "in_features"), meta_int(meta, "out_features")
    block = meta_value(meta, "block")
    if not isinstance(block, (list, tuple)) or len(block) != 2:
        raise KernelInputError(f"layer meta 'block' must be a pair [r, c], got {block!r}")
    # r beyond max(K, 64) only pads x further (ceil(K / r) * r columns per row): refused, never allocated
    r = meta_int({"r": block[0]}, "r", 1, max(k, 64))
    c = meta_int({"c": block[1]}, "c", 1, 16)
    if not supported(r, c):
        raise KernelInputError(f"no kernel for block ({r}, {c})")
    indptr = stored_array(arrays, "indptr", INDPTR_DTYPES, (-(-n // c) + 1,))
    indices = stored_array(arrays, "indices", INDEX_DTYPES, (None,))
    values = stored_array(arrays, "values", (value_dtype,), (None, r, c))
    check_block_arrays(indptr, indices, -(-n // c), -(-k // r), values)
    scales = (stored_array(arrays, "scales", (np.float32,), (n,)),) if scaled else ()
    bias = stored_array(arrays, "bias", (np.float32,), (n,))
    return (BlockSparse(indptr, indices, values), *scales, bias, meta_activation(meta), k)


class _BsrBase(LayerKernel):
    def __init__(self, bs: BlockSparse, bias: np.ndarray, activation: str, in_features: int) -> None:
        if np.ndim(bias) != 1 or np.ndim(bs.values) != 3:
            raise KernelInputError(f"bias [N] and values [nblocks, r, c] expected, got shapes {list(np.shape(bias))} "
                                   f"and {list(np.shape(bs.values))}")
        self.in_features = int(in_features)
        self.out_features = int(bias.shape[0])
        self.activation = check_activation(activation)
        _, self.r, self.c = (int(v) for v in bs.values.shape)
        kb = -(-self.in_features // self.r)
        check_block_arrays(bs.indptr, bs.indices, -(-self.out_features // self.c), kb, bs.values)
        self.indptr = np.ascontiguousarray(bs.indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(bs.indices, dtype=index_dtype(kb))
        self.values = np.ascontiguousarray(bs.values)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self._flat = self.values.reshape(-1)
        self._code = activation_code(activation)

    @property
    def block(self) -> tuple[int, int]:
        """``(r, c)``: inputs x outputs per block."""
        return self.r, self.c

    @property
    def nblocks(self) -> int:
        """Number of stored blocks."""
        return int(self.values.shape[0])

    def _bs(self) -> BlockSparse:
        return BlockSparse(self.indptr, self.indices, self.values)

    def bias_vector(self) -> np.ndarray:
        return self.bias.copy()

    def meta(self) -> dict[str, Any]:
        return {"format": self.format, "activation": self.activation, "in_features": self.in_features,
                "out_features": self.out_features, "block": [self.r, self.c]}


class BsrF32(_BsrBase):
    """fp32 block-sparse layer; ``block=(r, c)`` = ``r`` inputs x ``c`` outputs (default ``(1, 16)``)."""

    format = "bsr_f32"

    def __init__(self, bs: BlockSparse, bias: np.ndarray, activation: str, in_features: int) -> None:
        r, c = bs.values.shape[1:]
        if not f32_block_supported(r, c):
            raise KernelInputError(f"bsr_f32 has no kernel for block ({r}, {c}); use one of {F32_BLOCKS}")
        super().__init__(bs, bias, activation, in_features)

    @classmethod
    def from_dense(cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any) -> "BsrF32":
        """Store every ``(r, c)`` block of fp32 ``weights[K, N]`` holding a nonzero; option ``block``."""
        r, c = _block_option(options.pop("block", (1, 16)))
        if options:
            raise TypeError(f"bsr_f32 got unknown options {sorted(options)}")
        if not f32_block_supported(r, c):
            raise KernelInputError(f"bsr_f32 has no kernel for block ({r}, {c}); use one of {F32_BLOCKS}")
        w = np.asarray(weights, dtype=np.float32)
        return cls(pack_blocks(w, r, c), np.asarray(bias, np.float32), activation, w.shape[0])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "BsrF32":
        return cls(*_stored(arrays, meta, np.float32, f32_block_supported, scaled=False))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "values": self.values, "bias": self.bias}

    def dense_weights(self) -> np.ndarray:
        return unpack_blocks(self._bs(), self.in_features, self.out_features)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return bsr_f32_forward(self.indptr, self.indices, self._flat, self.bias, self._code, x, self.r, self.c)


class BsrInt8(_BsrBase):
    """int8 block-sparse layer, ``block=(r, c)`` (default ``(16, 1)``): per-channel weight scales, dynamic
    per-row activation quantization, int32 accumulation (VNNI for ``(r, 1)`` blocks when available)."""

    format = "bsr_int8"

    def __init__(self, bs: BlockSparse, scales: np.ndarray, bias: np.ndarray, activation: str,
                 in_features: int) -> None:
        if not int8_block_supported(*bs.values.shape[1:]):
            raise KernelInputError(f"bsr_int8 has no kernel for block {bs.values.shape[1:]}; use one of "
                                   f"{INT8_BLOCKS}")
        super().__init__(BlockSparse(bs.indptr, bs.indices, bs.values.astype(np.int8)), bias, activation,
                         in_features)
        self.scales = np.ascontiguousarray(scales, dtype=np.float32)
        if self.scales.shape != (self.out_features,):
            raise KernelInputError(f"bsr_int8 needs {self.out_features} scales, got shape {list(self.scales.shape)}")
        nbr = self.indptr.shape[0] - 1
        rows = np.repeat(np.arange(nbr), np.diff(self.indptr))
        self.wsum = np.bincount(rows, weights=self.values.sum(axis=(1, 2), dtype=np.int64),
                                minlength=nbr).astype(np.int32)
        self.use_vnni = HAS_VNNI and self.c == 1 and self.r in VNNI_WIDTHS
        self.lanes_min_batch = portable_lanes_min_batch(self.r)

    @classmethod
    def from_dense(cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any) -> "BsrInt8":
        """Quantize fp32 ``weights[K, N]`` per output channel; keep every ``(r, 1)`` block whose fp32 weights
        hold a nonzero. Option ``block`` (default ``(16, 1)``)."""
        r, c = _block_option(options.pop("block", (16, 1)))
        if options:
            raise TypeError(f"bsr_int8 got unknown options {sorted(options)}")
        if not int8_block_supported(r, c):
            raise KernelInputError(f"bsr_int8 has no kernel for block ({r}, {c}); use one of {INT8_BLOCKS}")
        w = np.asarray(weights, dtype=np.float32)
        q, scales = quantize_weights_per_channel(w)
        pattern = pack_blocks(w, r, c)
        kb, nb = -(-w.shape[0] // r), -(-w.shape[1] // c)
        padded = np.zeros((kb * r, nb * c), dtype=np.int8)
        padded[: w.shape[0], : w.shape[1]] = q
        rows = np.repeat(np.arange(nb), np.diff(pattern.indptr))
        values = padded.reshape(kb, r, nb, c)[pattern.indices.astype(np.int64), :, rows, :]
        bs = BlockSparse(pattern.indptr, pattern.indices, np.ascontiguousarray(values))
        return cls(bs, scales, np.asarray(bias, np.float32), activation, w.shape[0])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "BsrInt8":
        return cls(*_stored(arrays, meta, np.int8, int8_block_supported, scaled=True))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "values": self.values, "scales": self.scales,
                "bias": self.bias}

    def quantized_weights(self) -> np.ndarray:
        """The int8 ``[K, N]`` weights (zeros kept)."""
        return unpack_blocks(self._bs(), self.in_features, self.out_features)

    def dense_weights(self) -> np.ndarray:
        return self.quantized_weights().astype(np.float32) * self.scales

    def accumulators(self, xq: np.ndarray, vnni: bool | None = None, lanes_min_batch: int | None = None
                     ) -> np.ndarray:
        """Exact int32 ``xq @ Wq`` for int8 activations ``xq[B, K]``; ``vnni`` and ``lanes_min_batch`` force a
        path (for tests)."""
        vnni = self.use_vnni if vnni is None else (vnni and self.use_vnni)
        kp = -(-self.in_features // self.r) * self.r
        xq = pad_columns(np.ascontiguousarray(xq, dtype=np.int8), kp)
        if self.c > 1:
            acc = bsr_int8_accumulate_lanes(self.indptr, self.indices, self._flat, xq, self.r, self.c)
            return np.ascontiguousarray(acc[:, : self.out_features])
        if vnni:
            xu8 = (xq.astype(np.int16) + 128).astype(np.uint8)
            return bsr_int8_accumulate_vnni(self.indptr, self.indices, self._flat, xu8, self.r, self.wsum)
        return bsr_int8_accumulate_portable(self.indptr, self.indices, self._flat, xq, self.r,
                                            self.lanes_min_batch if lanes_min_batch is None else lanes_min_batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.use_vnni:
            return bsr_int8_forward_vnni(self.indptr, self.indices, self._flat, self.wsum, self.scales, self.bias,
                                         self._code, x, self.r)
        return bsr_int8_forward(self.indptr, self.indices, self._flat, self.scales, self.bias, self._code, x,
                                self.r, self.c, self.lanes_min_batch)
