"""The audit log: one JSON line per change with its result, whatever happens to the change or to the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from leanserve.server.errors import NotFound
from leanserve.server.repository.audit import AuditLog
from leanserve.server.serving.context import RequestContext

CTX = RequestContext(principal="ops", peer="ipv4:127.0.0.1:5000")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_change_records_ok_the_error_code_or_internal(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    with audit.change(CTX, "upload", "m") as entry:
        entry.version = 3
    with pytest.raises(NotFound), audit.change(CTX, "delete", "m", 9):
        raise NotFound("model 'm' has no version 9")
    with pytest.raises(ZeroDivisionError), audit.change(RequestContext(), "load", "m"):
        1 / 0
    audit.close()
    got = [(e["who"], e["what"], e["model"], e["version"], e["result"]) for e in _lines(tmp_path / "audit.jsonl")]
    assert got == [("ops", "upload", "m", 3, "ok"), ("ops", "delete", "m", 9, "not_found"),
                   ("anonymous", "load", "m", None, "internal")]


def test_appends_and_keeps_client_names_short(tmp_path: Path) -> None:
    AuditLog(tmp_path / "audit.jsonl").record(CTX, "upload", "a", 1, "ok")
    second = AuditLog(tmp_path / "audit.jsonl")  # another process on the same repository, or a restart
    second.record(RequestContext(principal="p" * 10_000), "upload", "n" * 100_000, None, "invalid_argument")
    first, long = _lines(tmp_path / "audit.jsonl")
    assert first["model"] == "a" and len(long["model"]) < 300 and len(long["who"]) < 300


def test_without_a_writable_file_the_entries_go_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "audit.jsonl").mkdir()  # cannot be opened as a file
    with caplog.at_level(logging.WARNING, logger="leanserve.server.repository.audit"):
        audit = AuditLog(tmp_path / "audit.jsonl")
        audit.record(CTX, "delete", "m", [1], "ok")
    assert '"what": "delete"' in caplog.records[-1].getMessage()
