"""deploy/kserve: the manifests parse, name a grpc-v2 runtime whose container args are valid ``leanserve serve``
flags, and the container command serves a model file dropped into a /mnt/models-like folder (on 127.0.0.1 here)."""

from __future__ import annotations

import queue
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from leanserve.server.cli import build_parser
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tests.serverproc import LEANSERVE, server_env

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"


def _container() -> tuple[dict, dict]:
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    [container] = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return runtime, container


def test_manifests_name_a_grpc_v2_runtime_with_valid_flags() -> None:
    runtime, container = _container()
    assert runtime["kind"] == "ServingRuntime" and runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert {"name": "h2c", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    annotations = runtime["spec"]["annotations"]
    metrics_port = {e["name"]: e["value"] for e in container["env"]}["LEANSERVE_METRICS_PORT"]
    assert annotations["prometheus.kserve.io/port"] == metrics_port
    assert annotations["prometheus.kserve.io/path"] == "/metrics"

    argv = [*container["command"], *container["args"]]
    assert argv[:2] == ["leanserve", "serve"]
    args = build_parser().parse_args(argv[1:])  # SystemExit on an unknown or malformed flag
    assert (args.command, args.host, args.port, args.repository, args.insecure) == (
        "serve", "0.0.0.0", 8081, "/mnt/models", True)

    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    model = service["spec"]["predictor"]["model"]
    assert service["kind"] == "InferenceService" and model["protocolVersion"] == "grpc-v2"
    assert model["runtime"] == runtime["metadata"]["name"] and model["storageUri"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert any(name == model["modelFormat"]["name"] for name, _ in formats)

    dockerfile = (KSERVE / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["leanserve"]' in dockerfile and "EXPOSE 8081" in dockerfile


def _read_only(folder: Path) -> list[str]:
    """A command prefix that runs the rest with ``folder`` mounted read-only (its own mount namespace), as
    KServe mounts /mnt/models. Root ignores file modes, so a chmod would prove nothing here."""
    probe = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"',
             str(folder)]
    if subprocess.run([*probe, "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m) to mount a folder read-only")
    return probe


def _run(argv: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(log, "w"), stdin=subprocess.DEVNULL, text=True,
                            env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put("")],  # type: ignore
                     daemon=True).start()
    try:
        first = lines.get(timeout=300)
    except queue.Empty:
        first = ""
    if not first.startswith("listening on 127.0.0.1:"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"the container command did not serve ({first!r}):\n{log.read_text()[-4000:]}")
    return proc, first.split()[-1]


@pytest.mark.slow
def test_container_command_serves_a_model_file_from_mnt_models(tmp_path: Path, model_files, keras_predict) -> None:
    _, container = _container()
    mnt = tmp_path / "mnt" / "models"  # what the storage initializer leaves: one plain model file
    mnt.mkdir(parents=True)
    (mnt / "model.h5").write_bytes(model_files["seed_h5"].read_bytes())
    substitute = {"0.0.0.0": "127.0.0.1", "8081": "0", "/mnt/models": str(mnt), "{{.Name}}": "seed"}
    # `leanserve` as this interpreter runs it (LEANSERVE), then the container args as the runtime passes them,
    # with /mnt/models read-only as mounted into the container
    argv = [*_read_only(mnt), *LEANSERVE, *[substitute.get(a, a) for a in container["args"]]]
    env = server_env(**{e["name"]: e["value"] for e in container["env"]})
    env.update(LEANSERVE_METRICS_PORT="0", LEANSERVE_REPOSITORY_CACHE_DIR=str(tmp_path / "writable"))
    x = np.random.default_rng(5).normal(size=(3, 1000)).astype(np.float32)
    for start in range(2):  # a restart serves the same version, it does not add one
        proc, address = _run(argv, env, tmp_path / f"server{start}.log")
        try:
            import grpc

            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ModelReady(pb.ModelReadyRequest(name="seed"), timeout=60).ready
                request = pb.ModelInferRequest(model_name="seed")
                request.inputs.add(name="input", datatype="FP32", shape=[3, 1000])
                request.raw_input_contents.append(x.tobytes())
                response = stub.ModelInfer(request, timeout=60)
                assert response.model_version == "1"
                y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 10)
                np.testing.assert_allclose(y, keras_predict(model_files["seed_h5"], x), atol=1e-5)
        finally:
            proc.terminate()
            assert proc.wait(60) == 0
    assert sorted(p.name for p in mnt.iterdir()) == ["model.h5"]  # nothing written into /mnt/models


@pytest.mark.slow
def test_a_read_only_leanserve_repository_is_served_and_changes_are_refused(tmp_path: Path, model_files) -> None:
    """A repository of versions (what `leanserve publish` writes) mounted read-only: the server failed to start
    (it created .staging in it). It serves it as it is; an upload or delete is FAILED_PRECONDITION."""
    import grpc

    from leanserve.client import Client

    _, container = _container()
    mnt = tmp_path / "models"
    publish = subprocess.run([*LEANSERVE, "publish", str(model_files["seed_h5"]), "--name", "seed",
                              "--repository", str(mnt)], env=server_env(), capture_output=True, text=True)
    assert publish.returncode == 0, publish.stderr
    before = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
    substitute = {"0.0.0.0": "127.0.0.1", "8081": "0", "/mnt/models": str(mnt), "{{.Name}}": "seed"}
    argv = [*_read_only(mnt), *LEANSERVE, *[substitute.get(a, a) for a in container["args"]]]
    env = server_env(**{e["name"]: e["value"] for e in container["env"]})
    env.update(LEANSERVE_METRICS_PORT="0", LEANSERVE_REPOSITORY_CACHE_DIR=str(tmp_path / "writable"))
    proc, address = _run(argv, env, tmp_path / "server.log")
    try:
        with Client(address, timeout=60) as client:
            x = np.ones((2, 1000), np.float32)
            assert client.predict("seed", x).output.shape == (2, 10)
            for change in (lambda: client.upload(model_files["seed_h5"], "other"), lambda: client.delete("seed", 1)):
                with pytest.raises(grpc.RpcError) as refused:
                    change()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "read-only" in refused.value.details()
            assert client.models() == {"seed": [1]}
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*")) == before
