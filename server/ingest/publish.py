"""Publishing without a server: ``leanserve publish FILE --name NAME --repository URI``.

The file goes through the very pipeline UploadModel uses (``ingest.build``: detect, convert, reference check, tune,
write the version's files) into a staging folder of the repository, is checked against the same limits, and is
committed as the next version (manifest last). Every server following the repository (local folder or s3://)
serves it at its next poll: this is how TF Serving and Triton users ship models.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.ingest import build as ingest
from leanserve.server.ingest.uploads import UploadRequest
from leanserve.server.repository.store import folder_bytes, validate_name
from leanserve.server.serving.context import RequestContext
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

_CHUNK = 4 * 1024 * 1024


@dataclass
class Published:
    """What ``publish_file`` stored."""

    name: str
    version: int
    runtime: str
    manifest: dict[str, Any]


def publish_file(path: Path, name: str, settings: Settings, *, description: str = "",
                 who: str = "leanserve publish") -> Published:
    """Convert and reference-check ``path`` locally, then commit it as the next version of ``name`` in
    ``settings.repository``. Raises the server's errors (InvalidArgument, FailedPrecondition, ResourceExhausted)."""
    from leanserve.server.dataplane import DataPlane
    from leanserve.server.repository.open import open_repository
    from leanserve.server.serving.registry import ModelRegistry

    validate_name(name)
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a file")
    repository = open_repository(settings.repository, settings, sweep=False)  # servers may be uploading
    # the DataPlane only for its limits and its audit log: nothing is served here
    dataplane = DataPlane(settings, repository, ModelRegistry())
    try:
        with dataplane.audit.change(RequestContext(principal=who), "upload", name) as entry:
            with repository.staging() as staged:
                source = staged / "upload.bin"
                size, sha256 = _copy_counted(path, source, settings.max_upload_bytes)
                dataplane.check_limits(name, size)
                req = UploadRequest(name=name, format="", size_bytes=size, sha256=sha256, description=description)
                manifest, conv = ingest.build(req, source, staged, settings)
                dataplane.check_limits(name, folder_bytes(staged))
                entry.version = version = repository.commit(name, staged)
            if repository.is_unloaded(name):  # as an upload through a server does: a new version is served
                repository.set_unloaded(name, False)
    finally:
        dataplane.audit.close()
    log.info("published %s version %d (%s runtime) to %s", name, version, conv.runtime, settings.repository)
    return Published(name, version, conv.runtime, manifest)


def _copy_counted(src: Path, dest: Path, max_bytes: int) -> tuple[int, str]:
    """Copy ``src`` to ``dest`` counting bytes as they are read (the file may be growing); (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ResourceExhausted(f"{src} is larger than the upload limit of {max_bytes} bytes "
                                        "(max_upload_bytes)")
            digest.update(chunk)
            fout.write(chunk)
    if size == 0:
        raise InvalidArgument(f"{src} is empty")
    shutil.copystat(src, dest)
    return size, digest.hexdigest()
