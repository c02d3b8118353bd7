"""Process-wide settings a serving process applies once, before it loads a model: BLAS threads and malloc thresholds.

BLAS: the runtime calls GEMM for the batch sizes the tuner gave to BLAS (kernels/dense.py), from several request
threads at once: a multithreaded BLAS would then run more threads than cores, and OpenBLAS' idle threads spin. One
thread per call is the server default (``Settings.blas_threads``); the tuner measures under the same limit it serves
with.

malloc: gRPC's receive buffers, the bytes of a message and a request's tensors are allocated and freed once per
message. With glibc's defaults, a freed block above ``M_TRIM_THRESHOLD`` at the top of a thread's arena goes back to
the kernel at once and blocks above ``M_MMAP_THRESHOLD`` are mapped and unmapped each time, so every large message
page-faults its memory in again (zeroed by the kernel): for 1 MB stream messages that was about half of a bare
grpcio server's CPU. Raising both thresholds keeps such blocks in the heap for the next message. The cost is memory
that stays mapped after a burst: at most the trim threshold per arena above what is in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from threadpoolctl import threadpool_limits

from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def limit_blas_threads(threads: int) -> None:
    """Limit every BLAS library loaded in this process (and loaded later by numpy) to ``threads`` threads."""
    threadpool_limits(limits=threads, user_api="blas")


def tune_malloc(trim_threshold: int, mmap_threshold: int) -> bool:
    """Set glibc malloc's trim and mmap thresholds (bytes; 0 leaves one as it is). False, and nothing changed, where
    the C library is not glibc (e.g. musl) or refuses a value."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)):
        if value:
            ok = bool(mallopt(param, value)) and ok
    return ok


def apply_process_settings(settings: Settings) -> None:
    """BLAS threads and malloc thresholds from ``settings``, for this whole process (idempotent)."""
    limit_blas_threads(settings.blas_threads)
    if (settings.malloc_trim_threshold_bytes or settings.malloc_mmap_threshold_bytes) and not tune_malloc(
            settings.malloc_trim_threshold_bytes, settings.malloc_mmap_threshold_bytes):
        log.info("malloc thresholds not applied (not glibc, or values refused); large messages will page-fault")
