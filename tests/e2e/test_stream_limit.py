"""Open streams are bounded: past the limit a new stream is refused at once, and unary calls still get answered."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from leanserve.client import Client, common
from leanserve.server.app import create_server
from tests.conftest import make_settings


@contextlib.contextmanager
def held_streams(client: Client, n: int, x: np.ndarray) -> Iterator[None]:
    """``n`` PredictStreams, each answered once and then left open (holding its slot) until the block ends."""
    feeds: list[queue.Queue] = []
    calls = []

    def requests(q: queue.Queue):
        while (item := q.get()) is not None:
            yield item

    try:
        for _ in range(n):
            q: queue.Queue = queue.Queue()
            call = client.inference_stub.PredictStream(requests(q))
            q.put(common.predict_request("seed", x, request_id="open"))
            assert next(call).request_id == "open"  # the stream is open and holding its slot
            feeds.append(q)
            calls.append(call)
        yield
    finally:
        for q in feeds:
            q.put(None)
        for call in calls:
            list(call)


def test_streams_past_the_limit_are_refused_and_unary_still_served(client: Client, model_files) -> None:
    client.upload(model_files["seed_h5"], "seed")
    x = np.zeros((1, 1000), np.float32)
    with held_streams(client, 4, x):  # the test server's max_open_streams
        with pytest.raises(grpc.RpcError) as err:
            next(client.inference_stub.PredictStream(iter([common.predict_request("seed", x)])))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "open streams" in err.value.details()
        assert client.predict("seed", x, timeout=10).output.shape == (1, 10)
    # the slots are free again
    assert [o.request_id for o in client.stream("seed", [x])] == ["0"]


def test_streams_never_take_the_unary_threads(model_files, tmp_path) -> None:
    """Streams run on a pool of their own: with ONE unary thread and every stream slot held, unary calls are served."""
    handle = create_server(make_settings(tmp_path / "models", worker_threads=1, max_open_streams=4))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
            c.upload(model_files["seed_h5"], "seed")
            x = np.zeros((1, 1000), np.float32)
            with held_streams(c, 4, x):
                for _ in range(3):
                    assert c.predict("seed", x, timeout=10).output.shape == (1, 10)
    finally:
        handle.stop(0.5)
