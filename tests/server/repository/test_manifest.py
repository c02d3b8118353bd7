"""The typed manifest: every malformed field is InvalidArgument at parse, before anything is allocated; manifests in
the layout the server wrote before the schema existed still read; writers and readers agree."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import artifacts
from leanserve.server.repository.manifest import Manifest, ManifestLimits
from tests.fuzz import hostile

# A stored plan version and a TensorFlow-served one, as the server wrote them before the typed schema (keys in the
# same places, null numpy_min_batch, string batch keys in timings, a null dim from Keras).
OLD_PLAN = {
    "conversion_note": "", "created_at": "2025-01-01T00:00:00Z", "description": "", "format": "leanserve",
    "format_version": 1, "input": {"dtype": "float32", "name": "input", "shape": [4]},
    "layers": [{"format": "dense_f32", "meta": {"activation": "relu", "in_features": 4, "numpy_min_batch": None,
                                                "out_features": 3},
                "name": "dense", "tensors": {"bias": "layers.0.bias", "weights": "layers.0.weights"},
                "tuning": {"chosen": "dense_f32", "options": {},
                           "timings": {"dense_f32": {"1": 1.2e-06, "16": 3.4e-06}}}},
               {"format": "bsr_f32", "meta": {"activation": "softmax", "block": [1, 16], "format": "bsr_f32",
                                              "in_features": 3, "out_features": 2},
                "name": "out", "tensors": {"bias": "layers.1.bias", "indices": "layers.1.indices",
                                           "indptr": "layers.1.indptr", "values": "layers.1.values"},
                "tuning": {}}],
    "metadata": {}, "name": "m", "output": {"dtype": "float32", "name": "output", "shape": [2]},
    "output_is_probability": True,
    "reference": {"atol": 0.0001, "max_abs_error": 0.0, "max_rel_error": 0.0, "n": 128, "reference": "keras",
                  "rtol": 0.001, "seed": 0, "within_tolerance": True},
    "runtime": "plan",
    "source": {"file": "source.h5", "format": "h5", "sha256": "0" * 64, "size_bytes": 1234},
    "weights_sha256": "a" * 64,
}
OLD_TF = {
    "conversion_note": "LayerNormalization", "created_at": "2025-01-01T00:00:00Z", "description": "d",
    "format": "leanserve", "format_version": 1, "input": {"dtype": "float32", "name": "in", "shape": [12]},
    "metadata": {}, "name": "ln", "output": {"dtype": "float32", "name": "dense_1", "shape": [None, 3]},
    "output_is_probability": False,
    "reference": {"atol": 0.0001, "max_abs_error": 1e-07, "max_rel_error": 1e-06, "n": 128, "reference": "keras",
                  "rtol": 0.001, "seed": 0, "within_tolerance": True},
    "runtime": "tensorflow",
    "source": {"file": "source.keras", "format": "keras", "sha256": "1" * 64, "size_bytes": 99},
}


def test_manifests_written_before_the_schema_still_read() -> None:
    plan = Manifest.parse(OLD_PLAN)
    assert plan.layers is not None and plan.layers[1].meta.block == [1, 16]
    assert plan.layers[0].tuning.timings == {"dense_f32": {"1": 1.2e-06, "16": 3.4e-06}}
    tf = Manifest.parse(json.dumps(OLD_TF))
    assert tf.output.shape == [-1, 3] and tf.source is not None and tf.source.file == "source.keras"
    # the layout written back is the one read (null dims become -1, unset keys stay out)
    again = plan.to_dict()
    expected = copy.deepcopy(OLD_PLAN)
    del expected["layers"][0]["meta"]["numpy_min_batch"]
    assert again == expected


def test_writer_and_reader_agree(tmp_path: Path) -> None:
    for fmt in ("dense_f32", "int8", "csr_f32", "csr_int8", "bsr_f32", "bsr_int8"):
        p = hostile.plan(fmt)
        manifest, blob = artifacts.plan_manifest(p, "x", "y")
        assert Manifest.parse(manifest.to_json()) == manifest
        path = tmp_path / f"{fmt}.leanserve"
        artifacts.write_zip(path, manifest, blob)
        read, blob2 = artifacts.read_zip(path, 1 << 20)
        assert read == manifest and blob2 == blob
        x = np.random.default_rng(0).standard_normal((2, 24)).astype(np.float32)
        np.testing.assert_array_equal(artifacts.plan_from_files(read, blob)(x), p(x))


def _set(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()
BAD_FIELDS: list[tuple[tuple[Any, ...], Any]] = [
    (("input", "shape"), [-4]), (("input", "shape"), [2**40, 2**40]), (("input", "shape"), [2**63]),
    (("input", "shape"), ["4"]), (("input", "shape"), [4.0]), (("input", "shape"), [True]), (("input", "shape"), 4),
    (("input", "shape"), [0]), (("input", "dtype"), "string"), (("input", "dtype"), "object"),
    (("output", "shape"), [-2]), (("output", "dtype"), "<U8"), (("input", "name"), 7), (("input",), None),
    (("layers",), {}), (("layers",), []), (("layers",), "dense"), (("layers", 0, "tensors"), ["weights"]),
    (("layers", 0, "tensors"), "layers.0.weights"), (("layers", 0, "tensors"), {"weights": 3}),
    (("layers", 0, "tuning"), []), (("layers", 0, "tuning"), "fast"), (("layers", 0, "tuning", "timings"), [1]),
    (("layers", 0, "tuning", "timings"), {"dense_f32": {"1": "fast"}}), (("layers", 0, "format"), "nonsense"),
    (("layers", 0, "format"), 3), (("layers", 0, "meta", "in_features"), -4),
    (("layers", 0, "meta", "in_features"), 2**62), (("layers", 0, "meta", "out_features"), 0),
    (("layers", 0, "meta", "activation"), "gelu"), (("layers", 0, "meta", "block"), [1, 16]),
    (("layers", 0, "meta", "extra"), 1), (("layers", 0, "meta"), _DELETE), (("layers", 1, "meta", "block"), _DELETE),
    (("layers", 1, "meta", "block"), [1]), (("layers", 1, "meta", "format"), "csr_f32"),
    (("layers", 1, "meta", "in_features"), 4), (("runtime",), "python"), (("format_version",), 2),
    (("format",), "keras"), (("weights_sha256",), "xyz"), (("source", "file"), "../../outside"),
    (("source", "file"), "/etc/passwd"), (("source", "format"), "pickle"), (("source", "size_bytes"), -1),
    (("reference", "n"), "many"), (("unknown_key",), 1), (("metadata",), "text"), (("output_is_probability",), 1),
]


@pytest.mark.parametrize("path,value", BAD_FIELDS, ids=lambda v: repr(v)[:40])
def test_a_malformed_field_is_invalid_argument(path: tuple[Any, ...], value: Any) -> None:
    bad = _set(OLD_PLAN, path, value)
    with pytest.raises(InvalidArgument, match="manifest"):
        Manifest.parse(bad)
    with pytest.raises(InvalidArgument):
        Manifest.parse(json.dumps(bad))


def test_tensorflow_manifest_needs_a_plain_source_file() -> None:
    for source in (None, {"format": "keras"}, {"format": "keras", "file": "../x.keras"}):
        with pytest.raises(InvalidArgument):
            Manifest.parse({**OLD_TF, "source": source})


def test_limits_from_settings_are_enforced_from_shapes_alone() -> None:
    ok = Manifest.parse(OLD_PLAN, ManifestLimits(max_params=100, max_layers=2, max_row_bytes=16))
    assert ok.layers is not None
    with pytest.raises(InvalidArgument, match="parameters"):
        Manifest.parse(OLD_PLAN, ManifestLimits(max_params=(4 + 1) * 3 + (3 + 1) * 2 - 1))
    with pytest.raises(InvalidArgument, match="layers"):
        Manifest.parse(OLD_PLAN, ManifestLimits(max_layers=1))
    with pytest.raises(InvalidArgument, match="max_message_bytes"):
        Manifest.parse(OLD_PLAN, ManifestLimits(max_row_bytes=15))
    # a 2**30 x 2**30 layer is refused by arithmetic: nothing of that size is ever built
    huge = _set(_set(_set(OLD_PLAN, ("input", "shape"), [2**30]), ("layers", 0, "meta", "in_features"), 2**30),
                ("layers", 0, "meta", "out_features"), 2**30)
    huge = _set(huge, ("layers", 1, "meta", "in_features"), 2**30)
    with pytest.raises(InvalidArgument, match="parameters"):
        Manifest.parse(huge, ManifestLimits(max_params=500_000_000))


@pytest.mark.parametrize("text", [b"", b"[]", b"null", b"{", b"\xff\xfe", b"[" * 5000 + b"]" * 5000,
                                  b'{"format": "leanserve", ' * 3, json.dumps(OLD_PLAN).encode()[:-1]])
def test_text_that_is_not_a_manifest(text: bytes) -> None:
    with pytest.raises(InvalidArgument):
        Manifest.parse(text)
