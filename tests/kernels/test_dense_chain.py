"""Consecutive fp32 dense layers fused into one kernel call: the same numbers as layer by layer."""

import numpy as np
import pytest

from leanserve.kernels import KernelInputError, fuse_dense_chains, prepare
from leanserve.kernels.dense import DenseF32, DenseF32Chain

WIDTHS = [(37, 70, 16, 3), (1000, 128, 64, 10), (5, 1, 1), (64, 65)]


def _layers(rng, widths, activations=("relu", "tanh", "softmax", "sigmoid"), **options):
    return [DenseF32.from_dense(rng.standard_normal((k, n)).astype(np.float32),
                                rng.standard_normal(n).astype(np.float32), activations[i % len(activations)], **options)
            for i, (k, n) in enumerate(zip(widths, widths[1:]))]


def _one_by_one(layers, x):
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 33])
def test_chain_is_bit_identical_to_layer_by_layer(rng, widths, batch):
    layers = _layers(rng, widths)
    x = rng.standard_normal((batch, widths[0])).astype(np.float32)
    expected = _one_by_one(layers, x)
    steps = fuse_dense_chains(layers)
    assert len(steps) == (1 if len(layers) > 1 else len(layers))
    got = _one_by_one(steps, x)
    assert got.shape == (batch, widths[-1]) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # the layers now read views of the chain's buffers: still the same numbers one by one
    np.testing.assert_array_equal(_one_by_one(layers, x), expected)


def test_read_only_input_as_a_request_tensor_is(rng):
    layers = _layers(rng, (40, 24, 6))
    x = rng.standard_normal((3, 40)).astype(np.float32)
    expected = _one_by_one(layers, x)
    view = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(3, 40)
    assert not view.flags.writeable
    (chain,) = fuse_dense_chains(layers)
    np.testing.assert_array_equal(chain(view), expected)


def test_large_batches_follow_each_layers_numpy_path(rng):
    layers = _layers(rng, (33, 17, 9), numpy_min_batch=4)
    (chain,) = fuse_dense_chains(layers)
    for batch in (1, 3, 4, 20):
        x = rng.standard_normal((batch, 33)).astype(np.float32)
        np.testing.assert_allclose(chain(x), _one_by_one(layers, x), rtol=1e-5, atol=1e-6)


def test_other_formats_split_the_chain(rng):
    w1, b1 = rng.standard_normal((20, 12)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    w2, b2 = rng.standard_normal((12, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    dense = _layers(rng, (8, 6, 4, 3))
    int8 = prepare("int8", w2, b2, "relu")
    first = prepare("dense_f32", w1, b1, "relu")
    steps = fuse_dense_chains([first, int8, *dense])
    assert steps[0] is first and steps[1] is int8 and isinstance(steps[2], DenseF32Chain) and len(steps) == 3
    x = rng.standard_normal((2, 20)).astype(np.float32)
    np.testing.assert_array_equal(_one_by_one(steps, x), _one_by_one([first, int8, *dense], x))


def test_weights_are_not_held_twice(rng):
    layers = _layers(rng, (50, 30, 20))
    (chain,) = fuse_dense_chains(layers)
    for layer in layers:
        assert np.shares_memory(layer._packed, chain._packed)


def test_a_chain_needs_chaining_dense_layers(rng):
    a, b = _layers(rng, (8, 4)), _layers(rng, (5, 3))
    with pytest.raises(KernelInputError):
        DenseF32Chain(a + b)
    with pytest.raises(KernelInputError):
        DenseF32Chain(a)


def test_layers_all_on_gemm_hold_no_panels_and_stay_out_of_chains(rng):
    gemm = _layers(rng, (30, 20, 10), numpy_min_batch=1)
    assert not any(layer.uses_panels for layer in gemm)
    panel = _layers(rng, (10, 8, 4))
    steps = fuse_dense_chains([*gemm, *panel])
    assert steps[:2] == gemm and isinstance(steps[2], DenseF32Chain) and len(steps) == 3
    x = rng.standard_normal((1, 30)).astype(np.float32)
    np.testing.assert_allclose(_one_by_one(steps, x), _one_by_one([*gemm, *panel], x), rtol=1e-5, atol=1e-6)
    again = DenseF32.from_arrays(gemm[0].arrays(), gemm[0].meta())
    assert not again.uses_panels and again.meta()["numpy_min_batch"] == 1
