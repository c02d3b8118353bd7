"""Receiving an upload: stream chunks to a file with a size cap, then verify size and SHA-256."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.repository.manifest import check_description

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UploadRequest:
    """The header of an upload, transport-free."""

    name: str
    format: str  # "keras" | "h5" | "leanserve" | "" (detect)
    size_bytes: int
    sha256: str
    description: str = ""



def check_header(req: UploadRequest, max_bytes: int) -> None:
    """Refuse a header before any byte is stored."""
    if not _SHA_RE.match(req.sha256):
        raise InvalidArgument("upload header needs sha256 as 64 lowercase hex characters")
    if req.size_bytes <= 0:
        raise InvalidArgument("upload header needs size_bytes > 0")
    if req.size_bytes > max_bytes:
        raise ResourceExhausted(f"model file of {req.size_bytes} bytes exceeds the upload limit of {max_bytes} bytes")
    check_description(req.description)


def receive(req: UploadRequest, chunks: Iterable[bytes], dest: Path, max_bytes: int) -> Path:
    """Write ``chunks`` to ``dest``; raise when the stream exceeds the declared size or the limit, or when the
    size or checksum differs from the header."""
    digest = hashlib.sha256()
    received = 0
    with open(dest, "wb") as f:
        for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise ResourceExhausted(f"upload exceeds the limit of {max_bytes} bytes")
            if received > req.size_bytes:
                raise InvalidArgument(f"upload is larger than the declared size_bytes={req.size_bytes}")
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if received != req.size_bytes:
        raise InvalidArgument(f"upload ended after {received} bytes but the header declared {req.size_bytes}")
    actual = digest.hexdigest()
    if actual != req.sha256:
        raise InvalidArgument(f"checksum mismatch: header says sha256 {req.sha256}, received bytes hash to {actual}")
    return dest
