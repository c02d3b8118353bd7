"""The unary request threads: few of them running, as many as needed waiting.

In one Python process every thread that runs Python competes for the GIL, and each hand-off of the GIL between
runnable threads costs context switches; a handful of runnable request threads serve a small model best (the bare
grpcio floor runs four). But a request waiting for a busy batcher holds its thread too, and a model can only batch
the requests that are waiting at once. ``WorkerPool`` gives both: at most ``runnable`` threads take new calls, and a
thread that announces it is about to wait (``blocking()``, called by the dataplane around the wait for a batch) stops
counting, so another thread takes the next call, up to ``max_threads`` in all. Threads are started on demand and
end after ``idle_seconds`` without work.

Nothing here knows about gRPC: the server passes the pool to ``grpc.server`` as its executor.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

_local = threading.local()


class WorkerPool(futures.Executor):
    """An executor that bounds its running (not waiting) threads; see the module docstring."""

    def __init__(self, runnable: int, max_threads: int, name: str = "worker", idle_seconds: float = 60.0) -> None:
        if not 1 <= runnable <= max_threads:
            raise ValueError(f"need 1 <= runnable ({runnable}) <= max_threads ({max_threads})")
        self.runnable, self.max_threads, self._name, self._idle_seconds = runnable, max_threads, name, idle_seconds
        self._cond = threading.Condition(threading.Lock())
        self._work: deque[tuple[futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._running = 0  # threads executing a call and not inside blocking()
        self._idle = 0  # threads waiting for work
        self._waking = 0  # threads told to take work that have not taken it yet (so one submit wakes one thread)
        self._threads = 0
        self._started = 0
        self._shutdown = False

    @property
    def threads(self) -> int:
        """Threads alive now (running, waiting inside a call, or idle)."""
        return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.append((future, fn, args, kwargs))
            self._wake_one()
        return future

    def _wake_one(self) -> None:
        """Let one more thread take work if the bound allows (caller holds the lock)."""
        if not self._work or self._running + self._waking >= self.runnable:
            return
        if self._idle > self._waking:
            self._waking += 1
            self._cond.notify()
        elif self._threads < self.max_threads:
            self._threads += 1
            self._started += 1
            threading.Thread(target=self._worker, name=f"{self._name}-{self._started}", daemon=True).start()
            self._waking += 1

    def _worker(self) -> None:
        _local.pool = self
        cond = self._cond
        with cond:
            self._waking -= 1  # this thread was started to take work
            while True:
                while not self._work or self._running >= self.runnable:
                    if self._shutdown and not self._work:
                        self._threads -= 1
                        cond.notify_all()  # shutdown(wait=True) waits for the last one
                        return
                    self._idle += 1
                    woken = cond.wait(self._idle_seconds)
                    self._idle -= 1
                    if woken:
                        self._waking = max(0, self._waking - 1)
                    elif not self._work:
                        self._threads -= 1  # idle too long: the next submit starts another
                        return
                future, fn, args, kwargs = self._work.popleft()
                self._running += 1
                cond.release()
                try:
                    if future.set_running_or_notify_cancel():
                        try:
                            result = fn(*args, **kwargs)
                        except BaseException as exc:  # noqa: BLE001 -- the future carries it, as ThreadPoolExecutor's
                            future.set_exception(exc)
                        else:
                            future.set_result(result)
                    del future, fn, args, kwargs
                finally:
                    cond.acquire()
                    self._running -= 1

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """The calling thread (one of this pool's) is about to wait, not compute: another may take a call."""
        with self._cond:
            self._running -= 1
            self._wake_one()
        try:
            yield
        finally:
            with self._cond:
                self._running += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            self._cond.notify_all()
        if wait and getattr(_local, "pool", None) is not self:
            with self._cond:
                self._cond.wait_for(lambda: self._threads == 0)


def blocking() -> contextlib.AbstractContextManager[None]:
    """Around a wait that does no work (e.g. for a batch to finish): on a ``WorkerPool`` thread, lets another
    thread take a call meanwhile; anywhere else, nothing."""
    pool: WorkerPool | None = getattr(_local, "pool", None)
    return pool.blocking() if pool is not None else contextlib.nullcontext()
