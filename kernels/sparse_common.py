"""Packing and epilogues shared by the sparse formats (``sparse_csr``, ``sparse_bsr``).

Orientation: every sparse format stores ``W[K, N]`` *by output channel* (the rows of ``W^T``), so one stored row
produces one output (or one block of ``c`` outputs) and accumulates in registers; no scatter into ``y``.

Blocks: ``block=(r, c)`` means ``r`` consecutive **inputs** (rows of ``W``, the K axis) by ``c`` consecutive
**outputs** (columns of ``W``, the N axis), the same orientation as ``W``'s Keras layout. CSR is ``(1, 1)``.
A block is stored whole (zeros included) iff it holds any nonzero. ``K`` and ``N`` are zero padded up to
multiples of ``r`` and ``c``; stored values are ``[nblocks, r, c]`` so a block's ``r`` (for ``c == 1``) or its
``c`` values per input (for ``c > 1``) are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from leanserve.kernels.activations import activate_row


def index_dtype(limit: int) -> np.dtype:
    """Smallest unsigned index dtype that can address ``limit`` items (storage size matters)."""
    return np.dtype(np.uint16) if limit <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass(frozen=True)
class BlockSparse:
    """Block-row sparse arrays of ``W^T``: row ``j`` = outputs ``[j*c, (j+1)*c)``, column = input block."""

    indptr: np.ndarray  # int32 [n_block_rows + 1]
    indices: np.ndarray  # uint16 / uint32 [nblocks]: input block index
    values: np.ndarray  # [nblocks, r, c]


def pack_blocks(w: np.ndarray, r: int, c: int) -> BlockSparse:
    """Pack ``w[K, N]`` (any dtype) into ``BlockSparse`` keeping every block that holds a nonzero."""
    K, N = w.shape
    kb, nb = -(-K // r), -(-N // c)
    padded = np.zeros((kb * r, nb * c), dtype=w.dtype)
    padded[:K, :N] = w
    blocks = padded.reshape(kb, r, nb, c).transpose(2, 0, 1, 3)  # [nb, kb, r, c]
    keep = (blocks != 0).any(axis=(2, 3))
    rows, cols = np.nonzero(keep)  # row-major order: sorted by output block, then input block
    indptr = np.zeros(nb + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return BlockSparse(indptr, cols.astype(index_dtype(kb)), np.ascontiguousarray(blocks[rows, cols]))


def unpack_blocks(bs: BlockSparse, K: int, N: int) -> np.ndarray:
    """Inverse of ``pack_blocks``: the dense ``[K, N]`` matrix."""
    _, r, c = bs.values.shape
    kb, nb = -(-K // r), bs.indptr.shape[0] - 1
    blocks = np.zeros((nb, kb, r, c), dtype=bs.values.dtype)
    rows = np.repeat(np.arange(nb), np.diff(bs.indptr))
    blocks[rows, bs.indices.astype(np.int64)] = bs.values
    return np.ascontiguousarray(blocks.transpose(1, 2, 0, 3).reshape(kb * r, nb * c)[:K, :N])


def check_block_arrays(indptr: np.ndarray, indices: np.ndarray, n_rows: int, n_cols: int) -> None:
    """Validate loaded index arrays so a corrupt file cannot make a kernel read out of bounds."""
    if indptr.shape != (n_rows + 1,) or indptr[0] != 0 or np.any(np.diff(indptr.astype(np.int64)) < 0):
        raise ValueError("sparse indptr is malformed")
    if indptr[-1] != indices.shape[0]:
        raise ValueError("sparse indptr does not match the number of stored entries")
    if indices.size and int(indices.max()) >= n_cols:
        raise ValueError("sparse column index out of range")


@njit(nogil=True, cache=True)
def epilogue_f32(acc: np.ndarray, transposed: bool, bias: np.ndarray, code: int, out: np.ndarray) -> None:
    """``out[b, n] = act(acc[b, n] + bias[n])`` (``acc[n, b]`` if ``transposed``; extra padding is ignored)."""
    B, N = out.shape
    for b in range(B):
        row = out[b]
        if transposed:
            for n in range(N):
                row[n] = acc[n, b] + bias[n]
        else:
            for n in range(N):
                row[n] = acc[b, n] + bias[n]
        activate_row(row, code)


@njit(nogil=True, cache=True)
def epilogue_int(acc: np.ndarray, transposed: bool, x_scales: np.ndarray, w_scales: np.ndarray, bias: np.ndarray,
                 code: int, out: np.ndarray) -> None:
    """``out[b, n] = act(acc[b, n] * x_scales[b] * w_scales[n] + bias[n])`` from int32 accumulators
    (``acc[n, b]`` if ``transposed``; extra padding is ignored)."""
    B, N = out.shape
    for b in range(B):
        row = out[b]
        xs = x_scales[b]
        if transposed:
            for n in range(N):
                row[n] = np.float32(acc[n, b]) * (xs * w_scales[n]) + bias[n]
        else:
            for n in range(N):
                row[n] = np.float32(acc[b, n]) * (xs * w_scales[n]) + bias[n]
        activate_row(row, code)
