"""Ends server-streaming calls whose client stopped reading.

The sync server sends a stream's responses one at a time: after a handler yields a response, its thread waits until
gRPC has handed that message to the connection, which it cannot do while the client's flow-control window is full.
A client that opens a stream and never reads would so hold a stream thread and a stream slot for as long as its
connection lives; the read side's idle timeout (calls.Inbox) does not see it, as the handler is not reading. The
watchdog cancels a call whose response has waited to be sent for longer than the timeout (the client sees
CANCELLED, if it is still there to see anything), which frees the handler's thread and slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)


class SendWatchdog:
    """Cancels calls whose response is not sent within ``timeout`` seconds; one thread for all calls, started on
    first use, waking every ``timeout / 4`` (at most every second) while responses wait. ``watch=False``: no
    thread, the caller runs ``expire`` (tests, with their own clock)."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic, watch: bool = True) -> None:
        self.timeout = timeout
        self._clock = clock
        self._watch_thread = watch
        self._period = min(1.0, max(0.01, timeout / 4))
        self._waiting: dict[grpc.ServicerContext, float] = {}  # call -> when its response must be sent by
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, context: grpc.ServicerContext) -> None:
        """The handler of ``context`` is about to yield a response: it must be sent within the timeout."""
        with self._lock:
            self._waiting[context] = self._clock() + self.timeout
            if self._thread is None and self._watch_thread and not self._stopped:
                self._thread = threading.Thread(target=self._watch, name="send-watchdog", daemon=True)
                self._thread.start()
        self._wake.set()

    def disarm(self, context: grpc.ServicerContext) -> None:
        """The response of ``context`` was sent (or the call ended)."""
        with self._lock:
            self._waiting.pop(context, None)

    def expire(self) -> int:
        """Cancel the calls whose response is overdue; returns how many (the watch thread calls this)."""
        now = self._clock()
        with self._lock:
            late = [context for context, due in self._waiting.items() if due <= now]
            for context in late:
                del self._waiting[context]
        for context in late:
            log.info("cancelled a stream whose client read nothing for %g s", self.timeout)
            context.cancel()
        return len(late)

    def stop(self) -> None:
        """End the watch thread (the server stopped; its calls are over)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(2 * self._period + 1)

    def _watch(self) -> None:
        while True:
            self._wake.wait()
            if self._stopped:
                return
            time.sleep(self._period)
            self.expire()
            with self._lock:
                if not self._waiting and not self._stopped:
                    self._wake.clear()
