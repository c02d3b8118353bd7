"""Tokens with roles (``--auth-tokens``), over TLS: who may call what, the open probes, reflection, the token file
re-read on change, and the audit log of changes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from leanserve.client.client import StreamError
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.e2e.pki import ADMIN_TOKEN, INFER_TOKEN, Secured, pki, secured, started, token_file, token_line  # noqa: F401

UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
X = np.zeros((2, 1000), np.float32)


def _code(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code()


def _until(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Poll ``check`` until it holds (the server looks at the token file at most once a second)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {seconds} s"
        time.sleep(0.2)


def _v2_stub(secured: Secured) -> tuple[grpc.Channel, v2_grpc.GRPCInferenceServiceStub]:
    channel = secured.channel()
    return channel, v2_grpc.GRPCInferenceServiceStub(channel)


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_admin_token_uploads_and_predicts_over_tls(secured: Secured, model_files, keras_predict) -> None:
    with secured.client(ADMIN_TOKEN) as c:
        info = c.upload(model_files["seed_h5"], "seed")
        assert info.version == 1 and info.runtime == "plan"
        np.testing.assert_allclose(c.predict("seed", X).output, keras_predict(model_files["seed_h5"], X), atol=1e-5)


def test_anonymous_and_unknown_tokens_are_unauthenticated(secured: Secured, model_files) -> None:
    for token in (None, "not-a-known-token", ADMIN_TOKEN + "x"):
        with secured.client(token) as c:
            assert _code(c.upload, model_files["seed_h5"], "seed") == UNAUTHENTICATED
            assert _code(c.models) == UNAUTHENTICATED
            assert _code(c.predict, "seed", X) == UNAUTHENTICATED
    with secured.client() as c:  # not a bearer token, or the token in the wrong scheme
        for value in (f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, "Bearer "):
            delete = model_pb.DeleteModelRequest(name="x")
            assert _code(c.models_stub.DeleteModel, delete, metadata=(("authorization", value),)) == UNAUTHENTICATED
    assert "seed" not in [p.name for p in secured.handle.dataplane.repository.root.iterdir()]


def test_unknown_methods_need_a_token_too(secured: Secured) -> None:
    with secured.channel() as channel:
        call = channel.unary_unary("/leanserve.v1.ModelService/NoSuchMethod")
        assert _code(call, b"") == UNAUTHENTICATED
        assert _code(call, b"", metadata=_bearer(INFER_TOKEN)) == PERMISSION_DENIED
        assert _code(call, b"", metadata=_bearer(ADMIN_TOKEN)) == grpc.StatusCode.UNIMPLEMENTED


def test_infer_token_cannot_change_models_but_infers_also_with_tritonclient(
    secured: Secured, model_files, keras_predict, tmp_path: Path
) -> None:
    with secured.client(ADMIN_TOKEN) as admin:
        admin.upload(model_files["seed_h5"], "seed")
    expected = keras_predict(model_files["seed_h5"], X)
    with secured.client(INFER_TOKEN) as c:
        assert _code(c.delete, "seed") == PERMISSION_DENIED
        assert _code(c.upload, model_files["seed_h5"], "seed") == PERMISSION_DENIED
        assert _code(c.set_default, "seed", 1) == PERMISSION_DENIED
        assert c.models() == {"seed": [1]} and c.info("seed").version == 1
        np.testing.assert_allclose(c.predict("seed", X).output, expected, atol=1e-5)
        streamed = list(c.stream("seed", [X[:1], X[1:]]))  # the token goes with streams too
        np.testing.assert_allclose(np.concatenate([o.output for o in streamed]), expected, atol=1e-5)
        with pytest.raises(StreamError) as err:  # an error inside the stream is still a per-request answer
            list(c.stream("nope", [X]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert secured.handle.dataplane.list_models() == {"seed": [1]}

    np.save(tmp_path / "x.npy", X)
    script = Path(__file__).with_name("tritonclient_tls_script.py")
    proc = subprocess.run([sys.executable, str(script), secured.target, str(secured.pki.ca), INFER_TOKEN, "seed",
                           str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["live_without_token"] and seen["ready_without_token"] and seen["model_ready"]
    np.testing.assert_allclose(seen["y"], expected, atol=1e-5)
    assert seen["infer_without_token"] == "StatusCode.UNAUTHENTICATED"
    assert seen["unload_with_infer_token"] == "StatusCode.PERMISSION_DENIED"


def test_health_and_v2_liveness_answer_without_a_token(secured: Secured) -> None:
    channel, stub = _v2_stub(secured)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "leanserve.v1.InferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert stub.ServerLive(v2.ServerLiveRequest()).live
        assert stub.ServerReady(v2.ServerReadyRequest()).ready
        assert _code(stub.ServerMetadata, v2.ServerMetadataRequest()) == UNAUTHENTICATED
        assert _code(stub.RepositoryModelUnload, v2.RepositoryModelUnloadRequest(model_name="x"),
                     metadata=_bearer(INFER_TOKEN)) == PERMISSION_DENIED
        assert stub.RepositoryIndex(v2.RepositoryIndexRequest(), metadata=_bearer(INFER_TOKEN)) is not None


def _list_services(channel: grpc.Channel, token: str | None = None) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    resp = next(stub.ServerReflectionInfo(requests, metadata=_bearer(token) if token else None))
    return {s.name for s in resp.list_services_response.service}


def test_reflection_is_off_by_default_with_tokens(secured: Secured) -> None:
    with secured.channel() as channel:
        assert _code(_list_services, channel, ADMIN_TOKEN) == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_switched_on_with_tokens_needs_a_token(pki, token_file: Path, tmp_path: Path) -> None:
    with started(tmp_path / "models", tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                 auth_tokens_file=token_file, reflection=True) as handle:
        secured = Secured(handle, pki, token_file)
        with secured.channel() as channel:
            assert _code(_list_services, channel) == UNAUTHENTICATED
            assert "leanserve.v1.ModelService" in _list_services(channel, INFER_TOKEN)


def test_reflection_can_be_switched_off_without_tokens(tmp_path: Path) -> None:
    with started(tmp_path / "models", reflection=False) as handle:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            assert _code(_list_services, channel) == grpc.StatusCode.UNIMPLEMENTED


def test_token_file_is_read_again_when_it_changes(secured: Secured) -> None:
    new_token = "a-token-added-while-serving"
    with secured.client(new_token) as c:
        assert _code(c.models) == UNAUTHENTICATED
        with secured.tokens.open("a") as f:
            f.write(token_line("infer", new_token, "added"))
        _until(lambda: _answers(c.models), "accepting the added token")
    with secured.client(ADMIN_TOKEN) as c:
        assert _answers(c.models)
        # an editor's way: write a new file, rename it over the old one
        replacement = secured.tokens.with_suffix(".new")
        replacement.write_text(token_line("infer", INFER_TOKEN, "dashboard"))
        replacement.replace(secured.tokens)
        _until(lambda: not _answers(c.models), "refusing the removed token")
        assert _code(c.models) == UNAUTHENTICATED
    with secured.client(INFER_TOKEN) as c:
        assert _answers(c.models)


def _answers(call: Callable[[], Any]) -> bool:
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() == UNAUTHENTICATED, err
        return False
    return True


def test_audit_log_records_changes_with_the_token_label(secured: Secured, model_files) -> None:
    with secured.client(ADMIN_TOKEN) as c:
        c.upload(model_files["seed_h5"], "seed")
        c.upload(model_files["seed_h5"], "seed")
        c.set_default("seed", 1)
        channel, stub = _v2_stub(secured)
        with channel:
            admin = _bearer(ADMIN_TOKEN)
            stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="seed"), metadata=admin)
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="seed"), metadata=admin)
        assert c.delete("seed", 2) == [2]
        assert _code(c.delete, "nope") == grpc.StatusCode.NOT_FOUND
    with secured.client(INFER_TOKEN) as c:
        assert _code(c.delete, "seed") == PERMISSION_DENIED  # refused before it could change anything

    lines = (secured.handle.dataplane.repository.root / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["what"], e["model"], e["version"], e["result"]) for e in entries] == [
        ("upload", "seed", 1, "ok"),
        ("upload", "seed", 2, "ok"),
        ("set_default", "seed", 1, "ok"),
        ("unload", "seed", [1, 2], "ok"),
        ("load", "seed", [1, 2], "ok"),
        ("delete", "seed", [2], "ok"),
        ("delete", "nope", None, "not_found"),
    ]
    assert {e["who"] for e in entries} == {"ci-admin"}
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") and e["time"].endswith("Z") for e in entries)
