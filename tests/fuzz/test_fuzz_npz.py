"""Hypothesis fuzzing of the Optimize data (.npz): hand-written .npy headers (any shape, dtype, order, body length),
byte mutants of the archive and odd member names. Every outcome is parsed data or INVALID_ARGUMENT /
RESOURCE_EXHAUSTED; nothing is unpickled, nothing is allocated from a declared shape. Refused cases through a real
server's Optimize keep their codes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from leanserve.client import Client
from leanserve.server.app import create_server
from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.optimize import data as data_mod
from tests.conftest import make_settings
from tests.fuzz import hostile

FUZZ = settings(derandomize=True, deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
CAP = 1 << 20
DESCRS = ["<f4", ">f4", "<f8", "<f2", "|i1", "|u1", "<i4", "<i8", ">i8", "|b1", "|O", "<U4", "|S3", "|V8", "<c8",
          "<M8[s]", "<m8[s]", [("a", "<f4")], "<f4 ", "float32", 7]


def _parse(blob: bytes) -> str:
    try:
        d = data_mod.parse(blob, (6,), 3, CAP)
    except (InvalidArgument, ResourceExhausted) as exc:
        return type(exc).__name__
    assert d.x.dtype == np.float32 and d.x.shape[1:] == (6,) and np.isfinite(d.x).all()
    return "OK"


def _good() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"x": hostile.npy_bytes(rng.standard_normal((10, 6)).astype(np.float32)),
            "y": hostile.npy_bytes(rng.integers(0, 3, 10))}


@FUZZ
@given(key=st.sampled_from(["x", "y", "x_val", "y_val", "z", "x.npy", "../x", ""]),
       shape=st.lists(st.integers(-3, 2**40) | st.sampled_from([0, 1, 6, 10, 2**31, 2**62, 2**63]), max_size=4),
       descr=st.sampled_from(DESCRS), fortran=st.booleans(), body=st.integers(0, 4096),
       compressed=st.booleans())
def test_fuzz_npy_headers(key: str, shape: list[int], descr: Any, fortran: bool, body: int, compressed: bool) -> None:
    header = {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}
    members = {**_good(), key: hostile.npy_bytes(header=header, body=b"\x01" * body)}
    result = _parse(hostile.npz_of(members, zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED))
    event(result)


@FUZZ
@given(positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=8), byte=st.integers(0, 255),
       compressed=st.booleans())
def test_fuzz_npz_bytes(positions: list[int], byte: int, compressed: bool) -> None:
    data = bytearray(hostile.npz_of(_good(), zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED))
    for pos in positions:
        data[pos % len(data)] = byte
    event(_parse(bytes(data)))


def test_declared_shapes_are_never_allocated() -> None:
    """A 200-byte .npy that declares 2**40 float64 elements is refused by arithmetic (numpy's own reader would try to
    allocate the declared shape first); an object array is refused without unpickling."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (2**20, 2**20)}
    with pytest.raises(InvalidArgument, match="declares shape"):
        data_mod.parse(hostile.npz_of({"x": hostile.npy_bytes(header=header, body=b"\0" * 64)}), (6,), 3, CAP)
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(InvalidArgument, match="pickle"):
        data_mod.parse(buf.getvalue(), (1,), 2, CAP)


def test_npz_cap_is_the_optimize_data_cap() -> None:
    """Finding: the .npz check allowed 4x the data cap. It is the cap now, counted while inflating."""
    blob = hostile.npz_of({"x": hostile.npy_bytes(np.zeros((CAP // 24 + 1, 6), np.float32))})
    assert len(blob) < CAP // 100
    with pytest.raises(ResourceExhausted):
        data_mod.parse(blob, (6,), 3, CAP)
    data_mod.parse(hostile.npz_of({"x": hostile.npy_bytes(np.zeros((CAP // 48, 6), np.float32))}), (6,), 3, CAP)


def test_refused_data_through_optimize(tmp_path: Path) -> None:
    handle = create_server(make_settings(tmp_path / "models", autotune=False, reference_samples=8,
                                         optimize_max_data_bytes=4 << 20))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as client:
            manifest, tensors = hostile.files(hostile.plan("dense_f32", k=6, n=3))
            hostile.upload_raw(client, hostile.leanserve_zip(manifest, tensors), "m")
            header = {"descr": "<f4", "fortran_order": False, "shape": (2**31, 2**31)}
            cases = {
                "bomb": (hostile.npz_of({"x": hostile.npy_bytes(np.zeros((1 << 20, 6), np.float32))}),
                         grpc.StatusCode.RESOURCE_EXHAUSTED),
                "lying header": (hostile.npz_of({"x": hostile.npy_bytes(header=header, body=b"\0" * 24)}),
                                 grpc.StatusCode.INVALID_ARGUMENT),
                "object array": (hostile.npz_of({"x": hostile.npy_bytes(header={**header, "descr": "|O",
                                                                                "shape": (1,)}, body=b"\x80\x04N.")}),
                                 grpc.StatusCode.INVALID_ARGUMENT),
                "not a zip": (b"\x93NUMPY" + b"\0" * 100, grpc.StatusCode.INVALID_ARGUMENT),
            }
            for name, (blob, expected) in cases.items():
                path = tmp_path / f"{name}.npz"
                path.write_bytes(blob)
                with pytest.raises(grpc.RpcError) as err:
                    client.optimize("m", path, sparsity=0.5)
                assert err.value.code() == expected, (name, err.value.details())
            assert client.predict("m", np.ones((1, 6), np.float32)).outputs["y"].shape == (1, 3)
    finally:
        handle.stop(0.5)
