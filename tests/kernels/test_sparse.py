"""Sparse formats (csr_f32, csr_int8, bsr_f32, bsr_int8) against numpy references."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

from leanserve.kernels import KernelInputError, LayerKernel, available_formats, get_format
from leanserve.kernels.prune import prune_magnitude
from leanserve.kernels.sparse_bsr import BsrF32, BsrInt8
from leanserve.kernels.sparse_csr import CsrF32, CsrInt8
from leanserve.kernels.sparse_bsr import F32_BLOCKS, HAS_VNNI, INT8_BLOCKS

from tests.kernels._kernel_refs import (activate64, assert_close_f32, int8_accumulators_ref, int8_error_bound,
                                        quantize_rows_ref, quantize_weights_ref, reference)

# (format name, block) — every block shape each format has a kernel for; the int8 broadcast kernel pairs two inputs
# (r == 1: across blocks, r even: within one) and takes them one by one for odd r > 1; (1, 4) pairs 4-lane blocks
CONFIGS = ([("csr_f32", None), ("csr_int8", None)] + [("bsr_f32", b) for b in F32_BLOCKS]
           + [("bsr_f32", (3, 8))] + [("bsr_int8", b) for b in INT8_BLOCKS]
           + [("bsr_int8", (3, 4)), ("bsr_int8", (1, 4))])
SHAPES = [(1, 1), (1, 7), (7, 1), (37, 13), (64, 33), (130, 17)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
BATCHES = [1, 3, 17, 64]


def _build(fmt: str, block: tuple[int, int] | None, w: np.ndarray, b: np.ndarray, act: str) -> LayerKernel:
    cls = get_format(fmt)
    return cls.from_dense(w, b, act) if block is None else cls.from_dense(w, b, act, block=block)


def _weights(rng: np.random.Generator, k: int, n: int, sparsity: float, block) -> np.ndarray:
    w = rng.standard_normal((k, n)).astype(np.float32)
    return prune_magnitude(w, sparsity, block=block)


def _int8_reference(w: np.ndarray, b: np.ndarray, activation: str, x: np.ndarray) -> np.ndarray:
    """The documented int8 semantics from the ORIGINAL fp32 weights (not the kernel's own quantized arrays):
    per-row quantized x, exact integer products, dequant + bias + act in float64."""
    xq, xs = quantize_rows_ref(x)
    wq, ws = quantize_weights_ref(w)
    acc = int8_accumulators_ref(xq, wq)
    h = acc.astype(np.float64) * xs[:, None].astype(np.float64) * ws.astype(np.float64)
    return activate64(h + b, activation)


def _check(kernel: LayerKernel, w: np.ndarray, b: np.ndarray, x: np.ndarray) -> None:
    out = kernel.run(x)
    if kernel.format.endswith("int8"):
        ref = _int8_reference(w, b, kernel.activation, x)
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(ref).max(initial=0))))
        # and within the derived quantization error of the fp32 layer it approximates
        fp32 = activate64(x.astype(np.float64) @ w.astype(np.float64) + b, kernel.activation)
        assert (np.abs(out - fp32) <= int8_error_bound(x, w, b, kernel.activation)).all()
    else:
        assert_close_f32(out, reference(x, w, b, kernel.activation), w.shape[0])


def test_all_formats_registered() -> None:
    assert {"csr_f32", "csr_int8", "bsr_f32", "bsr_int8"} <= set(available_formats())


@pytest.mark.parametrize("fmt,block", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparsity{s:g}")
def test_matches_numpy(fmt: str, block, shape: tuple[int, int], sparsity: float, rng: np.random.Generator) -> None:
    k, n = shape
    w = _weights(rng, k, n, sparsity, block)
    b = rng.standard_normal(n).astype(np.float32)
    kernel = _build(fmt, block, w, b, "linear")
    if fmt.endswith("int8"):  # exactly the documented quantization of the nonzeros
        assert np.array_equal(kernel.quantized_weights(), quantize_weights_ref(w)[0])
    else:
        assert np.array_equal(kernel.dense_weights(), w)  # exactly the nonzeros are kept
    assert np.array_equal(kernel.bias_vector(), b)
    for batch in BATCHES:
        _check(kernel, w, b, rng.standard_normal((batch, k)).astype(np.float32))


@pytest.mark.parametrize("fmt,block", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "softmax"])
def test_fused_activations(fmt: str, block, activation: str, rng: np.random.Generator) -> None:
    w = _weights(rng, 40, 21, 0.6, block)
    b = rng.standard_normal(21).astype(np.float32)
    kernel = _build(fmt, block, w, b, activation)
    for batch in (1, 5):
        _check(kernel, w, b, rng.standard_normal((batch, 40)).astype(np.float32))


@pytest.mark.parametrize("fmt,block", CONFIGS, ids=lambda v: str(v))
def test_empty_rows_columns_and_zero_nnz(fmt: str, block, rng: np.random.Generator) -> None:
    w = rng.standard_normal((48, 35)).astype(np.float32)
    w[:, ::3] = 0  # outputs with no weights (empty sparse rows)
    w[5:30] = 0  # inputs nothing reads
    b = rng.standard_normal(35).astype(np.float32)
    x = rng.standard_normal((6, 48)).astype(np.float32)
    _check(_build(fmt, block, w, b, "linear"), w, b, x)
    zero = _build(fmt, block, np.zeros_like(w), b, "relu")
    assert zero.arrays()["values"].size == 0
    np.testing.assert_array_equal(zero.run(x), np.broadcast_to(np.maximum(b, 0), (6, 35)))


def _int8_paths() -> list:
    """(format, block, path): the portable path of every int8 sparse kernel, and VNNI where it exists and the CPU
    has it (a visible skip elsewhere: ``accumulators(vnni=True)`` would silently run the portable path)."""
    out: list = []
    for fmt, block in CONFIGS:
        if not fmt.endswith("int8"):
            continue
        out.append((fmt, block, "portable"))
        if fmt == "bsr_int8" and block[1] == 1:  # both portable kernels, whichever the CPU's crossover picks
            out += [(fmt, block, "dots"), (fmt, block, "lanes")]
        if fmt == "bsr_int8" and block[1] == 1 and block[0] in (16, 32, 64):
            out.append(pytest.param(fmt, block, "vnni", marks=pytest.mark.skipif(
                not HAS_VNNI, reason="this CPU lacks AVX512_VNNI: the VNNI path cannot run here")))
    return out


@pytest.mark.parametrize("fmt,block,path", _int8_paths(), ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(1, 1), (37, 13), (130, 17), (256, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_accumulators_exact(fmt: str, block, path: str, shape: tuple[int, int],
                                 rng: np.random.Generator) -> None:
    k, n = shape
    w = _weights(rng, k, n, 0.5, block)
    kernel = _build(fmt, block, w, np.zeros(n, np.float32), "linear")
    wq = quantize_weights_ref(w)[0]  # from the original weights, not read back from the kernel
    for batch in (1, 3, 17, 70):  # >= 2 without VNNI: the batch-lane kernel with 1, 2 and 4 + 1 lane vectors
        xq = rng.integers(-127, 128, (batch, k)).astype(np.int8)
        xq[-1] = np.where(np.arange(k) % 2, 127, -127)  # products at +-127 * 127
        ref = int8_accumulators_ref(xq, wq)
        if fmt == "bsr_int8":
            assert kernel.use_vnni or path != "vnni"
            forced = {"dots": 1 << 62, "lanes": 1}.get(path)
            acc = kernel.accumulators(xq, vnni=path == "vnni", lanes_min_batch=forced)
        else:
            acc = kernel.accumulators(xq)
        assert acc.dtype == np.int32
        np.testing.assert_array_equal(acc, ref)


@pytest.mark.parametrize("k", [300, 70_000], ids=["uint16_idx", "uint32_idx"])
def test_csr_int8_gather_and_lane_paths_exact(k: int, rng: np.random.Generator) -> None:
    """Rows of 0..70 nonzeros (every 16/32 step boundary and scalar tail of the gather kernel), both the
    batch-1 gather path and the batch-lane path, uint16 and uint32 column indices; extreme int8 values."""
    n = 71
    w = np.zeros((k, n), np.float32)
    for j in range(n):  # output j holds exactly j nonzeros, at random inputs (first and last included)
        cols = rng.choice(k, size=j, replace=False)
        if j >= 2:
            cols[:2] = (0, k - 1)
        w[cols, j] = rng.choice([-1.0, 1.0], size=j) * rng.uniform(0.01, 1.0, size=j)
    csr = CsrInt8.from_dense(w, np.zeros(n, np.float32), "linear")
    assert csr.indices.dtype == (np.uint16 if k <= 65536 else np.uint32)
    wq = csr.quantized_weights().astype(np.int64)
    # 1 and 2: gathers (2: lanes on AVX-512); 3 on: lanes (1..4 vectors, lane blocks)
    for batch in (1, 2, 3, 17, 70) if k < 1000 else (1, 3):
        xq = rng.integers(-127, 128, (batch, k)).astype(np.int8)
        xq[0, :] = 127
        np.testing.assert_array_equal(csr.accumulators(xq), (xq.astype(np.int64) @ wq).astype(np.int32))
    x = rng.standard_normal((1, k)).astype(np.float32)
    f32 = CsrF32.from_dense(w, np.zeros(n, np.float32), "linear")
    assert_close_f32(f32(x), x @ w, k)
    assert_close_f32(f32(np.repeat(x, 3, axis=0)), np.repeat(x @ w, 3, axis=0), k)


def test_vnni_path_is_used_when_available(rng: np.random.Generator) -> None:
    """Which code runs, not the constructor's flag: a bsr_int8 (16, 1) layer runs the VNNI kernel on a CPU with
    AVX512_VNNI, and on one without it the VNNI kernel is never even compiled (LLVM cannot lower vpdpbusd)."""
    from leanserve.kernels import sparse_bsr

    w = _weights(rng, 64, 8, 0.5, (16, 1))
    kernel = BsrInt8.from_dense(w, np.zeros(8, np.float32), "linear", block=(16, 1))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    _check(kernel, w, np.zeros(8, np.float32), x)
    compiled = bool(sparse_bsr.bsr_int8_forward_vnni.signatures)
    assert compiled == HAS_VNNI


@pytest.mark.parametrize("fmt,block", CONFIGS, ids=lambda v: str(v))
def test_round_trip_through_safetensors(fmt: str, block, rng: np.random.Generator) -> None:
    w = _weights(rng, 70, 29, 0.8, block)
    b = rng.standard_normal(29).astype(np.float32)
    kernel = _build(fmt, block, w, b, "tanh")
    arrays = load(save(kernel.arrays()))
    meta = json.loads(json.dumps(kernel.meta()))
    again = get_format(fmt).from_arrays(arrays, meta)
    x = rng.standard_normal((9, 70)).astype(np.float32)
    np.testing.assert_array_equal(again(x), kernel(x))
    np.testing.assert_array_equal(again.dense_weights(), kernel.dense_weights())
    assert again.nbytes == kernel.nbytes and again.meta() == kernel.meta()


@pytest.mark.parametrize("fmt,block", CONFIGS, ids=lambda v: str(v))
def test_storage_smaller_than_dense_at_90_percent(fmt: str, block, rng: np.random.Generator) -> None:
    w = _weights(rng, 512, 256, 0.9, block)
    kernel = _build(fmt, block, w, np.zeros(256, np.float32), "linear")
    dense_bytes = w.size * (1 if fmt.endswith("int8") else 4)
    assert kernel.nbytes < 0.5 * dense_bytes


def test_corrupt_arrays_and_bad_options_are_refused(rng: np.random.Generator) -> None:
    kernel = CsrF32.from_dense(_weights(rng, 20, 10, 0.5, None), np.zeros(10, np.float32), "linear")
    arrays = dict(kernel.arrays())
    arrays["indices"] = arrays["indices"].copy()
    arrays["indices"][0] = 20
    with pytest.raises(ValueError):
        CsrF32.from_arrays(arrays, kernel.meta())
    w, b = np.ones((8, 8), np.float32), np.zeros(8, np.float32)
    with pytest.raises(KernelInputError):
        BsrF32.from_dense(w, b, "linear", block=(2, 2))
    with pytest.raises(KernelInputError):
        BsrInt8.from_dense(w, b, "linear", block=(2, 2))
    with pytest.raises(TypeError):
        CsrInt8.from_dense(w, b, "linear", block=(4, 1))
    with pytest.raises(KernelInputError):
        kernel.run(np.ones((2, 21), np.float32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.sampled_from(CONFIGS),
    k=st.integers(1, 80),
    n=st.integers(1, 50),
    sparsity=st.floats(0.0, 1.0),
    batch=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_random_shapes(config, k: int, n: int, sparsity: float, batch: int, seed: int) -> None:
    fmt, block = config
    rng = np.random.default_rng(seed)
    w = _weights(rng, k, n, sparsity, block)
    b = rng.standard_normal(n).astype(np.float32)
    _check(_build(fmt, block, w, b, "linear"), w, b, rng.standard_normal((batch, k)).astype(np.float32))


@pytest.mark.parametrize("fmt,block", [("csr_f32", None), ("csr_int8", None), ("bsr_f32", (1, 16)),
                                       ("bsr_f32", (16, 1)), ("bsr_int8", (16, 1))], ids=lambda v: str(v))
def test_concurrent_calls_give_identical_results(fmt: str, block, rng: np.random.Generator) -> None:
    w = _weights(rng, 300, 200, 0.9, block)
    kernel = _build(fmt, block, w, rng.standard_normal(200).astype(np.float32), "relu")
    xs = [rng.standard_normal((b, 300)).astype(np.float32) for b in (1, 3, 17, 32, 1, 8, 64, 2)]
    expected = [kernel(x) for x in xs]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(8)}
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            results[i].append(kernel(xs[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert len(results[i]) == 20
        for r in results[i]:
            np.testing.assert_array_equal(r, expected[i])
