"""Cumulative per-model-version counters: the one source for Prometheus metrics and V2 ModelStatistics.

Plain integers under a lock (a few hundred nanoseconds a request); readers take a consistent snapshot.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class StatsSnapshot:
    """A copy of the counters at one moment. Durations are nanoseconds."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    #: rows inferred
    inference_count: int = 0
    #: kernel calls (batches)
    execution_count: int = 0
    last_inference_ms: int = 0
    #: rows per kernel call -> [calls, total compute ns]
    batches: dict[int, list[int]] = field(default_factory=dict)
    #: why kernel calls started: "idle", "full", "timer", "inline", "cheap", "retry" (see serving/batching.py)
    dispatch: dict[str, int] = field(default_factory=dict)


class ModelStats:
    """Counters of one served version, updated by the dataplane (requests) and the batcher (batches)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = StatsSnapshot()

    def record_request(self, ok: bool, ns: int) -> None:
        """One request answered (ok) or failed after its model was found, ``ns`` after it arrived."""
        with self._lock:
            if ok:
                self._s.success_count += 1
                self._s.success_ns += ns
            else:
                self._s.fail_count += 1
                self._s.fail_ns += ns

    def record_batch(self, rows: int, requests: int, queue_ns: int, compute_ns: int, reason: str) -> None:
        """One kernel call over ``rows`` rows from ``requests`` requests that waited ``queue_ns`` in total."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            s = self._s
            s.queue_count += requests
            s.queue_ns += queue_ns
            s.compute_count += requests
            s.compute_ns += compute_ns * requests
            s.inference_count += rows
            s.execution_count += 1
            s.last_inference_ms = now_ms
            per_size = s.batches.setdefault(rows, [0, 0])
            per_size[0] += 1
            per_size[1] += compute_ns
            s.dispatch[reason] = s.dispatch.get(reason, 0) + 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            s = self._s
            return StatsSnapshot(
                **{k: v for k, v in vars(s).items() if k not in ("batches", "dispatch")},
                batches={k: list(v) for k, v in s.batches.items()},
                dispatch=dict(s.dispatch),
            )
