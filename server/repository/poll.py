"""A thread that keeps a server process in step with its repository (other processes' uploads, deletes, pins and
unloads; folders copied in by hand)."""

from __future__ import annotations

import logging
import threading

from leanserve.server.dataplane import DataPlane

log = logging.getLogger(__name__)


class RepositoryPoller:
    """Calls ``dataplane.sync()`` every ``interval`` seconds until stopped."""

    def __init__(self, dataplane: DataPlane, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the poll interval must be positive")
        self._dp = dataplane
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repository-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._dp.sync()
            except Exception:  # noqa: BLE001 -- a bad poll (e.g. a folder vanishing mid-read) must not end polling
                log.exception("repository poll failed; trying again in %.1f s", self._interval)

    def stop(self) -> None:
        """End polling (waits for a poll in progress)."""
        self._stop.set()
        self._thread.join()
