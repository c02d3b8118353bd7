"""Limits on what the repository may hold (models, versions per model, bytes), checked before anything is written;
batch threads that follow the versions in use, not the versions stored; repository names validated before the
disk is touched."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.v1 import optimize_service_pb2 as opt_pb
from leanserve.v1 import optimize_service_pb2_grpc as opt_grpc
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from leanserve.server.app import ServerHandle, create_server
from leanserve.server.repository import artifacts
from leanserve.server.repository.store import folder_bytes
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.conftest import make_settings
from tests.toy import wait_until

FEATURES = 6


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ``.leanserve`` model (6 → 4 → 2): quick to upload many times."""
    rng = np.random.default_rng(0)
    plan = build_plan((FEATURES,), [
        LayerSpec("h", rng.normal(size=(FEATURES, 4)).astype(np.float32), np.zeros(4, np.float32), "relu"),
        LayerSpec("o", rng.normal(size=(4, 2)).astype(np.float32), np.zeros(2, np.float32), "linear"),
    ])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    path = tmp_path_factory.mktemp("limits") / "m.leanserve"
    artifacts.write_zip(path, manifest, blob)
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """``serve(**settings)`` starts a server on a fresh repository and returns (handle, client)."""
    started: list[tuple[ServerHandle, Client]] = []

    def start(**overrides: object) -> tuple[ServerHandle, Client]:
        handle = create_server(make_settings(tmp_path / f"models{len(started)}", **overrides))
        client = Client(f"127.0.0.1:{handle.port}", timeout=120)
        started.append((handle, client))
        return handle, client

    yield start
    for handle, client in started:
        client.close()
        handle.stop(0.5)


def _refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    return err.value


def _stored(handle: ServerHandle) -> dict[str, list[int]]:
    return handle.dataplane.repository.models()


def test_models_past_max_models_are_refused(serve, model_file: Path) -> None:
    handle, c = serve(max_models=2)
    c.upload(model_file, "a")
    c.upload(model_file, "b")
    assert "max_models" in _refused(c.upload, model_file, "c").details()
    c.upload(model_file, "a")  # a new version of a stored model is not a new model
    assert _stored(handle) == {"a": [1, 2], "b": [1]}
    c.delete("b")
    c.upload(model_file, "c")
    assert _stored(handle) == {"a": [1, 2], "c": [1]}


def test_versions_past_max_versions_per_model_are_refused_for_uploads_and_optimizations(
        serve, model_file: Path) -> None:
    handle, c = serve(max_versions_per_model=2)
    c.upload(model_file, "m")
    c.upload(model_file, "m")
    assert "max_versions_per_model" in _refused(c.upload, model_file, "m").details()
    options = opt_pb.OptimizeRequest(options=opt_pb.OptimizeOptions(model_name="m", target_sparsity=0.5))
    stub = opt_grpc.OptimizeServiceStub(c.channel)
    _refused(lambda: list(stub.Optimize(iter([options]), timeout=120)))
    assert _stored(handle) == {"m": [1, 2]}
    c.delete("m", 1)
    assert c.upload(model_file, "m").version == 3


def test_uploads_past_max_repository_bytes_are_refused(serve, model_file: Path) -> None:
    probe, c = serve()
    c.upload(model_file, "m")
    one_version = folder_bytes(probe.dataplane.repository.root / "m")
    # room for one version, not two: the second is refused on what it would write, the repository unchanged
    handle, c = serve(max_repository_bytes=one_version + one_version // 2)
    c.upload(model_file, "m")
    assert "max_repository_bytes" in _refused(c.upload, model_file, "m").details()
    assert _stored(handle) == {"m": [1]}
    # a declared size past the limit is refused before a byte is received
    handle, c = serve(max_repository_bytes=model_file.stat().st_size // 2)
    _refused(c.upload, model_file, "m")
    assert _stored(handle) == {}
    assert not any((handle.dataplane.repository.root / ".staging").iterdir())


def _batch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("batch-")]


def test_batch_threads_follow_the_versions_in_use_not_the_versions_stored(serve, model_file: Path) -> None:
    before = len(_batch_threads())
    handle, c = serve(batch_thread_idle_seconds=0.5)
    for _ in range(20):
        c.upload(model_file, "m")
    assert len(c.models()["m"]) == 20
    assert len(_batch_threads()) == before  # stored and served, never asked: no thread
    x = np.ones((1, FEATURES), np.float32)
    expected = c.predict("m", x, version=1).outputs["y"]
    for version in range(1, 21):  # one caller at a time runs inline, on its own thread
        np.testing.assert_allclose(c.predict("m", x, version=version).outputs["y"], expected, rtol=1e-6)
    assert len(_batch_threads()) == before
    # many callers at once on every version: requests queue, so batch threads start (at most one per version
    # with the default batch_workers=1) ...
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda i: c.predict("m", x, version=1 + i % 20).outputs["y"], range(400)))
    for out in outs:
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert len(_batch_threads()) - before <= 20
    # ... and end once idle
    wait_until(lambda: len(_batch_threads()) == before, "the idle batch threads end")
    np.testing.assert_allclose(c.predict("m", x, version=20).outputs["y"], expected, rtol=1e-6)


def test_repository_load_of_a_path_is_invalid_whatever_exists_outside(serve, model_file: Path, tmp_path: Path) -> None:
    handle, c = serve()
    outside = tmp_path / "outside" / "1"
    outside.mkdir(parents=True)
    (outside / "manifest.json").write_text(json.dumps({"name": "outside"}))
    stub = v2_grpc.GRPCInferenceServiceStub(c.channel)
    for name in ("../outside", "../nothing-here", "/etc", "a/../../outside", "..", ""):
        for call, request in ((stub.RepositoryModelLoad, v2.RepositoryModelLoadRequest(model_name=name)),
                              (stub.RepositoryModelUnload, v2.RepositoryModelUnloadRequest(model_name=name))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
