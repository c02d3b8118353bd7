"""The repository never shows a half-written version, numbers versions monotonically and survives restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanserve.server.errors import InvalidArgument, NotFound
from leanserve.server.repository.store import MANIFEST, Repository


def _stage(repo: Repository, payload: str = "w") -> Path:
    """A staged folder left open (as a process that dies mid-upload leaves it)."""
    staged = repo.root / ".staging" / f"test-{payload}-{len(list((repo.root / '.staging').iterdir()))}"
    staged.mkdir()
    (staged / "weights.bin").write_text(payload)
    (staged / MANIFEST).write_text(json.dumps({"payload": payload}))
    return staged


def test_staged_version_is_invisible_until_commit(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with repo.staging() as staged:
        (staged / "weights.bin").write_bytes(b"x" * 100)
        (staged / MANIFEST).write_text("{}")
        assert repo.models() == {}
        with pytest.raises(NotFound):
            repo.versions("m")
        version = repo.commit("m", staged)
    assert version == 1 and repo.models() == {"m": [1]}
    assert (repo.path("m", 1) / "weights.bin").read_bytes() == b"x" * 100


def test_failure_while_staging_leaves_nothing(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with pytest.raises(RuntimeError):
        with repo.staging() as staged:
            (staged / "weights.bin").write_bytes(b"partial")
            raise RuntimeError("conversion failed")
    assert repo.models() == {}
    assert list((tmp_path / ".staging").iterdir()) == []


def test_crash_leftovers_are_swept_and_never_loaded(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    _stage(repo)  # simulates a process that died mid-upload: the staging folder stays behind
    # a version folder without a manifest (e.g. copied by hand, incomplete) is not a version either
    (tmp_path / "m" / "7").mkdir(parents=True)
    (tmp_path / "m" / "7" / "weights.bin").write_text("half")
    reopened = Repository(tmp_path)
    assert reopened.models() == {}
    assert list((tmp_path / ".staging").iterdir()) == []


def test_versions_are_monotonic_across_deletes_and_restarts(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    assert [repo.commit("m", _stage(repo, str(i))) for i in range(3)] == [1, 2, 3]
    assert repo.delete("m", 3) == [3]
    assert repo.commit("m", _stage(repo)) == 4
    assert repo.delete("m") == [1, 2, 4]
    assert Repository(tmp_path).commit("m", _stage(repo)) == 5


def test_commit_requires_manifest_and_valid_name(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with repo.staging() as staged:
        with pytest.raises(InvalidArgument):
            repo.commit("m", staged)
        (staged / MANIFEST).write_text("{}")
        for bad in ("", "../x", ".hidden", "-x", "a/b", "x" * 200):
            with pytest.raises(InvalidArgument):
                repo.commit(bad, staged)
