"""Dynamic batching: requests to one model version, from any API or stream, run as one kernel call.

Policy (one queue; at most ``workers`` batches of a model version execute at once):

- A request that finds the queue empty and a free execution slot runs at once, in the caller's own thread: no
  timer, no hand-off to another thread, so latency at concurrency 1 equals an unbatched call. Except a stream's
  request expected to compute for ``inline_below_us`` or more (its rows times the kernel's time per row): it goes
  to a batch thread, so the stream's reader takes the next message off the wire while this one computes.
- Otherwise it is queued. Under load the queue fills while batches execute, so the next batch is large on its own
  (self-clocking); ``workers`` threads take everything queued (up to ``max_batch_size`` rows) as soon as a slot is
  free. A worker that would start a small batch while another batch executes first waits up to
  ``max_queue_delay_us`` for more rows (0 = never), so slots do not split the load into many small kernel calls.
- Requests are never split; a request larger than ``max_batch_size`` runs alone. Only requests whose rows have the
  same shape are concatenated.
- A request whose deadline passed, or whose caller went away, while queued is dropped without compute.
- Each kernel call is counted by why it started: "idle" (a free slot and no batch waiting for rows), "full",
  "timer" (another batch executing and ``max_queue_delay_us`` passed), "inline" (batching off or stopped),
  "cheap" (a model cheaper than the hand-off, run on its caller's thread while another call executes), "retry"
  (one request of a batch whose values were refused, run again by itself).
- A batch whose call refuses its values (InvalidArgument) is run again one request at a time: a request whose
  values the model refuses fails alone, not every request batched with it. Any other error fails the whole batch.
- ``stop()`` drains the queue and ends the workers; afterwards (and when batching is off) ``submit`` runs the
  request in the caller's thread, so a request racing an unload or a hot swap is still answered.
- Worker threads start with the first request that has to queue and end after ``idle_seconds`` without work, so
  the server's threads follow the versions in use, not the versions stored (a version that only ever sees one
  request at a time never starts one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from leanserve.server.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from leanserve.server.serving.context import NO_CONTEXT, RequestContext
from leanserve.server.settings import BatchOverride, Settings
from leanserve.server.serving.stats import ModelStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """The batching settings of one model version (server-wide values with per-model overrides applied)."""

    enabled: bool = True
    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    max_queue_size: int = 1024
    workers: int = 1
    idle_seconds: float = 30.0
    inline_below_us: int = 100

    @classmethod
    def for_model(cls, settings: Settings, name: str, manifest: dict[str, Any] | None = None) -> "BatchConfig":
        """Server settings, then the manifest's ``"batching"`` object, then ``settings.batch_overrides[name]``."""
        values: dict[str, Any] = {
            "enabled": settings.batching,
            "max_batch_size": settings.batch_max_size,
            "max_queue_delay_us": settings.batch_max_queue_delay_us,
            "max_queue_size": settings.batch_max_queue_size,
            "workers": settings.batch_workers,
            "idle_seconds": settings.batch_thread_idle_seconds,
            "inline_below_us": settings.batch_inline_below_us,
        }
        layers = []
        if manifest and manifest.get("batching"):
            try:
                layers.append(BatchOverride.model_validate(manifest["batching"]))
            except ValueError as exc:
                raise InvalidArgument(f"model {name!r}: bad \"batching\" in manifest: {exc}") from None
        if name in settings.batch_overrides:
            layers.append(settings.batch_overrides[name])
        for layer in layers:
            values.update(layer.model_dump(exclude_none=True))
        return cls(**{f.name: values[f.name] for f in fields(cls)})


class _Item:
    """One queued request."""

    __slots__ = ("x", "rows", "future", "ctx", "enqueued")

    def __init__(self, x: np.ndarray, ctx: RequestContext) -> None:
        self.x = x
        self.rows = int(x.shape[0])
        self.future: Future[np.ndarray] = Future()
        self.ctx = ctx
        self.enqueued = time.monotonic()


class Ready:
    """The result of a request that ran at once: the Future interface the callers use, without its lock."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: np.ndarray | None = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error

    def result(self, timeout: float | None = None) -> np.ndarray:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def cancel(self) -> bool:
        return False

    def done(self) -> bool:
        return True


#: ``Batcher._solo_ns`` before any request ran alone: never below ``inline_below_us``
_UNMEASURED = float("inf")


def _low_quantile(estimate: float, sample: float) -> float:
    """A running low quantile: down at once, up by at most 1 % a sample. Not a mean: time spent waiting to get the
    GIL back after the kernel only ever adds (up to the interpreter's switch interval), and under load it would make
    every cheap model look expensive and send it through the batch thread."""
    return sample if sample < estimate else estimate + 0.01 * min(sample - estimate, estimate)


def _drop_reason(item: _Item, now: float) -> Exception | None:
    """Why a queued request must not be computed (None = compute it)."""
    if item.ctx.deadline is not None and item.ctx.deadline <= now:
        return DeadlineExceeded("the deadline passed while the request was queued")
    if item.ctx.is_active is not None and not item.ctx.is_active():
        return Cancelled("the caller cancelled the request")
    return None


class Batcher:
    """The queue and worker threads of one model version. Thread-safe."""

    def __init__(self, runner: Callable[[np.ndarray], np.ndarray], config: BatchConfig, stats: ModelStats,
                 name: str = "model") -> None:
        self.config = config
        self._runner = runner
        self._stats = stats
        self._name = name
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._busy = 0  # batches executing right now
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopped = not config.enabled
        #: low quantile of the kernel time of one request run by itself (ns); _UNMEASURED until one has run
        self._solo_ns: float = _UNMEASURED
        #: low quantile of the kernel time per row of any kernel call (ns); _UNMEASURED until one has run
        self._row_ns: float = _UNMEASURED
        self._inline_below_ns = config.inline_below_us * 1000
        self._threads: list[threading.Thread] = []  # alive workers; started on demand, see _ensure_worker
        self._started = 0  # workers ever started (names them)

    @property
    def queued(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    @property
    def threads(self) -> int:
        """Worker threads alive right now (0 while idle)."""
        return len(self._threads)

    def submit(self, x: np.ndarray, ctx: RequestContext = NO_CONTEXT) -> "Future[np.ndarray] | Ready":
        """Queue one validated request; the result resolves to its output rows.

        A request that finds the model idle (nothing queued, a worker slot free) runs at once on the caller's
        thread and comes back as a ``Ready`` result: no Future, no hand-off, no wake-up of a batch thread; unless
        ``ctx.stream`` and it would compute for ``inline_below_us`` or more (see the module docstring).
        Raises ResourceExhausted when ``max_queue_size`` requests are already waiting.
        """
        with self._lock:  # the condition's own lock: entering it directly skips Condition's Python wrapper
            # a stream's long request: the batch thread computes it while the stream's reader reads the next one
            long = ctx.stream and x.shape[0] * self._row_ns >= self._inline_below_ns
            if self._stopped:
                idle = False
            elif not self._queue and self._busy < self.config.workers and not long:
                idle = True
                self._busy += 1
            elif not self._queue and self._solo_ns < self._inline_below_ns and not long:
                # a model this cheap costs less to run again than to hand over to the batch thread: batching it
                # could only save part of its kernel time, the hand-off costs more than all of it
                idle = False
            else:
                if len(self._queue) >= self.config.max_queue_size:
                    raise ResourceExhausted(
                        f"model {self._name}: the batch queue is full ({len(self._queue)} requests waiting)"
                    )
                item = _Item(x, ctx)
                self._queue.append(item)
                self._queued_rows += item.rows
                self._ensure_worker()
                self._cond.notify_all()
                return item.future
        try:
            return self._run_alone(x, ctx, "idle" if idle else "inline" if self._stopped else "cheap")
        finally:
            if idle:
                self._release()

    def _run_alone(self, x: np.ndarray, ctx: RequestContext, reason: str) -> "Ready":
        """Run one request by itself on the caller's thread."""
        if ctx.deadline is not None and ctx.deadline <= time.monotonic():
            return Ready(error=DeadlineExceeded("the deadline passed before the request could run"))
        t0 = time.perf_counter_ns()
        try:
            y = self._runner(x)
        except Exception as exc:  # noqa: BLE001 -- the caller's result carries it, as a queued request's future would
            return Ready(error=exc)
        ns = time.perf_counter_ns() - t0
        self._solo_ns = _low_quantile(self._solo_ns, ns)
        self._note_rows(x.shape[0], ns)
        self._stats.record_batch(int(x.shape[0]), 1, 0, ns, reason)
        return Ready(y)

    def _note_rows(self, rows: int, ns: int) -> None:
        if rows:
            self._row_ns = _low_quantile(self._row_ns, ns / rows)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the workers. Idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # -- workers ---------------------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        """Start a worker if fewer than ``workers`` are alive (caller holds the lock and has just queued)."""
        if len(self._threads) < self.config.workers:
            t = threading.Thread(target=self._work, name=f"batch-{self._name}-{self._started}", daemon=True)
            self._started += 1
            self._threads.append(t)
            t.start()

    def _work(self) -> None:
        cfg = self.config
        delay = cfg.max_queue_delay_us / 1e6
        me = threading.current_thread()
        while True:
            with self._cond:
                while not (self._queue and self._busy < cfg.workers):
                    # a worker leaves only with an empty queue (stopped, or idle too long): whoever queues next
                    # starts another
                    if self._stopped and not self._queue:
                        self._threads.remove(me)
                        return
                    if not self._cond.wait(cfg.idle_seconds) and not self._queue:
                        self._threads.remove(me)
                        return
                if self._busy and delay > 0 and self._queued_rows < cfg.max_batch_size:
                    until = self._queue[0].enqueued + delay
                    while self._busy and self._queued_rows < cfg.max_batch_size and not self._stopped:
                        remaining = until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if not (self._queue and self._busy < cfg.workers):  # another worker took them
                        continue
                if not self._busy:
                    reason = "idle"
                elif self._queued_rows >= cfg.max_batch_size:
                    reason = "full"
                else:
                    reason = "timer"
                batch = self._take()
                self._busy += 1
            try:
                self._execute(batch, reason)
            except BaseException:  # noqa: BLE001 -- a worker must survive anything; futures already carry it
                log.exception("batch worker of %s", self._name)
            finally:
                self._release()

    def _each_alone(self, live: list[_Item], start: float) -> None:
        """A batch whose call refused its values (InvalidArgument): each request again by itself, so one request's
        bad values (an index out of an embedding's range, say) fail that request only, not the others that happened
        to share its batch. A request whose deadline passed or whose caller left meanwhile is dropped."""
        for item in live:
            why = _drop_reason(item, time.monotonic())
            if why is not None:
                item.future.set_exception(why)
                continue
            t0 = time.perf_counter_ns()
            try:
                y = self._runner(item.x)
            except Exception as exc:  # noqa: BLE001 -- this request's own error
                item.future.set_exception(exc)
                continue
            ns = time.perf_counter_ns() - t0
            item.future.set_result(y)
            self._stats.record_batch(item.rows, 1, int((start - item.enqueued) * 1e9), ns, "retry")

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._queue:  # only a worker waiting for a free slot needs to know
                self._cond.notify_all()

    def _take(self) -> list[_Item]:
        """Pop the next batch (caller holds the lock): whole requests, same row shape, up to max rows."""
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        while self._queue:
            nxt = self._queue[0]
            if rows + nxt.rows > self.config.max_batch_size or nxt.x.shape[1:] != first.x.shape[1:]:
                break
            batch.append(self._queue.popleft())
            rows += nxt.rows
        self._queued_rows -= rows
        return batch

    def _execute(self, batch: list[_Item], reason: str) -> None:
        """Drop expired/cancelled requests, run the rest as one kernel call, hand each its rows."""
        start = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():  # the caller gave up waiting
                continue
            why = _drop_reason(item, start)
            if why is not None:
                item.future.set_exception(why)
            else:
                live.append(item)
        if not live:
            return
        x = live[0].x if len(live) == 1 else np.concatenate([item.x for item in live])
        t0 = time.perf_counter_ns()
        try:
            y = self._runner(x)
        except Exception as exc:
            if len(live) > 1 and isinstance(exc, InvalidArgument):
                self._each_alone(live, start)  # values the model refused: whose?
            else:
                for item in live:
                    item.future.set_exception(exc)
            return
        compute_ns = time.perf_counter_ns() - t0
        self._note_rows(x.shape[0], compute_ns)
        offset = 0
        for item in live:
            item.future.set_result(y[offset:offset + item.rows])
            offset += item.rows
        queue_ns = int(sum(start - item.enqueued for item in live) * 1e9)
        self._stats.record_batch(int(x.shape[0]), len(live), queue_ns, compute_ns, reason)
