"""The asyncio client speaks the same API: upload, models, info, predict, stream, delete."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from leanserve.client import AsyncClient
from leanserve.server.app import ServerHandle


def test_async_client_round_trip(server: ServerHandle, model_files, keras_predict) -> None:
    x = np.random.default_rng(0).normal(size=(6, 1000)).astype(np.float32)

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as c:
            info = await c.upload(model_files["seed_keras"], "a")
            assert info.runtime == "plan" and (await c.models()) == {"a": [1]}
            assert (await c.info("a")).version == 1
            # several predictions in flight at once on one channel
            outs = await asyncio.gather(*(c.predict("a", x[i:i + 1]) for i in range(6)))
            got = np.concatenate([o.output for o in outs])
            np.testing.assert_allclose(got, keras_predict(model_files["seed_keras"], x), atol=1e-5)
            streamed = [o async for o in c.stream("a", [x[:3], x[3:]], postprocess="argmax")]
            assert [o.request_id for o in streamed] == ["0", "1"]
            np.testing.assert_array_equal(np.concatenate([o.outputs["class"] for o in streamed]), got.argmax(1))
            assert await c.delete("a") == [1]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.predict("a", x)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())
