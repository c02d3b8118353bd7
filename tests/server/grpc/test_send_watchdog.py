"""The send watchdog cancels exactly the calls whose response waited longer than its timeout to be sent."""

from __future__ import annotations

from leanserve.server.grpc.send_watchdog import SendWatchdog


class _Call:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_only_overdue_sends_are_cancelled_once() -> None:
    now = [100.0]
    dog = SendWatchdog(5.0, clock=lambda: now[0], watch=False)
    stuck, reading, done = _Call(), _Call(), _Call()
    for call in (stuck, reading, done):
        dog.arm(call)
    dog.disarm(done)  # its response was sent
    now[0] += 4.9
    assert dog.expire() == 0
    dog.disarm(reading)
    dog.arm(reading)  # the next response of a client that reads: its own five seconds
    now[0] += 0.2
    assert dog.expire() == 1 and stuck.cancelled == 1
    assert (reading.cancelled, done.cancelled) == (0, 0)
    now[0] += 10
    assert dog.expire() == 1 and reading.cancelled == 1
    assert dog.expire() == 0 and stuck.cancelled == 1  # each call is cancelled once


def test_the_watch_thread_ends_with_the_server() -> None:
    """Each server started its own watch thread, which outlived it (one more idle thread per server created)."""
    dog = SendWatchdog(0.04)
    call = _Call()
    dog.arm(call)
    thread = dog._thread
    assert thread is not None and thread.is_alive()
    dog.stop()
    assert not thread.is_alive()
    dog.arm(_Call())  # after stop: no new thread
    assert dog._thread is thread
