"""The Open Inference Protocol with Triton's own client (in a subprocess: see tritonclient_script.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from leanserve.client import Client
from leanserve.v2 import grpc_service_pb2
from leanserve.server.app import ServerHandle
from tests.e2e.tritonclient_script import describe

SCRIPT = Path(__file__).with_name("tritonclient_script.py")


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_our_messages_are_wire_compatible_with_tritons() -> None:
    """Every field we define has Triton's number, type and label (Triton may add fields we do not serve)."""
    theirs = _run("descriptors")
    ours = describe(grpc_service_pb2)
    for name, fields in ours.items():
        if name == "rpc":
            for rpc, signature in fields.items():
                assert theirs["rpc"][rpc] == signature, rpc
        else:
            missing = [f for f in json.loads(json.dumps(fields)) if f not in theirs[name]]
            assert not missing, (name, missing)


def test_tritonclient_health_metadata_infer_and_stream(
    server: ServerHandle, client: Client, model_files, keras_predict, tmp_path: Path
) -> None:
    client.upload(model_files["seed_h5"], "seed")
    x = np.random.default_rng(5).normal(size=(16, 1000)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = keras_predict(model_files["seed_h5"], x)

    seen = _run("client", f"127.0.0.1:{server.port}", "seed", str(tmp_path / "x.npy"))

    assert seen["live"] and seen["ready"] and seen["model_ready"] and not seen["unknown_model_ready"]
    assert seen["server_metadata"]["name"] == "leanserve"
    assert "model_repository" in seen["server_metadata"]["extensions"]
    md = seen["model_metadata"]
    assert md["name"] == "seed" and md["versions"] == ["1"] and md["platform"] == "leanserve_plan"
    assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1000"]}]
    assert md["outputs"][0]["datatype"] == "FP32" and md["outputs"][0]["shape"] == ["-1", "10"]

    np.testing.assert_allclose(seen["infer_1"], expected[:1], atol=1e-5)
    np.testing.assert_allclose(seen["infer_16"], expected, atol=1e-5)
    assert seen["infer_16_response"] == "u16"

    stream = seen["stream"]
    assert len(stream) == 17
    assert "NOT_FOUND" in stream[5]["error"] and "no-such-model" in stream[5]["error"]
    answers = stream[:5] + stream[6:]
    assert [a["id"] for a in answers] == [str(i) for i in range(16)]  # in order, the stream went on after the error
    np.testing.assert_allclose([a["y"][0] for a in answers], expected, atol=1e-5)
