"""Format choice at load time: per layer, measure the formats that compute the same numbers and keep the fastest.

Only numerically equivalent candidates compete: an fp32 layer may move between dense, CSR and BSR (the same
weights, zeros skipped); an int8 layer between int8, CSR-int8 and BSR-int8 (the same quantized weights). Turning
fp32 into int8 changes results and is the optimizer's decision, never the loader's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from leanserve.kernels.formats import available_formats, get_format
from leanserve.server.runtime.plan import Plan

log = logging.getLogger(__name__)

FP32_FAMILY = ("dense_f32", "csr_f32", "bsr_f32")
INT8_FAMILY = ("int8", "csr_int8", "bsr_int8")
#: BSR block shapes tried by the tuner (rows along K x columns along N): the ones that won the kernel
#: measurements (16x1/8x1 at batch 1, 4x16/1x16 at batch >= 16; int8: r x 1 for the VNNI kernel, 1 x 16 for
#: output-lane blocks).
BSR_BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    "bsr_f32": ((8, 1), (16, 1), (1, 16), (4, 16)),
    "bsr_int8": ((16, 1), (32, 1), (1, 16)),
}
#: below this fraction of zeros a sparse format cannot win; skip measuring it
MIN_SPARSITY_FOR_SPARSE = 0.3


def candidates_for(layer_format: str, sparsity: float) -> list[tuple[str, dict[str, Any]]]:
    """The formats equivalent to ``layer_format`` worth measuring at this sparsity."""
    family = INT8_FAMILY if layer_format in INT8_FAMILY else FP32_FAMILY
    known = set(available_formats())
    out: list[tuple[str, dict[str, Any]]] = [(family[0], {})] if family[0] in known else []
    if sparsity >= MIN_SPARSITY_FOR_SPARSE:
        if family[1] in known:
            out.append((family[1], {}))
        if family[2] in known:
            out.extend((family[2], {"block": block}) for block in BSR_BLOCKS[family[2]])
    if not any(fmt == layer_format for fmt, _ in out):
        out.insert(0, (layer_format, {}))
    return out


def tune_plan(plan: Plan, batch_sizes: tuple[int, ...]) -> Plan:
    """A new Plan whose layers use the fastest equivalent format; the measurements are kept in ``plan.tuning``."""
    from leanserve.kernels.autotune import autotune

    layers, tuning = [], []
    for name, layer in zip(plan.layer_names, plan.layers):
        weights = layer.dense_weights()
        sparsity = float(1.0 - np.count_nonzero(weights) / max(weights.size, 1))
        cands = candidates_for(layer.format, sparsity)
        if len(cands) == 1:
            layers.append(layer)
            block = layer.meta().get("block")
            tuning.append({"chosen": layer.format, "options": {"block": block} if block else {}, "timings": {}})
            continue
        fmt, options, record = autotune(weights, layer.bias_vector(), layer.activation, cands, batch_sizes=batch_sizes)
        log.info("layer %s (%.0f%% zeros): %s %s", name, 100 * sparsity, fmt, options or "")
        layers.append(get_format(fmt).from_dense(weights, layer.bias_vector(), layer.activation, **options))
        tuning.append({"chosen": fmt, "options": options, "timings": record})
    return Plan(input_shape=plan.input_shape, layers=layers, layer_names=list(plan.layer_names), tuning=tuning)
