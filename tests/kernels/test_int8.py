import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.kernels import int8 as int8_mod
from leanserve.kernels._simd import has_avx2, has_avx512_vnni
from leanserve.kernels import ACTIVATIONS, KernelInputError
from leanserve.kernels.int8 import Int8, resolve_path, set_default_path
from leanserve.kernels.quantize import quantize_rows, quantize_rows_u8, quantize_weights_per_channel

from tests.kernels._kernel_refs import (activate64, int8_accumulators_ref, int8_error_bound, quantize_rows_ref,
                                        quantize_weights_ref)

PATHS = [
    "portable",  # forced: runs on every machine
    pytest.param("avx2", marks=pytest.mark.skipif(
        not has_avx2(), reason="this CPU lacks AVX2: the AVX2 path cannot run here")),
    pytest.param("vnni", marks=pytest.mark.skipif(
        not has_avx512_vnni(), reason="this CPU lacks AVX512_VNNI: the VNNI path cannot run here")),
]
#: the paths this CPU runs
RUNNABLE = ["portable"] + ["avx2"] * has_avx2() + ["vnni"] * has_avx512_vnni()
SHAPES = [(1, 1), (3, 1), (5, 17), (37, 100), (64, 10), (130, 65), (255, 16), (1000, 33)]
SHAPE_IDS = [f"{k}x{n}" for k, n in SHAPES]
BATCHES = [1, 2, 3, 4, 5, 9]


def quantized_reference(w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact accumulators and row scales from the ORIGINAL weights, quantized as documented (not read back from
    the kernel, so a quantize or pack bug consistent with itself still shows)."""
    xq, xs = quantize_rows_ref(x)
    return int8_accumulators_ref(xq, quantize_weights_ref(w)[0]), xs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k,n", SHAPES, ids=SHAPE_IDS)
def test_accumulators_exact(rng, path, k, n):
    w = rng.standard_normal((k, n)).astype(np.float32)
    kernel = Int8.from_dense(w, np.zeros(n, np.float32), "linear", path=path)
    assert kernel.path == path
    np.testing.assert_array_equal(kernel.arrays()["q"], quantize_weights_ref(w)[0])
    for batch in BATCHES:
        x = rng.standard_normal((batch, k)).astype(np.float32)
        acc, xs = kernel.accumulators(x)
        ref_acc, ref_xs = quantized_reference(w, x)
        np.testing.assert_array_equal(acc, ref_acc)
        np.testing.assert_array_equal(xs, ref_xs)


@pytest.mark.parametrize("path", PATHS)
def test_accumulators_exact_at_extremes(path):
    # Every product at +-127*127 and the +128 offset at its largest: the widest int32 values the kernel sees.
    k, n = 4001, 35
    w = np.where(np.arange(k * n).reshape(k, n) % 3 == 0, -1.0, 1.0).astype(np.float32)
    x = np.stack([np.ones(k), -np.ones(k), np.where(np.arange(k) % 2, 1.0, -1.0)]).astype(np.float32)
    kernel = Int8.from_dense(w, np.zeros(n, np.float32), "linear", path=path)
    acc, _ = kernel.accumulators(x)
    np.testing.assert_array_equal(acc, quantized_reference(w, x)[0])
    assert np.abs(acc).max() >= 127 * 127 * (k // 3)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 70),
    n=st.integers(1, 140),
    batch=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    path=st.sampled_from(RUNNABLE),
)
def test_accumulators_property(k, n, batch, seed, path):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 10, n)).astype(np.float32)
    w[:, rng.random(n) < 0.1] = 0.0  # zero channels must stay safe
    x = (rng.standard_normal((batch, k)) * rng.uniform(0.01, 10, (batch, 1))).astype(np.float32)
    kernel = Int8.from_dense(w, np.zeros(n, np.float32), "linear", path=path)
    np.testing.assert_array_equal(kernel.accumulators(x)[0], quantized_reference(w, x)[0])
    out = kernel(x)
    assert (np.abs(out - x.astype(np.float64) @ w.astype(np.float64)) <= int8_error_bound(
        x, w, np.zeros(n, np.float32), "linear")).all()


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="this CPU runs only the portable path")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k,n", [(77, 50), (4, 200), (1001, 33)])
def test_paths_bit_identical(rng, activation, k, n):
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    kernels = [Int8.from_dense(w, b, activation, path=path) for path in RUNNABLE]
    for batch in (1, 2, 4, 7, 33):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        outputs = [kernel(x) for kernel in kernels]
        for path, out in zip(RUNNABLE[1:], outputs[1:]):
            np.testing.assert_array_equal(out, outputs[0], err_msg=f"{path} vs portable")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_outputs_close_to_fp32(rng, path, activation):
    k, n = 300, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    kernel = Int8.from_dense(w, b, activation, path=path)
    x = rng.standard_normal((6, k)).astype(np.float32)
    out = kernel(x)
    assert out.dtype == np.float32 and out.shape == (6, n) and out.flags.c_contiguous
    # Exactly the dequantized int math of the documented quantization of w ...
    acc, xs = quantized_reference(w, x)
    pre = acc * (xs[:, None].astype(np.float64) * quantize_weights_ref(w)[1].astype(np.float64)) + b
    np.testing.assert_allclose(out, activate64(pre, activation), rtol=1e-5, atol=1e-5)
    # ... and within the derived quantization error bound of the fp32 layer (float64 on the original weights)
    exact = activate64(x.astype(np.float64) @ w.astype(np.float64) + b, activation)
    assert (np.abs(out - exact) <= int8_error_bound(x, w, b, activation)).all()


@pytest.mark.parametrize("path", PATHS)
def test_rows_independent_of_batch(rng, path):
    # Per-row activation scales: a row's result does not depend on what it is batched with.
    w = rng.standard_normal((90, 30)).astype(np.float32)
    kernel = Int8.from_dense(w, np.zeros(30, np.float32), "linear", path=path)
    x = rng.standard_normal((5, 90)).astype(np.float32) * np.array([[1e-3], [1], [1e3], [0], [5]], np.float32)
    batched = kernel(x)
    for r in range(5):
        np.testing.assert_array_equal(batched[r], kernel(x[r : r + 1])[0])


def test_per_row_more_accurate_than_per_tensor(rng):
    # Why per row: a small row batched with a large one keeps its precision.
    k, n = 256, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    kernel = Int8.from_dense(w, np.zeros(n, np.float32), "linear")
    x = rng.standard_normal((2, k)).astype(np.float32) * np.array([[1.0], [100.0]], np.float32)
    exact = x[0].astype(np.float64) @ w
    per_row_err = np.abs(kernel(x)[0] - exact).max()
    q, s = quantize_weights_per_channel(w)
    t_scale = np.abs(x).max() / 127
    per_tensor = (np.rint(x[0] / t_scale) @ q.astype(np.float64)) * t_scale * s
    assert per_row_err * 5 < np.abs(per_tensor - exact).max()


def test_quantize_weights_per_channel(rng):
    w = rng.standard_normal((50, 6)).astype(np.float32)
    w[:, 2] = 0.0
    q, s = quantize_weights_per_channel(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (6,)
    assert np.abs(q).max() == 127 and (q[:, 2] == 0).all() and s[2] == 1.0
    np.testing.assert_allclose(s[[0, 1, 3, 4, 5]], np.abs(w[:, [0, 1, 3, 4, 5]]).max(axis=0) / 127, rtol=1e-6)
    assert (np.abs(q * s - w) <= s / 2 + 1e-7).all()


def test_quantize_rows(rng):
    x = rng.standard_normal((4, 13)).astype(np.float32)
    x[2] = 0.0
    q = np.full((4, 16), 99, np.int8)
    u = np.zeros((4, 16), np.uint8)
    s = np.empty(4, np.float32)
    quantize_rows(x, q, s)
    assert s[2] == 1.0 and (q[2] == 0).all() and (q[:, 13:] == 0).all()
    expected_s = np.where(np.abs(x).max(axis=1) > 0, np.abs(x).max(axis=1) / np.float32(127), 1).astype(np.float32)
    np.testing.assert_array_equal(s, expected_s)
    np.testing.assert_array_equal(q[:, :13], np.clip(np.rint(x * (np.float32(1) / s[:, None])), -127, 127))
    quantize_rows_u8(x, u, s)
    np.testing.assert_array_equal(u.astype(np.int32) - 128, q.astype(np.int32))


@pytest.mark.parametrize("path", PATHS)
def test_round_trip_and_concurrency(rng, path):
    w = rng.standard_normal((200, 70)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    kernel = Int8.from_dense(w, b, "relu", path=path)
    meta = json.loads(json.dumps(kernel.meta()))
    again = Int8.from_arrays(kernel.arrays(), meta)
    assert again.path == kernel.path and meta["path"] == path
    np.testing.assert_array_equal(again.dense_weights(), kernel.dense_weights())
    inputs = [rng.standard_normal((1 + i % 6, 200)).astype(np.float32) for i in range(8)]
    expected = [kernel(x) for x in inputs]
    for x, e in zip(inputs, expected):
        np.testing.assert_array_equal(again(x), e)
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        results[i] = [kernel(inputs[i]) for _ in range(50)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        for out in results[i]:
            np.testing.assert_array_equal(out, expected[i])


def test_path_selection():
    expected_auto = "vnni" if has_avx512_vnni() else "avx2" if has_avx2() else "portable"
    assert resolve_path("auto") == expected_auto
    assert resolve_path("portable") == "portable"
    for path, available in (("vnni", has_avx512_vnni()), ("avx2", has_avx2())):
        if available:
            assert resolve_path(path) == path
        else:
            with pytest.raises(KernelInputError, match=f"int8 path '{path}' needs"):
                resolve_path(path)
    try:
        set_default_path("portable")
        assert resolve_path("auto") == "portable"
        assert Int8.from_dense(np.ones((4, 2), np.float32), np.zeros(2, np.float32), "linear").path == "portable"
    finally:
        set_default_path("auto")
    assert int8_mod._default_path == "auto"
    with pytest.raises(KernelInputError, match="unknown int8 path"):
        resolve_path("avx9")
    with pytest.raises(KernelInputError, match="unknown int8 path"):
        set_default_path("gpu")


@pytest.mark.parametrize("fmt", ["int8", "csr_int8"])
def test_a_nan_in_a_row_gives_nan_as_in_fp32(fmt: str) -> None:
    """The row scale's ``amax > 0`` was False for NaN: the row was quantized with a step of 1, the NaN read as 0,
    and the answer finite and wrong where fp32 answers NaN."""
    from leanserve.kernels import get_format

    x = np.array([[1.0, np.nan, 2.0, -3.0], [1.0, 0.5, 2.0, -3.0]], np.float32)
    q, s = np.zeros((2, 4), np.int8), np.zeros(2, np.float32)
    quantize_rows(x, q, s)
    assert np.isnan(s[0]) and s[1] == np.float32(3.0 / 127)
    w = np.eye(4, dtype=np.float32)
    kernel = get_format(fmt)
    y = kernel.from_dense(w, np.zeros(4, np.float32), "linear")(x)
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
