"""Which kernel format serves a pruned / quantized layer: a first choice by rule for judging candidates, then
the autotuner's measured choice among equivalent formats (including the requested block shape) for the result."""

from __future__ import annotations

from typing import Any

import numpy as np

from leanserve.kernels.formats import get_format
from leanserve.kernels.sparse_bsr import f32_block_supported, int8_block_supported
from leanserve.server.optimize.prune import measured_sparsity
from leanserve.server.runtime.plan import LayerSpec, Plan
from leanserve.server.runtime.tuning import MIN_SPARSITY_FOR_SPARSE, candidates_for


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
        tuning.append({"chosen": fmt, "options": _jsonable(options), "timings": {}})
    return Plan(input_shape=tuple(input_shape), layers=layers, layer_names=[s.name for s in specs], tuning=tuning)


def tune(plan: Plan, batch_sizes: tuple[int, ...], block: tuple[int, int] | None) -> Plan:
    """Per layer, time the equivalent formats (the tuner's usual candidates plus the pruned block shape; only
    sparse ones for a pruned layer) and keep the fastest; the record lands in ``plan.tuning`` and so in GetModel's layer timings."""
    from leanserve.kernels.autotune import autotune

    layers, tuning = [], []
    for layer in plan.layers:
        weights, bias = layer.dense_weights(), layer.bias_vector()
        sparsity = measured_sparsity(weights)
        cands = candidates_for(layer.format, sparsity)
        if sparsity >= MIN_SPARSITY_FOR_SPARSE:
            # a pruned layer stays sparse: its stored size is what pruning is for; the fastest sparse format wins
            cands = [(f, o) for f, o in cands if f not in ("dense_f32", "int8")]
        cands = _compact(cands, weights, bias, layer.activation)
        first, first_opts = initial_format(sparsity, layer.format in ("int8", "csr_int8", "bsr_int8"), block)
        if first_opts and (first, first_opts) not in cands:
            cands.append((first, first_opts))
        fmt, options, record = autotune(weights, bias, layer.activation, cands, batch_sizes=batch_sizes)
        layers.append(get_format(fmt).from_dense(weights, bias, layer.activation, **options))
        tuning.append({"chosen": fmt, "options": _jsonable(options), "timings": record})
    return Plan(input_shape=plan.input_shape, layers=layers, layer_names=list(plan.layer_names), tuning=tuning)


#: a candidate format may store at most this much more than the most compact one (BSR pads partial blocks)
MAX_SIZE_RATIO = 1.25


def _compact(cands: list[tuple[str, dict[str, Any]]], weights: np.ndarray, bias: np.ndarray,
             activation: str) -> list[tuple[str, dict[str, Any]]]:
    """The candidates whose stored size is within MAX_SIZE_RATIO of the smallest: a block format only competes
    when the zeros really come in its blocks."""
    sizes = [get_format(f).from_dense(weights, bias, activation, **o).nbytes for f, o in cands]
    smallest = min(sizes)
    return [c for c, n in zip(cands, sizes) if n <= MAX_SIZE_RATIO * smallest]


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def layer_report(plan: Plan) -> list[dict[str, Any]]:
    """Per layer, from the stored arrays: format, block, sparsity of the effective weights, bytes."""
    out = []
    for name, layer in zip(plan.layer_names, plan.layers):
        w = layer.dense_weights()
        out.append({"name": name, "format": layer.format, "block": layer.meta().get("block"),
                    "shape": [layer.in_features, layer.out_features], "sparsity": measured_sparsity(w),
                    "nonzero": int(np.count_nonzero(w)), "bytes": int(layer.nbytes)})
    return out
