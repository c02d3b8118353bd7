"""Extra server processes on the same port (``processes`` > 1), started, watched and stopped by the first one.

Python's GIL keeps one process's request handling near one core; grpc binds with SO_REUSEPORT, so N processes can
listen on one port and the kernel spreads new connections over them. Each extra process is a fresh interpreter
(``python -m server.cli serve``; forking a process that runs gRPC is unsafe) that gets the first process's settings
through ``LEANSERVE_*`` variables, loads the repository and polls it to follow the others. Two pipes tie it to the
first process: it writes ``ready`` on one once it serves, and stops when the other reaches end of file, which
happens however the first process ends (even SIGKILL), so no extra process outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

READY = b"ready\n"
_RESTART_BACKOFF_SECONDS = 5.0
#: how often a wait for the extra processes to start looks at the stop event (SIGTERM must not wait for them)
_STOP_POLL_SECONDS = 0.2


def child_env(settings: Settings, port: int, index: int) -> dict[str, str]:
    """The environment of extra process ``index``: the first process's settings, its port, its own metrics port."""
    values = settings.model_dump(mode="json")
    values.update(port=port, process_index=index,
                  metrics_port=settings.metrics_port + index if settings.metrics_port else 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEANSERVE_")}
    for key, value in values.items():
        if value is not None:
            env[f"LEANSERVE_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen
    ready_fd: int
    started: float


class ExtraProcesses:
    """Processes 1..N-1 of a server whose first process listens on ``port``."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self._alive_read, self._alive_write = os.pipe()  # children hold the read end; EOF = the first one is gone
        self._children: dict[int, _Child] = {}
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def _spawn(self, index: int) -> _Child:
        ready_read, ready_write = os.pipe()
        argv = [sys.executable, "-m", "leanserve.server.cli", "serve",
                "--supervisor-fd", str(self._alive_read), "--ready-fd", str(ready_write)]
        proc = subprocess.Popen(argv, env=child_env(self.settings, self.port, index),
                                pass_fds=(self._alive_read, ready_write))
        os.close(ready_write)
        return _Child(index, proc, ready_read, time.monotonic())

    def start(self, timeout: float = 600.0, stop: threading.Event | None = None) -> bool:
        """Start the extra processes and wait until each serves; RuntimeError (all stopped) if one cannot.

        False, at once, when ``stop`` is set meanwhile (SIGTERM while they start): the caller stops them.
        """
        for index in range(1, self.settings.processes):
            self._children[index] = self._spawn(index)
        deadline = time.monotonic() + timeout
        try:
            for child in self._children.values():
                if not self._wait_ready(child, deadline, stop):
                    return False
        except RuntimeError:
            self.stop(0)
            raise
        self._watch = threading.Thread(target=self._watch_children, name="process-watch", daemon=True)
        self._watch.start()
        log.info("%d extra server process(es) serving on port %d", len(self._children), self.port)
        return True

    @staticmethod
    def _wait_ready(child: _Child, deadline: float, stop: threading.Event | None) -> bool:
        """True once ``child`` reports ready, False if ``stop`` is set first; RuntimeError if it cannot start."""
        readable: list[int] = []
        while not readable:
            if stop is not None and stop.is_set():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([child.ready_fd], [], [], min(remaining, _STOP_POLL_SECONDS))
        line = os.read(child.ready_fd, len(READY)) if readable else b""
        os.close(child.ready_fd)
        child.ready_fd = -1
        if line != READY:
            code = child.proc.poll()
            why = f"exited with code {code}" if code is not None else "did not get ready in time"
            raise RuntimeError(f"server process {child.index} {why}")
        return True

    def _watch_children(self) -> None:
        """Start again a process that died (not faster than once per backoff period)."""
        while not self._stopping.wait(1.0):
            for index, child in list(self._children.items()):
                code = child.proc.poll()
                if code is None:
                    self._note_ready(child)
                    continue
                if self._stopping.is_set() or time.monotonic() - child.started < _RESTART_BACKOFF_SECONDS:
                    continue
                log.error("server process %d exited with code %s; starting it again", index, code)
                self._close_ready(child)
                # the read end stays open until it reports ready: writing to a pipe nobody reads fails (EPIPE)
                self._children[index] = self._spawn(index)

    @staticmethod
    def _note_ready(child: _Child) -> None:
        """Log (once) that a restarted process serves; nobody waits for it."""
        if child.ready_fd < 0 or not select.select([child.ready_fd], [], [], 0)[0]:
            return
        if os.read(child.ready_fd, len(READY)) == READY:
            log.info("server process %d serves again (pid %d)", child.index, child.proc.pid)
        ExtraProcesses._close_ready(child)

    @staticmethod
    def _close_ready(child: _Child) -> None:
        if child.ready_fd >= 0:
            os.close(child.ready_fd)
            child.ready_fd = -1

    def terminate(self) -> None:
        """SIGTERM every extra process (each then lets its in-flight calls finish); returns at once."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join()
        for child in self._children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float) -> None:
        """``terminate``, wait up to ``grace`` (+10 s to shut down) for each process, SIGKILL stragglers."""
        self.terminate()
        deadline = time.monotonic() + grace + 10.0
        for child in self._children.values():
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("server process %d did not stop; killing it", child.index)
                child.proc.kill()
                child.proc.wait()
        for fd in (self._alive_read, self._alive_write):
            try:
                os.close(fd)
            except OSError:
                pass


def watch_first_process(fd: int, stop: threading.Event) -> None:
    """In an extra process: set ``stop`` when the first process is gone (its pipe reaches end of file)."""
    def wait() -> None:
        while os.read(fd, 1):
            pass
        stop.set()

    threading.Thread(target=wait, name="first-process-watch", daemon=True).start()
