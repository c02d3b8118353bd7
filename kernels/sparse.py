"""Sparse weight formats: importing this module registers ``csr_f32``, ``csr_int8``, ``bsr_f32``, ``bsr_int8``.

Layouts, block axes and kernel choices are documented in ``sparse_common``, ``sparse_csr`` and ``sparse_bsr``.
"""

from __future__ import annotations

from leanserve.kernels.sparse_bsr import BsrF32, BsrInt8
from leanserve.kernels.sparse_csr import CsrF32, CsrInt8

__all__ = ["BsrF32", "BsrInt8", "CsrF32", "CsrInt8"]
