import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.kernels import api
from leanserve.kernels._simd import pack_panels, unpack_panels
from leanserve.kernels.activations import ACTIVATION_CODES, activate_numpy, bias_activate_rows
from leanserve.kernels.dense import DenseF32
from leanserve.kernels import ACTIVATIONS, KernelInputError, available_formats, get_format

from tests.kernels._kernel_refs import assert_close_f32, reference

SHAPES = [(1, 1), (5, 1), (7, 3), (33, 17), (64, 10), (130, 65), (257, 129), (128, 64)]
BATCHES = [1, 2, 3, 4, 5, 9, 17]


def _layer(rng, k, n):
    return rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_matches_numpy(rng, k, n, activation):
    w, b = _layer(rng, k, n)
    kernel = get_format("dense_f32").from_dense(w, b, activation)
    for batch in BATCHES:
        x = rng.standard_normal((batch, k)).astype(np.float32)
        assert_close_f32(kernel(x), reference(x, w, b, activation), k)


@pytest.mark.parametrize("k,n", [(33, 17), (257, 129)])
def test_gemm_path_matches_panel_path(rng, k, n):
    w, b = _layer(rng, k, n)
    panel = DenseF32.from_dense(w, b, "tanh")
    gemm = DenseF32.from_dense(w, b, "tanh", numpy_min_batch=4)
    for batch in (1, 4, 20):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        assert_close_f32(gemm(x), reference(x, w, b, "tanh"), k)
        np.testing.assert_allclose(gemm(x), panel(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 90),
    n=st.integers(1, 140),
    batch=st.integers(1, 11),
    activation=st.sampled_from(ACTIVATIONS),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
)
def test_dense_property(k, n, batch, activation, seed, scale):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * scale).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    out = DenseF32.from_dense(w, b, activation)(x)
    assert np.isfinite(out).all()
    assert_close_f32(out, reference(x, w, b, activation), k, x, w)


def test_round_trip_arrays_meta(rng):
    w, b = _layer(rng, 70, 33)
    kernel = DenseF32.from_dense(w, b, "sigmoid")
    arrays, meta = kernel.arrays(), json.loads(json.dumps(kernel.meta()))
    assert all(a.flags.c_contiguous and a.dtype == np.float32 for a in arrays.values())
    np.testing.assert_array_equal(arrays["weights"], w)
    again = DenseF32.from_arrays(arrays, meta)
    x = rng.standard_normal((6, 70)).astype(np.float32)
    np.testing.assert_array_equal(again(x), kernel(x))
    np.testing.assert_array_equal(again.dense_weights(), w)
    np.testing.assert_array_equal(again.bias_vector(), b)
    assert (again.in_features, again.out_features, again.activation) == (70, 33, "sigmoid")
    assert kernel.nbytes == sum(a.nbytes for a in arrays.values())


@pytest.mark.parametrize("k,n,group", [(8, 1, 4), (12, 100, 4), (5, 130, 1), (4, 64, 4), (3, 200, 1)])
def test_pack_unpack_round_trip(rng, k, n, group):
    w = rng.standard_normal((k, n)).astype(np.float32)
    np.testing.assert_array_equal(unpack_panels(pack_panels(w, group), k, n, group), w)


def test_activations_match_numpy(rng):
    h = np.concatenate([rng.standard_normal((4, 50)) * 10, np.full((1, 50), 200.0), np.full((1, 50), -200.0)])
    h = h.astype(np.float32)
    bias = rng.standard_normal(50).astype(np.float32)
    for name, code in ACTIVATION_CODES.items():
        out = h.copy()
        bias_activate_rows(out, bias, code)
        with np.errstate(over="ignore"):
            ref = activate_numpy(h.astype(np.float64) + bias, name)
        assert np.isfinite(out).all(), name
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6, err_msg=name)
    assert sorted(ACTIVATION_CODES) == sorted(ACTIVATIONS)


def test_concurrent_calls_identical(rng):
    w, b = _layer(rng, 300, 200)
    kernel = DenseF32.from_dense(w, b, "softmax")
    kernel.warmup()
    inputs = [rng.standard_normal((1 + i % 5, 300)).astype(np.float32) for i in range(8)]
    expected = [kernel(x) for x in inputs]
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


def test_api_dense_and_prepare(rng):
    w, b = _layer(rng, 20, 7)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    assert_close_f32(api.dense(x, w, b, "relu"), reference(x, w, b, "relu"), 20)
    # float64 weights are accepted and converted; a non-contiguous x is copied by run().
    kernel = api.prepare("dense_f32", w.astype(np.float64), b, "linear")
    xt = np.asfortranarray(x)
    assert_close_f32(kernel.run(xt), reference(x, w, b, "linear"), 20)
    assert "dense_f32" in available_formats() and "int8" in available_formats()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w, b, x: api.dense(x.astype(np.float64), w, b), "float32"),
        (lambda w, b, x: api.dense(x[:, :5], w, b), "shape"),
        (lambda w, b, x: api.dense(x[0], w, b), "shape"),
        (lambda w, b, x: api.dense(x[:0], w, b), "at least one row"),
        (lambda w, b, x: api.dense(x.tolist(), w, b), "numpy array"),
        (lambda w, b, x: api.dense(x, w.astype(np.int32), b), "floating point"),
        (lambda w, b, x: api.dense(x, w[0], b), "[K, N]"),
        (lambda w, b, x: api.dense(x, w, b[:3]), "bias must have shape"),
        (lambda w, b, x: api.dense(x, np.where(w > 0, np.nan, w), b), "finite"),
        (lambda w, b, x: api.dense(x, w, b, activation="gelu"), "unsupported activation"),
        (lambda w, b, x: api.dense(x, w, b, format="fp4"), "unknown layer format"),
        (lambda w, b, x: api.prepare("dense_f32", w, b, bogus=1), "bad options"),
    ],
)
def test_api_rejects_bad_input(rng, call, message):
    w, b = _layer(rng, 20, 7)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    with pytest.raises(KernelInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(w, b, x)


_TILE_PROBE = """
import sys
import numpy as np
from leanserve.kernels import _simd
panel, tiles = sys.argv[1].split(":")
_simd.F32_PANEL = int(panel)  # before dense.py binds them
_simd.F32_TILE_NV = tuple(int(v) for v in tiles.split(","))
from leanserve.kernels.dense import DenseF32
rng = np.random.default_rng(3)
worst = 0.0
for k, n in [(1, 1), (7, 3), (33, 17), (64, 64), (130, 65), (257, 129), (40, 200)]:
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    layer = DenseF32.from_dense(w, b, "linear")
    assert np.array_equal(layer.dense_weights(), w)
    for batch in (1, 2, 3, 4, 5, 8, 9):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        ref = x.astype(np.float64) @ w.astype(np.float64) + b
        worst = max(worst, float(np.abs(layer(x) - ref).max() / (1 + np.abs(ref).max())))
print(worst)
"""


@pytest.mark.parametrize("layout", ["64:0,4,4,4,4", "16:0,4,2,1,1", "16:0,1,1,1,1", "64:0,1,3,2,1"])
def test_every_panel_and_tile_width_matches_numpy(layout, tmp_path):
    """The panel kernel is right with every panel width and tile width, not only with the ones this host picks
    (AVX-512: 64-channel panels and 4 x 64 tiles; AVX2: 16-channel panels, tiles of one to four panels): each layout
    compiled apart in a fresh process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}  # a cached kernel would keep the host's layout
    out = subprocess.run([sys.executable, "-c", _TILE_PROBE, layout], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    assert float(out.stdout.strip()) < 1e-5
