"""The int8 formats (int8, csr_int8, bsr_int8) against independent oracles.

1. Their quantized weights are exactly the documented per-channel quantization of the ORIGINAL fp32 weights
   (``_kernel_refs.quantize_weights_ref``, written from the spec, not read back from the kernel).
2. Their int32 accumulators are exactly ``quantize_rows_ref(x) @ quantize_weights_ref(w)``.
3. Their float32 outputs are within the derived quantization error bound (``_kernel_refs.int8_error_bound``) of
   float64 numpy on the original fp32 weights.

Each check runs on the portable path on every machine (forced), on the int8 AVX2 path where the CPU has AVX2 and
on the VNNI path where it has AVX512_VNNI (skipped, with the reason shown, elsewhere). Nothing here calls a VNNI
kernel on a CPU without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from leanserve.kernels import KernelInputError, LayerKernel, get_format, has_avx512_vnni, prune_magnitude
from leanserve.kernels._simd import has_avx2
from leanserve.kernels import int8 as int8_mod
from leanserve.kernels import sparse_bsr
from leanserve.kernels.sparse_bsr import INT8_BLOCKS

from tests.kernels._kernel_refs import (activate64, int8_accumulators_ref, int8_error_bound, quantize_rows_ref,
                                        quantize_weights_ref)

HAS_VNNI = has_avx512_vnni()
NO_VNNI = pytest.mark.skipif(not HAS_VNNI, reason="this CPU lacks AVX512_VNNI: the VNNI path cannot run here")
NO_AVX2 = pytest.mark.skipif(not has_avx2(), reason="this CPU lacks AVX2: the int8 AVX2 path cannot run here")
VNNI_BLOCKS = [b for b in INT8_BLOCKS if b[1] == 1 and b[0] in (16, 32, 64)]


def _configs() -> list[Any]:
    """(format, options, path) for every int8 kernel: portable everywhere, VNNI where the format has one."""
    out: list[Any] = [("int8", None, "portable"), pytest.param("int8", None, "avx2", marks=NO_AVX2),
                      pytest.param("int8", None, "vnni", marks=NO_VNNI), ("csr_int8", None, "portable")]
    for block in INT8_BLOCKS:
        out.append(("bsr_int8", block, "portable"))
        if block in VNNI_BLOCKS:
            out.append(pytest.param("bsr_int8", block, "vnni", marks=NO_VNNI))
    return out


CONFIGS = _configs()
SHAPES = [(1, 1), (37, 13), (130, 17), (256, 40)]
SPARSITIES = [0.0, 0.5, 0.9]
BATCHES = [1, 3, 17]


def config_id(value: Any) -> str:
    if isinstance(value, tuple):
        return f"block{value[0]}x{value[1]}"
    return "noblock" if value is None else str(value)


def build(fmt: str, block: tuple[int, int] | None, path: str, w: np.ndarray, b: np.ndarray,
          activation: str) -> LayerKernel:
    """The kernel of ``fmt`` on ``path`` (forced, and checked to be the one that runs)."""
    cls = get_format(fmt)
    if fmt == "int8":
        kernel = cls.from_dense(w, b, activation, path=path)
        assert kernel.path == path
        return kernel
    kernel = cls.from_dense(w, b, activation) if block is None else cls.from_dense(w, b, activation, block=block)
    if fmt == "bsr_int8":
        if path == "portable":
            kernel.use_vnni = False  # force the portable kernels even on a VNNI machine
        assert kernel.use_vnni == (path == "vnni")
    return kernel


def quantized(kernel: LayerKernel) -> tuple[np.ndarray, np.ndarray]:
    """The int8 weights ``[K, N]`` and the per-channel scales a kernel holds."""
    if kernel.format == "int8":
        arrays = kernel.arrays()
        return arrays["q"], arrays["scales"]
    return kernel.quantized_weights(), kernel.scales


def accumulators(kernel: LayerKernel, x: np.ndarray, xq: np.ndarray, path: str) -> np.ndarray:
    if kernel.format == "int8":
        acc, xs = kernel.accumulators(x)
        np.testing.assert_array_equal(xs, quantize_rows_ref(x)[1])
        return acc
    if kernel.format == "bsr_int8":
        return kernel.accumulators(xq, vnni=path == "vnni")
    return kernel.accumulators(xq)


def weights(rng: np.random.Generator, k: int, n: int, sparsity: float, block: tuple[int, int] | None) -> np.ndarray:
    w = (rng.standard_normal((k, n)) * rng.uniform(0.05, 5.0, n)).astype(np.float32)  # channels of mixed scale
    return prune_magnitude(w, sparsity, block=block)


def inputs(rng: np.random.Generator, batch: int, k: int) -> np.ndarray:
    return (rng.standard_normal((batch, k)) * rng.uniform(0.01, 10.0, (batch, 1))).astype(np.float32)


@pytest.mark.parametrize("fmt,block,path", CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparsity{s:g}")
def test_weights_are_the_documented_quantization_of_the_original(fmt, block, path, shape, sparsity, rng) -> None:
    w = weights(rng, *shape, sparsity, block)
    q, s = quantized(build(fmt, block, path, w, np.zeros(shape[1], np.float32), "linear"))
    q_ref, s_ref = quantize_weights_ref(w)
    assert q.dtype == np.int8 and q.shape == shape
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)


@pytest.mark.parametrize("fmt,block,path", CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparsity{s:g}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
def test_accumulators_are_exact(fmt, block, path, shape, sparsity, batch, rng) -> None:
    k, n = shape
    w = weights(rng, k, n, sparsity, block)
    kernel = build(fmt, block, path, w, np.zeros(n, np.float32), "linear")
    x = inputs(rng, batch, k)
    xq, _ = quantize_rows_ref(x)
    acc = accumulators(kernel, x, xq, path)
    assert acc.dtype == np.int32 and acc.shape == (batch, n)
    np.testing.assert_array_equal(acc, int8_accumulators_ref(xq, quantize_weights_ref(w)[0]))


@pytest.mark.parametrize("fmt,block,path", CONFIGS, ids=config_id)
def test_accumulators_exact_at_the_extremes(fmt, block, path) -> None:
    """Every product at ±127·127 over a long K: the widest int32 values the kernels see."""
    k, n = 4032, 35
    w = np.where(np.arange(k * n).reshape(k, n) % 3 == 0, -1.0, 1.0).astype(np.float32)
    x = np.stack([np.ones(k), -np.ones(k), np.where(np.arange(k) % 2, 1.0, -1.0)]).astype(np.float32)
    kernel = build(fmt, block, path, w, np.zeros(n, np.float32), "linear")
    xq, _ = quantize_rows_ref(x)
    acc = accumulators(kernel, x, xq, path)
    np.testing.assert_array_equal(acc, int8_accumulators_ref(xq, quantize_weights_ref(w)[0]))
    assert np.abs(acc).max() >= 127 * 127 * (k // 3)


@pytest.mark.parametrize("fmt,block,path", CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparsity{s:g}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
def test_outputs_within_the_quantization_bound_of_fp32(fmt, block, path, shape, sparsity, batch, rng) -> None:
    k, n = shape
    w = weights(rng, k, n, sparsity, block)
    b = rng.standard_normal(n).astype(np.float32)
    x = inputs(rng, batch, k)
    out = build(fmt, block, path, w, b, "linear")(x)
    assert out.dtype == np.float32 and out.shape == (batch, n) and out.flags.c_contiguous
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    bound = int8_error_bound(x, w, b, "linear")
    excess = np.abs(out - ref) - bound
    assert (excess <= 0).all(), f"exceeds the bound by {excess.max():.3g} (bound {bound.flat[excess.argmax()]:.3g})"


@pytest.mark.parametrize("fmt,block,path", CONFIGS, ids=config_id)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "softmax"])
def test_fused_activations_within_the_bound(fmt, block, path, activation, rng) -> None:
    k, n = 90, 21
    w = weights(rng, k, n, 0.6, block)
    b = rng.standard_normal(n).astype(np.float32)
    x = inputs(rng, 5, k)
    out = build(fmt, block, path, w, b, activation)(x)
    ref = activate64(x.astype(np.float64) @ w.astype(np.float64) + b, activation)
    assert (np.abs(out - ref) <= int8_error_bound(x, w, b, activation)).all()


@pytest.mark.parametrize("fmt,block,path", CONFIGS, ids=config_id)
def test_the_bound_catches_a_wrong_weight(fmt, block, path, rng) -> None:
    """The bound is tight enough to matter: a kernel built from weights with one column changed by the size of a
    typical weight (a packing or channel-order bug would do that) falls outside it."""
    k, n = 130, 17
    w = weights(rng, k, n, 0.5, block)
    x = inputs(rng, 8, k)
    j = int(np.count_nonzero(w, axis=0).argmax())
    wrong = w.copy()
    wrong[:, j] = np.roll(w[:, j], 1)  # same magnitudes, other positions: quantizes just as well
    out = build(fmt, block, path, wrong, np.zeros(n, np.float32), "linear")(x)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    outside = np.abs(out - ref) > int8_error_bound(x, w, np.zeros(n, np.float32), "linear")
    assert outside[:, j].any() and not np.delete(outside, j, axis=1).any()


def test_vnni_kernels_run_exactly_where_the_cpu_has_vnni(rng) -> None:
    """A CPU without AVX512_VNNI never compiles (let alone calls) a VNNI kernel: LLVM cannot lower vpdpbusd
    there. With it, the int8 and bsr_int8 ``(16, 1)`` layers do run the VNNI kernels."""
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    get_format("int8").from_dense(w, np.zeros(32, np.float32), "relu")(x)  # path "auto"
    for block in VNNI_BLOCKS:
        get_format("bsr_int8").from_dense(w, np.zeros(32, np.float32), "relu", block=block)(x)
    vnni_functions = [int8_mod.vnni_forward, int8_mod.vnni_accumulate, sparse_bsr.bsr_int8_forward_vnni]
    if HAS_VNNI:
        assert all(f.signatures for f in vnni_functions)
    else:
        assert not any(f.signatures for f in vnni_functions), [f.__name__ for f in vnni_functions if f.signatures]
        with pytest.raises(KernelInputError, match="AVX512_VNNI"):
            get_format("int8").from_dense(w, np.zeros(32, np.float32), "relu", path="vnni")
