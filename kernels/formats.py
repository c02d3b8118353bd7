"""The contract between the runtime and the kernels: one ``LayerKernel`` per weight format.

A dense layer ``y = act(x @ W + b)`` (``W`` is ``[K, N]``, Keras' kernel layout) can be served in several
formats (dense fp32, int8, CSR, BSR, sparse-int8). Each format is a ``LayerKernel`` subclass, registered by name in
``kernels.registry``; the runtime only ever talks to this interface, so it never needs to know how a format packs
its weights. Everything here is plain numpy: nothing imports from ``server/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

#: Activations every kernel fuses into its output pass. ``softmax`` is applied per row.
ACTIVATIONS: tuple[str, ...] = ("linear", "relu", "sigmoid", "tanh", "softmax")


#: Formats that quantize their input activations per row on every call (``kernels.quantize.quantize_rows``);
#: a faithful reference of such a layer quantizes its input the same way.
QUANTIZED_INPUT_FORMATS: frozenset[str] = frozenset({"int8", "csr_int8", "bsr_int8"})


class KernelInputError(ValueError):
    """A checked kernel entry point was given arrays of the wrong shape, dtype or layout."""


class LayerKernel(ABC):
    """One dense layer, prepared for one weight format.

    Subclasses set ``format`` and implement the abstract methods. ``__call__`` is the unchecked fast path the
    runtime uses once the plan's shapes are validated; ``run`` is the checked public entry point.
    """

    format: ClassVar[str]

    in_features: int
    out_features: int
    activation: str

    @classmethod
    @abstractmethod
    def from_dense(
        cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any
    ) -> "LayerKernel":
        """Build from fp32 ``weights[K, N]`` and ``bias[N]`` (quantize / sparsify as the format requires)."""

    @classmethod
    @abstractmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "LayerKernel":
        """Rebuild from what ``arrays()`` and ``meta()`` returned (loaded from safetensors + a JSON manifest)."""

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to persist (safetensors-compatible: C-contiguous numeric arrays)."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-serialisable options needed by ``from_arrays`` (activation, shapes, block shape, ...)."""

    @abstractmethod
    def dense_weights(self) -> np.ndarray:
        """The effective fp32 ``[K, N]`` weights this kernel computes with (dequantized, zeros kept)."""

    @abstractmethod
    def bias_vector(self) -> np.ndarray:
        """The fp32 ``[N]`` bias."""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Unchecked fast path: ``x`` is C-contiguous float32 ``[B, K]``; returns float32 ``[B, N]``."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Compile / load every specialisation a request could hit, so no request pays the JIT."""
        for batch in batch_sizes:
            self(np.zeros((batch, self.in_features), dtype=np.float32))

    @property
    def nbytes(self) -> int:
        """Bytes of weight storage (what ``arrays()`` persists)."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Checked entry point: validates ``x`` then calls the fast path."""
        x = check_input(x, self.in_features)
        return self(x)


def check_input(x: np.ndarray, in_features: int) -> np.ndarray:
    """Validate a ``[B, K]`` float32 activation matrix, returning a C-contiguous view or copy."""
    if not isinstance(x, np.ndarray):
        raise KernelInputError(f"expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise KernelInputError(f"expected float32 input, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != in_features:
        raise KernelInputError(f"expected input of shape [B, {in_features}], got {list(x.shape)}")
    if x.shape[0] < 1:
        raise KernelInputError("batch must hold at least one row")
    return np.ascontiguousarray(x)


def check_activation(activation: str) -> str:
    """Return ``activation`` if a kernel can fuse it, else raise ``KernelInputError``."""
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    return activation


#: Largest ``in_features`` / ``out_features`` a stored layer may declare: indices and offsets are 32-bit.
MAX_FEATURES = 2**31 - 1


def stored_array(arrays: Any, key: str, dtypes: tuple[Any, ...], shape: tuple[int | None, ...]) -> np.ndarray:
    """``arrays[key]`` checked as loaded from a file: a C-contiguous numpy array of exactly one of ``dtypes`` and of
    ``shape`` (``None`` = any length on that axis). Raises ``KernelInputError`` naming what is wrong.

    Every ``from_arrays`` runs its arrays through this (and the format's own index checks) so that no caller can
    hand a kernel arrays it would read out of bounds (the kernels are compiled without bounds checks)."""
    if not isinstance(arrays, dict):
        raise KernelInputError(f"layer arrays must be a dict, got {type(arrays).__name__}")
    if key not in arrays:
        raise KernelInputError(f"layer arrays lack {key!r} (have {sorted(map(str, arrays))})")
    a = arrays[key]
    if not isinstance(a, np.ndarray):
        raise KernelInputError(f"array {key!r} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in tuple(np.dtype(d) for d in dtypes):
        expected = " or ".join(str(np.dtype(d)) for d in dtypes)
        raise KernelInputError(f"array {key!r} has dtype {a.dtype}; expected {expected}")
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        expected = ["*" if d is None else d for d in shape]
        raise KernelInputError(f"array {key!r} has shape {list(a.shape)}; expected {expected}")
    if not a.flags.c_contiguous:
        raise KernelInputError(f"array {key!r} is not C-contiguous")
    return a


def meta_int(meta: Any, key: str, low: int = 1, high: int = MAX_FEATURES) -> int:
    """``meta[key]`` as an int in ``[low, high]`` (a bool is not an int here); ``KernelInputError`` otherwise."""
    value = meta_value(meta, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise KernelInputError(f"layer meta {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def meta_value(meta: Any, key: str) -> Any:
    """``meta[key]``; ``KernelInputError`` when ``meta`` is not a dict or lacks ``key``."""
    if not isinstance(meta, dict):
        raise KernelInputError(f"layer meta must be a dict, got {type(meta).__name__}")
    if key not in meta:
        raise KernelInputError(f"layer meta lacks {key!r}")
    return meta[key]


def meta_activation(meta: Any) -> str:
    """``meta["activation"]`` checked against the fused activations."""
    activation = meta_value(meta, "activation")
    if not isinstance(activation, str):
        raise KernelInputError(f"layer meta 'activation' must be a string, got {activation!r}")
    return check_activation(activation)
