"""What every servicer needs from a gRPC call: its deadline and liveness, and pipelined streams."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from leanserve.server.errors import LeanserveError, ResourceExhausted
from leanserve.server.serving.context import RequestContext

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_END = object()
_NO_DEADLINE = 1e7  # seconds


def request_context(context: grpc.ServicerContext) -> RequestContext:
    """The call's deadline (on the monotonic clock) and a liveness check, in transport-free terms."""
    remaining = context.time_remaining()
    # grpc reports "no deadline" as None or as a practically infinite time remaining
    deadline = None if remaining is None or remaining > _NO_DEADLINE else time.monotonic() + remaining
    return RequestContext(deadline=deadline, is_active=context.is_active)


class StreamSlots:
    """Bounds the streams open at once. Each open stream holds a worker thread for its whole life in the sync
    server; past the bound a new stream is refused at once (RESOURCE_EXHAUSTED) rather than left hanging, and
    unary calls keep finding threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def open(self, requests: Iterator[Req], answer: Callable[[Iterator[Req]], Iterator[Resp]]) -> Iterator[Resp]:
        """Yield ``answer(requests)`` while holding a slot."""
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(f"too many open streams (limit {self.limit}); retry later or use fewer streams")
        try:
            yield from answer(requests)
        finally:
            self._free.release()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def pipelined(
    requests: Iterator[Req],
    submit: Callable[[Req], Callable[[], Resp]],
    on_error: Callable[[Req, LeanserveError], Resp],
    window: int,
) -> Iterator[Resp]:
    """Answer a request stream in order while up to ``window`` requests are in flight.

    A reader thread takes requests off the stream and ``submit``s each (validate + queue for the batcher), which
    returns a function waiting for its response. This generator yields those responses in request order. The
    bounded hand-over queue stops the reader when ``window`` answers are pending, so gRPC flow control pushes back
    on the client instead of the server buffering without bound. A request that fails with a LeanserveError is
    answered with ``on_error`` and the stream goes on.
    """
    pending: queue.Queue[object] = queue.Queue(maxsize=window)
    closed = threading.Event()

    def put(entry: object) -> bool:
        while not closed.is_set():
            try:
                pending.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for req in requests:
                try:
                    entry: object = (req, submit(req), None)
                except LeanserveError as exc:
                    entry = (req, None, exc)
                if not put(entry):
                    return
        except BaseException as exc:  # noqa: BLE001 -- handed to the answering thread
            put(_Failed(exc))
            return
        put(_END)

    reader = threading.Thread(target=read, name="stream-reader", daemon=True)
    reader.start()
    try:
        while True:
            entry = pending.get()
            if entry is _END:
                return
            if isinstance(entry, _Failed):
                if isinstance(entry.exc, grpc.RpcError):  # the client went away: nobody to answer
                    return
                raise entry.exc
            req, wait, error = entry  # type: ignore[misc]
            if error is None:
                try:
                    response = wait()
                except LeanserveError as exc:
                    error = exc
            yield response if error is None else on_error(req, error)
    finally:
        closed.set()
