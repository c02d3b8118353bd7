"""Every format's ``from_arrays`` refuses arrays a file could carry that would make a kernel (compiled without bounds
checks) read out of bounds: wrong lengths of values/scales/bias/indices/indptr, indices outside [0, K) (negative
ones too), a non-monotone indptr, unsupported blocks, inexact dtypes, non-contiguous arrays, bad meta."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanserve.kernels import KernelInputError, LayerKernel, get_format

FORMATS = [("dense_f32", {}), ("int8", {}), ("csr_f32", {}), ("csr_int8", {}), ("bsr_f32", {"block": (1, 4)}),
           ("bsr_f32", {"block": (4, 1)}), ("bsr_int8", {"block": (16, 1)}), ("bsr_int8", {"block": (1, 8)})]
K, N = 37, 11


def _kernel(fmt: str, options: dict[str, Any], seed: int = 0) -> LayerKernel:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    if fmt not in ("dense_f32", "int8"):
        w[rng.random((K, N)) < 0.6] = 0
    return get_format(fmt).from_dense(w, rng.standard_normal(N).astype(np.float32), "relu", **options)


def _stored(kernel: LayerKernel) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return {k: np.array(v) for k, v in kernel.arrays().items()}, json.loads(json.dumps(kernel.meta()))


def _refused(fmt: str, arrays: dict[str, Any], meta: Any) -> None:
    with pytest.raises(KernelInputError):
        get_format(fmt).from_arrays(arrays, meta)


def _alterations(arrays: dict[str, np.ndarray]) -> list[tuple[str, Callable[[dict[str, np.ndarray]], None]]]:
    out: list[tuple[str, Callable[[dict[str, np.ndarray]], None]]] = []
    for key, a in arrays.items():
        out.append((f"{key} one short", lambda d, k=key: d.__setitem__(k, d[k][:-1].copy())))
        out.append((f"{key} one long", lambda d, k=key: d.__setitem__(k, np.concatenate([d[k], d[k][-1:]]))))
        wrong = np.float64 if a.dtype != np.float64 else np.float32
        out.append((f"{key} as {np.dtype(wrong)}", lambda d, k=key, t=wrong: d.__setitem__(k, d[k].astype(t))))
        if a.ndim >= 1 and a.shape[0] > 1:
            out.append((f"{key} strided", lambda d, k=key: d.__setitem__(k, np.repeat(d[k], 2, axis=0)[::2])))
        out.append((f"{key} missing", lambda d, k=key: d.pop(k)))
    return out


@pytest.mark.parametrize("fmt,options", FORMATS, ids=lambda v: str(v))
def test_every_altered_array_is_refused(fmt: str, options: dict[str, Any]) -> None:
    kernel = _kernel(fmt, options)
    arrays, meta = _stored(kernel)
    again = get_format(fmt).from_arrays(arrays, meta)  # the untouched arrays load
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    np.testing.assert_array_equal(again(x), kernel(x))
    for what, alter in _alterations(arrays):
        if what.endswith("strided"):
            bad = dict(arrays)
            alter(bad)
            if bad[what.split()[0]].flags.c_contiguous:
                continue
        else:
            bad = {k: v.copy() for k, v in arrays.items()}
            alter(bad)
        with pytest.raises(KernelInputError):
            get_format(fmt).from_arrays(bad, meta)


@pytest.mark.parametrize("fmt,options", [f for f in FORMATS if f[0][:3] in ("csr", "bsr")], ids=lambda v: str(v))
def test_sparse_index_attacks_are_refused(fmt: str, options: dict[str, Any]) -> None:
    arrays, meta = _stored(_kernel(fmt, options))
    assert arrays["indices"].size > 2

    def with_(key: str, f: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
        return {**arrays, key: np.ascontiguousarray(f(arrays[key].copy()))}

    n_cols = K if fmt.startswith("csr") else -(-K // options["block"][0])
    signed = arrays["indices"].astype(np.int32)
    signed[0] = -1
    cases = {
        "negative index": {**arrays, "indices": signed},
        "index == K": with_("indices", lambda a: np.where(np.arange(a.size) == 0, n_cols, a).astype(a.dtype)),
        "indptr not from 0": with_("indptr", lambda a: a + 1),
        "indptr decreasing": with_("indptr", lambda a: np.where(np.arange(a.size) == 1, a[2] + 1, a).astype(a.dtype)),
        "indptr past nnz": with_("indptr", lambda a: np.where(np.arange(a.size) == a.size - 1, a[-1] + 1, a)
                                 .astype(a.dtype)),
        "indptr as float": with_("indptr", lambda a: a.astype(np.float32)),
        "indices as bool": with_("indices", lambda a: a.astype(bool)),
        "values 2-D": with_("values", lambda a: a.reshape(a.shape[0], -1)) if fmt.startswith("bsr") else None,
    }
    for bad in cases.values():
        if bad is not None:
            _refused(fmt, bad, meta)


@pytest.mark.parametrize("fmt,options", FORMATS, ids=lambda v: str(v))
def test_bad_meta_is_refused(fmt: str, options: dict[str, Any]) -> None:
    arrays, meta = _stored(_kernel(fmt, options))
    bad_values: list[tuple[str, Any]] = [
        ("in_features", -1), ("in_features", 0), ("in_features", 2**40), ("in_features", True),
        ("in_features", "37"), ("in_features", 37.0), ("out_features", N - 1), ("activation", "gelu"),
        ("activation", ["relu"]), ("activation", None),
    ]
    if fmt in ("dense_f32", "int8"):  # a sparse layer may legitimately have inputs no stored weight uses
        bad_values.append(("in_features", K + 1))
    else:
        bad_values.append(("in_features", 1))
    if fmt.startswith("bsr"):
        r, c = options["block"]
        bad_values += [("block", [r]), ("block", [r, c, 1]), ("block", "16x1"), ("block", [2, 2]), ("block", [-r, c]),
                       ("block", [10**12, 4]), ("block", [r, 32])]
    if fmt == "int8":
        bad_values += [("path", "fast"), ("path", 3)]
    for key, value in bad_values:
        _refused(fmt, arrays, {**meta, key: value})
    for key in ("activation", "in_features"):
        _refused(fmt, arrays, {k: v for k, v in meta.items() if k != key})
    _refused(fmt, arrays, [meta])
    _refused(fmt, list(arrays.values()), meta)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(FORMATS),
    key_index=st.integers(0, 10),
    position=st.integers(0, 10**6),
    value=st.one_of(st.integers(-(2**31), 2**31), st.sampled_from([0, -1, 1, K, N, K - 1, 2**16, 2**32 - 1])),
)
def test_fuzz_one_entry_of_one_array(config: tuple[str, dict[str, Any]], key_index: int, position: int,
                                     value: int) -> None:
    """Overwrite one entry of one array with an arbitrary value: the layer is refused, or it loads and runs (its
    arrays satisfy every invariant the kernels rely on)."""
    fmt, options = config
    arrays, meta = _stored(_kernel(fmt, options))
    key = sorted(arrays)[key_index % len(arrays)]
    flat = arrays[key].reshape(-1)
    if flat.size == 0:
        return
    info = np.iinfo(flat.dtype) if np.issubdtype(flat.dtype, np.integer) else None
    flat[position % flat.size] = np.clip(value, info.min, info.max) if info is not None else value
    try:
        layer = get_format(fmt).from_arrays(arrays, meta)
    except KernelInputError:
        return
    out = layer(np.random.default_rng(0).standard_normal((5, K)).astype(np.float32))
    assert out.shape == (5, N)
