"""The optimization data: one .npz received in the stream (never read from a server-side path), checked."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.ingest.archives import expansion_limit, read_npz

_KEYS = frozenset({"x", "y", "x_val", "y_val"})


@dataclass
class OptimizeData:
    """Rows shaped ``[n, *input_shape]`` float32; labels int64 class ids or None."""

    x: np.ndarray
    y: np.ndarray | None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return self.y is not None


def receive(chunks: Iterable[bytes], declared: int, max_bytes: int) -> bytes:
    """Concatenate the data chunks, refusing more than ``max_bytes`` (ResourceExhausted) or a size mismatch.

    Returns as soon as the declared bytes are in, without waiting for the end of the stream: a client that keeps
    its side open until the report comes (as bidirectional clients may) must not wait for the idle timeout."""
    parts, total = [], 0
    if declared <= 0:
        return b""
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise ResourceExhausted(f"optimization data exceeds the limit of {max_bytes} bytes")
        if total > declared:
            raise InvalidArgument(f"data is larger than the declared data_size_bytes={declared}")
        parts.append(chunk)
        if total == declared:
            break
    if total != declared:
        raise InvalidArgument(f"data ended after {total} bytes but data_size_bytes declared {declared}")
    return b"".join(parts)


def parse(blob: bytes, input_shape: tuple[int, ...], num_classes: int, max_bytes: int,
          max_ratio: float | None = None) -> OptimizeData:
    """Read the .npz (no pickle), reshape rows to ``input_shape`` and turn one-hot labels into class ids.

    What the data may take in memory is bounded as for uploads (``archives.expansion_limit``): at most
    ``max_ratio`` times the bytes received (at least the expansion floor; None: no ratio), never more than
    ``max_bytes`` (the Optimize data cap). The archive's members are counted while inflating, and the arrays as
    they will be held (float32 rows, int64 labels: a compressed int8 array grows 4× more when converted) before
    any conversion."""
    cap = max_bytes if max_ratio is None else expansion_limit(len(blob), max_bytes, max_ratio)
    arrays = read_npz(blob, cap, "the optimization data (.npz)")
    unknown = set(arrays) - _KEYS
    if unknown or "x" not in arrays:
        raise InvalidArgument(f"the .npz must hold x and optionally y, x_val, y_val; found {sorted(arrays)}")
    if ("x_val" in arrays) != ("y_val" in arrays) or ("y_val" in arrays and "y" not in arrays):
        raise InvalidArgument("x_val and y_val come together, and only with y")
    held = sum(4 * a.size if key.startswith("x") else 8 * len(a) for key, a in arrays.items())
    if held > cap:
        raise ResourceExhausted(f"the optimization data would take {held} bytes as float32 rows and int64 labels; "
                                f"{len(blob)} bytes received may take at most {cap}")
    x = _rows(arrays["x"], "x", input_shape)
    y = _labels(arrays["y"], "y", len(x), num_classes) if "y" in arrays else None
    x_val = y_val = None
    if "x_val" in arrays:
        x_val = _rows(arrays["x_val"], "x_val", input_shape)
        y_val = _labels(arrays["y_val"], "y_val", len(x_val), num_classes)
    return OptimizeData(x, y, x_val, y_val)


def _rows(a: np.ndarray, key: str, input_shape: tuple[int, ...]) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.number) or a.ndim < 1 or len(a) < 1:
        raise InvalidArgument(f"{key} must be a non-empty numeric array, got {a.dtype} {list(a.shape)}")
    if int(np.prod(a.shape[1:], dtype=np.int64)) != int(np.prod(input_shape)):
        raise InvalidArgument(f"{key} rows have shape {list(a.shape[1:])}; the model takes {list(input_shape)}")
    out = np.ascontiguousarray(a.reshape(len(a), *input_shape), dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidArgument(f"{key} holds NaN or infinite values")
    return out


def _labels(a: np.ndarray, key: str, n: int, num_classes: int) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == num_classes:
        a = np.argmax(a, axis=1)
    if a.ndim != 1 or len(a) != n:
        raise InvalidArgument(f"{key} must hold {n} integer labels or one-hot rows of {num_classes}, "
                              f"got shape {list(a.shape)}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise InvalidArgument(f"{key} labels must be whole numbers")
    elif not np.issubdtype(a.dtype, np.integer):
        raise InvalidArgument(f"{key} labels must be integers, got {a.dtype}")
    labels = a.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidArgument(f"{key} labels must be in 0..{num_classes - 1}")
    return labels


def split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A seeded shuffle split into (x_train, y_train, x_eval, y_eval); at least one row on each side."""
    idx = np.random.default_rng(seed).permutation(len(x))
    n_eval = min(max(1, int(round(fraction * len(x)))), len(x) - 1)
    if n_eval < 1:
        raise InvalidArgument("fine-tuning without x_val needs at least 2 rows")
    ev, tr = idx[:n_eval], idx[n_eval:]
    return x[tr], y[tr], x[ev], y[ev]
