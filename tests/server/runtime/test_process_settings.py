"""Process-wide settings: malloc thresholds keep large per-message blocks in the heap; BLAS threads are limited."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from leanserve.server.settings import Settings

# Allocates and frees four 1 MiB blocks at once, 200 times (a server holds several copies of each 1 MB message: the
# received bytes, the parsed message, the tensor) and prints the minor page faults that costs: with glibc's defaults
# the blocks are trimmed from the heap when freed and faulted in again (zeroed by the kernel) each time.
_PROBE = textwrap.dedent("""
    import resource, sys
    from leanserve.server.runtime.process import apply_process_settings
    from leanserve.server.settings import Settings
    apply_process_settings(Settings(malloc_trim_threshold_bytes=int(sys.argv[1]),
                                    malloc_mmap_threshold_bytes=int(sys.argv[2])))
    for _ in range(3):
        [bytearray(1 << 20) for _ in range(4)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        [bytearray(1 << 20) for _ in range(4)]  # zero-filled: every page is touched
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(trim: int, mmap: int) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(trim), str(mmap)], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_default_malloc_thresholds_stop_large_blocks_from_faulting_in_again() -> None:
    defaults = Settings()
    tuned = _faults(defaults.malloc_trim_threshold_bytes, defaults.malloc_mmap_threshold_bytes)
    untuned = _faults(0, 0)  # 0 = glibc's own thresholds
    pages = 200 * 4 * (1 << 20) // 4096
    assert untuned > pages // 2, f"the probe should fault with glibc's defaults ({untuned} faults)"
    assert tuned < pages // 20, f"{tuned} minor faults for 200 x 4 reused 1 MiB blocks"


def test_malloc_thresholds_are_bounded_by_what_glibc_accepts() -> None:
    with pytest.raises(ValueError):
        Settings(malloc_mmap_threshold_bytes=64 * 1024 * 1024)
    with pytest.raises(ValueError):
        Settings(malloc_trim_threshold_bytes=-1)


def test_blas_is_limited_to_the_configured_threads() -> None:
    from threadpoolctl import threadpool_info

    from leanserve.server.runtime.process import apply_process_settings

    apply_process_settings(Settings(blas_threads=1))
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)
