"""The standard ``grpc.health.v1.Health`` service (Check and Watch), for grpc_health_probe, k8s and load balancers.

grpc-health's own servicer sends watch answers while holding its lock, and grpc's sync server waits for each
send to complete on its polling thread; that same thread runs the close callback of any watch that ends, and the
callback takes the lock. One watch ending while a status changed (every shutdown, with watchers attached) froze
the server (grpc/grpc#43403 moves the sends out of the lock upstream; not released). Here the lock only guards the
tables; every send happens outside it, each watcher's sends are serialized on its own, and the status sent is
always the latest one. Shutdown notifies watchers from a thread of its own, so a watcher whose client stopped
reading cannot hold ``stop()`` past its grace.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from leanserve.server.errors import InvalidArgument, NotFound, ResourceExhausted

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
MAX_SERVICE_NAME = 256  # service names are short; a long one is not worth a table lookup


class _Watcher:
    """One open Watch call: its send callback and what was last sent to it."""

    __slots__ = ("service", "send", "guard", "sending", "pending", "sent")

    def __init__(self, service: str, send: Callable[[Any], None]) -> None:
        self.service = service
        self.send = send
        self.guard = threading.Lock()
        self.sending = False  # a thread is sending to this watcher: it re-reads the status before it stops
        self.pending = False
        self.sent: int | None = None


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Per-service status, answered by Check and pushed to Watch calls; at most ``max_watches`` watches open."""

    def __init__(self, max_watches: int) -> None:
        self._max_watches = max_watches
        self._lock = threading.Lock()
        self._status: dict[str, int] = {}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._open = 0
        self._shutting_down = False

    @property
    def open_watches(self) -> int:
        """Watch calls open now."""
        return self._open

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
              ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(_service(request))
        if status is None:
            raise NotFound(f"no health status for service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Callable[[Any], None] | None = None) -> None:
        if send_response_callback is None:  # grpc's sync server always passes it to a non-blocking method
            raise RuntimeError("Watch needs grpc's non-blocking server-streaming mode")
        watcher = _Watcher(_service(request), send_response_callback)
        with self._lock:
            if self._open >= self._max_watches:
                raise ResourceExhausted(f"{self._open} health watches are open, the most this server keeps")
            self._watchers.setdefault(watcher.service, set()).add(watcher)
            self._open += 1
        if not context.add_callback(lambda: self._forget(watcher)):
            self._forget(watcher)  # the call already ended
            return None
        self._deliver(watcher)
        return None

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]

    def set(self, service: str, status: int) -> None:
        """Set ``service``'s status and send it to its watchers (ignored once shutdown began)."""
        with self._lock:
            if self._shutting_down:
                return
            self._status[service] = status
            watchers = list(self._watchers.get(service, ()))
        self._deliver_all(watchers)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, for good; watchers are told from a thread of their own."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            watchers = [w for ws in self._watchers.values() for w in ws]
        if watchers:
            threading.Thread(target=self._deliver_all, args=(watchers,), name="health-shutdown", daemon=True).start()

    def _forget(self, watcher: _Watcher) -> None:
        with self._lock:
            watchers = self._watchers.get(watcher.service)
            if watchers is not None and watcher in watchers:
                watchers.discard(watcher)
                self._open -= 1
                if not watchers:
                    del self._watchers[watcher.service]

    def _deliver_all(self, watchers: Iterable[_Watcher]) -> None:
        for watcher in watchers:
            self._deliver(watcher)

    def _deliver(self, watcher: _Watcher) -> None:
        # Whoever finds a send in progress leaves it to that sender, which reads the status again when done:
        # no caller waits on another's send, and the last status set is the last one sent.
        with watcher.guard:
            watcher.pending = True
            if watcher.sending:
                return
            watcher.sending = True
        try:
            while True:
                with watcher.guard:
                    if not watcher.pending:
                        watcher.sending = False
                        return
                    watcher.pending = False
                status = self._status.get(watcher.service, SERVICE_UNKNOWN)
                if status != watcher.sent:
                    watcher.send(health_pb2.HealthCheckResponse(status=status))
                    watcher.sent = status
        except BaseException:
            with watcher.guard:
                watcher.sending = False
            raise


def _service(request: health_pb2.HealthCheckRequest) -> str:
    if len(request.service) > MAX_SERVICE_NAME:
        raise InvalidArgument(f"service name of {len(request.service)} characters (at most {MAX_SERVICE_NAME})")
    return request.service
