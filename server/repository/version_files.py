"""Version folders checked against their file index, and the local cache of them an S3 repository serves from.

Every committed version carries ``.files.json`` (size and SHA-256 of each of its files, written before the manifest);
a folder downloaded from the bucket, or found in the cache after a restart, is served only once it holds exactly
those files and its manifest equals the bucket's. Folders enter the cache by one rename from a private staging
folder and leave it by one rename into ``.trash`` (readers see the folder or nothing), then are deleted.

Several processes may share one cache folder (``--processes`` > 1, or several servers on one host using the default
cache folder): each entry is filled, checked, placed and removed under an exclusive ``flock`` on
``.locks/<model>/<version>.lock``, so a second process waits for the first one's copy and uses it. Staging folders
are locked by their writer while in use (``liveness``): a sweep removes those of processes that ended at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import liveness
from leanserve.server.repository.store import ENTRY_LOCKS, MANIFEST, parse_version

log = logging.getLogger(__name__)

#: per version: size and SHA-256 of each file but the manifest (written before the manifest)
FILES_INDEX = ".files.json"
TRASH = ".trash"
STAGING = ".staging"
#: bytes read at a time when hashing or downloading
CHUNK = 4 * 1024 * 1024


def file_facts(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one file, as ``.files.json`` records them."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def check_folder(folder: Path, manifest_bytes: bytes) -> str:
    """'' when ``folder`` holds exactly the files its index names, with their sizes and SHA-256, the manifest
    equals ``manifest_bytes`` and the weights match the manifest's ``weights_sha256``; else what is wrong."""
    from leanserve.server.repository.artifacts import WEIGHTS

    try:
        if (folder / MANIFEST).read_bytes() != manifest_bytes:
            return "the manifest differs from the repository's"
        index = json.loads((folder / FILES_INDEX).read_bytes())
        manifest = json.loads(manifest_bytes)
    except (OSError, ValueError) as exc:
        return f"cannot read {FILES_INDEX} or the manifest: {exc}"
    if not isinstance(index, dict) or not isinstance(manifest, dict):
        return f"{FILES_INDEX} or the manifest is not a JSON object"
    for rel, facts in index.items():
        path = folder / rel
        if not inside(path, folder) or not path.is_file():
            return f"{rel} is missing"
        if not isinstance(facts, dict) or path.stat().st_size != facts.get("size"):
            return f"{rel} has the wrong size"
        if file_facts(path)["sha256"] != facts.get("sha256"):
            return f"{rel} does not match its SHA-256"
    expected = manifest.get("weights_sha256")
    if expected:
        if WEIGHTS not in index or index[WEIGHTS].get("sha256") != expected:
            return "the weights do not match the manifest's weights_sha256"
    return ""


def cached_ok(folder: Path, manifest_bytes: bytes) -> bool:
    """Whether a cached copy can be served as it is (a damaged one is logged and downloaded again)."""
    if not (folder / MANIFEST).is_file():
        return False
    problem = check_folder(folder, manifest_bytes)
    if problem and (folder / MANIFEST).read_bytes() == manifest_bytes:
        log.warning("cached copy %s is damaged (%s); downloading it again", folder, problem)
    return not problem


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies under ``folder`` once normalised (no ``..`` escapes)."""
    return os.path.normpath(path).startswith(os.path.normpath(folder) + os.sep)


def remove(folder: Path, root: Path) -> None:
    """Take ``folder`` out of the cache in one rename (readers see it or nothing), then delete it."""
    trash = root / TRASH / uuid.uuid4().hex
    trash.parent.mkdir(exist_ok=True)
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class VersionCache:
    """Checked local copies of committed versions, ``root/<model>/<version>``, and private staging folders,
    ``root/.staging/<random>``. Thread- and process-safe; one download per version at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / STAGING).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the fields below, never held during I/O
        self._verified: dict[tuple[str, int], bytes] = {}  # folders checked by this process -> their manifest
        self._fill_locks: dict[tuple[str, int], threading.Lock] = {}

    def folder(self, name: str, version: int) -> Path:
        """Where the copy of ``name`` version ``version`` lives (whether or not it is there)."""
        return self.root / name / str(version)

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A fresh private folder, locked while in use; removed on exit unless it was moved away (``adopt``)."""
        return liveness.locked_folder(self.root / STAGING)

    def _entry_lock(self, name: str, version: int, *,
                    gone: bool = False) -> contextlib.AbstractContextManager[None]:
        """Exclusive against every process using this cache folder, for one version's folder (``gone``: the
        version left the store; its lock file goes too)."""
        return liveness.held(self.root / ENTRY_LOCKS / name / f"{version}.lock", unlink_after=gone)

    def get(self, name: str, version: int, manifest_bytes: bytes, fill: Callable[[Path], None]) -> Path:
        """The checked folder of a version whose manifest is ``manifest_bytes``: as this process last checked it,
        or found in the cache and checked, or written by ``fill(folder)`` (every file but the manifest) into a
        staging folder, checked and renamed into place. InvalidArgument when what ``fill`` wrote is corrupt."""
        key = (name, version)
        folder = self.folder(name, version)
        with self._lock:
            lock = self._fill_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if self._verified.get(key) == manifest_bytes and folder.is_dir():
                    return folder
            with self._entry_lock(name, version):  # another process filling it: wait, then use its copy
                if cached_ok(folder, manifest_bytes):
                    log.info("using the cached copy of %s version %d", name, version)
                else:
                    with self.staging() as tmp:
                        fill(tmp)
                        (tmp / MANIFEST).write_bytes(manifest_bytes)
                        problem = check_folder(tmp, manifest_bytes)
                        if problem:
                            raise InvalidArgument(f"{name} version {version} in the repository is corrupt: {problem}")
                        self._place(tmp, folder)
            with self._lock:
                self._verified[key] = manifest_bytes
            return folder

    def _place(self, source: Path, folder: Path) -> None:
        """Rename ``source`` to ``folder`` (replacing what is there); caller holds the entry's lock."""
        if folder.exists():
            remove(folder, self.root)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, folder)

    def adopt(self, name: str, version: int, staged: Path, manifest_bytes: bytes) -> None:
        """Move a staging folder just committed into the cache (its uploader never downloads it); a failure only
        costs a download later."""
        try:
            with self._entry_lock(name, version):
                self._place(staged, self.folder(name, version))
        except OSError as exc:
            log.warning("could not cache %s version %d locally: %s", name, version, exc)
            return
        with self._lock:
            self._verified[(name, version)] = manifest_bytes

    def drop(self, gone: set[tuple[str, int]]) -> None:
        """Forget versions deleted from the store and remove their copies."""
        for name, version in gone:
            with self._lock:
                self._verified.pop((name, version), None)
            folder = self.folder(name, version)
            if folder.is_dir():
                with self._entry_lock(name, version, gone=True):
                    remove(folder, self.root)

    def sweep(self, committed: dict[str, set[int]]) -> None:
        """Remove copies of versions not in ``committed`` (model -> versions), staging folders whose writer is
        gone (its lock is free: a crash or ``kill -9`` left them) and leftover trash."""
        liveness.sweep_folders(self.root / STAGING, "download or upload")
        trash = self.root / TRASH
        if trash.is_dir():
            for child in trash.iterdir():  # another process removing it too is harmless
                shutil.rmtree(child, ignore_errors=True)
        for model_dir in self.root.iterdir():
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            versions = committed.get(model_dir.name, set())
            for version_dir in model_dir.iterdir():
                version = parse_version(version_dir.name)
                if version is not None and version not in versions:
                    with self._entry_lock(model_dir.name, version, gone=True):
                        remove(version_dir, self.root)
