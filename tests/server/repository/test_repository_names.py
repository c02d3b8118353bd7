"""What the repository takes for a version, a pin and a model name, in a folder and on S3 (a real ``rclone serve
s3``): version folders/keys are ASCII ``[1-9][0-9]{0,17}`` (anything else is ignored with one warning per model,
not per poll), a malformed pin is "no pin" (never an exception that would stop the poll), and names of what the
repository keeps in its root are refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import store
from leanserve.server.repository.audit import AUDIT_FILE, AuditLog
from leanserve.server.repository.s3 import S3Repository
from leanserve.server.repository.s3_bucket import parse_s3_uri
from leanserve.server.repository.store import MANIFEST, Repository
from tests.s3server import S3Server

#: names str.isdigit() accepts but that are not version numbers: int() refuses '²', reads '٣' as 3; the rest
#: overflow int64, are zero or have leading zeros
ODD_VERSIONS = ["²", "٣", "99999999999999999999", "1000000000000000000", "0", "01"]


def _commit(repo: Repository | S3Repository, name: str, payload: object = "p") -> int:
    with repo.staging() as staged:
        (staged / "weights.bin").write_bytes(b"w" * 32)
        (staged / MANIFEST).write_text(json.dumps({"payload": payload}))
        return repo.commit(name, staged)


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage())


def test_parse_version_accepts_only_ascii_positive_int64_numbers() -> None:
    assert store.parse_version("1") == 1 and store.parse_version("999999999999999999") == 10**18 - 1
    for text in [*ODD_VERSIONS, "", "-1", "+1", " 1", "1 ", "1\n", "1.0", "١"]:
        assert store.parse_version(text) is None, text


def test_odd_version_folders_are_ignored_with_one_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    repo = Repository(tmp_path)
    assert _commit(repo, "seed") == 1
    for odd in ODD_VERSIONS:  # a copy of a good version under a name that is not a number
        shutil.copytree(tmp_path / "seed" / "1", tmp_path / "seed" / odd)
    (tmp_path / "seed" / ".last_version").write_text("99999999999999999999")  # a counter that overflowed
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three polls
            assert repo.models() == {"seed": [1]}
            assert repo.versions("seed") == [1]
        assert _commit(repo, "other") == 1
        assert _commit(repo, "seed") == 2  # not 10**20 + 1
    assert _warnings(caplog, "ignoring folder(s)") == 1


def test_odd_version_keys_are_ignored_on_s3(uri: str, s3: S3Server, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "c")
    assert _commit(repo, "seed") == 1
    bucket, prefix = parse_s3_uri(uri)
    client = s3.client()
    for odd in ODD_VERSIONS:
        client.put_object(Bucket=bucket, Key=f"{prefix}/seed/{odd}/{MANIFEST}", Body=b"{}")
    client.put_object(Bucket=bucket, Key=f"{prefix}/seed/²/notes.txt", Body=b"hello")
    client.put_object(Bucket=bucket, Key=f"{prefix}/seed/.claims/99999999999999999999/x", Body=b"")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert repo.models() == {"seed": [1]}
        assert repo.versions("seed") == [1]
        assert _commit(repo, "seed") == 2
        restarted = S3Repository(uri, cache_dir=tmp_path / "c2")  # the startup sweep reads the same listing
        assert restarted.models() == {"seed": [1, 2]}
    assert _warnings(caplog, "ignoring key(s)") == 1


def test_a_malformed_local_pin_is_no_pin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = Repository(tmp_path)
    _commit(repo, "seed")
    _commit(repo, "seed")
    pin = tmp_path / "seed" / "default_version"
    with caplog.at_level(logging.WARNING):
        pin.mkdir()  # a folder where the pin belongs
        assert [repo.default_version("seed") for _ in range(3)] == [None] * 3
        assert _warnings(caplog, "ignoring the pin") == 1
        pin.rmdir()
        for text in ("1 # pinned back after an incident", "²", "99999999999999999999", "0", "x" * 100, "\xff"):
            pin.write_bytes(text.encode("latin-1"))
            assert repo.default_version("seed") is None, text
        pin.write_text("2\n")
        assert repo.default_version("seed") == 2
    (tmp_path / "seed" / "unloaded").mkdir()  # the mark is there, whatever it is
    assert repo.is_unloaded("seed")


def test_a_malformed_s3_pin_is_no_pin(uri: str, s3: S3Server, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    writer = S3Repository(uri, cache_dir=tmp_path / "w")
    _commit(writer, "seed")
    _commit(writer, "zeta")
    bucket, prefix = parse_s3_uri(uri)
    note = b"1 # pinned back to v1 after the incident of 2026-11-29, see ticket OPS-1234"  # > 64 bytes
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/seed/default_version", Body=note)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/seed/unloaded", Body=b"u" * 1000)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/zeta/default_version", Body="²".encode())
    reader = S3Repository(uri, cache_dir=tmp_path / "r")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert reader.models() == {"seed": [1], "zeta": [1]}
            assert reader.default_version("seed") is None and reader.default_version("zeta") is None
            assert reader.is_unloaded("seed") and not reader.is_unloaded("zeta")
    assert _warnings(caplog, "ignoring the pin") == 2
    writer.set_default_version("seed", 1)
    reader.models()
    assert reader.default_version("seed") == 1


@pytest.mark.parametrize("name", [AUDIT_FILE, AUDIT_FILE.upper()])
def test_names_of_files_in_the_root_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="reserved"):
        store.validate_name(name)
    repo = Repository(tmp_path)
    AuditLog(tmp_path / AUDIT_FILE).close()  # what a server on the folder keeps there
    with pytest.raises(InvalidArgument, match="reserved"):
        _commit(repo, name)
    assert repo.models() == {}
    assert store.validate_name("audit") == "audit" and store.validate_name("audit.jsonl2") == "audit.jsonl2"


def test_a_model_named_like_the_audit_log_is_refused_on_s3(uri: str, s3: S3Server, tmp_path: Path) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "c")
    with pytest.raises(InvalidArgument, match="reserved"):
        _commit(repo, AUDIT_FILE)
    bucket, prefix = parse_s3_uri(uri)  # written by an older version: ignored, not served from a clashing path
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{AUDIT_FILE}/1/{MANIFEST}", Body=b"{}")
    assert repo.models() == {}
