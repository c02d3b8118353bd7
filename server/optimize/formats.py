"""Which kernel format serves a pruned / quantized layer: a first choice by rule for judging candidates, then
the autotuner's measured choice among equivalent formats (including the requested block shape) for the result."""

from __future__ import annotations

from typing import Any

import numpy as np

from leanserve.kernels import f32_block_supported, get_format, int8_block_supported
from leanserve.server.optimize.prune import measured_sparsity
from leanserve.server.runtime.plan import LayerSpec, Plan
from leanserve.server.runtime.tuning import MIN_SPARSITY_FOR_SPARSE, jsonable_options, tune_plan


def initial_format(sparsity: float, int8: bool, block: tuple[int, int] | None) -> tuple[str, dict[str, Any]]:
    """A sensible format before measuring (all formats of one family compute the same numbers)."""
    if sparsity < MIN_SPARSITY_FOR_SPARSE:
        return ("int8" if int8 else "dense_f32"), {}
    if int8:
        return ("bsr_int8", {"block": block}) if block and int8_block_supported(*block) else ("csr_int8", {})
    if block is not None and f32_block_supported(*block):
        return "bsr_f32", {"block": block}
    return "csr_f32", {}


def build(input_shape: tuple[int, ...], specs: list[LayerSpec], int8: bool, block: tuple[int, int] | None) -> Plan:
    """A Plan of ``specs`` (already pruned, fp32) with every layer in its initial format."""
    layers, tuning = [], []
    for s in specs:
        fmt, options = initial_format(measured_sparsity(s.weights), int8, block)
        layers.append(get_format(fmt).from_dense(s.weights, s.bias, s.activation, **options))
        tuning.append({"chosen": fmt, "options": jsonable_options(options), "timings": {}})
    return Plan(input_shape=tuple(input_shape), layers=layers, layer_names=[s.name for s in specs], tuning=tuning)


def tune(plan: Plan, batch_sizes: tuple[int, ...], block: tuple[int, int] | None) -> Plan:
    """Per layer, the fastest equivalent format; a pruned layer stays sparse (``runtime.tuning.tune_plan``)."""
    return tune_plan(plan, batch_sizes, stay_sparse=True, block=block)


def layer_report(plan: Plan) -> list[dict[str, Any]]:
    """Per layer, from the stored arrays: format, block, sparsity of the effective weights, bytes."""
    out = []
    for name, layer in zip(plan.layer_names, plan.layers):
        w = layer.dense_weights()
        out.append({"name": name, "format": layer.format, "block": layer.meta().get("block"),
                    "shape": [layer.in_features, layer.out_features], "sparsity": measured_sparsity(w),
                    "nonzero": int(np.count_nonzero(w)), "bytes": int(layer.nbytes)})
    return out
