"""``AsyncClient`` offers ``Client``'s methods (README): the same names and parameters, checked here so the two
cannot drift apart, and the methods the asyncio client once lacked or took fewer arguments for, against a real
in-process server: per-call timeouts, ``set_default``, ``wait_ready``, ``stream(raise_on_error=False)``."""

from __future__ import annotations

import asyncio
import inspect
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import AsyncClient, Client
from leanserve.client.common import ReadyTimeout
from leanserve.server.app import ServerHandle
from tests.client.test_aio_client import _model
from tests.toy import GatedRunner

#: parameters whose annotation differs on purpose: the channel is a grpc.aio one
ASYNC_ANNOTATIONS = {("__init__", "channel")}


def _public(cls: type) -> set[str]:
    return {name for name, member in vars(cls).items() if not name.startswith("_") and callable(member)}


def test_async_client_has_client_methods_with_the_same_parameters() -> None:
    assert _public(AsyncClient) == _public(Client)
    for name in sorted(_public(Client) | {"__init__"}):
        sync, aio = inspect.signature(getattr(Client, name)), inspect.signature(getattr(AsyncClient, name))
        assert list(sync.parameters) == list(aio.parameters), name
        for p, q in zip(sync.parameters.values(), aio.parameters.values()):
            assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)
            if (name, p.name) not in ASYNC_ANNOTATIONS:
                assert p.annotation == q.annotation, (name, p.name)
    for name in _public(AsyncClient):  # every one of them talks to the server (or closes the channel)
        method = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name


def test_async_predict_timeout_overrides_the_clients(server: ServerHandle, gated: GatedRunner) -> None:
    gated.gate.clear()

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.predict("toy", np.ones((1, 4), np.float32), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(scenario())


def test_async_stream_can_skip_failed_requests(server: ServerHandle, gated: GatedRunner) -> None:
    good, bad = np.ones((1, 4), np.float32), np.ones((1, 5), np.float32)

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            got = [o async for o in c.stream("toy", [good, bad, good * 3], raise_on_error=False)]
            assert [o.request_id for o in got] == ["0", "2"]
            np.testing.assert_array_equal(got[1].output, good * 6)

    asyncio.run(scenario())


def test_async_set_default_pins_and_unpins(server: ServerHandle, tmp_path: Path) -> None:
    path = _model(tmp_path / "m.leanserve")

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            await c.wait_ready(30)
            await c.upload(path, "m")
            await c.upload(path, "m")
            assert await c.set_default("m", 1) == 1
            assert (await c.info("m")).version == 1
            assert (await c.predict("m", np.zeros((1, 20), np.float32))).model_version == 1
            assert await c.set_default("m") == 2  # unpinned: the latest again
            assert (await c.info("m")).version == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.set_default("m", 7)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_ready_times_out_the_same_way_in_both_clients() -> None:
    target = f"127.0.0.1:{_unused_port()}"  # nothing listens there
    with Client(target) as c, pytest.raises(ReadyTimeout):
        c.wait_ready(0.2)

    async def scenario() -> None:
        async with AsyncClient(target) as c:
            with pytest.raises(ReadyTimeout) as err:
                await c.wait_ready(0.2)
            assert isinstance(err.value, grpc.FutureTimeoutError) and isinstance(err.value, TimeoutError)

    asyncio.run(scenario())


def test_async_optimize_takes_a_timeout(server: ServerHandle) -> None:
    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=1e-9) as c:  # too short for anything
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.optimize("nope", None, quantize="int8", timeout=60)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())
