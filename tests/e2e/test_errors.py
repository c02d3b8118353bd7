"""Every bad input gets its status code and a message a person understands."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.v1 import model_service_pb2 as pb
from leanserve.server.app import create_server
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.conftest import make_settings


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code(), err.value.details()


@pytest.fixture
def seeded(client: Client, model_files) -> Client:
    client.upload(model_files["seed_h5"], "seed")
    return client


def test_unknown_model_and_version(seeded: Client) -> None:
    code, msg = _code(seeded.predict, "nope", np.zeros((1, 1000), np.float32))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    code, msg = _code(seeded.predict, "seed", np.zeros((1, 1000), np.float32), version=9)
    assert code == grpc.StatusCode.NOT_FOUND and "version 9" in msg
    assert _code(seeded.info, "nope")[0] == grpc.StatusCode.NOT_FOUND
    assert _code(seeded.delete, "nope")[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "x, expect",
    [
        (np.zeros((2, 999), np.float32), "expected shape ['batch', 1000], got [2, 999]"),
        (np.zeros((2, 1000), np.float64), "expected dtype float32, got float64"),
        (np.zeros((1000,), np.float32), "expected shape ['batch', 1000], got [1000]"),
        (np.zeros((0, 1000), np.float32), "batch size must be 1..8192, got 0"),
        (np.zeros((2, 1000), np.int32), "expected dtype float32, got int32"),
    ],
)
def test_bad_inputs_are_invalid_argument(seeded: Client, x: np.ndarray, expect: str) -> None:
    code, msg = _code(seeded.predict, "seed", x)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expect in msg


def test_bad_postprocess_options(seeded: Client) -> None:
    code, msg = _code(seeded.predict, "seed", np.zeros((1, 1000), np.float32), postprocess="top_k", top_k=11)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_k must be between 1 and 10" in msg


def _upload_raw(client: Client, data: bytes, *, name: str = "x", sha: str | None = None, size: int | None = None,
                fmt: int = pb.MODEL_FORMAT_UNSPECIFIED):
    header = pb.UploadHeader(name=name, format=fmt, size_bytes=len(data) if size is None else size,
                             sha256=sha or hashlib.sha256(data).hexdigest())
    msgs = [pb.UploadModelRequest(header=header)] + [
        pb.UploadModelRequest(chunk=data[i:i + 4096]) for i in range(0, len(data), 4096)
    ]
    return client.models_stub.UploadModel(iter(msgs))


def test_corrupt_and_mismatched_uploads(client: Client, model_files) -> None:
    good = Path(model_files["seed_h5"]).read_bytes()
    code, msg = _code(_upload_raw, client, good[: len(good) // 2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and ("Keras" in msg or "HDF5" in msg), (code, msg)
    code, msg = _code(_upload_raw, client, b"this is not a model at all")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unrecognised model file" in msg
    code, msg = _code(_upload_raw, client, good, sha="0" * 64)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "checksum mismatch" in msg
    code, msg = _code(_upload_raw, client, good, size=len(good) + 10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declared" in msg
    code, msg = _code(_upload_raw, client, good, fmt=pb.KERAS)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declares format 'keras'" in msg
    code, msg = _code(_upload_raw, client, good, name="../evil")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model name" in msg
    # nothing half-uploaded became visible
    assert client.models() == {}


def test_header_first(client: Client) -> None:
    code, msg = _code(client.models_stub.UploadModel, iter([pb.UploadModelRequest(chunk=b"abc")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in msg


def test_lambda_model_refused(client: Client, model_files) -> None:
    code, msg = _code(client.upload, model_files["lambda_keras"], "lam")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Lambda" in msg


def test_size_limit_is_resource_exhausted(repo_dir: Path, model_files) -> None:
    handle = create_server(make_settings(repo_dir, max_upload_bytes=10_000))
    try:
        with Client(f"127.0.0.1:{handle.port}") as c:
            code, msg = _code(c.upload, model_files["seed_h5"], "big")
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg
    finally:
        handle.stop(0.5)


def _needs_more_than_float32(path: Path) -> Path:
    """A leanserve file whose answers float32 kernels cannot compute: ``y = (x·w + 1e8) - 1e8``. Its float64
    reference keeps ``x·w`` (a few units); in float32, where numbers near 1e8 are 8 apart, ``x·w`` is rounded away
    before the second layer subtracts 1e8 again, so the served answers are off by about ``|x·w|``."""
    rng = np.random.default_rng(3)
    plan = build_plan((4,), [
        LayerSpec("add", rng.normal(size=(4, 1)).astype(np.float32), np.array([1e8], np.float32), "linear"),
        LayerSpec("sub", np.ones((1, 1), np.float32), np.array([-1e8], np.float32), "linear"),
    ])
    manifest, blob = artifacts.plan_to_files(plan)
    artifacts.write_zip(path, manifest, blob)
    return path


def test_reference_check_outside_tolerance_is_failed_precondition(client: Client, server, tmp_path: Path) -> None:
    # the server's default tolerances (atol 1e-4, rtol 1e-3): the model itself is off, not the check made strict
    code, msg = _code(client.upload, _needs_more_than_float32(tmp_path / "off.leanserve"), "off")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "reference" in msg, (code, msg)
    assert "max abs error" in msg
    assert client.models() == {}
    assert not any((server.dataplane.repository.root / ".staging").iterdir())  # nothing left half-stored


def test_a_second_server_on_a_taken_port_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    """gRPC's default SO_REUSEPORT let an unrelated second server bind the same port: both printed "listening"
    and the connections were split between them."""
    from leanserve.server.app import create_server
    from tests.conftest import make_settings

    first = create_server(make_settings(repo_dir))
    try:
        with pytest.raises(OSError, match="cannot listen"):
            create_server(make_settings(tmp_path / "other", port=first.port))
    finally:
        first.stop(0)


@pytest.mark.parametrize("name", ["", "../etc", "a b"])
def test_a_name_no_model_can_have_is_invalid_argument_not_not_found(client: Client, name: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.predict(name, np.zeros((1, 4), np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
