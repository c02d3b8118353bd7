"""leanserve's compiled layer kernels: the public contract. Pure functions over numpy arrays (Numba, nogil, cached);
nothing here imports from the server, and the server imports kernels only through this module.

- ``LayerKernel`` (one dense layer ``act(x @ W + b)`` in one weight format), ``get_format`` / ``available_formats`` /
  ``register`` (formats by name), ``prepare`` / ``dense`` (the checked entry points), ``KernelInputError``;
  ``fuse_dense_chains`` (consecutive fp32 dense layers as one kernel call).
- ``autotune``: time equivalent formats on this machine; ``prune_magnitude``; per-channel weight and per-row
  activation quantization; ``activate_numpy``, the float64 reference of the fused activations.
"""

from leanserve.kernels.activations import activate_numpy
from leanserve.kernels.api import check_layer, dense, prepare
from leanserve.kernels.autotune import autotune, candidate_key
from leanserve.kernels.dense import fuse_dense_chains
from leanserve.kernels.formats import (
    ACTIVATIONS,
    QUANTIZED_INPUT_FORMATS,
    KernelInputError,
    LayerKernel,
    check_activation,
    check_input,
)
from leanserve.kernels.prune import prune_magnitude
from leanserve.kernels.quantize import quantize_rows, quantize_weights_per_channel
from leanserve.kernels.registry import available_formats, get_format, register, unregister
from leanserve.kernels.sparse_bsr import f32_block_supported, int8_block_supported
from leanserve.kernels._simd import has_avx512_vnni

__all__ = [
    "ACTIVATIONS", "QUANTIZED_INPUT_FORMATS", "KernelInputError", "LayerKernel", "activate_numpy", "autotune",
    "available_formats", "candidate_key", "check_activation", "check_input", "check_layer", "dense",
    "f32_block_supported", "fuse_dense_chains", "get_format", "has_avx512_vnni", "int8_block_supported", "prepare",
    "prune_magnitude", "quantize_rows", "quantize_weights_per_channel", "register", "unregister",
]
