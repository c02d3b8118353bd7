"""The on-disk model repository: ``<root>/<model>/<version>/`` folders, each complete or absent.

A version is assembled in ``<root>/.staging/<random>/`` (files written and fsynced), then renamed into place in
one ``rename``; the parent folder is fsynced so the rename survives a crash. Readers therefore never see a
half-written version. Each staging folder is locked (``liveness``) by its writer for as long as it is in use, so
the sweep at startup removes only the leftovers of writers that are gone (a crash mid-upload), never an upload in
flight in another server process or a ``leanserve publish`` on the same folder.

Several server processes may share one repository (``processes`` > 1): version numbers, deletes and pins are
decided under an exclusive ``flock`` on ``<root>/.lock`` as well as a thread lock.

Version folders are named by positive decimal numbers in ASCII (``[1-9][0-9]{0,17}``: they fit int64 with room to
spare); any other folder in a model folder is ignored, with one warning per model per process. A pin
(``default_version``) that cannot be read or is not such a number is "no pin", with one warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leanserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown
from leanserve.server.repository import liveness
from leanserve.server.repository.audit import AUDIT_FILE

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
#: the locks of the S3 cache's entries (``version_files``)
ENTRY_LOCKS = ".locks"
#: what a repository folder or an S3 cache folder keeps in its root beside the model folders: no model may be
#: named so (dot-names are refused anyway; compared without case, for case-insensitive file systems)
RESERVED_NAMES = frozenset({AUDIT_FILE, _STAGING, _TRASH, _LOCK, ENTRY_LOCKS})
#: a version number: positive, ASCII decimal digits, no leading zero, at most 18 digits (fits int64)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
MAX_VERSION = 10**18 - 1
#: longest pin file read (a version number and a newline take at most 19 bytes)
MAX_PIN_BYTES = 64
#: longest manifest read from a version folder
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise InvalidArgument."""
    if not _NAME_RE.match(name or "") or name in {".", ".."}:
        raise InvalidArgument(
            f"invalid model name {shown(name)}: use 1-128 characters from [A-Za-z0-9_.-], not starting with '.' or '-'"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidArgument(f"invalid model name {shown(name)}: reserved (the repository keeps a file of that name "
                              "beside its models)")
    return name


def parse_version(text: str) -> int | None:
    """The version a folder (or key, or pin) named ``text`` stands for, or None when it is not one."""
    return int(text) if _VERSION_RE.fullmatch(text) else None


_warned: set[tuple[str, ...]] = set()
_warned_lock = threading.Lock()
_MAX_WARNED = 100_000


def warn_once(key: tuple[str, ...], message: str, *args: object) -> None:
    """Log a warning the first time ``key`` is seen in this process (a poll repeats what it finds every time)."""
    with _warned_lock:
        if key in _warned:
            return
        if len(_warned) < _MAX_WARNED:
            _warned.add(key)
    log.warning(message, *args)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed); ValueError when it is not a regular file or
    holds more than ``limit`` bytes, OSError when it cannot be read. Never blocks on a FIFO or reads a device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


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
        """Remove the staging folders of writers that are gone (their lock is free) and leftover trash (a delete
        removes its trash at once: removing it twice is harmless)."""
        liveness.sweep_folders(self.root / _STAGING, "upload")
        trash = self.root / _TRASH
        if trash.is_dir():
            for child in trash.iterdir():
                log.warning("removing a deleted version left by an earlier run: %s", child.name)
                shutil.rmtree(child, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh private folder for assembling a version, locked while in use (a sweep by another process
        leaves it alone); removed on exit unless committed (moved away)."""
        self._check_writable()
        with liveness.locked_folder(self.root / _STAGING) as path:
            yield path

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
            if version > MAX_VERSION:
                raise ResourceExhausted(f"model {shown(name)} has used every version number")
            # The counter is bumped first: a crash between the two leaves a gap, never a reused number.
            counter_tmp = model_dir / f"{_COUNTER}.tmp"
            write_file_durably(counter_tmp, str(version).encode())
            os.replace(counter_tmp, model_dir / _COUNTER)
            os.rename(staged, model_dir / str(version))
            fsync_dir(model_dir)
            fsync_dir(self.root)
        return version

    def _last_version(self, model_dir: Path) -> int:
        try:
            text = read_bounded(model_dir / _COUNTER, MAX_PIN_BYTES).decode("ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            text = f"unreadable ({exc})"
        version = parse_version(text)
        if version is None:
            warn_once((str(self.root), model_dir.name, "counter"), "%s: %s is not a version number (%s); numbering "
                      "continues after the highest version", model_dir, _COUNTER, text[:40])
        return version or 0

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
        found, odd = [], []
        if model_dir.is_dir():
            for child in model_dir.iterdir():
                version = parse_version(child.name)
                if version is not None:
                    if (child / MANIFEST).is_file():
                        found.append(version)
                elif not child.name.startswith(".") and child.is_dir():
                    odd.append(child.name)
        if odd:
            warn_once((str(self.root), name, "versions"), "model %s: ignoring folder(s) %s: a version folder is named "
                      "by a number from 1 to %d in ASCII digits without leading zeros", name,
                      ", ".join(shown(n) for n in sorted(odd)[:5]), MAX_VERSION)
        if not found and not missing_ok:
            raise NotFound(f"model {shown(name)} not found")
        return sorted(found)

    def path(self, name: str, version: int) -> Path:
        """Folder of one version; NotFound when absent."""
        validate_name(name)
        path = self.root / name / str(version)
        if parse_version(str(version)) is None or not (path / MANIFEST).is_file():
            raise NotFound(f"model {shown(name)} version {version} not found")
        return path

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        """The manifest of one version; InvalidArgument (naming the file) when it cannot be read or is not JSON."""
        path, where = self.path(name, version) / MANIFEST, f"{name}/{version}/{MANIFEST}"
        try:
            return json.loads(read_bounded(path, MAX_MANIFEST_BYTES))
        except OSError as exc:
            raise InvalidArgument(f"cannot read {where}: {exc.strerror or exc}") from None
        except ValueError as exc:  # not a regular file, too large, not UTF-8 or not JSON
            raise InvalidArgument(f"{where} is not a valid manifest: {str(exc)[:200]}") from None

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
        """The pinned default version of ``name``, or None (the latest version is the default). A pin that
        cannot be read or is not a version number counts as no pin (with one warning): never raises for it."""
        path = self.root / validate_name(name) / _DEFAULT
        try:
            text = read_bounded(path, MAX_PIN_BYTES).decode("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            text = f"unreadable ({exc})"
        version = parse_version(text)
        if version is None:
            warn_once((str(self.root), name, "pin", text[:80]), "model %s: ignoring the pin %s: %s is not a version "
                      "number; the latest version is the default", name, path, shown(text))
        return version

    def set_default_version(self, name: str, version: int | None) -> None:
        """Pin ``version`` as the default of ``name`` (durably, atomically), or unpin with None."""
        self._set_flag(name, _DEFAULT, None if version is None else str(int(version)))

    def is_unloaded(self, name: str) -> bool:
        """True while ``name`` is marked unloaded (stored, not to be served until loaded again): the mark is there
        (whatever it holds)."""
        return os.path.lexists(self.root / validate_name(name) / _UNLOADED)  # never raises

    def set_unloaded(self, name: str, unloaded: bool) -> None:
        """Mark ``name`` unloaded or not, durably: every server process on the repository follows the mark."""
        self._set_flag(name, _UNLOADED, "1" if unloaded else None)

    def _set_flag(self, name: str, flag: str, value: str | None) -> None:
        """Write (atomically, durably) or remove a small per-model file."""
        model_dir = self.root / validate_name(name)
        with self._lock():
            if (model_dir / flag).is_dir() and not (model_dir / flag).is_symlink():
                raise FailedPrecondition(f"{model_dir / flag} is a folder: remove it to change the model's {flag}")
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
