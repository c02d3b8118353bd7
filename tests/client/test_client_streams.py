"""Errors on the client's side of a request stream, in both clients, against a real in-process server: an
exception raised while a request is built (a dtype the codec refuses, the caller's iterable failing, a progress
callback failing) reaches the caller as it is, after the results answered before it, instead of grpc's
``UNKNOWN "Exception iterating requests!"``; bad optimize options are refused before any call. Also what a
``StreamError`` says, and the documented read-only output arrays."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import AsyncClient, Client
from leanserve.client.codec import TensorCodecError
from leanserve.client.common import StreamError
from leanserve.server.app import ServerHandle
from tests.toy import toy_model

X = np.ones((1, 4), np.float32)


@pytest.fixture
def toy(server: ServerHandle) -> str:
    server.dataplane.serve(toy_model(lambda x: x * 2, features=4))
    return f"127.0.0.1:{server.port}"


def _sync_stream(target: str, batches: object, **kw: object) -> tuple[list[str], BaseException]:
    got: list[str] = []
    with Client(target, timeout=60) as c, pytest.raises(Exception) as err:
        for out in c.stream("toy", batches, **kw):  # type: ignore[arg-type]
            got.append(out.request_id)
    return got, err.value


def _async_stream(target: str, batches: object, **kw: object) -> tuple[list[str], BaseException]:
    got: list[str] = []

    async def scenario() -> BaseException:
        async with AsyncClient(target, timeout=60) as c:
            with pytest.raises(Exception) as err:
                async for out in c.stream("toy", batches, **kw):  # type: ignore[arg-type]
                    got.append(out.request_id)
            return err.value

    return got, asyncio.run(scenario())


STREAMS = pytest.mark.parametrize("stream", [_sync_stream, _async_stream], ids=["sync", "asyncio"])


@STREAMS
def test_a_batch_the_codec_refuses_is_raised_after_the_earlier_results(toy: str, stream) -> None:
    got, err = stream(toy, [X, X * 2, X.astype(np.complex64), X])
    assert got == ["0", "1"]
    assert type(err) is TensorCodecError and "complex64" in str(err)


@STREAMS
def test_the_callers_iterable_failing_is_raised_as_it_is(toy: str, stream) -> None:
    def batches() -> Iterator[np.ndarray]:
        yield X
        raise KeyError("no more rows")

    got, err = stream(toy, batches())
    assert got == ["0"] and type(err) is KeyError and err.args == ("no more rows",)


@STREAMS
def test_a_server_error_comes_before_a_later_client_error(toy: str, stream) -> None:
    got, err = stream(toy, [X, np.ones((1, 5), np.float32), X.astype(np.complex64)])
    assert got == ["0"] and isinstance(err, StreamError) and err.request_id == "1"
    got, err = stream(toy, [X, np.ones((1, 5), np.float32), X.astype(np.complex64)], raise_on_error=False)
    assert got == ["0"] and type(err) is TensorCodecError


def test_a_failing_upload_progress_callback_is_raised_as_it_is(server: ServerHandle, tmp_path: Path) -> None:
    path = tmp_path / "big.leanserve"
    path.write_bytes(bytes(3 * 1024 * 1024))  # three chunks: the callback fails after the first

    def progress(n: int) -> None:
        raise OSError("disk on fire")

    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        with pytest.raises(OSError, match="disk on fire"):
            c.upload(path, "m", progress=progress)
        assert c.models() == {}

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            with pytest.raises(OSError, match="disk on fire"):
                await c.upload(path, "m", progress=progress)
            assert await c.models() == {}

    asyncio.run(scenario())


@pytest.mark.parametrize("options, error, message", [
    ({"epochs": -1}, ValueError, "epochs"), ({"version": -2}, ValueError, "version"),
    ({"granularity": "row"}, ValueError, "granularity"), ({"quantize": "int4"}, ValueError, "quantize"),
    ({"sparsity": "most"}, TypeError, "real number"),
])
def test_options_that_cannot_be_sent_are_refused_before_the_call(options: dict, error: type, message: str) -> None:
    """Nothing listens at the target: the error comes before any call is tried. (Ranges are the server's to
    check: tests/server/optimize/test_e2e.py.)"""
    options = {"quantize": "int8", **options}
    with Client("127.0.0.1:9", timeout=60) as c, pytest.raises(error, match=message):
        c.optimize("m", None, **options)

    async def scenario() -> None:
        async with AsyncClient("127.0.0.1:9", timeout=60) as c:
            with pytest.raises(error, match=message):
                await c.optimize("m", None, **options)

    asyncio.run(scenario())


def test_stream_error_reads_like_an_rpc_error(toy: str) -> None:
    with Client(toy, timeout=60) as c, pytest.raises(grpc.RpcError) as err:  # the except clause of a failed call
        list(c.stream("toy", [X, np.ones((1, 5), np.float32)]))
    assert isinstance(err.value, StreamError) and isinstance(err.value, RuntimeError)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == err.value.message
    assert "INVALID_ARGUMENT" in str(err.value) and "status 3" not in str(err.value)
    assert StreamError(5, "gone", "7").code() is grpc.StatusCode.NOT_FOUND
    assert StreamError(grpc.StatusCode.NOT_FOUND, "gone", "7").code() is grpc.StatusCode.NOT_FOUND
    assert StreamError(99, "?", "7").code() is grpc.StatusCode.UNKNOWN


def test_outputs_are_read_only_views_and_copy_to_write(toy: str) -> None:
    with Client(toy, timeout=60) as c:
        y = c.predict("toy", X).output
    assert not y.flags.writeable
    z = np.array(y)
    z *= 2
    np.testing.assert_array_equal(z, X * 4)
