"""The asyncio client beyond the round trip (tests/e2e/test_async_client.py): optimize with progress, a
``promote=True`` run over its budget that is not promoted, a failed request inside a stream, and timeouts."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import AsyncClient, Client
from leanserve.client.client import StreamError
from leanserve.server.app import ServerHandle
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.toy import GatedRunner


def _model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    plan = build_plan((20,), [
        LayerSpec("h", rng.normal(size=(20, 32)).astype(np.float32), rng.normal(size=32).astype(np.float32), "relu"),
        LayerSpec("o", rng.normal(size=(32, 6)).astype(np.float32), np.zeros(6, np.float32), "softmax"),
    ])
    manifest, blob = artifacts.plan_to_files(plan)
    artifacts.write_zip(path, manifest, blob)
    return path


@pytest.mark.slow  # an optimization builds a TensorFlow reference and measures latency
def test_optimize_reports_progress_and_promotes_within_budget(server: ServerHandle, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=300) as c:
            await c.upload(_model(tmp_path / "m.leanserve"), "m")
            stages: list[str] = []
            report = await c.optimize("m", None, quantize="int8", max_accuracy_drop=1.0, promote=True,
                                      progress=lambda stage, fraction, message: stages.append(stage))
            assert {"baseline", "store"} <= set(stages)
            assert report["version"] == 2 and report["within_budget"] and report["promoted"]
            assert report["default_version"] == 2 and (await c.info("m")).version == 2

    asyncio.run(scenario())


@pytest.mark.slow  # an optimization builds a TensorFlow reference and measures latency
def test_promote_over_budget_is_not_promoted(server: ServerHandle, tmp_path: Path) -> None:
    """Asked to promote, but pruning 95 % changes answers beyond a zero budget: the version is stored, the report
    says why, and the default stays where it was."""
    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=300) as c:
            await c.upload(_model(tmp_path / "m.leanserve"), "m")
            report = await c.optimize("m", None, sparsity=0.95, max_accuracy_drop=0.0, promote=True)
            assert report["before"]["metric"] - report["after"]["metric"] > 0.0
            assert not report["within_budget"] and not report["promoted"]
            assert report["version"] == 2 and report["default_version"] == 1
            assert (await c.models()) == {"m": [1, 2]}
            assert (await c.info("m")).version == 1
            assert (await c.predict("m", np.zeros((1, 20), np.float32))).model_version == 1

    asyncio.run(scenario())


def test_optimize_errors_are_rpc_errors(server: ServerHandle) -> None:
    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.optimize("nope", None, quantize="int8")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_a_failed_request_inside_a_stream_is_a_stream_error(server: ServerHandle, gated: GatedRunner) -> None:
    good, bad = np.ones((1, 4), np.float32), np.ones((1, 5), np.float32)

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            got = []
            with pytest.raises(StreamError) as err:
                async for out in c.stream("toy", [good, bad, good]):
                    got.append(out)
            assert [o.request_id for o in got] == ["0"]
            np.testing.assert_array_equal(got[0].output, good * 2)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.request_id == "1"
            assert "shape" in err.value.message

    asyncio.run(scenario())


def test_timeouts_are_deadline_exceeded(server: ServerHandle, gated: GatedRunner) -> None:
    """The client's ``timeout`` is each call's deadline: a model held busy answers too late."""
    gated.gate.clear()
    sync = Client(f"127.0.0.1:{server.port}", timeout=60)
    held = threading.Thread(target=sync.predict, args=("toy", np.ones((1, 4), np.float32)))
    held.start()
    try:
        assert gated.entered.wait(60)

        async def scenario() -> None:
            async with AsyncClient(f"127.0.0.1:{server.port}", timeout=0.5) as c:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await c.predict("toy", np.ones((1, 4), np.float32))
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # the stream's deadline: the call ends with it, or (when the server's answer to the request gets
                # out first) the request fails with it
                with pytest.raises((grpc.aio.AioRpcError, StreamError)) as err:
                    async for _ in c.stream("toy", [np.ones((1, 4), np.float32)]):
                        pass
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # both: StreamError is an RpcError

        asyncio.run(scenario())
    finally:
        gated.gate.set()
        held.join(60)
        sync.close()
    assert gated.calls == [1]  # the late requests were dropped, never computed
