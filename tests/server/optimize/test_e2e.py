"""OptimizeService end to end: a real server, the Client, the digits model uploaded as .keras."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.client import optimize as opt
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.server.repository import artifacts
from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings
from tests.server.optimize.conftest import Digits


def _stored_plan(server: ServerHandle, name: str, version: int):
    path = server.dataplane.repository.path(name, version)
    manifest = json.loads((path / artifacts.MANIFEST).read_text())
    return manifest, artifacts.plan_from_files(manifest, (path / artifacts.WEIGHTS).read_bytes())


@pytest.mark.slow
def test_upload_optimize_promote_predict(client: Client, server: ServerHandle, digits: Digits) -> None:
    client.upload(digits.path, "digits")
    stages: list[str] = []
    report = client.optimize("digits", digits.data(), sparsity=0.9, quantize="int8", epochs=15,
                             max_accuracy_drop=0.015, promote=True, progress=lambda s, f, m: stages.append(s))
    assert {"baseline", "finetune", "evaluate", "measure", "store"} <= set(stages)
    assert report["version"] == 2 and report["from_version"] == 1
    assert report["within_budget"] and report["promoted"] and report["default_version"] == 2
    assert report["before"]["metric"] - report["after"]["metric"] <= 0.015

    info = client.info("digits")  # the default is the optimized version now
    assert info.version == 2
    assert all(layer.format in ("csr_int8", "bsr_int8") for layer in info.layers)
    assert all(layer.sparsity == pytest.approx(0.9, abs=0.01) for layer in info.layers)
    meta = json.loads(info.metadata_json)["optimization"]
    assert meta["after"]["size_bytes"] == info.served_size_bytes == report["after"]["size_bytes"]
    assert meta["options"]["target_sparsity"] == pytest.approx(0.9)

    manifest, plan = _stored_plan(server, "digits", 2)
    assert manifest["source"] == {"format": "optimized", "from_version": 1}
    out = client.predict("digits", digits.x_val)
    assert out.model_version == 2
    np.testing.assert_allclose(out.output, plan(digits.x_val), rtol=1e-6, atol=1e-6)  # the stored weights
    np.testing.assert_allclose(out.output, plan.reference(digits.x_val), atol=0.05)  # numpy float64 reference
    assert np.mean(out.output.argmax(1) == plan.reference(digits.x_val).argmax(1)) > 0.98


@pytest.mark.slow
def test_not_promoted_keeps_the_default_and_rolls_back(client: Client, server: ServerHandle, digits: Digits,
                                                       repo_dir: Path) -> None:
    client.upload(digits.path, "d2")
    report = client.optimize("d2", {"x": digits.x_val}, quantize="int8", max_accuracy_drop=0.01)
    assert report["metric"] == "agreement" and report["version"] == 2 and not report["promoted"]
    assert report["default_version"] == 1
    assert client.predict("d2", digits.x_val[:3]).model_version == 1
    assert client.predict("d2", digits.x_val[:3], version=2).model_version == 2
    assert client.info("d2").version == 1 and (repo_dir / "d2" / "default_version").read_text() == "1"
    assert client.info("d2", 2).default_version == 1
    summary = client.models_stub.ListModels(model_pb.ListModelsRequest()).models[0]
    assert (summary.latest_version, summary.default_version) == (2, 1)

    assert client.set_default("d2", 2) == 2
    assert client.predict("d2", digits.x_val[:3]).model_version == 2
    assert client.set_default("d2", 0) == 2  # unpinned: the latest
    assert not (repo_dir / "d2" / "default_version").exists()
    with pytest.raises(grpc.RpcError) as err:
        client.set_default("d2", 7)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_pinned_default_survives_a_restart(tmp_path: Path, digits: Digits) -> None:
    settings = make_settings(tmp_path / "models")
    handle = create_server(settings)
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as c:
            c.upload(digits.path, "p")
            c.optimize("p", None, sparsity=0.5, max_accuracy_drop=1.0)  # not promoted: v1 stays the default
    finally:
        handle.stop(0.5)
    handle = create_server(settings)
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as c:
            assert c.models()["p"] == [1, 2] and c.info("p").version == 1
    finally:
        handle.stop(0.5)


def test_one_shot_without_data(client: Client, server: ServerHandle, digits: Digits) -> None:
    client.upload(digits.path, "nodata")
    report = client.optimize("nodata", None, sparsity=0.5, block="16x1", quantize="int8", max_accuracy_drop=0.5,
                             promote=True)
    assert report["metric"] == "agreement_random" and report["eval_source"] == "random"
    assert report["fine_tuning"] is None and report["promoted"]
    _, plan = _stored_plan(server, "nodata", report["version"])
    w = plan.layers[0].dense_weights()
    blocks = (w != 0).reshape(4, 16, -1)
    # 16x1 blocks pruned whole: half of them hold no weight (int8 rounding may zero a few more single weights)
    assert np.mean(~blocks.any(axis=1)) == pytest.approx(0.5, abs=0.01)
    assert report["after"]["layers"][0]["sparsity"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.5}, "target_sparsity"),
    ({"sparsity": 0.5, "block": "abc"}, "block"),
    ({"sparsity": 0.5, "epochs": 3}, "labelled data"),
    ({"quantize": "int8", "max_accuracy_drop": -0.1}, "max_accuracy_drop"),
])
def test_bad_options_are_invalid_argument(client: Client, server: ServerHandle, digits: Digits, kwargs: dict,
                                          match: str) -> None:
    client.upload(digits.path, "bad")
    with pytest.raises(grpc.RpcError) as err:
        client.optimize("bad", **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()


def test_unknown_model_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.optimize("nope", quantize="int8")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_data_over_the_limit_is_resource_exhausted(tmp_path: Path, digits: Digits) -> None:
    handle = create_server(make_settings(tmp_path / "models", optimize_max_data_bytes=10_000))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as c:
            c.upload(digits.path, "big")
            with pytest.raises(grpc.RpcError) as err:
                c.optimize("big", {"x": digits.x}, quantize="int8")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        handle.stop(0.5)


def _start_long_job(client: Client, digits: Digits, name: str):
    """A fine-tuning job that would take minutes; returns the call once fine-tuning has begun."""
    msgs = opt.requests(name, opt.data_bytes({"x": digits.x, "y": digits.y}), sparsity=0.9, epochs=200)
    call = client.optimize_stub.Optimize(msgs, timeout=300)
    for event in call:
        if event.progress.stage == "finetune":
            return call
    raise AssertionError("no fine-tuning progress")


@pytest.mark.slow
def test_busy_then_cancel(client: Client, server: ServerHandle, digits: Digits, repo_dir: Path) -> None:
    client.upload(digits.path, "long")
    call = _start_long_job(client, digits, "long")
    with pytest.raises(grpc.RpcError) as err:  # one job at a time
        client.optimize("long", quantize="int8")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # predictions keep flowing while the job trains
    for _ in range(20):
        assert client.predict("long", digits.x_val[:4]).model_version == 1

    call.cancel()
    deadline = time.monotonic() + 60
    while True:  # the worker stops at its next batch and frees the slot
        try:
            report = client.optimize("long", None, quantize="int8", max_accuracy_drop=1.0)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.2)
    # the cancelled job left no version behind: the next one is version 2 and staging is empty
    assert report["version"] == 2 and client.models()["long"] == [1, 2]
    assert not any((repo_dir / ".staging").iterdir())
