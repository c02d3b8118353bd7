"""Magnitude pruning: exact sparsity, keeps the largest weights / blocks, handles ragged edges."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.kernels.prune import prune_magnitude


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_unstructured_prunes_exact_fraction_of_smallest(sparsity: float) -> None:
    w = np.random.default_rng(0).standard_normal((37, 11)).astype(np.float32)
    p = prune_magnitude(w, sparsity)
    assert int((p == 0).sum()) == round(sparsity * w.size)
    kept = p != 0
    assert np.array_equal(p[kept], w[kept])
    if 0 < sparsity < 1:
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()


@pytest.mark.parametrize("block", [(4, 1), (16, 1), (1, 8), (3, 5)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_block_pruning_zeroes_whole_blocks(block: tuple[int, int], norm: str) -> None:
    r, c = block
    w = np.random.default_rng(1).standard_normal((33, 19)).astype(np.float32)
    p = prune_magnitude(w, 0.75, block=block, norm=norm)
    kb, nb = -(-33 // r), -(-19 // c)
    pad = np.zeros((kb * r, nb * c), np.float32)
    pad[:33, :19] = p
    tiles = pad.reshape(kb, r, nb, c)
    zero = (tiles == 0).all(axis=(1, 3))
    assert int(zero.sum()) == round(0.75 * kb * nb)
    live = ~zero
    assert np.array_equal(np.where(np.repeat(np.repeat(live, r, 0), c, 1)[:33, :19], w, 0), p)


def test_input_is_not_modified_and_bad_arguments_raise() -> None:
    w = np.ones((4, 4), np.float32)
    prune_magnitude(w, 0.5)
    assert (w == 1).all()
    with pytest.raises(ValueError):
        prune_magnitude(w, 1.5)
    with pytest.raises(ValueError):
        prune_magnitude(w, 0.5, norm="linf")
    with pytest.raises(ValueError):
        prune_magnitude(np.ones(3), 0.5)
