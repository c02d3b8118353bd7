"""Format choice at load time: per layer, measure the formats that compute the same numbers and keep the fastest.

Only numerically equivalent candidates compete: an fp32 layer may move between dense (the Numba panel kernel, or BLAS
GEMM from some batch size on), CSR and BSR (the same weights, zeros skipped); an int8 layer between int8, CSR-int8
and BSR-int8 (the same quantized weights). Turning fp32 into int8 changes results and is the optimizer's decision,
never the loader's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from leanserve.kernels import (
    autotune,
    available_formats,
    f32_block_supported,
    get_format,
    int8_block_supported,
)
from leanserve.server.runtime.plan import Plan

log = logging.getLogger(__name__)

FP32_FAMILY = ("dense_f32", "csr_f32", "bsr_f32")
INT8_FAMILY = ("int8", "csr_int8", "bsr_int8")
#: BSR block shapes tried by the tuner (rows along K x columns along N): the shapes that won in bench/kernels.py
#: (column blocks at batch 1, 2-D tiles at larger batches; for int8, r x 1 feeds the VNNI kernel and 1 x 16 the
#: output-lane kernel).
BSR_BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    "bsr_f32": ((8, 1), (16, 1), (1, 16), (4, 16)),
    "bsr_int8": ((16, 1), (32, 1), (1, 16)),
}
#: below this fraction of zeros a sparse format cannot win; skip measuring it
MIN_SPARSITY_FOR_SPARSE = 0.3
#: dense fp32 layers are also measured with batches of this many rows or more on BLAS GEMM instead of the Numba panel
#: kernel (the same numbers up to float rounding): where GEMM starts to win depends on the CPU's vector registers
#: and on whether the weights stay in cache (see kernels/dense.py)
NUMPY_MIN_BATCHES = (1, 8, 32)


def candidates_for(layer_format: str, sparsity: float,
                   block: tuple[int, int] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The formats equivalent to ``layer_format`` worth measuring at this sparsity (``block``: one more BSR block
    shape to try, when the family's BSR kernel supports it)."""
    family = INT8_FAMILY if layer_format in INT8_FAMILY else FP32_FAMILY
    known = set(available_formats())
    out: list[tuple[str, dict[str, Any]]] = [(family[0], {})] if family[0] in known else []
    if sparsity >= MIN_SPARSITY_FOR_SPARSE:
        if family[1] in known:
            out.append((family[1], {}))
        if family[2] in known:
            blocks = list(BSR_BLOCKS[family[2]])
            supported = int8_block_supported if family is INT8_FAMILY else f32_block_supported
            if block is not None and tuple(block) not in blocks and supported(*block):
                blocks.append(tuple(block))
            out.extend((family[2], {"block": b}) for b in blocks)
    if family is FP32_FAMILY and family[0] in known:
        out[1:1] = [(family[0], {"numpy_min_batch": m}) for m in NUMPY_MIN_BATCHES]
    if not any(fmt == layer_format for fmt, _ in out):
        out.insert(0, (layer_format, {}))
    return out


#: a candidate format may store at most this much more than the most compact one (BSR pads partial blocks)
MAX_SIZE_RATIO = 1.25


def tune_plan(plan: Plan, batch_sizes: tuple[int, ...], *, stay_sparse: bool = False,
              block: tuple[int, int] | None = None) -> Plan:
    """A new Plan whose layers use the fastest equivalent format; the measurements are kept in ``plan.tuning``.

    ``stay_sparse`` (the optimizer's choice for pruned layers): a layer sparse enough for a sparse format is only
    served by sparse formats whose stored size is within ``MAX_SIZE_RATIO`` of the most compact one (its stored
    size is what pruning is for). ``block`` is one more BSR block shape to measure (the one pruning used)."""
    layers, tuning = [], []
    for name, layer in zip(plan.layer_names, plan.layers):
        weights, bias = layer.dense_weights(), layer.bias_vector()
        sparsity = float(1.0 - np.count_nonzero(weights) / max(weights.size, 1))
        cands = candidates_for(layer.format, sparsity, block)
        if stay_sparse and sparsity >= MIN_SPARSITY_FOR_SPARSE:
            cands = _compact([(f, o) for f, o in cands if f not in ("dense_f32", "int8")], weights, bias,
                             layer.activation)
        if len(cands) == 1 and cands[0][0] == layer.format:
            layers.append(layer)
            layer_block = layer.meta().get("block")
            tuning.append({"chosen": layer.format, "options": {"block": list(layer_block)} if layer_block else {},
                           "timings": {}})
            continue
        fmt, options, record = autotune(weights, bias, layer.activation, cands, batch_sizes=batch_sizes)
        log.info("layer %s (%.0f%% zeros): %s %s", name, 100 * sparsity, fmt, options or "")
        layers.append(get_format(fmt).from_dense(weights, bias, layer.activation, **options))
        tuning.append({"chosen": fmt, "options": jsonable_options(options), "timings": record})
    return Plan(input_shape=plan.input_shape, layers=layers, layer_names=list(plan.layer_names), tuning=tuning)


def _compact(cands: list[tuple[str, dict[str, Any]]], weights: np.ndarray, bias: np.ndarray,
             activation: str) -> list[tuple[str, dict[str, Any]]]:
    """The candidates whose stored size is within MAX_SIZE_RATIO of the smallest: a block format only competes
    when the zeros really come in its blocks."""
    sizes = [get_format(f).from_dense(weights, bias, activation, **o).nbytes for f, o in cands]
    smallest = min(sizes)
    return [c for c, n in zip(cands, sizes) if n <= MAX_SIZE_RATIO * smallest]


def jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    """Kernel options as JSON values (block tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
