"""The local cache of checked version folders (``version_files.VersionCache``), on its own: no S3 server needed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import version_files
from leanserve.server.repository.store import MANIFEST
from leanserve.server.repository.version_files import FILES_INDEX, STAGING, TRASH, VersionCache

MANIFEST_BYTES = json.dumps({"name": "m"}).encode()


class Filler:
    """A ``fill`` callback that writes one file and its index, counting calls (``corrupt``: a wrong index)."""

    def __init__(self, payload: bytes = b"weights" * 100, corrupt: bool = False) -> None:
        self.payload, self.corrupt, self.calls = payload, corrupt, 0
        self.lock = threading.Lock()

    def __call__(self, folder: Path) -> None:
        with self.lock:
            self.calls += 1
        (folder / "weights.bin").write_bytes(self.payload)
        facts = version_files.file_facts(folder / "weights.bin")
        if self.corrupt:
            facts["sha256"] = "0" * 64
        (folder / FILES_INDEX).write_text(json.dumps({"weights.bin": facts}))


def test_a_version_is_filled_once_then_served_from_the_cache(tmp_path: Path) -> None:
    cache, fill = VersionCache(tmp_path), Filler()
    first = cache.get("m", 1, MANIFEST_BYTES, fill)
    assert first == tmp_path / "m" / "1" and (first / MANIFEST).read_bytes() == MANIFEST_BYTES
    assert cache.get("m", 1, MANIFEST_BYTES, fill) == first
    # a new process over the same folder checks the copy instead of filling it again
    assert VersionCache(tmp_path).get("m", 1, MANIFEST_BYTES, fill) == first
    assert fill.calls == 1
    assert not any((tmp_path / STAGING).iterdir())


def test_a_damaged_copy_is_filled_again(tmp_path: Path) -> None:
    cache, fill = VersionCache(tmp_path), Filler()
    folder = cache.get("m", 1, MANIFEST_BYTES, fill)
    (folder / "weights.bin").write_bytes(b"x" * 700)
    assert VersionCache(tmp_path).get("m", 1, MANIFEST_BYTES, fill) == folder
    assert fill.calls == 2 and (folder / "weights.bin").read_bytes() == fill.payload


def test_corrupt_content_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    cache = VersionCache(tmp_path)
    with pytest.raises(InvalidArgument, match="corrupt.*SHA-256"):
        cache.get("m", 1, MANIFEST_BYTES, Filler(corrupt=True))
    assert not (tmp_path / "m" / "1").exists()
    assert not any((tmp_path / STAGING).iterdir())


def test_concurrent_readers_fill_a_version_once(tmp_path: Path) -> None:
    cache, fill = VersionCache(tmp_path), Filler(payload=b"w" * 2_000_000)
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda: folders.append(cache.get("m", 3, MANIFEST_BYTES, fill)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert fill.calls == 1 and len(set(folders)) == 1 and len(folders) == 6


def test_an_adopted_staging_folder_is_never_filled(tmp_path: Path) -> None:
    cache, fill = VersionCache(tmp_path), Filler()
    with cache.staging() as staged:
        Filler()(staged)
        (staged / MANIFEST).write_bytes(MANIFEST_BYTES)
        cache.adopt("m", 2, staged, MANIFEST_BYTES)
    assert not staged.exists()
    assert cache.get("m", 2, MANIFEST_BYTES, fill) == tmp_path / "m" / "2" and fill.calls == 0


def test_drop_and_sweep_remove_what_the_store_no_longer_has(tmp_path: Path) -> None:
    cache, fill = VersionCache(tmp_path), Filler()
    for version in (1, 2, 3):
        cache.get("m", version, MANIFEST_BYTES, fill)
    cache.get("gone", 1, MANIFEST_BYTES, fill)
    cache.drop({("m", 1)})
    assert not (tmp_path / "m" / "1").exists()
    assert cache.get("m", 1, MANIFEST_BYTES, fill) and fill.calls == 5  # dropped: filled again when asked

    dead, trash = tmp_path / STAGING / "dead", tmp_path / TRASH / "left"
    for folder in (dead, trash):
        folder.mkdir(parents=True)
    with cache.staging() as live:  # a download in flight (this process or another): its lock is held
        (live / "part").write_bytes(b"x")
        cache.sweep({"m": {2, 3}})
        assert live.exists()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["2", "3"]
    assert not any((tmp_path / "gone").iterdir())
    assert not dead.exists() and not trash.exists()  # no live owner: removed at once, whatever their age
    assert not any((tmp_path / STAGING).iterdir())
