"""Real faults: a server killed with SIGKILL in the middle of an upload and of an optimization, many uploads of one
name at once (threads of one server, and two server processes on one repository), and changes to what is served
(pin, unload, load, delete, a new version) while 16 callers predict.

After a crash only complete versions are listed, and each listed version loads and answers; version numbers never
collide; callers under changes get either a correct answer from the version they are told served them or
NOT_FOUND, nothing else."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client, common
from leanserve.client import optimize as opt
from leanserve.server.app import ServerHandle
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, Plan, build_plan
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.serverproc import ServerProcess, server_env
from tests.toy import wait_until


def own_format(path: Path, seed: int, k: int = 8, n: int = 4) -> tuple[Path, Plan]:
    """A two-layer leanserve file with weights drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    plan = build_plan((k,), [
        LayerSpec("h", rng.normal(size=(k, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32), "tanh"),
        LayerSpec("o", rng.normal(size=(16, n)).astype(np.float32), np.zeros(n, np.float32), "linear"),
    ])
    manifest, blob = artifacts.plan_to_files(plan)
    artifacts.write_zip(path, manifest, blob)
    return path, plan


def staged_bytes(repo: Path) -> int:
    """Bytes in the repository's staging area (uploads and optimizations in progress)."""
    return sum(p.stat().st_size for p in (repo / ".staging").rglob("*") if p.is_file())


def assert_only_complete_versions(repo: Path, address: str, expected: dict[str, list[int]],
                                  x: np.ndarray, references: dict[tuple[str, int], np.ndarray]) -> None:
    """A restarted server lists exactly ``expected``, each version answers as stored, and no staging is left."""
    with Client(address, timeout=120) as c:
        assert c.models() == expected
        for (name, version), want in references.items():
            out = c.predict(name, x, version=version)
            assert out.model_version == version
            np.testing.assert_allclose(out.output, want, atol=1e-4, rtol=1e-4)  # float32 sums over K = 2048
    assert staged_bytes(repo) == 0 and not any((repo / ".staging").iterdir())


@pytest.mark.slow
def test_kill_during_a_large_upload_leaves_only_complete_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    small, plan1 = own_format(tmp_path / "small.leanserve", 1, k=2048, n=4)
    big, _ = own_format(tmp_path / "big.leanserve", 2, k=2048, n=4)
    # a large file: 64 MiB of weights in the first layer
    rng = np.random.default_rng(3)
    big_plan = build_plan((2048,), [LayerSpec("h", rng.normal(size=(2048, 8192)).astype(np.float32),
                                               np.zeros(8192, np.float32), "relu"),
                                    LayerSpec("o", rng.normal(size=(8192, 4)).astype(np.float32),
                                              np.zeros(4, np.float32), "linear")])
    manifest, blob = artifacts.plan_to_files(big_plan)
    artifacts.write_zip(big, manifest, blob)
    assert big.stat().st_size > 64 << 20
    x = np.random.default_rng(4).normal(size=(3, 2048)).astype(np.float32)

    with ServerProcess(repo, log=tmp_path / "first.log") as server:
        with Client(server.address, timeout=300) as c:
            assert c.upload(small, "m").version == 1

            def messages() -> Iterator[object]:
                for i, msg in enumerate(common.upload_messages(big, "m")):
                    yield msg
                    if i == 8:  # 8 MiB sent: kill the server once part of it is on its disk
                        wait_until(lambda: staged_bytes(repo) > 0, "the upload is being written to staging")
                        os.kill(server.pid, signal.SIGKILL)

            with pytest.raises(grpc.RpcError):
                c.models_stub.UploadModel(messages(), timeout=300)
        server.proc.wait(60)
        assert server.proc.returncode == -signal.SIGKILL
    assert staged_bytes(repo) > 0  # the crash left a partial upload behind

    with ServerProcess(repo, log=tmp_path / "second.log") as again:
        assert_only_complete_versions(repo, again.address, {"m": [1]}, x, {("m", 1): plan1.reference(x)})
        with Client(again.address, timeout=300) as c:
            assert c.upload(small, "m").version == 2  # the next number; nothing of the killed upload was kept


@pytest.mark.slow
def test_kill_during_optimize_leaves_only_complete_versions(tmp_path: Path, model_files) -> None:
    repo = tmp_path / "repo"
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(512, 1000)).astype(np.float32), "y": rng.integers(0, 10, 512)}
    x = rng.normal(size=(3, 1000)).astype(np.float32)
    with ServerProcess(repo, log=tmp_path / "first.log") as server:
        with Client(server.address, timeout=300) as c:
            c.upload(model_files["seed_keras"], "m")
            v1 = c.predict("m", x).output
            msgs = opt.requests("m", opt.data_bytes(data), sparsity=0.9, epochs=200)
            call = c.optimize_stub.Optimize(msgs, timeout=600)
            stages = []
            for event in call:  # fine-tuning for 200 epochs: the job is in the middle when it trains
                stages.append(event.progress.stage)
                if event.progress.stage == "finetune":
                    break
            assert "finetune" in stages
            os.kill(server.pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError):
                list(call)
        server.proc.wait(60)

    with ServerProcess(repo, log=tmp_path / "second.log") as again:
        assert_only_complete_versions(repo, again.address, {"m": [1]}, x, {("m", 1): v1})
        with Client(again.address, timeout=300) as c:
            report = c.optimize("m", None, quantize="int8", max_accuracy_drop=1.0)
            assert report["version"] == 2 and c.models() == {"m": [1, 2]}


def test_concurrent_uploads_of_one_name_get_unique_versions(client: Client, tmp_path: Path) -> None:
    path, _ = own_format(tmp_path / "m.leanserve", 5)
    n = 8
    barrier = threading.Barrier(n)

    def upload(_: int) -> int:
        barrier.wait(60)
        return client.upload(path, "m").version

    with ThreadPoolExecutor(n) as pool:
        versions = list(pool.map(upload, range(n)))
    assert sorted(versions) == list(range(1, n + 1))
    assert client.models() == {"m": list(range(1, n + 1))}


@pytest.mark.slow
def test_two_server_processes_uploading_one_name_never_collide(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    path, plan = own_format(tmp_path / "m.leanserve", 6)
    x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    per_server = 4
    polling = server_env(LEANSERVE_REPOSITORY_POLL_SECONDS="0.1")
    # two independent servers (each sweeps the staging area as it starts, so both start before any upload)
    with ServerProcess(repo, log=tmp_path / "a.log", env=polling) as a, \
            ServerProcess(repo, log=tmp_path / "b.log", env=polling) as b:
        clients = [Client(a.address, timeout=300), Client(b.address, timeout=300)]
        try:
            barrier = threading.Barrier(2 * per_server)

            def upload(i: int) -> int:
                barrier.wait(120)
                return clients[i % 2].upload(path, "m").version

            with ThreadPoolExecutor(2 * per_server) as pool:
                versions = list(pool.map(upload, range(2 * per_server)))
            everything = list(range(1, 2 * per_server + 1))
            assert sorted(versions) == everything
            for c in clients:  # each process serves every version, whichever process stored it
                wait_until(lambda c=c: c.models() == {"m": everything}, "both processes serve every version")
                for v in everything:
                    np.testing.assert_allclose(c.predict("m", x, version=v).output, plan.reference(x), atol=1e-5)
        finally:
            for c in clients:
                c.close()


def test_pin_unload_load_delete_and_publish_under_load(server: ServerHandle, client: Client, tmp_path: Path) -> None:
    """16 callers predict (the default version, and versions 1 and 2 by number) while the model is pinned,
    unpinned, unloaded, loaded, a version deleted, a new one published and the whole model deleted. Every answer
    is the version it names, computed right, or NOT_FOUND; each change itself succeeds."""
    files = {v: own_format(tmp_path / f"v{v}.leanserve", 10 + v) for v in (1, 2, 3)}
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    expected = {v: plan.reference(x) for v, (_, plan) in files.items()}
    expected[4] = expected[1]  # version 4 is the first file uploaded again, at the end
    for v in (1, 2):
        assert client.upload(files[v][0], "m").version == v
    callers = 16
    stop = threading.Event()
    started = threading.Barrier(callers + 1)
    failures: list[BaseException] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def caller(i: int) -> None:
        version = (0, 1, 2)[i % 3]
        try:
            first = True
            while not stop.is_set():
                try:
                    out = client.predict("m", x, version=version)
                    assert version in (0, out.model_version)
                    np.testing.assert_allclose(out.output, expected[out.model_version], atol=1e-5, rtol=0)
                    key = "OK"
                except grpc.RpcError as exc:
                    key = exc.code().name
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, (exc.code(), exc.details())
                with lock:
                    codes[key] = codes.get(key, 0) + 1
                if first:
                    first = False
                    started.wait(120)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)
            started.abort()

    repo_v2 = v2_grpc.GRPCInferenceServiceStub(client.channel)
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    try:
        started.wait(120)  # every caller has an answer: the changes below happen under load
        assert client.set_default("m", 1) == 1
        assert client.set_default("m", 0) == 2
        repo_v2.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="m"), timeout=120)
        repo_v2.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="m"), timeout=120)
        assert client.delete("m", 1) == [1]
        assert client.upload(files[3][0], "m").version == 3
        assert client.set_default("m", 2) == 2
        assert client.delete("m") == [2, 3]
        assert client.upload(files[1][0], "m").version == 4  # numbers are never reused
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures[:3]
    assert set(codes) <= {"OK", "NOT_FOUND"} and codes["OK"] > 0, codes
