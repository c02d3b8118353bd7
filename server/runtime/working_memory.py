"""How much memory one row of a model's input makes it allocate, and so how many rows one call of it may take.

A model's file bounds its weights, not what it computes: a 0-parameter ``RepeatVector(10**6)`` in a 15 KB file turns
each input row into 4 MB, and a few hundred convolutions over a long sequence keep a megabyte per row per layer.
The working memory of a call is bounded by the sum of every layer's output for its rows (what it holds if nothing
is freed before the end), plus what attention layers hold inside (their scores: heads x queries x keys), so
``Settings.max_activation_bytes`` divided by that sum per row is the most rows one call may take: a model refused
when a single row is over it, every other call bounded. Other scratch memory a layer may use inside (a convolution's
workspace, say) is not counted: it is of the order of the layer's own output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from leanserve.server.errors import ResourceExhausted

#: the row cap of a model with no intermediate results to count (a model built in code, a test's toy)
UNBOUNDED_ROWS = 2**62


def keras_bytes_per_row(model: Any) -> int:
    """Bytes of every tensor a Keras model produces for one input row: its input and each layer's outputs (layers
    of nested models counted one by one; a dimension other than the batch that is not known counts as 1)."""
    tensors = {id(t): t for t in model.inputs}  # by identity: an input layer's output is the model's input
    inside = 0
    for layer in _layers(model):
        for node in getattr(layer, "_inbound_nodes", ()):
            tensors.update((id(t), t) for t in getattr(node, "outputs", ()))
            inside += _attention_bytes(layer, list(getattr(node, "input_tensors", ())))
    return sum(_tensor_bytes(t) for t in tensors.values()) + inside


#: attention layers whose scores, [heads,] queries x keys per row, never appear as a layer output
_ATTENTION = {"MultiHeadAttention": "num_heads", "GroupedQueryAttention": "num_query_heads", "Attention": None,
              "AdditiveAttention": None}


def _attention_bytes(layer: Any, inputs: list[Any]) -> int:
    """The float32 attention scores and their softmax for one row of an attention layer's call (AdditiveAttention's
    scores also have the feature axis); 0 for any other layer."""
    kind = type(layer).__name__
    if kind not in _ATTENTION or len(inputs) < 2:
        return 0
    query, value = (getattr(t, "shape", None) for t in inputs[:2])
    if query is None or value is None or len(query) < 3 or len(value) < 3:
        return 0
    steps = [int(d) if d is not None else 1 for d in (query[-2], value[-2])]
    heads = int(getattr(layer, _ATTENTION[kind]) or 1) if _ATTENTION[kind] else 1
    width = int(query[-1] or 1) if kind == "AdditiveAttention" else 1
    return 2 * 4 * heads * steps[0] * steps[1] * width


def _layers(model: Any) -> list[Any]:
    found, todo = [], list(getattr(model, "layers", ()))
    while todo:
        layer = todo.pop()
        found.append(layer)
        todo.extend(getattr(layer, "layers", ()))
    return found


def _tensor_bytes(tensor: Any) -> int:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return 0
    try:
        itemsize = np.dtype(str(tensor.dtype)).itemsize
    except TypeError:  # a dtype numpy does not know (a string tensor): counted as 8 bytes per element
        itemsize = 8
    return math.prod(int(d) if d is not None else 1 for d in tuple(shape)[1:]) * itemsize


def plan_bytes_per_row(in_features: int, out_features: list[int]) -> int:
    """Bytes one row makes a Plan allocate: its input as float32 (a copy when it came in another layout) and each
    layer's float32 output."""
    return 4 * (in_features + sum(out_features))


def max_rows(bytes_per_row: int, budget: int, what: str) -> int:
    """The most rows one call may take under ``budget`` bytes of intermediate results; ResourceExhausted when a
    single row needs more (``what`` names the model in the message)."""
    if bytes_per_row <= 0:
        return UNBOUNDED_ROWS
    rows = budget // bytes_per_row
    if rows < 1:
        raise ResourceExhausted(f"{what}: one input row makes the model produce {bytes_per_row} bytes of "
                                f"intermediate results, more than max_activation_bytes ({budget})")
    return rows
