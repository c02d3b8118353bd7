"""The dynamic batcher on its own: batch formation, limits, deadlines, cancellation, lifecycle, settings."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from leanserve.server.serving.batching import BatchConfig, Batcher
from leanserve.server.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from leanserve.server.serving.context import RequestContext
from leanserve.server.settings import Settings
from leanserve.server.serving.stats import ModelStats
from tests.toy import GatedRunner, wait_until


def _rows(n: int, value: float, width: int = 4) -> np.ndarray:
    return np.full((n, width), value, np.float32)


@pytest.fixture
def runner() -> GatedRunner:
    return GatedRunner()


def _batcher(runner: GatedRunner, **config: object) -> tuple[Batcher, ModelStats]:
    stats = ModelStats()
    return Batcher(runner, BatchConfig(**{"inline_below_us": 0, **config}), stats, "toy"), stats


def _submit_in_thread(b: Batcher, x: np.ndarray) -> Future:
    """Submit from another thread (a request finding a free slot runs in its submitter's thread)."""
    box: Future = Future()
    threading.Thread(target=lambda: box.set_result(b.submit(x)), daemon=True).start()
    return box


class _Later:
    """The future a background submit will return, usable like that future."""

    def __init__(self, box: Future) -> None:
        self._box = box

    def result(self, timeout: float | None = None) -> np.ndarray:
        return self._box.result(timeout).result(timeout)

    def done(self) -> bool:
        return self._box.done() and self._box.result().done()


def _hold_worker(b: Batcher, runner: GatedRunner) -> _Later:
    """Close the gate and start one request: an execution slot is now busy inside the kernel."""
    runner.gate.clear()
    runner.entered.clear()
    later = _Later(_submit_in_thread(b, _rows(1, -1)))
    assert runner.entered.wait(30)
    return later


def _pack(sizes: list[int], limit: int) -> list[int]:
    """Whole requests in arrival order, as many as fit under ``limit`` rows."""
    calls, rows = [], 0
    for n in sizes:
        if rows and rows + n > limit:
            calls.append(rows)
            rows = 0
        rows += n
    return calls + [rows]


@pytest.mark.parametrize("max_batch_size", [64, 16])
def test_queued_requests_run_as_one_kernel_call_and_split_in_order(runner, max_batch_size) -> None:
    b, stats = _batcher(runner, max_batch_size=max_batch_size, workers=1)
    first = _hold_worker(b, runner)
    xs = [_rows(1 + i % 3, i) for i in range(1, 32)]  # 62 rows in 31 requests
    expected_calls = [1, *_pack([len(x) for x in xs], max_batch_size)]
    futures = [b.submit(x) for x in xs]
    assert b.queued == 31
    runner.gate.set()
    np.testing.assert_array_equal(first.result(30), _rows(1, -2))
    for x, f in zip(xs, futures):
        np.testing.assert_array_equal(f.result(30), x * 2)  # identical to running each alone
    assert runner.calls == expected_calls
    snap = stats.snapshot()
    assert snap.execution_count == len(expected_calls) and snap.inference_count == 63 and snap.queue_count == 32
    b.stop()


def test_full_queue_is_resource_exhausted(runner) -> None:
    b, _ = _batcher(runner, max_queue_size=2)
    held = _hold_worker(b, runner)
    queued = [b.submit(_rows(1, 1)), b.submit(_rows(1, 2))]
    with pytest.raises(ResourceExhausted, match="queue is full"):
        b.submit(_rows(1, 3))
    runner.gate.set()
    assert [f.result(30)[0, 0] for f in (held, *queued)] == [-2, 2, 4]
    b.stop()


def test_deadline_passed_while_queued_is_dropped_without_compute(runner) -> None:
    b, _ = _batcher(runner)
    held = _hold_worker(b, runner)
    late = b.submit(_rows(1, 1), RequestContext(deadline=time.monotonic() + 0.05))
    time.sleep(0.1)  # ordering, not a threshold: the deadline passes while the worker is held
    runner.gate.set()
    held.result(30)
    with pytest.raises(DeadlineExceeded):
        late.result(30)
    assert runner.calls == [1]
    b.submit(_rows(1, 1)).result(30)  # the worker goes on
    assert runner.calls == [1, 1]
    b.stop()


def test_cancelled_caller_gets_no_compute(runner) -> None:
    b, _ = _batcher(runner)
    held = _hold_worker(b, runner)
    gone = b.submit(_rows(1, 1), RequestContext(is_active=lambda: False))
    abandoned = b.submit(_rows(1, 2))
    assert abandoned.cancel()  # the waiting side gave up (e.g. its own deadline)
    runner.gate.set()
    held.result(30)
    with pytest.raises(Cancelled):
        gone.result(30)
    assert runner.calls == [1]
    b.stop()


def test_lone_request_is_not_held_for_the_timer(runner) -> None:
    # a minute of allowed delay: a lone request runs at once, in the caller's thread, before submit returns
    b, stats = _batcher(runner, max_queue_delay_us=60_000_000, workers=2)
    future = b.submit(_rows(1, 3))
    assert future.done() and runner.threads == [threading.current_thread()]
    np.testing.assert_array_equal(future.result(0), _rows(1, 6))
    assert stats.snapshot().dispatch == {"idle": 1}
    b.stop()


def test_free_slot_starts_at_once_even_while_another_batch_executes(runner) -> None:
    b, stats = _batcher(runner, max_queue_delay_us=60_000_000, workers=2, max_batch_size=4)
    first = _hold_worker(b, runner)
    second = _Later(_submit_in_thread(b, _rows(1, 2)))
    wait_until(lambda: len(runner.calls) == 2, "the second request is in the kernel too")  # not held by the timer
    queued = [b.submit(_rows(1, i)) for i in range(3)]  # both slots busy: these wait
    assert b.queued == 3
    runner.gate.set()
    for f in (first, second, *queued):
        f.result(30)
    assert runner.calls == [1, 1, 3]
    assert stats.snapshot().dispatch["idle"] >= 2


def test_rows_of_different_shapes_are_not_concatenated(runner) -> None:
    b, _ = _batcher(runner)
    held = _hold_worker(b, runner)
    a, c = b.submit(_rows(2, 1, width=4)), b.submit(_rows(3, 1, width=5))
    runner.gate.set()
    assert [held.result(30).shape, a.result(30).shape, c.result(30).shape] == [(1, 4), (2, 4), (3, 5)]
    assert runner.calls == [1, 2, 3]
    b.stop()


def test_batching_off_runs_each_request_in_the_callers_thread(runner) -> None:
    b, stats = _batcher(runner, enabled=False)
    assert b.submit(_rows(2, 1)).result(0)[0, 0] == 2  # done before submit returned
    assert runner.threads == [threading.current_thread()] and stats.snapshot().dispatch == {"inline": 1}


def test_stop_drains_the_queue_then_runs_late_requests_inline(runner) -> None:
    b, _ = _batcher(runner)
    held = _hold_worker(b, runner)
    queued = b.submit(_rows(1, 1))
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    runner.gate.set()
    stopper.join(30)
    assert not stopper.is_alive() and held.done() and queued.done()
    late = b.submit(_rows(1, 4))
    assert late.done() and runner.threads[-1] is threading.current_thread()


def test_config_from_settings_manifest_and_overrides() -> None:
    settings = Settings(batch_max_size=32, batch_overrides={"m": {"max_batch_size": 8}})
    cfg = BatchConfig.for_model(settings, "m", {"batching": {"max_batch_size": 16, "workers": 2}})
    assert (cfg.enabled, cfg.max_batch_size, cfg.workers) == (True, 8, 2)
    assert BatchConfig.for_model(settings, "other", {}).max_batch_size == 32
    assert not BatchConfig.for_model(Settings(batching=False), "m").enabled
    with pytest.raises(InvalidArgument, match="batching"):
        BatchConfig.for_model(settings, "m", {"batching": {"max_batch_size": 0}})


class _SecondCallBlocks:
    """``y = 2x``; the second call blocks until released (it holds the batcher's only slot meanwhile)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread())
        if len(self.threads) == 2:
            self.entered.set()
            assert self.release.wait(30), "test never released the call"
        return x * 2


@pytest.mark.parametrize("inline_below_us,queues", [(10**9, False), (0, True)], ids=["cheap-model", "threshold-0"])
def test_a_model_cheaper_than_the_hand_off_runs_at_once_even_while_busy(inline_below_us: int, queues: bool) -> None:
    """While a batch executes, a request to a model measured cheaper than ``inline_below_us`` runs on its caller's
    thread at once (no queue, no batch thread); with the threshold at 0 it queues for the batch thread."""
    runner = _SecondCallBlocks()
    b = Batcher(runner, BatchConfig(inline_below_us=inline_below_us, max_queue_delay_us=0), ModelStats(), "cheap")
    np.testing.assert_array_equal(b.submit(_rows(1, 1.0)).result(), _rows(1, 2.0))  # measured alone: idle
    holder = _submit_in_thread(b, _rows(1, 3.0))
    assert runner.entered.wait(30)  # the second call holds the only worker slot
    third = b.submit(_rows(2, 5.0))
    try:
        assert third.done() is not queues
        if not queues:
            np.testing.assert_array_equal(third.result(), _rows(2, 10.0))
            assert runner.threads[-1] is threading.current_thread() and b.threads == 0
    finally:
        runner.release.set()
    np.testing.assert_array_equal(third.result(30), _rows(2, 10.0))
    np.testing.assert_array_equal(holder.result(30).result(30), _rows(1, 6.0))
    if queues:
        assert b.threads == 1 and runner.threads[-1] is not threading.current_thread()
    b.stop(30)


def test_one_slow_run_does_not_make_a_cheap_model_queue() -> None:
    """The single-request time is a low quantile: a run slowed by waiting for the GIL (here: a 0.3 s stall) may
    move it up by at most 1 %, so a cheap model keeps running at once while busy instead of queueing for the batch
    thread; a model that really got slower moves it up run after run."""
    stall = threading.Event()

    def runner(x: np.ndarray) -> np.ndarray:
        if stall.is_set():
            time.sleep(0.3)
        return x * 2

    b = Batcher(runner, BatchConfig(inline_below_us=50_000), ModelStats(), "cheap")
    try:
        b.submit(_rows(1, 1.0)).result()
        fast = b._solo_ns
        assert fast < 50_000_000
        stall.set()
        b.submit(_rows(1, 1.0)).result()
        stall.clear()
        assert b._solo_ns <= fast * 1.011
        for _ in range(3):
            b.submit(_rows(1, 1.0)).result()
        assert b._solo_ns < 50_000_000
    finally:
        b.stop(30)


def test_a_long_stream_request_computes_on_the_batch_thread_even_when_idle() -> None:
    """A stream's request expected to compute for ``inline_below_us`` or more (rows × the measured time per row)
    goes to the batch thread, so the stream's reader goes back to reading; a short one, and any unary request, run
    at once on the caller's thread as before."""

    def runner(x: np.ndarray) -> np.ndarray:
        time.sleep(0.0005 * x.shape[0])  # 0.5 ms a row
        threads.append(threading.current_thread())
        return x * 2

    threads: list[threading.Thread] = []
    stream = RequestContext(stream=True)
    # 50 ms: far above one row (0.5 ms, even 50x slower on a loaded machine), far below 200 rows (never < 100 ms)
    b = Batcher(runner, BatchConfig(inline_below_us=50_000, max_queue_delay_us=0), ModelStats(), "long")
    try:
        first = b.submit(_rows(1, 1.0), stream)  # nothing measured yet: handed off
        np.testing.assert_array_equal(first.result(30), _rows(1, 2.0))
        assert threads[-1] is not threading.current_thread()
        assert 0.4e6 < b._row_ns < 50e6
        short = b.submit(_rows(1, 1.0), stream)  # at once, here
        assert short.done() and threads[-1] is threading.current_thread()
        long = b.submit(_rows(200, 1.0), stream)  # to the batch thread
        np.testing.assert_array_equal(long.result(30), _rows(200, 2.0))
        assert threads[-1] is not threading.current_thread()
        unary = b.submit(_rows(200, 1.0))
        assert unary.done() and threads[-1] is threading.current_thread()
    finally:
        b.stop(30)


class _RefusesNegative(GatedRunner):
    """``GatedRunner`` that refuses any call holding a negative value (as a model refuses an index out of range)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = super().__call__(x)
        if (x < 0).any():
            raise InvalidArgument("a negative value")
        return y


def test_a_request_the_model_refuses_fails_alone_not_the_batch_it_shared() -> None:
    runner = _RefusesNegative()
    b, stats = _batcher(runner, workers=1)
    held = _hold_worker(b, runner)  # a row of -1: refused, alone
    good, bad, also_good = b.submit(_rows(2, 1)), b.submit(_rows(1, -3)), b.submit(_rows(1, 5))
    runner.gate.set()
    with pytest.raises(InvalidArgument, match="negative"):
        held.result(30)
    np.testing.assert_array_equal(good.result(30), _rows(2, 2))
    with pytest.raises(InvalidArgument, match="negative"):
        bad.result(30)
    np.testing.assert_array_equal(also_good.result(30), _rows(1, 10))
    # the held call, the batch of 4 rows that failed, then each of its requests by itself
    assert runner.calls == [1, 4, 2, 1, 1]
    assert stats.snapshot().dispatch.get("retry") == 2  # the two requests answered by their own calls
    b.stop()


def test_a_refused_batch_reruns_only_live_requests_and_only_for_refused_values() -> None:
    """Requests whose deadline passed or whose caller left while the refused batch ran are dropped, not rerun; an
    error other than refused values (a bug, memory) fails the whole batch with no reruns."""
    runner = _RefusesNegative()
    b, _ = _batcher(runner, workers=1)
    held = _hold_worker(b, runner)
    expiring = b.submit(_rows(1, 7), RequestContext(deadline=time.monotonic() + 0.2))
    gone = b.submit(_rows(1, 8), RequestContext(is_active=lambda: len(runner.calls) < 2))  # leaves once it ran
    bad = b.submit(_rows(1, -3))
    time.sleep(0.3)  # ordering, not a threshold: the first deadline passes before the batch's call fails
    expiring2 = b.submit(_rows(1, 9), RequestContext(deadline=time.monotonic() + 30))
    runner.gate.set()
    with pytest.raises(InvalidArgument):
        held.result(30)
    with pytest.raises(DeadlineExceeded):
        expiring.result(30)  # dropped before the batch ran
    with pytest.raises(Cancelled):
        gone.result(30)  # ran in the refused batch, gone by the rerun
    with pytest.raises(InvalidArgument):
        bad.result(30)
    np.testing.assert_array_equal(expiring2.result(30), _rows(1, 18))
    assert runner.calls == [1, 3, 1, 1]  # the refused batch (gone, bad, expiring2), then bad and expiring2 alone
    b.stop()

    class Broken(GatedRunner):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            super().__call__(x)
            raise MemoryError("out of memory")

    broken = Broken()
    b, _ = _batcher(broken, workers=1)
    held = _hold_worker(b, broken)
    queued = [b.submit(_rows(1, i)) for i in range(3)]
    broken.gate.set()
    for f in (held, *queued):
        with pytest.raises(MemoryError):
            f.result(30)
    assert broken.calls == [1, 3]
    b.stop()
