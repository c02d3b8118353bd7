"""An append-only log of changes to the repository: who changed which model, how, when and with what result.

One JSON object per line in ``<repository>/audit.jsonl``::

    {"time": "2025-01-01T12:00:00.123Z", "who": "ci-deploy", "peer": "ipv4:10.0.0.7:51234",
     "what": "upload", "model": "seed", "version": 3, "result": "ok"}

``who`` is the token label, else the client certificate's CN, else "anonymous"; ``result`` is "ok" or the
error's code ("not_found", "invalid_argument", ..., "internal"). The file is opened with O_APPEND and each line is
one ``write`` (then fsync), so the processes sharing a repository append whole lines without a lock. An ``s3://``
repository has no shared file to append to: each server keeps its log in its local cache folder (``root``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from leanserve.server.errors import LeanserveError
from leanserve.server.serving.context import RequestContext

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
#: what a change is called in the log
WHAT = ("upload", "delete", "set_default", "unload", "load", "optimize")
_MAX_FIELD_CHARS = 256  # names come from clients: a line stays short whatever they send


@dataclass
class AuditEntry:
    """A change being made; the code making it fills in what it learns (e.g. the version an upload became)."""

    version: int | list[int] | None = None


def _short(value: str | None) -> str | None:
    if value is None or len(value) <= _MAX_FIELD_CHARS:
        return value
    return f"{value[:_MAX_FIELD_CHARS]}… ({len(value)} characters)"


class AuditLog:
    """Appends one line per change to a file (created if absent, never truncated). When the file cannot be
    opened (a read-only repository, e.g. one mounted by KServe's storage initializer) the lines go to the server
    log instead."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # a closed descriptor's number may be reused: never write after close
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._fd = -1
            log.warning("audit log %s cannot be opened (%s): changes are logged to the server log", self.path, exc)
        self._closed = False

    def record(self, ctx: RequestContext, what: str, model: str, version: int | list[int] | None, result: str) -> None:
        """Append one line. A failed write is logged, not raised: the change itself already happened."""
        line = json.dumps({
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "who": _short(ctx.principal) or "anonymous",
            "peer": _short(ctx.peer),
            "what": what,
            "model": _short(model),
            "version": version,
            "result": result,
        }, ensure_ascii=True) + "\n"
        try:
            with self._lock:
                if self._fd < 0:
                    raise OSError("closed (the server is stopping)" if self._closed else "not open")
                os.write(self._fd, line.encode())
                os.fsync(self._fd)
        except OSError as exc:
            log.warning("audit (not written to %s: %s): %s", self.path, exc, line.strip())

    @contextlib.contextmanager
    def change(self, ctx: RequestContext, what: str, model: str, version: int | None = None) -> Iterator[AuditEntry]:
        """Record the change made in the ``with`` block once it ends: "ok", or the code of the error it raised."""
        entry = AuditEntry(version)
        try:
            yield entry
        except LeanserveError as exc:
            self.record(ctx, what, model, entry.version, exc.code.value)
            raise
        except BaseException:
            self.record(ctx, what, model, entry.version, "internal")
            raise
        self.record(ctx, what, model, entry.version, "ok")

    def close(self) -> None:
        with self._lock:
            fd, self._fd, self._closed = self._fd, -1, True
        if fd >= 0:
            os.close(fd)
