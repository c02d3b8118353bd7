"""A version folder checked against its file index: what an S3 repository's local cache relies on.

Every committed version carries ``.files.json`` (size and SHA-256 of each of its files, written before the manifest);
a folder downloaded from the bucket, or found in the cache after a restart, is served only once it holds exactly
those files and its manifest equals the bucket's. Folders leave the cache by one rename into ``.trash`` (readers see
the folder or nothing), then are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from leanserve.server.repository.store import MANIFEST

log = logging.getLogger(__name__)

#: per version: size and SHA-256 of each file but the manifest (written before the manifest)
FILES_INDEX = ".files.json"
TRASH = ".trash"
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
