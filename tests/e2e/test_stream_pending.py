"""A stream whose client does not read its answers: the server computes ahead only up to
``stream_max_pending_bytes`` of answers, not a whole window of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from leanserve.client import common
from leanserve.server.app import ServerHandle
from leanserve.v1 import inference_service_pb2_grpc as inf_grpc
from tests.toy import GatedRunner, toy_model

WIDTH = 16384  # 64 KiB a row, in and out
ROWS = 64  # 4 MiB a request, and 4 MiB of answer
SENT = 20


@pytest.mark.settings(stream_max_pending_bytes=8 << 20, batching=False, stream_window=16,
                      stream_idle_timeout_seconds=60.0)
def test_a_stream_not_read_computes_ahead_only_up_to_the_pending_bytes(gated_server: tuple[ServerHandle,
                                                                                          GatedRunner]) -> None:
    """Finding: a client sending 40 small requests and reading nothing made the server hold 21 answers of 64 MiB
    (1.3 GiB) for 30 s; with 96 streams the ceiling was past any machine's memory."""
    handle, _ = gated_server
    runner = GatedRunner()
    handle.dataplane.serve(toy_model(runner, name="wide", features=WIDTH))
    x = np.ones((ROWS, WIDTH), np.float32)
    stop = threading.Event()

    def requests() -> Iterator[object]:
        for _ in range(SENT):
            yield common.predict_request("wide", x)
        stop.wait(60)  # keeps the stream open, reading nothing

    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}", options=common.channel_options(1 << 30))
    call = inf_grpc.InferenceServiceStub(channel).PredictStream(requests(), timeout=60)
    try:
        # the server computes until the answers it holds (and grpc's send buffers) stop it; give it time to do so
        deadline, seen = time.monotonic() + 10, -1
        while time.monotonic() < deadline and len(runner.calls) != seen:
            seen = len(runner.calls)
            time.sleep(1.0)
        # 8 MiB = 2 answers held, 1 being sent, 1 passed by the reader before it waits; a window would be 16+
        assert len(runner.calls) <= 5, runner.calls
        first = next(call)  # reading again lets it go on
        assert first.outputs[0].shape[:] == [ROWS, WIDTH]
    finally:
        stop.set()
        call.cancel()
        channel.close()
