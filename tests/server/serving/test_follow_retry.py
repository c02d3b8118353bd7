"""A version that failed to load is tried again by the repository poll, with a backoff; one model whose entry
cannot be read does not stop the others from being followed.

The poll used to skip a failed version for good: a store that answered 503 once, or a folder copied in by hand
and seen half-written, left that server without the version while the rest of the fleet served it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from leanserve.client import Client
from leanserve.server import dataplane as dataplane_mod
from leanserve.server.app import create_server
from leanserve.server.repository import artifacts
from tests.conftest import make_settings
from tests.toy import leanserve_file, wait_until


def test_a_version_seen_half_written_is_served_once_complete(repo_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane_mod, "RETRY_FIRST_SECONDS", 0.2)
    handle = create_server(make_settings(repo_dir, repository_poll_seconds=0.05))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=60) as client:
            client.upload(leanserve_file(tmp_path)[0], "m")
            weights = repo_dir / "m" / "1" / artifacts.WEIGHTS
            good = weights.read_bytes()
            copy = tmp_path / "2"  # a version copied in by hand: the poll sees its weights cut short
            shutil.copytree(repo_dir / "m" / "1", copy)
            (copy / artifacts.WEIGHTS).write_bytes(good[: len(good) // 2])
            copy.rename(repo_dir / "m" / "2")
            wait_until(lambda: ("m", 2) in handle.dataplane._failed, "the poll tried the half-written version")
            assert client.models() == {"m": [1]}
            (repo_dir / "m" / "2" / artifacts.WEIGHTS).write_bytes(good)  # the copy completes
            wait_until(lambda: client.models() == {"m": [1, 2]}, "the poll served it once complete")
            assert ("m", 2) not in handle.dataplane._failed
    finally:
        handle.stop(0)


def test_one_unreadable_model_does_not_stop_the_others(repo_dir: Path, tmp_path: Path) -> None:
    handle = create_server(make_settings(repo_dir, repository_poll_seconds=0.05))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=60) as client:
            client.upload(leanserve_file(tmp_path)[0], "a")
            pin = repo_dir / "a" / "default_version"
            pin.mkdir()  # a pin that cannot be read as one
            client.upload(leanserve_file(tmp_path)[0], "b")
            other = handle.dataplane.repository.root / "b"
            shutil.copytree(other / "1", other / "2")  # a version published by another writer
            wait_until(lambda: client.models().get("b") == [1, 2], "model b is still followed")
    finally:
        handle.stop(0)
