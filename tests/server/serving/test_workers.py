"""The unary request pool: at most ``runnable`` threads computing, more while calls wait for batches."""

from __future__ import annotations

import threading
import time

import pytest

from leanserve.server.serving.workers import WorkerPool, blocking


def _until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_runs_calls_and_carries_results_and_errors() -> None:
    pool = WorkerPool(2, 4, "t")
    try:
        assert pool.submit(lambda a, b: a + b, 2, b=3).result(5) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(5)
    finally:
        pool.shutdown()
    assert pool.threads == 0


def test_at_most_runnable_calls_compute_at_once() -> None:
    pool = WorkerPool(2, 8, "t")
    lock = threading.Lock()
    running, peak = [0], [0]
    release = threading.Event()

    def busy() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(5)
        with lock:
            running[0] -= 1

    try:
        futures = [pool.submit(busy) for _ in range(6)]
        assert _until(lambda: running[0] == 2)
        time.sleep(0.1)
        assert running[0] == 2  # the other four wait in the queue, not on threads of their own
        release.set()
        for f in futures:
            f.result(5)
        assert peak[0] == 2
    finally:
        pool.shutdown()


def test_a_call_waiting_inside_blocking_lets_another_call_run() -> None:
    """Calls waiting for a batch do not count: with ONE runnable thread, three waiting calls and a fourth that
    computes all make progress (this is how unary callers still form batches)."""
    pool = WorkerPool(1, 8, "t")
    arrived = threading.Semaphore(0)
    go = threading.Event()

    def waits() -> str:
        arrived.release()
        with blocking():
            go.wait(5)
        return "waited"

    try:
        waiting = [pool.submit(waits) for _ in range(3)]
        for _ in range(3):
            assert arrived.acquire(timeout=5), "a waiting call kept the next one from starting"
        assert pool.submit(lambda: "computed").result(5) == "computed"
        go.set()
        assert [f.result(5) for f in waiting] == ["waited"] * 3
        assert pool.threads <= 8
    finally:
        pool.shutdown()


def test_threads_never_exceed_max_threads() -> None:
    pool = WorkerPool(1, 3, "t")
    go = threading.Event()

    def waits() -> None:
        with blocking():
            go.wait(5)

    try:
        futures = [pool.submit(waits) for _ in range(10)]
        assert _until(lambda: pool.threads == 3)
        time.sleep(0.1)
        assert pool.threads == 3
        go.set()
        for f in futures:
            f.result(5)
    finally:
        pool.shutdown()


def test_blocking_outside_a_pool_thread_does_nothing() -> None:
    with blocking():
        pass


def test_idle_threads_end_and_shutdown_refuses_new_calls() -> None:
    pool = WorkerPool(2, 4, "t", idle_seconds=0.05)
    pool.submit(time.sleep, 0.01).result(5)
    assert _until(lambda: pool.threads == 0)
    assert pool.submit(lambda: 7).result(5) == 7  # a new thread starts for it
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 1)


def test_cancelled_queued_calls_never_run() -> None:
    pool = WorkerPool(1, 1, "t")
    gate = threading.Event()
    ran = []
    try:
        first = pool.submit(gate.wait, 5)
        second = pool.submit(ran.append, 1)
        assert second.cancel()
        gate.set()
        first.result(5)
        time.sleep(0.05)
        assert ran == []
    finally:
        pool.shutdown()
