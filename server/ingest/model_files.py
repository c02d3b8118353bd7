"""Serving plain model files: ``leanserve serve --model NAME=PATH``, and a ``--repository`` folder that holds model
files instead of a repository (what KServe's storage initializer leaves in ``/mnt/models``).

Such a folder may be read-only, so the versions go into a writable repository beside it (``repository_cache_dir``,
else a folder under the system's temporary directory named after the source folder). Each file is published
through the same pipeline as UploadModel (``publish_file``) unless the model's newest version already came from a
file with the same SHA-256, so a restart does not add a version.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository.store import parse_version, validate_name
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

#: file endings of a model file (a repository folder holds model folders instead)
MODEL_SUFFIXES = (".h5", ".keras", ".leanserve")


def parse_model_arg(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` → (name, path); InvalidArgument when malformed."""
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise InvalidArgument(f"--model takes NAME=PATH, got {value!r}")
    return validate_name(name), Path(path)


def model_files_in(folder: Path) -> list[Path]:
    """The model files at the top of ``folder`` if it is a folder of model files rather than a repository (no
    sub-folder is a model with versions); else []."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)
    has_versions = any(child.is_dir() and any(parse_version(v.name) is not None for v in child.iterdir())
                       for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    return [] if has_versions else files


def prepare(settings: Settings, models: list[tuple[str, Path]], model_name: str | None = None) -> Settings:
    """Publish ``models`` (and the files of a model-file ``settings.repository``) and return the settings the
    server should run with (the repository swapped for a writable one when the folder held files)."""
    repository = settings.repository
    if not settings.repository_is_s3:
        files = model_files_in(Path(repository))
        if files:
            if model_name and len(files) > 1:
                raise InvalidArgument(f"--model-name names one model but {repository} holds {len(files)} model files")
            models = [*[(validate_name(model_name) if model_name else validate_name(f.stem), f) for f in files],
                      *models]
            writable = settings.repository_cache_dir or Path(tempfile.gettempdir()) / (
                "leanserve-repository-" + hashlib.sha256(str(Path(repository).resolve()).encode()).hexdigest()[:12])
            log.info("%s holds model files, not a repository: serving them from %s", repository, writable)
            settings = settings.model_copy(update={"repository": Path(writable)})
    for name, path in models:
        publish_if_new(settings, name, path)
    return settings


def publish_if_new(settings: Settings, name: str, path: Path) -> int | None:
    """Publish ``path`` as a new version of ``name`` unless its newest version came from the same bytes; returns
    the new version or None."""
    from leanserve.server.ingest.publish import publish_file
    from leanserve.server.repository.open import open_repository

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    repository = open_repository(settings.repository, settings, sweep=False)
    versions = repository.versions(name, missing_ok=True)
    if versions:
        source = repository.manifest(name, versions[-1]).get("source") or {}
        if source.get("sha256") == digest.hexdigest():
            log.info("%s is already %s version %d", path, name, versions[-1])
            return None
    published = publish_file(path, name, settings, description=f"from {path.name}")
    log.info("published %s as %s version %d", path, name, published.version)
    return published.version
