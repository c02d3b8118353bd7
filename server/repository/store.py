"""The on-disk model repository: ``<root>/<model>/<version>/`` folders, each complete or absent.

A version is assembled in ``<root>/.staging/<random>/`` (files written and fsynced), then renamed into place in
one ``rename``; the parent folder is fsynced so the rename survives a crash. Readers therefore never see a
half-written version, and leftovers in ``.staging`` (from a crash mid-upload) are swept at startup.

Several server processes may share one repository (``processes`` > 1): version numbers, deletes and pins are
decided under an exclusive ``flock`` on ``<root>/.lock`` as well as a thread lock, and only the first process
sweeps (the others would delete its uploads in flight).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leanserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, shown

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_STAGING = ".staging"
_TRASH = ".trash"
_COUNTER = ".last_version"
#: per model: the pinned default version (absent = the latest version is the default)
_DEFAULT = "default_version"
#: per model: present while the model is unloaded (RepositoryModelUnload) — kept, but not served
_UNLOADED = "unloaded"
_LOCK = ".lock"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise InvalidArgument."""
    if not _NAME_RE.match(name or "") or name in {".", ".."}:
        raise InvalidArgument(
            f"invalid model name {shown(name)}: use 1-128 characters from [A-Za-z0-9_.-], not starting with '.' or '-'"
        )
    return name


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller fsyncs the folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Repository:
    """Versioned, crash-safe storage of model folders (no knowledge of what is inside them)."""

    def __init__(self, root: Path, *, sweep: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()
        #: a repository mounted read-only (KServe's /mnt/models) is served as it is; every change is refused
        self.read_only = not os.access(self.root, os.W_OK)  # a read-only mount or no write permission
        if self.read_only:
            log.warning("repository %s is read-only: served as it is; uploads and changes are refused", self.root)
            return
        (self.root / _STAGING).mkdir(exist_ok=True)
        if sweep:
            self._sweep()

    def _check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition(f"the repository {self.root} is read-only: models can be served from it, "
                                     "not uploaded, changed or deleted")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive against this process's threads and other processes on the same repository (every change
        takes it: FailedPrecondition on a read-only repository)."""
        self._check_writable()
        with self._thread_lock, open(self.root / _LOCK, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _sweep(self) -> None:
        for leftover in (_STAGING, _TRASH):
            folder = self.root / leftover
            if folder.exists():
                for child in folder.iterdir():
                    log.warning("removing incomplete %s left by an earlier run: %s", leftover, child.name)
                    shutil.rmtree(child, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh private folder for assembling a version; removed on exit unless committed (moved away)."""
        self._check_writable()
        path = self.root / _STAGING / uuid.uuid4().hex
        path.mkdir()
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, name: str, staged: Path) -> int:
        """Publish ``staged`` (which must hold a manifest) as the next version of ``name``; returns the version."""
        validate_name(name)
        if not (staged / MANIFEST).is_file():
            raise InvalidArgument("a version needs a manifest")
        for child in staged.iterdir():
            _fsync_file(child)
        fsync_dir(staged)
        with self._lock():
            model_dir = self.root / name
            model_dir.mkdir(exist_ok=True)
            version = max([self._last_version(model_dir), *self.versions(name, missing_ok=True)]) + 1
            # The counter is bumped first: a crash between the two leaves a gap, never a reused number.
            counter_tmp = model_dir / f"{_COUNTER}.tmp"
            write_file_durably(counter_tmp, str(version).encode())
            os.replace(counter_tmp, model_dir / _COUNTER)
            os.rename(staged, model_dir / str(version))
            fsync_dir(model_dir)
            fsync_dir(self.root)
        return version

    @staticmethod
    def _last_version(model_dir: Path) -> int:
        try:
            return int((model_dir / _COUNTER).read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0

    def models(self) -> dict[str, list[int]]:
        """Every model with at least one version, and its versions ascending."""
        out: dict[str, list[int]] = {}
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and _NAME_RE.match(child.name):
                versions = self.versions(child.name, missing_ok=True)
                if versions:
                    out[child.name] = versions
        return out

    def size_bytes(self) -> int:
        """Bytes the stored versions (and per-model files) take, without uploads still being staged."""
        return sum(folder_bytes(child) for child in self.root.iterdir()
                   if child.is_dir() and not child.name.startswith("."))

    def versions(self, name: str, *, missing_ok: bool = False) -> list[int]:
        """Versions of ``name`` ascending; NotFound when there are none (unless ``missing_ok``)."""
        model_dir = self.root / name
        found = []
        if model_dir.is_dir():
            for child in model_dir.iterdir():
                if child.name.isdigit() and (child / MANIFEST).is_file():
                    found.append(int(child.name))
        if not found and not missing_ok:
            raise NotFound(f"model {shown(name)} not found")
        return sorted(found)

    def path(self, name: str, version: int) -> Path:
        """Folder of one version; NotFound when absent."""
        validate_name(name)
        path = self.root / name / str(version)
        if not (path / MANIFEST).is_file():
            raise NotFound(f"model {shown(name)} version {version} not found")
        return path

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        """The manifest of one version."""
        return json.loads((self.path(name, version) / MANIFEST).read_text())

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version (or all); each disappears in one rename. Returns the deleted versions."""
        validate_name(name)
        with self._lock():
            stored = self.versions(name)
            targets = stored if version is None else [version]
            if version is not None and version not in stored:
                raise NotFound(f"model {shown(name)} version {version} not found")
            for v in targets:
                src = self.path(name, v)
                trash = self.root / _TRASH / uuid.uuid4().hex
                trash.parent.mkdir(exist_ok=True)
                os.rename(src, trash)
                fsync_dir(src.parent)
                shutil.rmtree(trash, ignore_errors=True)
            if self.default_version(name) in targets:
                (self.root / name / _DEFAULT).unlink(missing_ok=True)
        return targets

    def default_version(self, name: str) -> int | None:
        """The pinned default version of ``name``, or None (the latest version is the default)."""
        try:
            return int((self.root / validate_name(name) / _DEFAULT).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def set_default_version(self, name: str, version: int | None) -> None:
        """Pin ``version`` as the default of ``name`` (durably, atomically), or unpin with None."""
        self._set_flag(name, _DEFAULT, None if version is None else str(int(version)))

    def is_unloaded(self, name: str) -> bool:
        """True while ``name`` is marked unloaded (stored, not to be served until loaded again)."""
        return (self.root / validate_name(name) / _UNLOADED).exists()

    def set_unloaded(self, name: str, unloaded: bool) -> None:
        """Mark ``name`` unloaded or not, durably: every server process on the repository follows the mark."""
        self._set_flag(name, _UNLOADED, "1" if unloaded else None)

    def _set_flag(self, name: str, flag: str, value: str | None) -> None:
        """Write (atomically, durably) or remove a small per-model file."""
        model_dir = self.root / validate_name(name)
        with self._lock():
            if value is None:
                (model_dir / flag).unlink(missing_ok=True)
            else:
                tmp = model_dir / f"{flag}.tmp"
                write_file_durably(tmp, value.encode())
                os.replace(tmp, model_dir / flag)
            if model_dir.is_dir():
                fsync_dir(model_dir)


def folder_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(folder, file)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def _fsync_file(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
