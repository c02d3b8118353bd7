"""One entry point for every command that takes a repository: a folder, or ``s3://BUCKET/PREFIX``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from leanserve.server.repository.s3_bucket import is_s3_uri
from leanserve.server.repository.store import Repository

if TYPE_CHECKING:
    from leanserve.server.repository.s3 import S3Repository
    from leanserve.server.settings import Settings

#: what ``open_repository`` returns: both have the same public interface
Store = Union[Repository, "S3Repository"]


def open_repository(location: Path | str, settings: "Settings | None" = None, *, sweep: bool = True) -> Store:
    """``S3Repository`` for an ``s3://`` URI (boto3 finds the endpoint and credentials in its usual places;
    ``settings`` adds ``s3_endpoint_url`` and ``repository_cache_dir``), else the local ``Repository``.
    ``sweep`` removes leftovers of crashed uploads (only one of several processes on a repository should)."""
    if is_s3_uri(location):
        from leanserve.server.repository.s3 import S3Repository

        return S3Repository(
            str(location),
            cache_dir=getattr(settings, "repository_cache_dir", None),
            endpoint_url=getattr(settings, "s3_endpoint_url", None),
            max_version_bytes=getattr(settings, "max_repository_bytes", None),
            sweep=sweep,
        )
    return Repository(Path(location), sweep=sweep)
