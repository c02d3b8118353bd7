"""The health servicer never sends while holding its lock, and the last status set is the last one a watcher gets.

grpc's sync server completes a send on its polling thread, which also runs the close callback of a watch that
ends; a servicer that sends under the lock its close callback takes freezes the server. ``_PollingSend`` plays
that thread: each send waits until a close callback, run on another thread, has finished. grpc-health's own
servicer (1.81) deadlocks on every case here (it sends under its lock in Watch, set and enter_graceful_shutdown).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest
from grpc_health.v1 import health_pb2

from leanserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from leanserve.server.grpc.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthServicer

WAIT = 5.0


class _Context:
    """The part of grpc's ServicerContext Watch uses: close callbacks, run when the test ends the call."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.ended = False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self.ended:
            return False
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        self.ended = True
        for callback in self.callbacks:
            callback()


class _PollingSend:
    """A send callback that completes only after ``closing``'s close callbacks ran on another thread."""

    def __init__(self, closing: _Context | None = None) -> None:
        self.closing = closing
        self.statuses: list[int] = []

    def __call__(self, response: Any) -> None:
        if self.closing is not None and not self.closing.ended:
            poller = threading.Thread(target=self.closing.end, daemon=True)
            poller.start()
            poller.join(WAIT)
            assert not poller.is_alive(), "a close callback waited for the lock a send holds: deadlock"
        self.statuses.append(response.status)


def _watch(servicer: HealthServicer, send: Callable[[Any], None], service: str = "") -> _Context:
    context = _Context()
    servicer.Watch(health_pb2.HealthCheckRequest(service=service), context, send_response_callback=send)
    return context


def test_a_watch_ending_while_another_is_answered_does_not_freeze() -> None:
    servicer = HealthServicer(max_watches=8)
    servicer.set("", SERVING)
    first = _watch(servicer, _PollingSend())
    second = _PollingSend(closing=first)
    _watch(servicer, second)
    assert second.statuses == [SERVING] and servicer.open_watches == 1


def test_a_watch_ending_while_a_status_is_sent_does_not_freeze() -> None:
    servicer = HealthServicer(max_watches=8)
    servicer.set("", SERVING)
    ending = _watch(servicer, _PollingSend())
    sender = _PollingSend()
    _watch(servicer, sender)
    sender.closing = ending
    servicer.set("", NOT_SERVING)
    assert sender.statuses == [SERVING, NOT_SERVING] and servicer.open_watches == 1


def test_shutdown_tells_watchers_without_waiting_for_them() -> None:
    servicer = HealthServicer(max_watches=8)
    servicer.set("", SERVING)
    servicer.set("leanserve.v1.InferenceService", SERVING)
    release = threading.Event()
    stuck_statuses: list[int] = []

    def stuck(response: Any) -> None:  # a client that stopped reading: its send completes when the call ends
        if stuck_statuses:
            release.wait(WAIT)
        stuck_statuses.append(response.status)

    _watch(servicer, stuck)
    told = _PollingSend()
    _watch(servicer, told, service="leanserve.v1.InferenceService")
    started = time.monotonic()
    servicer.enter_graceful_shutdown()
    assert time.monotonic() - started < 1.0
    release.set()  # grpc ends a stuck send when the server's grace is over and it cancels the call
    deadline = time.monotonic() + WAIT
    while told.statuses != [SERVING, NOT_SERVING] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert told.statuses == [SERVING, NOT_SERVING] and stuck_statuses == [SERVING, NOT_SERVING]
    servicer.set("", SERVING)  # ignored from now on
    with pytest.raises(NotFound):
        servicer.Check(health_pb2.HealthCheckRequest(service="other"), None)
    assert servicer.Check(health_pb2.HealthCheckRequest(service=""), None).status == NOT_SERVING


def test_statuses_set_during_a_send_end_with_the_latest() -> None:
    servicer = HealthServicer(max_watches=8)
    servicer.set("", SERVING)
    entered, release = threading.Event(), threading.Event()
    statuses: list[int] = []

    def slow(response: Any) -> None:
        if statuses:
            entered.set()
            release.wait(WAIT)
        statuses.append(response.status)

    _watch(servicer, slow)
    setter = threading.Thread(target=servicer.set, args=("", NOT_SERVING))
    setter.start()
    assert entered.wait(WAIT)
    started = time.monotonic()
    for status in (SERVING, NOT_SERVING, SERVING):  # a send is in progress: these return at once
        servicer.set("", status)
    assert time.monotonic() - started < 1.0
    release.set()
    setter.join(WAIT)
    assert statuses == [SERVING, NOT_SERVING, SERVING]


def test_unknown_services_and_limits() -> None:
    servicer = HealthServicer(max_watches=2)
    ended = _Context()
    ended.ended = True
    servicer.Watch(health_pb2.HealthCheckRequest(), ended, send_response_callback=_PollingSend())
    assert servicer.open_watches == 0  # a call that ended before its callback was added is not kept
    unknown = _PollingSend()
    context = _watch(servicer, unknown, service="not.a.Service")
    assert unknown.statuses == [SERVICE_UNKNOWN]
    _watch(servicer, _PollingSend())
    with pytest.raises(ResourceExhausted):
        _watch(servicer, _PollingSend())
    context.end()
    _watch(servicer, _PollingSend())  # the ended watch's place is free again
    with pytest.raises(InvalidArgument):
        servicer.Check(health_pb2.HealthCheckRequest(service="s" * 1000), None)
