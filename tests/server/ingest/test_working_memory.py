"""A model's working memory per row, counted from its layers' output shapes, and the rows a call may take."""

from __future__ import annotations

from typing import Any

import pytest

from leanserve.server.errors import ResourceExhausted
from leanserve.server.runtime.working_memory import (UNBOUNDED_ROWS, keras_bytes_per_row, max_rows,
                                                      plan_bytes_per_row)


def test_every_layer_output_counts_once_per_row(keras: Any) -> None:
    L = keras.layers
    mlp = keras.Sequential([keras.Input((1000,)), L.Dense(128, activation="relu"), L.Dense(64), L.Dense(10)])
    assert keras_bytes_per_row(mlp) == 4 * (1000 + 128 + 64 + 10) == plan_bytes_per_row(1000, [128, 64, 10])
    conv = keras.Sequential([keras.Input((512, 8))] + [L.Conv1D(16, 3, padding="same") for _ in range(5)])
    assert keras_bytes_per_row(conv) == 4 * (512 * 8 + 5 * 512 * 16)
    inp = keras.Input((4,), dtype="float64")
    wide = keras.Model(inp, L.GlobalAveragePooling1D()(L.RepeatVector(1000)(inp)))
    assert keras_bytes_per_row(wide) == 8 * 4 + 4 * (1000 * 4 + 4)  # the layers compute in float32


def test_a_nested_model_and_a_shared_layer_are_counted_inside(keras: Any) -> None:
    L = keras.layers
    inner = keras.Sequential([keras.Input((8,)), L.RepeatVector(100), L.Flatten(), L.Dense(2)])
    inp = keras.Input((8,))
    shared = L.Dense(8)
    outer = keras.Model(inp, inner(shared(shared(inp))))
    # at least: the input, the shared layer's two calls, the inner model's 800-float repeat and its output
    assert keras_bytes_per_row(outer) >= 4 * (8 + 2 * 8 + 800 + 800 + 2)


def test_rows_per_call_under_the_budget() -> None:
    assert max_rows(4 << 20, 64 << 20, "m") == 16
    assert max_rows(0, 1, "m") == UNBOUNDED_ROWS
    with pytest.raises(ResourceExhausted, match="m: one input row makes the model produce 4194305 bytes"):
        max_rows((4 << 20) + 1, 4 << 20, "m")


def test_attention_scores_count_though_no_layer_outputs_them(keras: Any) -> None:
    """Finding: a MultiHeadAttention over 1,024 steps was counted at 64 KiB per row while its [heads, T, T] scores
    took ~67 MB per row."""
    L = keras.layers
    inp = keras.Input((1024, 32))
    model = keras.Model(inp, L.GlobalAveragePooling1D()(L.MultiHeadAttention(num_heads=16, key_dim=8)(inp, inp)))
    assert keras_bytes_per_row(model) >= 2 * 4 * 16 * 1024 * 1024
    plain = keras.Model(inp, L.GlobalAveragePooling1D()(L.Attention()([inp, inp])))
    assert keras_bytes_per_row(plain) >= 2 * 4 * 1024 * 1024
