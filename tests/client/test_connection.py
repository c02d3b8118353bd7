"""The clients' connection options: token on every kind of call, TLS, mTLS; the CLI's --token/--tls-* flags."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import AsyncClient, Client
from leanserve.client.common import Connection
from tests.e2e.conftest import keras, model_files  # noqa: F401 -- session fixtures of the e2e tests
from tests.e2e.pki import ADMIN_TOKEN, INFER_TOKEN, Pki, Secured, pki, secured, started, token_file  # noqa: F401

X = np.zeros((3, 1000), np.float32)


def test_async_client_sends_the_token_on_every_kind_of_call(secured: Secured, model_files) -> None:
    async def scenario() -> None:
        async with AsyncClient(secured.target, token=ADMIN_TOKEN, tls_ca=secured.pki.ca, timeout=120) as c:
            assert (await c.upload(model_files["seed_h5"], "seed")).version == 1  # client stream
            assert await c.models() == {"seed": [1]}  # unary
            streamed = [o async for o in c.stream("seed", [X[:1], X[1:]])]  # bidirectional stream
            assert [o.request_id for o in streamed] == ["0", "1"]
        async with AsyncClient(secured.target, token=INFER_TOKEN, tls_ca=secured.pki.ca, timeout=120) as c:
            assert (await c.predict("seed", X)).output.shape == (3, 10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.delete("seed")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with AsyncClient(secured.target, tls_ca=secured.pki.ca, timeout=120) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.predict("seed", X)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(scenario())


def test_async_client_with_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    with started(tmp_path / "models", tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                 tls_client_ca_file=pki.ca) as handle:
        async def scenario() -> None:
            async with AsyncClient(f"127.0.0.1:{handle.port}", tls_ca=pki.ca, tls_cert=pki.client_cert,
                                   tls_key=pki.client_key, timeout=60) as c:
                assert await c.models() == {}

        asyncio.run(scenario())


def test_token_goes_with_raw_stub_calls_too(secured: Secured) -> None:
    from leanserve.v1 import model_service_pb2 as pb

    with Client(secured.target, token=ADMIN_TOKEN, tls_ca=secured.pki.ca) as c:
        assert list(c.models_stub.ListModels(pb.ListModelsRequest()).models) == []


def test_connection_choices() -> None:
    assert not Connection("h:1").secure and Connection("h:1", tls=True).secure
    assert Connection("h:1", tls_ca="ca.pem").secure
    assert Connection("h:1", token="t").metadata() == (("authorization", "Bearer t"),)
    assert Connection("h:1").metadata() == ()
    with pytest.raises(ValueError, match="go together"):
        Connection("h:1", tls_cert="c.pem").credentials()


def _cli(*args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LEANSERVE_TOKEN"}
    if token is not None:
        env["LEANSERVE_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "leanserve.server.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_token_from_the_environment_and_tls_flags(secured: Secured) -> None:
    conn = ["--server", secured.target, "--tls-ca", str(secured.pki.ca), "--json"]
    ok = _cli("models", *conn, token=INFER_TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {}
    refused = _cli("delete", "seed", *conn, token=INFER_TOKEN)
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"]["code"] == "PERMISSION_DENIED"
    anonymous = _cli("models", *conn, token=None)
    assert anonymous.returncode == 1 and json.loads(anonymous.stdout)["error"]["code"] == "UNAUTHENTICATED"
    flag = _cli("models", *conn, "--token", ADMIN_TOKEN, token=None)
    assert flag.returncode == 0, flag.stderr


def test_cli_token_command_prints_a_line_for_the_token_file(secured: Secured) -> None:
    made = _cli("token", "--role", "infer", "--label", "made-by-cli", token=None)
    assert made.returncode == 0, made.stderr
    role, digest, label = made.stdout.split()
    token = made.stderr.strip().rsplit(" ", 1)[-1]
    assert (role, label, len(digest)) == ("infer", "made-by-cli", 64)
    with secured.tokens.open("a") as f:
        f.write(made.stdout)
    secured.handle.reload_credentials()  # what SIGHUP does: no need to wait for the once-a-second look
    with secured.client(token) as c:
        assert c.models() == {}
