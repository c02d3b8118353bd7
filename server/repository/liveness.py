"""Who is still using a folder: an exclusive ``flock`` held for as long as it is in use.

The kernel releases a lock when its process ends, however it ends (``kill -9``, OOM killer, power loss), so a
sweep that can take a lock knows its owner is gone and may remove what it guards at once, whatever its age; a
folder whose lock is held belongs to a live writer (another server process, ``leanserve publish``) and is left
alone.

A lock file may be unlinked by whoever holds it (an owner finishing, a sweep removing a leftover); whoever opened
it just before then finds, once it holds the lock, that the path no longer names that file, and starts again. So
a lock taken here always guards the file its path names.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: suffix of the lock file beside each staging folder (``<parent>/<id>`` is locked by ``<parent>/<id>.lock``)
LOCK_SUFFIX = ".lock"
#: a held lock whose path was unlinked meanwhile is taken again; this many times at most (each needs a racer)
_MAX_RETRIES = 1000


def try_lock(path: Path, *, create: bool, wait: bool = False) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None when ``path`` is absent (and not
    ``create``), held by someone else (and not ``wait``), or was unlinked before the lock was taken."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            on_disk = os.stat(path)
        except FileNotFoundError:
            on_disk = None
        mine = os.fstat(fd)
        if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@contextlib.contextmanager
def held(path: Path, *, unlink_after: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent), waiting for other holders, for the block.
    ``unlink_after`` removes the lock file before releasing it (when what it guards is gone for good)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_MAX_RETRIES):
        fd = try_lock(path, create=True, wait=True)
        if fd is not None:
            break
    else:
        raise OSError(f"could not lock {path}: it kept being removed")
    try:
        yield
    finally:
        if unlink_after:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def locked_folder(parent: Path) -> Iterator[Path]:
    """A fresh folder ``parent/<random>``, its lock ``parent/<random>.lock`` held while the block runs; the
    folder is removed on exit unless it was moved away, then the lock file."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_MAX_RETRIES):
        name = uuid.uuid4().hex
        lock = parent / f"{name}{LOCK_SUFFIX}"
        fd = try_lock(lock, create=True)  # before the folder exists: a folder without its lock is a leftover
        if fd is not None:
            break
    else:
        raise OSError(f"could not lock a staging folder in {parent}")
    path = parent / name
    try:
        path.mkdir()
        yield path
    finally:
        try:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)


def sweep_folders(parent: Path, what: str) -> list[str]:
    """Remove the entries of ``parent`` whose owner is gone: those whose lock can be taken, and those without a
    lock file (left by a crash, or by a version of leanserve that did not lock). Entries whose lock is held are
    kept. Returns the names removed."""
    try:
        entries = sorted(parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    names = {entry.name for entry in entries}
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX):
            continue
        lock = parent / f"{entry.name}{LOCK_SUFFIX}"
        fd = try_lock(lock, create=False)
        if fd is None and lock.exists():
            continue  # a live writer holds it
        try:
            log.warning("removing an incomplete %s left by a process that ended: %s", what, entry.name)
            _remove(entry)
            removed.append(entry.name)
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                os.close(fd)
    for entry in entries:  # locks whose folder is gone (a crash right after a commit moved it away)
        if entry.name.endswith(LOCK_SUFFIX) and entry.name[:-len(LOCK_SUFFIX)] not in names:
            fd = try_lock(entry, create=False)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(entry)
                os.close(fd)
    return removed


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()
