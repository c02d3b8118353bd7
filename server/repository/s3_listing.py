"""What one LIST of an S3 repository says, per model: committed versions, their files, claims and flags (the
layout is described in ``s3.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from leanserve.server.errors import InvalidArgument, shown
from leanserve.server.repository.s3_bucket import S3Object
from leanserve.server.repository.store import (
    _DEFAULT,
    _UNLOADED,
    MANIFEST,
    MAX_VERSION,
    parse_version,
    validate_name,
    warn_once,
)

#: per model: who claimed which version number (see ``s3.py``)
CLAIMS = ".claims"


@dataclass
class ModelState:
    """What one LIST saw of one model."""

    committed: dict[int, str] = field(default_factory=dict)  # version -> manifest ETag
    files: dict[int, dict[str, S3Object]] = field(default_factory=dict)  # version -> relative key -> object
    claims: set[int] = field(default_factory=set)
    flags: dict[str, str] = field(default_factory=dict)  # default_version / unloaded -> ETag


def parse_listing(listing: dict[str, S3Object], uri: str) -> dict[str, ModelState]:
    """What a listing says, per model. Keys that are not a model's files, claims or flags are ignored (version
    numbers are ASCII ``[1-9][0-9]{0,17}``), with one warning per model per process."""
    models: dict[str, ModelState] = {}
    odd: dict[str, set[str]] = {}
    for rel, obj in listing.items():
        parts = rel.split("/")
        if len(parts) < 2 or parts[0].startswith("."):
            continue
        if not valid_name(parts[0]):
            odd.setdefault(parts[0], set()).add(rel)
            continue
        state = models.setdefault(parts[0], ModelState())
        if len(parts) == 2 and parts[1] in (_DEFAULT, _UNLOADED):
            state.flags[parts[1]] = obj.etag
            continue
        if parts[1] == CLAIMS:
            claim = parse_version(parts[2]) if len(parts) == 4 else None
            if claim is not None:
                state.claims.add(claim)
            continue
        version = parse_version(parts[1])
        if version is not None and len(parts) >= 3 and parts[-1]:
            rest = "/".join(parts[2:])
            if rest == MANIFEST:
                state.committed[version] = obj.etag
            state.files.setdefault(version, {})[rest] = obj
        else:
            odd.setdefault(parts[0], set()).add(rel)
    for name, keys in odd.items():
        warn_once((uri, name, "keys"), "%s: ignoring key(s) %s: not a model's version (a number from 1 to %d "
                  "in ASCII digits without leading zeros), pin or unload mark", uri,
                  ", ".join(shown(k) for k in sorted(keys)[:5]), MAX_VERSION)
    return models


def valid_name(name: str) -> bool:
    """Whether ``name`` is a valid model name."""
    try:
        validate_name(name)
        return True
    except InvalidArgument:
        return False
