"""The ``leanserve`` command as a person uses it: serve in a subprocess, client verbs, exit codes, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.serverproc import LEANSERVE, ServerProcess, server_env


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LEANSERVE, *args], capture_output=True, text=True, timeout=300, env=server_env(),
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"leanserve {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``leanserve serve --port 0`` in a subprocess; yields its address once it printed ``listening on``."""
    repo = tmp_path / "repo"
    with ServerProcess(repo, log=tmp_path / "server.log") as server:
        yield server.address, server.proc, repo


@pytest.mark.slow
def test_train_upload_predict_restart_with_the_cli(tmp_path: Path, served, keras_predict) -> None:
    """The seed's own path: train with TF, model.save('model.h5'), upload by CLI, predict, restart, predict."""
    address, proc, repo = served
    model = tmp_path / "model.h5"
    out = run_cli("train", "--dataset", "synthetic", "--epochs", "2", "--out", str(model))
    assert "validation accuracy" in out.stdout and model.exists()

    info = json.loads(run_cli("upload", str(model), "--name", "seed", "--server", address, "--json").stdout)
    assert info["runtime"] == "plan" and info["version"] == "1"
    assert [layer["format"] for layer in info["layers"]] == ["dense_f32"] * 3
    assert info["reference"]["passed"] is True

    x = np.random.default_rng(3).normal(size=(64, 1000)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run_cli("predict", "seed", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
            "--server", address)
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y, keras_predict(model, x), atol=1e-5, rtol=0)

    # graceful stop on SIGTERM, then a new server process on the same repository serves the same model
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with ServerProcess(repo, log=tmp_path / "server2.log") as second:
        run_cli("predict", "seed", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y2.npy"),
                "--version", "1", "--server", second.address)
        np.testing.assert_array_equal(np.load(tmp_path / "y2.npy"), y)
        second.proc.send_signal(signal.SIGINT)
        assert second.proc.wait(timeout=30) == 0


def test_failed_calls_exit_non_zero_with_status(served, tmp_path: Path) -> None:
    address, _, _ = served
    proc = run_cli("info", "missing", "--server", address, check=False)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and "missing" in proc.stderr
    proc = run_cli("info", "missing", "--server", address, "--json", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "NOT_FOUND"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    proc = run_cli("upload", str(bad), "--name", "bad", "--server", address, check=False)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in proc.stderr
    assert json.loads(run_cli("models", "--server", address, "--json").stdout) == {}


@pytest.mark.parametrize("args, env, words", [
    (("--port", "99999"), {}, "port: Input should be less than or equal to 65535"),
    (("--workers", "0"), {}, "worker_threads: Input should be greater than or equal to 1"),
    (("--log-level", "LOUD"), {}, "unknown log level 'LOUD'"),
    ((), {"LEANSERVE_PORT": "abc"}, "port: Input should be a valid integer"),
    ((), {"LEANSERVE_BATCH_OVERRIDES": "notjson"}, 'field "batch_overrides"'),
    (("--model", "x=/nonexistent/model.h5"), {}, "No such file or directory"),
], ids=["port", "workers", "log-level", "env-port", "env-json", "model-file"])
def test_settings_that_cannot_be_served_exit_2_with_one_line(tmp_path: Path, args, env, words) -> None:
    """Each used to end in a pydantic, logging or OSError traceback with exit 1."""
    port = [] if "LEANSERVE_PORT" in env else ["--port", "0"]  # a flag wins over the variable
    proc = subprocess.run([*LEANSERVE, "serve", "--host", "127.0.0.1", *port, "--repository",
                           str(tmp_path / "repo"), *args], capture_output=True, text=True, timeout=120,
                          env=server_env(**env), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_serves_on_ipv6_loopback(tmp_path: Path) -> None:
    """``--host ::1`` was refused as "not an address of this machine" (the address was written ::1:0), and
    ``--host [::1]`` served gRPC but not its metrics."""
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    for host in ("::1", "[::1]"):
        proc = subprocess.Popen([*LEANSERVE, "serve", "--host", host, "--port", "0", "--repository",
                                 str(tmp_path / "repo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=server_env(), stdin=subprocess.DEVNULL)
        try:
            first = proc.stdout.readline()
            assert first.startswith("listening on [::1]:"), first + proc.stderr.read()
            with grpc.insecure_channel(first.split()[-1]) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
                    health_pb2.HealthCheckResponse.SERVING
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "metrics endpoint off" not in err, err
