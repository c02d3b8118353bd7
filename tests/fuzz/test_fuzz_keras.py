"""Hypothesis fuzzing of Keras uploads in-process through the ingest pipeline: byte mutants of a small saved legacy
``.h5`` (the finding: 75 of 240 such mutants were INTERNAL, h5py raising RuntimeError/OSError/KeyError/ValueError)
and member/byte mutants of a ``.keras`` zip. Every outcome is accepted or INVALID_ARGUMENT / RESOURCE_EXHAUSTED
(FAILED_PRECONDITION only from the reference check); never another error, never a crash."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fuzz import hostile, pipeline

FUZZ = settings(derandomize=True, deadline=None, max_examples=80,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(3)
    d = tmp_path_factory.mktemp("keras-fuzz")
    model = keras.Sequential([keras.Input((6,), name="x"), keras.layers.Dense(5, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])
    model.save(d / "m.h5")
    model.save(d / "m.keras")
    return {"h5": (d / "m.h5").read_bytes(), "keras": (d / "m.keras").read_bytes()}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    return pipeline.settings(tmp_path_factory.mktemp("keras-fuzz-cfg"))


def _mutant(good: bytes, positions: list[int], values: list[int], cut: int | None) -> bytes:
    data = bytearray(good)
    for pos, value in zip(positions, values):
        data[pos % len(data)] = value
    return bytes(data[: cut % len(data)] if cut is not None else data)


@FUZZ
@given(positions=st.lists(st.integers(0, 10**7), min_size=1, max_size=12),
       values=st.lists(st.integers(0, 255) | st.sampled_from([0, 0xFF, 0x7F, 0x80]), min_size=12, max_size=12),
       cut=st.integers(0, 10**7), truncate=st.integers(0, 3))
def test_fuzz_h5_bytes(saved: dict[str, bytes], cfg: Any, tmp_path: Path, positions: list[int], values: list[int],
                       cut: int, truncate: int) -> None:
    data = _mutant(saved["h5"], positions, values, cut if truncate == 0 else None)
    result = pipeline.outcome(data, tmp_path, cfg)
    event(result)
    assert result in pipeline.ACCEPTABLE


@FUZZ
@given(member=st.sampled_from(["config.json", "metadata.json", "model.weights.h5"]),
       positions=st.lists(st.integers(0, 10**7), min_size=1, max_size=8),
       values=st.lists(st.integers(0, 255), min_size=8, max_size=8), deflate=st.booleans())
def test_fuzz_keras_members(saved: dict[str, bytes], cfg: Any, tmp_path: Path, member: str, positions: list[int],
                            values: list[int], deflate: bool) -> None:
    source = tmp_path / "m.keras"
    source.write_bytes(saved["keras"])
    with zipfile.ZipFile(source) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    if member in members:
        members[member] = _mutant(members[member], positions, values, None)
    data = hostile.zip_of(members, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    result = pipeline.outcome(data, tmp_path, cfg)
    event(result)
    assert result in pipeline.ACCEPTABLE
