"""How many threads BLAS (OpenBLAS, MKL) may use in a leanserve process.

The runtime calls GEMM for the batch sizes the tuner gave to BLAS (kernels/dense.py), from several request threads at
once: a multithreaded BLAS would then run more threads than cores, and OpenBLAS' idle threads spin. One thread per
call is the server default (``Settings.blas_threads``); the tuner measures under the same limit it serves with.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def limit_blas_threads(threads: int) -> None:
    """Limit every BLAS library loaded in this process (and loaded later by numpy) to ``threads`` threads."""
    threadpool_limits(limits=threads, user_api="blas")
