"""What a caller can ask for instead of raw outputs: probabilities, top-k, argmax (pure numpy)."""

from __future__ import annotations

from enum import Enum

import numpy as np

from leanserve.server.errors import InvalidArgument, shown
from leanserve.server.serving.model import TensorSignature


class PostProcess(str, Enum):
    RAW = "raw"
    PROBABILITIES = "probabilities"
    TOP_K = "top_k"
    ARGMAX = "argmax"


DEFAULT_TOP_K = 5
#: the outputs each post-processing answers (RAW: the model's own output, by its name)
OUTPUT_NAMES: dict[PostProcess, tuple[str, ...]] = {
    PostProcess.PROBABILITIES: ("probabilities",),
    PostProcess.TOP_K: ("indices", "scores"),
    PostProcess.ARGMAX: ("class",),
}


def check_request(kind: PostProcess, top_k: int, output: TensorSignature, requested: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is computed, a post-processing the model's ``output`` cannot take, or a requested
    output name the request would not produce. ``apply`` checks the same again on the computed rows."""
    if kind is PostProcess.RAW:
        for name in requested:
            if name != output.name:
                raise InvalidArgument(f"no output {shown(name)}; this request produces {output.name}")
        return
    names = OUTPUT_NAMES[kind]
    for name in requested:
        if name not in names:
            raise InvalidArgument(f"no output {shown(name)}; this request produces {', '.join(names)}")
    if len(output.shape) != 1:
        raise InvalidArgument(f"{kind.value} needs a [batch, classes] output; this model's output is "
                              f"[batch, {', '.join(map(str, output.shape))}]")
    classes = output.shape[0]
    if kind is PostProcess.TOP_K and classes > 0 and not 0 <= top_k <= classes:
        raise InvalidArgument(f"top_k must be between 1 and {classes} (the number of outputs), got {top_k}")


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
        return {OUTPUT_NAMES[kind][0]: np.argmax(y, axis=1).astype(np.int64)}
    probs = y if is_probability else softmax(y)
    if kind is PostProcess.PROBABILITIES:
        return {OUTPUT_NAMES[kind][0]: np.ascontiguousarray(probs, dtype=np.float32)}
    classes = y.shape[1]
    k = top_k or min(DEFAULT_TOP_K, classes)
    if not 1 <= k <= classes:
        raise InvalidArgument(f"top_k must be between 1 and {classes} (the number of outputs), got {k}")
    # argpartition then sort the k winners: O(C + k log k) per row instead of a full sort
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(probs, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    indices, scores = OUTPUT_NAMES[kind]
    return {indices: idx, scores: np.take_along_axis(probs, idx, axis=1).astype(np.float32)}
