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
from leanserve.kernels.formats import KernelInputError


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


#: dtypes a stored sparse layer's arrays may have (the writers use int32 offsets and uint16/uint32 indices; signed
#: index arrays are accepted and checked for negative entries)
INDPTR_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.int32), np.dtype(np.int64))
INDEX_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32), np.dtype(np.int64))
_MAX_STORED = int(np.iinfo(np.int32).max)


def check_block_arrays(indptr: np.ndarray, indices: np.ndarray, n_rows: int, n_cols: int,
                       values: np.ndarray | None = None) -> int:
    """Validate index arrays (and the number of stored ``values``) so that a corrupt file cannot make a kernel read
    out of bounds: ``indptr`` ``[n_rows + 1]`` starts at 0, never decreases and ends at the number of stored
    entries; every index is in ``[0, n_cols)``; ``values`` holds exactly that many entries along axis 0.
    Returns the number of stored entries; raises ``KernelInputError``."""
    for name, a, dtypes in (("indptr", indptr, INDPTR_DTYPES), ("indices", indices, INDEX_DTYPES)):
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype not in dtypes:
            got = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
            raise KernelInputError(f"sparse {name} must be a 1-D array of {', '.join(map(str, dtypes))}; got {got}")
    if indptr.shape[0] != n_rows + 1:
        raise KernelInputError(f"sparse indptr has {indptr.shape[0]} entries; expected {n_rows + 1}")
    offsets = indptr.astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise KernelInputError("sparse indptr is malformed (must start at 0 and never decrease)")
    nnz = int(offsets[-1])
    if nnz != indices.shape[0]:
        raise KernelInputError(f"sparse indptr ends at {nnz} but {indices.shape[0]} indices are stored")
    if nnz > _MAX_STORED:
        raise KernelInputError(f"sparse layer stores {nnz} entries; at most {_MAX_STORED} are supported")
    if nnz and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
        raise KernelInputError(f"sparse column index out of range [0, {n_cols})")
    if values is not None and (not isinstance(values, np.ndarray) or values.ndim < 1 or values.shape[0] != nnz):
        got = list(values.shape) if isinstance(values, np.ndarray) else type(values).__name__
        raise KernelInputError(f"sparse layer stores {nnz} entries but its values have shape {got}")
    return nnz


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
