"""What a caller can ask for instead of raw outputs: probabilities, top-k, argmax (pure numpy)."""

from __future__ import annotations

from enum import Enum

import numpy as np

from leanserve.server.errors import InvalidArgument


class PostProcess(str, Enum):
    RAW = "raw"
    PROBABILITIES = "probabilities"
    TOP_K = "top_k"
    ARGMAX = "argmax"


DEFAULT_TOP_K = 5


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    z = x.astype(np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def apply(
    kind: PostProcess, output_name: str, y: np.ndarray, *, is_probability: bool, top_k: int = 0
) -> dict[str, np.ndarray]:
    """Named output tensors for ``kind`` computed from the model output ``y[B, C]``."""
    if kind is PostProcess.RAW:
        return {output_name: y}
    if y.ndim != 2:
        raise InvalidArgument(f"{kind.value} needs a [batch, classes] output; this model's output is {list(y.shape)}")
    if kind is PostProcess.ARGMAX:
        return {"class": np.argmax(y, axis=1).astype(np.int64)}
    probs = y if is_probability else softmax(y)
    if kind is PostProcess.PROBABILITIES:
        return {"probabilities": np.ascontiguousarray(probs, dtype=np.float32)}
    classes = y.shape[1]
    k = top_k or min(DEFAULT_TOP_K, classes)
    if not 1 <= k <= classes:
        raise InvalidArgument(f"top_k must be between 1 and {classes} (the number of outputs), got {k}")
    # argpartition then sort the k winners: O(C + k log k) per row instead of a full sort
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(probs, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return {"indices": idx, "scores": np.take_along_axis(probs, idx, axis=1).astype(np.float32)}
