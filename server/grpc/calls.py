"""What every servicer needs from a gRPC call: its deadline and liveness, slots for long calls, client streams read
with an idle timeout, data chunks read at a minimum rate, pipelined predict streams, and the status number of an error
answered inside a stream."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message

from leanserve.server.errors import Cancelled, DeadlineExceeded, InvalidArgument, LeanserveError, ResourceExhausted
from leanserve.server.grpc.interceptors import STATUS
from leanserve.server.serving.context import RequestContext

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Item = TypeVar("Item")

_END = object()
_NO_DEADLINE = 1e7  # seconds
_PUT_POLL_SECONDS = 0.1


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an error is answered with: its code's (see interceptors.STATUS); INTERNAL for anything but
    a LeanserveError."""
    return STATUS[exc.code] if isinstance(exc, LeanserveError) else grpc.StatusCode.INTERNAL


def status_number(exc: BaseException) -> int:
    """The numeric gRPC status of an error (e.g. 3 for INVALID_ARGUMENT), for error answers inside a stream."""
    return status_code(exc).value[0]


def internal_error() -> LeanserveError:
    """What a caller is told about a bug while answering one request of a stream (details stay in the log)."""
    return LeanserveError("internal error while answering this request; see the server log")


def request_context(context: grpc.ServicerContext) -> RequestContext:
    """The call's deadline (on the monotonic clock) and a liveness check, in transport-free terms."""
    remaining = context.time_remaining()
    # grpc reports "no deadline" as None or as a practically infinite time remaining
    deadline = None if remaining is None or remaining > _NO_DEADLINE else time.monotonic() + remaining
    return RequestContext(deadline=deadline, is_active=context.is_active)


class StreamSlots:
    """Bounds the long calls of one kind open at once (predict streams, uploads, optimizations).

    Each open call holds a worker thread of the sync server for its whole life; past the bound a new call is
    refused at once (RESOURCE_EXHAUSTED) rather than left hanging, and unary calls keep finding threads (the
    settings keep all bounds together below the worker count).
    """

    def __init__(self, limit: int, kind: str = "streams") -> None:
        self.limit = limit
        self.kind = kind
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot for the ``with`` block; ResourceExhausted at once when none is free."""
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(f"too many open {self.kind} (limit {self.limit}); retry later or open fewer")
        try:
            yield
        finally:
            self._free.release()

    def open(self, requests: Iterator[Req], answer: Callable[[Iterator[Req]], Iterator[Resp]]) -> Iterator[Resp]:
        """Yield ``answer(requests)`` while holding a slot."""
        with self.hold():
            yield from answer(requests)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Inbox(Generic[Item]):
    """A client stream read on a helper thread, so that waiting for the next message can time out.

    The sync server's request iterator blocks without a timeout; here a reader thread moves each message
    (through ``take``, run on the reader thread) into a bounded queue, and iterating waits at most
    ``idle_timeout`` seconds for the next one: then DeadlineExceeded. A client that went away raises Cancelled.
    The reader blocks until the call ends, so the handler must end the call (return or raise) after giving up;
    ``close`` (or leaving the ``with`` block) tells the reader to drop what it still reads. ``first_at`` is when
    the reader got the stream's first message (monotonic clock; None before).
    """

    def __init__(
        self,
        requests: Iterator[Req],
        idle_timeout: float,
        take: Callable[[Req], Item] | None = None,
        capacity: int = 1,
    ) -> None:
        self._requests = requests
        self._idle = idle_timeout
        self._take = take if take is not None else (lambda req: req)  # type: ignore[assignment,return-value]
        self._queue: queue.Queue[object] = queue.Queue(maxsize=capacity)
        self._closed = threading.Event()
        self._done = False
        self.first_at: float | None = None
        self._reader = threading.Thread(target=self._read, name="stream-reader", daemon=True)
        self._reader.start()

    def _put(self, entry: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_PUT_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for req in self._requests:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                if not self._put(self._take(req)):
                    return
        except BaseException as exc:  # noqa: BLE001 -- handed to the handler's thread
            self._put(_Failed(exc))
            return
        self._put(_END)

    def __iter__(self) -> Inbox[Item]:
        return self

    def __next__(self) -> Item:
        return self.next_by(None)

    def next_by(self, due: float | None, late: Callable[[], LeanserveError] | None = None) -> Item:
        """The next message, waiting at most the idle timeout, and when ``due`` (monotonic clock) comes sooner only
        until then: past it ``late()`` is raised (the call is given up). StopIteration at the end of the stream."""
        if self._done:
            raise StopIteration
        wait = self._idle if due is None else min(self._idle, max(0.0, due - time.monotonic()))
        try:
            entry = self._queue.get(timeout=wait)
        except queue.Empty:
            self.close()
            if late is not None and wait < self._idle:
                raise late() from None
            raise DeadlineExceeded(
                f"no message from the client for {self._idle:g} s; the call was idle too long"
            ) from None
        if entry is _END:
            self._done = True
            raise StopIteration
        if isinstance(entry, _Failed):
            self.close()
            if isinstance(entry.exc, grpc.RpcError):
                raise Cancelled("the client went away")
            raise entry.exc
        return entry  # type: ignore[return-value]

    def close(self) -> None:
        """Stop handing over messages (the reader drops the rest)."""
        self._done = True
        self._closed.set()

    def __enter__(self) -> Inbox[Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MinRate:
    """The slowest average rate a client's data may arrive at (``upload_min_bytes_per_second``).

    The clock starts at the call's first message. Within ``grace_seconds`` anything goes; after that the bytes
    received since the start must be at least ``min_bytes_per_second`` times the seconds passed, else
    DeadlineExceeded. Only bytes received count: an empty chunk adds nothing, sizes a header declares add nothing.
    A minimum of 0 checks nothing.
    """

    def __init__(self, min_bytes_per_second: int, grace_seconds: float, what: str, started: float) -> None:
        self.min_bytes_per_second = min_bytes_per_second
        self.grace_seconds = grace_seconds
        self.what = what
        self.started = started
        self.received = 0

    def due(self) -> float | None:
        """When (monotonic clock) the bytes received so far stop being enough; None without a minimum."""
        if self.min_bytes_per_second <= 0:
            return None
        return self.started + max(self.grace_seconds, self.received / self.min_bytes_per_second)

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` received; DeadlineExceeded when even with them the average is below the minimum."""
        self.received += nbytes
        due = self.due()
        if due is not None and time.monotonic() > due:
            raise self.too_slow()

    def too_slow(self) -> DeadlineExceeded:
        """The error a client too slow is answered with: what came in, over how long, and the minimum."""
        seconds = time.monotonic() - self.started
        return DeadlineExceeded(
            f"{self.what} too slow: {self.received} bytes in {seconds:.1f} s since its first message, below the "
            f"minimum of {self.min_bytes_per_second} bytes/s (upload_min_bytes_per_second); the call was ended"
        )


def data_chunks(messages: Inbox[Message], part: str, min_bytes_per_second: int, grace_seconds: float, what: str,
                misplaced: str) -> Iterator[bytes]:
    """The bytes of the ``part`` field of each further message of a client stream (an upload's chunks, an
    optimization's data), at least at ``min_bytes_per_second`` on average once ``grace_seconds`` have passed since
    the stream's first message (``MinRate``); a slower stream ends with DeadlineExceeded. Waiting for a message
    stops at the moment the rate is missed, not only at the idle timeout, so a trickle is cut on time. A message
    of another kind raises InvalidArgument(``misplaced``)."""
    started = messages.first_at if messages.first_at is not None else time.monotonic()
    rate = MinRate(min_bytes_per_second, grace_seconds, what, started)
    while True:
        try:
            msg = messages.next_by(rate.due(), rate.too_slow)
        except StopIteration:
            return
        if msg.WhichOneof("part") != part:
            raise InvalidArgument(misplaced)
        chunk: bytes = getattr(msg, part)
        rate.add(len(chunk))  # an empty chunk is a message, not progress: it adds nothing
        yield chunk


class PendingBytes:
    """The bytes of a stream's answers computed and not yet sent, held under a limit: ``add`` (on the reader
    thread, after a request is queued, before it is handed over) waits until the answers already handed over leave
    room for it, or there are none; ``done`` (once an answer is sent) gives its bytes back; ``close`` releases a
    waiting reader when the stream ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._cond = threading.Condition()
        self._closed = False

    def add(self, nbytes: int) -> None:
        with self._cond:
            # waits for the answers already handed over (never for this one: a request larger than the limit goes
            # through once it is alone)
            while self.held and self.held + nbytes > self.limit and not self._closed:
                self._cond.wait(_PUT_POLL_SECONDS)
            self.held += nbytes

    def done(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def pipelined(
    requests: Iterator[Req],
    submit: Callable[[Req], tuple[Callable[[], Resp], int]],
    on_error: Callable[[Req, LeanserveError], Resp],
    window: int,
    idle_timeout: float,
    max_pending_bytes: int,
) -> Iterator[Resp]:
    """Answer a request stream in order while up to ``window`` requests, and answers of at most
    ``max_pending_bytes``, are in flight.

    The Inbox's reader takes requests off the stream and ``submit``s each (validate + queue for the batcher),
    which returns a function waiting for its response and the bytes that response will hold. This generator yields
    those responses in request order. The bounded hand-over queue stops the reader when ``window`` answers are
    pending, and ``PendingBytes`` when the answers computed and not sent pass ``max_pending_bytes``, so gRPC flow
    control pushes back on the client instead of the server buffering without bound (a client that does not read
    its answers holds at most that). A request that fails (a LeanserveError, or a bug, answered as INTERNAL) is
    answered with ``on_error`` and the stream goes on. With nothing pending and no request for ``idle_timeout``
    seconds the stream ends with DeadlineExceeded.
    """
    pending = PendingBytes(max_pending_bytes)

    def take(req: Req) -> tuple[Req, Callable[[], Resp] | None, LeanserveError | None, int]:
        try:
            wait, nbytes = submit(req)
        except LeanserveError as exc:
            return req, None, exc, 0
        except Exception:  # a bug in one request's handling: answer it, keep the stream
            log.exception("unexpected error in a stream request")
            return req, None, internal_error(), 0
        pending.add(nbytes)
        return req, wait, None, nbytes

    try:
        with Inbox(requests, idle_timeout, take, capacity=window) as inbox:
            while True:
                try:
                    req, wait, error, nbytes = next(inbox)
                except StopIteration:
                    return
                except Cancelled:  # the client went away: nobody to answer
                    return
                if wait is not None:
                    try:
                        response = wait()
                    except LeanserveError as exc:
                        error = exc
                    except Exception:
                        log.exception("unexpected error in a stream request")
                        error = internal_error()
                try:
                    yield response if error is None else on_error(req, error)
                finally:
                    pending.done(nbytes)  # sent (or the stream ended): its bytes are no longer held
    finally:
        pending.close()
