"""Weight formats by name: the built-in ``LayerKernel`` classes, plus any a caller registers."""

from __future__ import annotations

from leanserve.kernels.dense import DenseF32
from leanserve.kernels.formats import KernelInputError, LayerKernel
from leanserve.kernels.int8 import Int8
from leanserve.kernels.sparse_bsr import BsrF32, BsrInt8
from leanserve.kernels.sparse_csr import CsrF32, CsrInt8

BUILTIN_FORMATS: tuple[type[LayerKernel], ...] = (DenseF32, Int8, CsrF32, CsrInt8, BsrF32, BsrInt8)

_REGISTRY: dict[str, type[LayerKernel]] = {cls.format: cls for cls in BUILTIN_FORMATS}


def register(cls: type[LayerKernel]) -> type[LayerKernel]:
    """Class decorator: make a format available by its ``format`` name (a built-in name cannot be replaced)."""
    if cls.format in _REGISTRY and _REGISTRY[cls.format] is not cls:
        raise KernelInputError(f"format {cls.format!r} is already registered")
    _REGISTRY[cls.format] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a format a caller registered (built-in formats stay)."""
    if any(cls.format == name for cls in BUILTIN_FORMATS):
        raise KernelInputError(f"format {name!r} is built in")
    _REGISTRY.pop(name, None)


def get_format(name: str) -> type[LayerKernel]:
    """The ``LayerKernel`` class registered under ``name``; ``KernelInputError`` for an unknown name."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise KernelInputError(f"unknown layer format {str(name)[:64]!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def available_formats() -> list[str]:
    """Names of every registered format."""
    return sorted(_REGISTRY)
