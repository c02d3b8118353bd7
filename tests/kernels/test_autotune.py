import time

import numpy as np
import pytest

from leanserve.kernels.autotune import autotune, candidate_key
from leanserve.kernels.dense import DenseF32
from leanserve.kernels import register


@register
class _SlowDense(DenseF32):
    """A deliberately slow format, so the tuner has a known loser."""

    format = "test_slow_dense"

    def __call__(self, x):
        time.sleep(2e-4)
        return super().__call__(x)


def test_autotune_picks_fastest_and_records(rng):
    w = rng.standard_normal((100, 40)).astype(np.float32)
    b = np.zeros(40, np.float32)
    candidates = [("test_slow_dense", {}), ("dense_f32", {}), ("int8", {"path": "portable"})]
    fmt, options, record = autotune(w, b, "relu", candidates, batch_sizes=(1, 8), repeats=3)
    assert (fmt, options) != ("test_slow_dense", {})
    assert set(record) == {candidate_key(f, o) for f, o in candidates} == {
        "test_slow_dense[]", "dense_f32[]", "int8[path=portable]"
    }
    for times in record.values():
        assert set(times) == {1, 8} and all(t > 0 for t in times.values())
    assert record["test_slow_dense[]"][1] >= 2e-4
    best = min(record, key=lambda k: sum(record[k].values()))
    assert best == candidate_key(fmt, options)


def test_autotune_is_quick_for_small_layers(rng):
    w = rng.standard_normal((128, 64)).astype(np.float32)
    b = np.zeros(64, np.float32)
    candidates = [("dense_f32", {}), ("int8", {})]
    autotune(w, b, "linear", candidates)  # JIT / cache load
    t0 = time.perf_counter()
    autotune(w, b, "linear", candidates)
    assert time.perf_counter() - t0 < 0.5


def test_autotune_needs_candidates(rng):
    with pytest.raises(ValueError):
        autotune(np.ones((2, 2), np.float32), np.zeros(2, np.float32), "linear", [])
