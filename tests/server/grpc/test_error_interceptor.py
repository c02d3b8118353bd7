"""Errors are transport-neutral; the one interceptor maps their codes to gRPC status codes, logs client mistakes as
rate-limited single lines and bugs with a traceback, and long client-supplied names never reach the trailer whole."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.client.client import StreamError
from leanserve.server import errors
from leanserve.server.app import ServerHandle
from leanserve.server.errors import Code, LeanserveError, NotFound, shown
from leanserve.server.grpc.calls import status_number
from leanserve.server.grpc.interceptors import STATUS, ErrorInterceptor, RateLimitedLog, grpc_status
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc

SERVER_DIR = Path(__file__).parents[3] / "server"
ERROR_CLASSES = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LeanserveError)]


def test_every_error_code_maps_to_the_grpc_status_of_the_same_name() -> None:
    assert set(STATUS) == set(Code)
    for cls in ERROR_CLASSES:
        status = grpc_status(cls.code)
        assert status.name == cls.code.name and status_number(cls("x")) == status.value[0]
    assert grpc_status(errors.UnsupportedModel.code) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(LeanserveError.code) == grpc.StatusCode.INTERNAL
    assert status_number(ValueError("a bug")) == grpc.StatusCode.INTERNAL.value[0]


def test_errors_module_does_not_import_grpc() -> None:
    code = "import sys, leanserve.server.errors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_below_the_transport_imports_grpc() -> None:
    """Only server/grpc/ (the transport) and the entry points that assemble a gRPC server around it (app.py, and
    ray_app.py for Ray Serve's proxy) may import grpc."""
    offenders = []
    for path in SERVER_DIR.rglob("*.py"):
        rel = path.relative_to(SERVER_DIR)
        if rel.parts[0] == "grpc" or rel.as_posix() in ("app.py", "ray_app.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection")]
    assert offenders == []


def test_shown_and_messages_are_bounded() -> None:
    assert shown("seed") == "'seed'"
    long = shown("x" * 100_000)
    assert len(long) < 120 and "100000 characters" in long
    assert len(LeanserveError("y" * 100_000).message) < errors.MAX_MESSAGE_CHARS + 60


def test_rate_limited_log_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.limited"), 3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.limited"):
        for i in range(10):
            limited(Code.NOT_FOUND, "miss %d", i)
        limited(Code.INVALID_ARGUMENT, "other code")  # its own budget
        now[0] += 1
        limited(Code.NOT_FOUND, "next second")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["miss 0", "miss 1", "miss 2", "other code",
                     "next second (7 similar lines dropped before this one)"]


# -- the interceptor on a real grpc server with a tiny service ----------------------------------------------------
def _raise(exc: Exception):
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise exc

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise exc

    return unary, stream


@pytest.fixture
def toy() -> Iterator[tuple[grpc.Channel, ErrorInterceptor]]:
    handlers = {}
    for name, exc in (("NotFound", NotFound("model 'x' not found")), ("Bug", ValueError("secret detail"))):
        unary, stream = _raise(exc)
        handlers[f"{name}Unary"] = grpc.unary_unary_rpc_method_handler(unary)
        handlers[f"{name}Stream"] = grpc.unary_stream_rpc_method_handler(stream)
    interceptor = ErrorInterceptor(client_errors_per_second=100)
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("toy.Toy", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, interceptor
    server.stop(0)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if not isinstance(result, bytes):
            list(result)
    return err.value.code(), err.value.details()


def test_interceptor_maps_codes_and_hides_bugs(toy, caplog: pytest.LogCaptureFixture) -> None:
    channel, interceptor = toy
    with caplog.at_level(logging.INFO, logger="leanserve.server.grpc.interceptors"):
        for kind in ("Unary", "Stream"):
            call = getattr(channel, "unary_unary" if kind == "Unary" else "unary_stream")
            assert _status(lambda: call(f"/toy.Toy/NotFound{kind}")(b"")) == \
                (grpc.StatusCode.NOT_FOUND, "model 'x' not found")
            code, message = _status(lambda: call(f"/toy.Toy/Bug{kind}")(b""))
            assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "server log" in message
    mistakes = [r for r in caplog.records if r.levelno == logging.INFO]
    bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(mistakes) == 2 and all(r.exc_info is None and "NOT_FOUND" in r.getMessage() for r in mistakes)
    assert len(bugs) == 2 and all(r.exc_info is not None for r in bugs)


def test_interceptor_wraps_each_method_once_and_never_unknown_ones(toy) -> None:
    channel, interceptor = toy
    for _ in range(3):
        _status(lambda: channel.unary_unary("/toy.Toy/NotFoundUnary")(b""))
    wrapped = interceptor._wrapped["/toy.Toy/NotFoundUnary"][1]
    _status(lambda: channel.unary_unary("/toy.Toy/NotFoundUnary")(b""))
    assert interceptor._wrapped["/toy.Toy/NotFoundUnary"][1] is wrapped
    for i in range(20):
        assert _status(lambda: channel.unary_unary(f"/toy.Toy/Nope{i}")(b""))[0] == grpc.StatusCode.UNIMPLEMENTED
    assert set(interceptor._wrapped) == {"/toy.Toy/NotFoundUnary"}


# -- a 100 KB model name against the real server ------------------------------------------------------------------
def test_a_100kb_model_name_gets_its_status_and_a_short_message(server: ServerHandle, client: Client) -> None:
    name = "m" * 100_000
    code, message = _status(lambda: client.predict(name, np.zeros((1, 4), np.float32)))
    # no model can have such a name: the caller's mistake (INVALID_ARGUMENT), echoed as its start and length
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300 and "100000 characters" in message
    code, message = _status(lambda: client.info(name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300
    header = model_pb.UploadHeader(name=name, size_bytes=1, sha256="0" * 64)
    code, message = _status(lambda: client.models_stub.UploadModel(iter([model_pb.UploadModelRequest(header=header)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300 and "invalid model name" in message
    stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
    code, message = _status(lambda: stub.ModelMetadata(v2.ModelMetadataRequest(name=name)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300
    code, message = _status(lambda: stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name=name)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) < 300
    with pytest.raises(StreamError) as err:  # inside a stream: that request's own error answer
        list(client.stream(name, [np.zeros((1, 4), np.float32)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.message) < 300
