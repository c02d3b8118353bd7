"""The autotuner: measures every candidate at every batch size and keeps a known-fastest one.

The known loser is a test-only format that sleeps 10 ms per call (``time.sleep`` sleeps at least that long), so
which candidate wins is decided by construction, not by how fast this machine is; the format is registered for
each test and removed afterwards. How long tuning takes is a benchmark (bench/autotune_cost.py), not a test.
"""

import time

import numpy as np
import pytest

from leanserve.kernels import autotune, available_formats, candidate_key, get_format, register, unregister
from leanserve.kernels.dense import DenseF32

SLEEP_SECONDS = 0.01


class _SlowDense(DenseF32):
    """A deliberately slow format, so the tuner has a known loser; counts its calls per batch size."""

    format = "test_slow_dense"
    calls: dict[int, int] = {}

    def __call__(self, x):
        _SlowDense.calls[x.shape[0]] = _SlowDense.calls.get(x.shape[0], 0) + 1
        time.sleep(SLEEP_SECONDS)
        return super().__call__(x)


@pytest.fixture
def slow_format():
    """``test_slow_dense`` registered for one test; the registry is as before afterwards."""
    before = available_formats()
    register(_SlowDense)
    _SlowDense.calls = {}
    yield _SlowDense.format
    unregister(_SlowDense.format)
    assert available_formats() == before


@pytest.mark.parametrize("slow_first", [True, False], ids=["slow-listed-first", "slow-listed-last"])
def test_autotune_picks_the_fast_candidate_and_records_every_one(rng, slow_format, slow_first):
    w = rng.standard_normal((100, 40)).astype(np.float32)
    b = np.zeros(40, np.float32)
    candidates = [(slow_format, {}), ("dense_f32", {})]
    if not slow_first:
        candidates.reverse()
    fmt, options, record = autotune(w, b, "relu", candidates, batch_sizes=(1, 8), repeats=3)
    assert (fmt, options) == ("dense_f32", {})
    assert set(record) == {"test_slow_dense[]", "dense_f32[]"} == {candidate_key(f, o) for f, o in candidates}
    for times in record.values():
        assert set(times) == {1, 8} and all(t > 0 for t in times.values())
    assert min(record["test_slow_dense[]"].values()) >= SLEEP_SECONDS  # it slept in every timed call
    # warmed, then sampled at each batch size (round-robin across candidates, ``repeats`` times)
    assert _SlowDense.calls[1] >= 1 + 3 and _SlowDense.calls[8] >= 1 + 3


def test_options_are_passed_to_the_format_and_returned(rng, slow_format):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[np.abs(w) < 1.5] = 0
    candidates = [(slow_format, {}), ("bsr_f32", {"block": (1, 16)})]
    fmt, options, record = autotune(w, np.zeros(32, np.float32), "linear", candidates, batch_sizes=(1,), repeats=1)
    assert (fmt, options) == ("bsr_f32", {"block": (1, 16)})
    assert options is not candidates[1][1]  # a copy: the caller's list is not aliased
    assert "bsr_f32[block=(1, 16)]" in record
    assert get_format(fmt).from_dense(w, np.zeros(32, np.float32), "linear", **options).block == (1, 16)


def test_autotune_needs_candidates(rng):
    with pytest.raises(ValueError):
        autotune(np.ones((2, 2), np.float32), np.zeros(2, np.float32), "linear", [])


def test_candidate_key_is_stable():
    assert candidate_key("int8", {"path": "portable"}) == "int8[path=portable]"
    assert candidate_key("bsr_f32", {"b": 1, "a": 2}) == "bsr_f32[a=2,b=1]"
    assert candidate_key("dense_f32", {}) == "dense_f32[]"
