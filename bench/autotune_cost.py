"""What load-time format tuning costs: seconds of ``autotune`` per layer shape, with warm kernels.

Moved here from the test suite (a pass/fail threshold on time flakes on a shared machine). Prints one line per
layer shape: the median of ``--repeats`` tuning runs after one run that compiles or loads the kernels.

    python bench/autotune_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from leanserve.kernels import autotune

SHAPES = [(128, 64), (1000, 128), (1024, 1024)]
CANDIDATES = [("dense_f32", {}), ("int8", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'layer':>12}  {'seconds per autotune (median)':>30}")
    for k, n in SHAPES:
        w = rng.standard_normal((k, n)).astype(np.float32)
        b = np.zeros(n, np.float32)
        autotune(w, b, "linear", CANDIDATES)  # JIT / cache load
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            autotune(w, b, "linear", CANDIDATES)
            times.append(time.perf_counter() - t0)
        print(f"{k:>5} x {n:<5}  {float(np.median(times)):>30.4f}")


if __name__ == "__main__":
    main()
