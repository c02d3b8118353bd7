"""Check a served model against a reference on seeded random inputs.

Inputs are drawn from ``numpy.random.default_rng(seed)`` (so a report is reproducible) in the model's input dtype:
standard normal for floating point, integers in the range the type shares with int8/uint8 (a model taking
integers usually takes indices or pixel values; if it refuses them, e.g. an embedding of fewer rows, 0 and 1
instead), random bits for bool. They are fed in a few batches of different
sizes (1, 3, then up to 64 rows) so batch-size-dependent bugs show up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from leanserve.server.errors import FailedPrecondition, brief

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ReferenceReport:
    """Outcome of ``reference_check``.

    ``max_rel_error`` is ``max |served - ref| / max(|ref|, atol)``: the ``atol`` floor keeps near-zero reference
    values (softmax tails) from inflating it. ``within_tolerance`` follows ``numpy.allclose``:
    ``|served - ref| <= atol + rtol * |ref|`` for every element, and every output finite.
    """

    n: int
    max_abs_error: float
    max_rel_error: float
    within_tolerance: bool
    atol: float
    rtol: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_check(
    served: Predict,
    reference: Predict,
    input_shape: tuple[int, ...],
    *,
    dtype: np.dtype | str = np.float32,
    n: int = 256,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    max_rows: int = 64,
) -> ReferenceReport:
    """Compare ``served(x)`` with ``reference(x)`` on ``n`` seeded random inputs of ``input_shape`` and ``dtype``.

    The rows go in batches of 1, 3, then up to ``max_rows`` (at most 64).
    Raises ``FailedPrecondition`` if the two disagree on the output shape, or if computing the samples fails (for
    integer inputs, after a second try on inputs of only 0 and 1: a model taking indices may refuse larger ones).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    x = sample_inputs(rng, (n, *input_shape), dtype)
    try:
        return _compare(served, reference, x, atol, rtol, seed, max_rows)
    except FailedPrecondition:
        raise
    except Exception as exc:  # noqa: BLE001 -- the model's own error on these values, answered as a refusal
        if dtype.kind not in "iu":
            raise FailedPrecondition("model refused: it fails on random sample inputs: "
                                     f"{brief(exc, first_line=True)}") from None
    # integer inputs are often indices (an embedding's): 0 and 1 are valid for any table of two rows or more
    x = rng.integers(0, 1, size=(n, *input_shape), endpoint=True).astype(dtype)
    try:
        return _compare(served, reference, x, atol, rtol, seed, max_rows)
    except FailedPrecondition:
        raise
    except Exception as exc:  # noqa: BLE001 -- as above
        raise FailedPrecondition("model refused: it fails on sample inputs of 0 and 1: "
                                 f"{brief(exc, first_line=True)}") from None


def _compare(served: Predict, reference: Predict, x: np.ndarray, atol: float, rtol: float, seed: int,
             max_rows: int) -> ReferenceReport:
    n = len(x)
    max_abs = max_rel = 0.0
    ok = True
    for batch in _batches(x, max_rows):
        got = np.asarray(served(batch), dtype=np.float64)
        want = np.asarray(reference(batch), dtype=np.float64)
        if got.shape != want.shape:
            raise FailedPrecondition(f"served output shape {list(got.shape)} != reference {list(want.shape)}")
        if not (np.all(np.isfinite(got)) and np.all(np.isfinite(want))):
            return ReferenceReport(n, float("inf"), float("inf"), False, atol, rtol, seed)
        diff = np.abs(got - want)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(want), atol)).max(initial=0.0)))
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(want)))
    return ReferenceReport(n, max_abs, max_rel, ok, atol, rtol, seed)


def sample_inputs(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random inputs of ``dtype`` (see the module docstring)."""
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = (0, 255) if dtype.kind == "u" else (-128, 127)
        return rng.integers(max(low, info.min), min(high, info.max), size=shape, endpoint=True).astype(dtype)
    raise ValueError(f"no random inputs for dtype {dtype}")


def _batches(x: np.ndarray, max_rows: int = 64) -> list[np.ndarray]:
    """Batches of 1, 3, then up to ``min(64, max_rows)`` rows (each at most ``max_rows``)."""
    step = max(1, min(64, max_rows))
    bounds = sorted({0, 1, min(4, 1 + step), len(x)})
    while bounds[-2] + step < len(x):
        bounds.insert(-1, bounds[-2] + step)
    bounds = sorted({min(b, len(x)) for b in bounds})
    return [x[a:b] for a, b in zip(bounds, bounds[1:])]


def keras_reference(model: Any) -> Predict:
    """A reference callable running ``model(x, training=False)`` on ``x`` as given (in the model's input dtype) and
    returning float32 numpy."""
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()

    def run(x: np.ndarray) -> np.ndarray:
        out = model(np.asarray(x), training=False)
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)

    return run
