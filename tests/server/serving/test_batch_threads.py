"""The batcher's worker threads start on demand and end when idle: a version nobody queues for has none."""

from __future__ import annotations

import threading

import numpy as np

from leanserve.server.serving.batching import BatchConfig, Batcher
from leanserve.server.serving.stats import ModelStats
from tests.toy import GatedRunner, wait_until


def _rows(value: float) -> np.ndarray:
    return np.full((1, 4), value, np.float32)


def test_no_thread_until_a_request_queues_then_none_once_idle() -> None:
    runner = GatedRunner()
    stats = ModelStats()
    b = Batcher(runner, BatchConfig(idle_seconds=0.2, max_queue_delay_us=0, inline_below_us=0), stats, "lazy")
    assert b.threads == 0
    # a lone request runs inline on the caller's thread: still no worker
    np.testing.assert_array_equal(b.submit(_rows(1)).result(5), _rows(2))
    assert b.threads == 0 and runner.threads == [threading.current_thread()]
    assert stats.snapshot().dispatch == {"idle": 1}

    # while one request holds the only execution slot, the next one queues and starts a worker
    runner.gate.clear()
    runner.entered.clear()
    held = threading.Thread(target=lambda: b.submit(_rows(3)))
    held.start()
    assert runner.entered.wait(30)
    queued = b.submit(_rows(4))
    assert b.threads == 1
    runner.gate.set()
    held.join(30)
    np.testing.assert_array_equal(queued.result(30), _rows(8))
    assert runner.threads[-1].name == "batch-lazy-0"

    wait_until(lambda: b.threads == 0, "the idle worker ends")
    assert not [t for t in threading.enumerate() if t.name.startswith("batch-lazy-")]
    np.testing.assert_array_equal(b.submit(_rows(5)).result(5), _rows(10))  # and inline again
    b.stop()


def test_stop_drains_the_queue_and_ends_the_worker() -> None:
    runner = GatedRunner()
    b = Batcher(runner, BatchConfig(idle_seconds=60, inline_below_us=0), ModelStats(), "stopping")
    runner.gate.clear()
    held = threading.Thread(target=lambda: b.submit(_rows(1)))
    held.start()
    assert runner.entered.wait(30)
    queued = [b.submit(_rows(i)) for i in range(3)]
    assert b.threads == 1
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    runner.gate.set()
    stopper.join(30)
    held.join(30)
    assert [f.result(5)[0, 0] for f in queued] == [0, 2, 4]
    assert b.threads == 0
    np.testing.assert_array_equal(b.submit(_rows(7)).result(5), _rows(14))  # stopped: inline
