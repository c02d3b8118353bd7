"""Pruning masks, schedule, options and data parsing (fast, no TensorFlow)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.optimize import data as data_mod
from leanserve.server.optimize import prune
from leanserve.server.optimize.options import OptimizeOptions, parse_block, validate


def _weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 128)).astype(np.float32), rng.normal(scale=0.1, size=(128, 10)).astype(np.float32)]


def test_per_layer_masks_hit_the_target_in_every_layer() -> None:
    for w, pw in zip(_weights(), prune.prune(_weights(), 0.9, "per_layer", None)):
        assert prune.measured_sparsity(pw) == pytest.approx(0.9, abs=1e-3)
        kept = pw != 0
        assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()  # magnitude order respected


def test_global_masks_hit_the_overall_target_and_prune_small_layers_more() -> None:
    ws = _weights()
    pruned = prune.prune(ws, 0.8, "global", None)
    total = sum(int(np.count_nonzero(p == 0)) for p in pruned) / sum(w.size for w in ws)
    assert total == pytest.approx(0.8, abs=1e-3)
    assert prune.measured_sparsity(pruned[1]) > prune.measured_sparsity(pruned[0])  # the 0.1-scale layer loses more


def test_block_masks_zero_whole_blocks() -> None:
    w = _weights()[0]
    (pw,) = prune.prune([w], 0.75, "per_layer", (16, 1))
    tiles = (pw != 0).reshape(4, 16, 128)
    assert np.all(tiles.all(axis=1) | ~tiles.any(axis=1))  # each 16x1 block all kept or all zero
    assert prune.measured_sparsity(pw) == pytest.approx(0.75, abs=1e-3)


def test_polynomial_schedule_is_monotonic_and_ends_at_the_target() -> None:
    values = [prune.polynomial_sparsity(t, 0, 100, 0.0, 0.9) for t in range(0, 121, 10)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.9) and values == sorted(values)
    assert values[1] - values[0] > values[9] - values[8]  # fast first, slow near the target


@pytest.mark.parametrize("text, expected", [("16x1", (16, 1)), ("4X16", (4, 16)), ("", None), ("unstructured", None)])
def test_parse_block(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_block(text) == expected


@pytest.mark.parametrize("text", ["16", "ax1", "0x4", "128x1"])
def test_parse_block_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_block(text)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_sparsity": 1.2}, "target_sparsity"),
    ({"target_sparsity": 0.5, "max_accuracy_drop": 2.0}, "max_accuracy_drop"),
    ({"target_sparsity": 0.5, "epochs": 3}, "labelled data"),
    ({}, "nothing to do"),
    ({"target_sparsity": 0.5, "epochs": 500, "data_size_bytes": 10}, "epochs"),
])
def test_validate_refuses_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate(OptimizeOptions("m", **kwargs), max_epochs=200, max_data_bytes=1000)


def test_validate_refuses_too_much_data() -> None:
    with pytest.raises(ResourceExhausted):
        validate(OptimizeOptions("m", quantize="int8", data_size_bytes=2000), max_epochs=200, max_data_bytes=1000)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_parse_data_one_hot_labels_and_reshape() -> None:
    x = np.ones((5, 2, 3), np.float64)
    y = np.eye(4)[[0, 1, 2, 3, 0]]
    d = data_mod.parse(_npz(x=x, y=y), (6,), 4, 1 << 20)
    assert d.x.shape == (5, 6) and d.x.dtype == np.float32 and d.y.tolist() == [0, 1, 2, 3, 0]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.ones((3, 5))}, "rows have shape"),
    ({"x": np.ones((3, 6)), "y": np.array([0, 1, 9])}, "labels must be in"),
    ({"x": np.ones((3, 6)), "z": np.ones(3)}, "must hold x"),
    ({"x": np.ones((3, 6)), "y": np.zeros(3, int), "x_val": np.ones((1, 6))}, "come together"),
])
def test_parse_data_refuses(arrays: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        data_mod.parse(_npz(**arrays), (6,), 4, 1 << 20)


def test_parse_refuses_pickled_objects() -> None:
    with pytest.raises(InvalidArgument):
        data_mod.parse(_npz(x=np.array([{"a": 1}], dtype=object)), (1,), 2, 1 << 20)


def test_receive_enforces_the_limit_and_the_declared_size() -> None:
    with pytest.raises(ResourceExhausted):
        data_mod.receive([b"x" * 600, b"x" * 600], 1200, 1000)
    with pytest.raises(InvalidArgument):
        data_mod.receive([b"x" * 10], 20, 1000)


def test_data_may_take_at_most_the_upload_ratio_of_what_was_received() -> None:
    """A compressed .npz of int8 zeros: ~60 KB on the wire, 60 MB inflated, 240 MB as float32 rows. With the
    upload ratio it is refused while inflating; without a ratio the arrays as held are counted before any
    conversion."""
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((2_500_000, 24), np.int8), y=np.zeros(2_500_000, np.int8))
    blob = buf.getvalue()
    assert len(blob) < 1 << 20
    with pytest.raises(ResourceExhausted):
        data_mod.parse(blob, (24,), 2, 256 << 20, max_ratio=2.0)
    with pytest.raises(ResourceExhausted, match="as float32 rows and int64 labels"):
        data_mod.parse(blob, (24,), 2, 64 << 20)  # inflates within 64 MiB, would take 260 MB converted
    small = io.BytesIO()
    np.savez_compressed(small, x=np.zeros((1000, 24), np.int8), y=np.zeros(1000, np.int8))
    d = data_mod.parse(small.getvalue(), (24,), 2, 256 << 20, max_ratio=2.0)  # under the 16 MiB floor
    assert d.x.dtype == np.float32 and d.x.shape == (1000, 24) and d.y.dtype == np.int64


def _then_hang(*chunks: bytes):
    """Chunks, then a stream the client keeps open: reading past them is a bug (it would wait for the timeout)."""
    yield from chunks
    raise AssertionError("read past the declared bytes")


def test_data_is_in_once_the_declared_bytes_are() -> None:
    receive = data_mod.receive
    assert receive(_then_hang(b"ab", b"cd"), declared=4, max_bytes=100) == b"abcd"
    assert receive(_then_hang(), declared=0, max_bytes=100) == b""
    with pytest.raises(InvalidArgument, match="larger than the declared"):
        receive(iter([b"ab", b"cdef"]), declared=4, max_bytes=100)
    with pytest.raises(InvalidArgument, match="ended after 2 bytes"):
        receive(iter([b"ab"]), declared=4, max_bytes=100)
    with pytest.raises(ResourceExhausted):
        receive(iter([b"abcdef"]), declared=6, max_bytes=4)
