"""The model repository on object storage: ``s3://BUCKET/PREFIX/<model>/<version>/``, with the guarantees of the
local one (``store.Repository``) and the same public interface, so the dataplane cannot tell them apart.

Layout under ``PREFIX``::

    <model>/<version>/<file>...        the version's files (weights, source, ...), written first
    <model>/<version>/.files.json      size and SHA-256 of every file above, written next
    <model>/<version>/manifest.json    written LAST: the commit marker. Readers ignore versions without one.
    <model>/.claims/<version>/<id>     who claimed a version number (zero bytes, kept forever: a counter)
    <model>/default_version            the pinned default (absent = the latest), like the local file
    <model>/unloaded                   present while the model is unloaded

Configuration is boto3's own: ``AWS_ENDPOINT_URL`` (or ``s3_endpoint_url``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and the shared config files, read by boto3.

**Version numbers that never collide.** Two servers (or ``leanserve publish`` runs) may commit the same model at
once. S3 now honours ``If-None-Match: *`` on PUT, which would make "create the manifest if absent" a
compare-and-swap; but not every S3 server does: ``rclone serve s3`` (checked with rclone 1.75) accepts the header and
overwrites anyway, and ignores ``If-Match`` and copy conditions too. So numbers are decided by a protocol that needs
only what every strongly consistent S3 gives (a PUT is visible to every LIST that starts after it returns):

1. list the model, pick ``n`` = 1 + the highest committed, uploaded or claimed number;
2. PUT ``<model>/.claims/<n>/<random id>``;
3. LIST ``<model>/.claims/<n>/``: if ours is the only claim, ``n`` is ours; else DELETE ours, wait a random,
   growing while, and start again.

Two writers cannot both win ``n``: each PUT its claim before its LIST, so whichever LISTed last saw the other's
claim (a winner never deletes its claim; a loser deletes only its own, then never uses ``n`` on that attempt).
Writers that collide may both lose and retry (the random wait breaks the tie). Winning claims stay, so numbers are
never reused after deletes, like the local repository's counter. The manifest is still sent with
``If-None-Match: *``, so a server that does honour it refuses an overwrite as well.

**Polling is one paginated LIST.** ``models()`` lists the whole prefix once and keeps what it saw (keys and ETags);
``default_version``/``is_unloaded``/``manifest`` answer from that listing (fetching an object only when its ETag
changed), and every write here updates it. ``versions(name)`` lists one model afresh. So a poll that finds nothing
new costs one LIST per 1000 objects.

**A local cache.** ``path()`` returns a local folder (``cache_dir/<model>/<version>``) holding the version's files,
downloaded once into a private folder, checked against ``.files.json`` and the manifest's ``weights_sha256``, then
renamed into place. A cached folder is checked again (sizes and SHA-256) the first time a process uses it, so a
restart reads from disk instead of downloading everything again. The audit log of an S3 repository lives in the
cache folder (``root``): it is per server, not shared. Processes sharing a cache folder take turns per version
(``version_files``): the second waits for the first one's copy and uses it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from leanserve.server.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, shown
from leanserve.server.repository import version_files
from leanserve.server.repository.s3_bucket import S3Bucket, S3Object
from leanserve.server.repository.s3_listing import CLAIMS, ModelState, parse_listing, valid_name
from leanserve.server.repository.store import (
    _DEFAULT,
    _UNLOADED,
    MANIFEST,
    MAX_PIN_BYTES,
    MAX_VERSION,
    parse_version,
    validate_name,
    warn_once,
)
from leanserve.server.repository.version_files import FILES_INDEX

log = logging.getLogger(__name__)

_CLAIMS = CLAIMS
_CLAIM_ATTEMPTS = 40
#: an uncommitted version folder (files, no manifest) older than this is a crashed upload: swept at startup
ABANDONED_AFTER = dt.timedelta(hours=24)


class S3Repository:
    """Versioned, crash-safe model storage in an S3 bucket (same interface as ``store.Repository``)."""

    def __init__(self, uri: str, *, cache_dir: Path | None = None, endpoint_url: str | None = None,
                 sweep: bool = True, max_version_bytes: int | None = None, client: Any = None) -> None:
        self._bucket = S3Bucket(uri, endpoint_url=endpoint_url, client=client)
        self.uri, self.bucket, self.prefix = self._bucket.uri, self._bucket.bucket, self._bucket.prefix
        if cache_dir is None:
            cache_dir = Path.home() / ".cache" / "leanserve" / "s3" / self.bucket / (self.prefix or "_")
        #: the local cache of downloaded versions (and this server's audit log)
        self.root = Path(cache_dir)
        self._cache = version_files.VersionCache(self.root)
        self.max_version_bytes = max_version_bytes
        self._lock = threading.Lock()  # guards the fields below, never held during I/O
        self._state: dict[str, ModelState] = {}
        self._flag_values: dict[tuple[str, str], tuple[str, str]] = {}  # (model, flag) -> (ETag, value)
        self._manifests: dict[tuple[str, int], tuple[str, bytes]] = {}  # (model, version) -> (ETag, bytes)
        self._epochs: dict[str, int] = {}  # per model: writes by this object (see _refresh_model)
        self._bucket.check()
        if sweep:
            self._sweep()

    def __repr__(self) -> str:
        return f"S3Repository({self.uri!r}, cache={str(self.root)!r})"

    # -- what a listing says ---------------------------------------------------------------------------------
    def _parse(self, listing: dict[str, S3Object]) -> dict[str, ModelState]:
        return parse_listing(listing, self.uri)

    def _refresh_model(self, name: str) -> ModelState:
        with self._lock:
            epoch = self._epochs.get(name, 0)
        state = self._parse(self._bucket.list(f"{name}/")).get(name, ModelState())
        with self._lock:
            # a write of ours that finished while we listed wins over the listing that may predate it
            if self._epochs.get(name, 0) == epoch or name not in self._state:
                self._state[name] = state
            return self._state[name]

    def _model(self, name: str) -> ModelState:
        """What the latest listing saw of ``name`` (listing it now if none has)."""
        with self._lock:
            state = self._state.get(name)
        return state if state is not None else self._refresh_model(name)

    # -- the Repository interface ----------------------------------------------------------------------------
    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A fresh private local folder for assembling a version; removed on exit unless committed."""
        return self._cache.staging()

    def commit(self, name: str, staged: Path) -> int:
        """Upload ``staged`` (which must hold a manifest) as the next version of ``name``: files first, then the
        index of their checksums, then the manifest. Returns the version."""
        validate_name(name)
        staged = Path(staged)
        if not (staged / MANIFEST).is_file():
            raise InvalidArgument("a version needs a manifest")
        files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST and p.name != FILES_INDEX)
        index = {p.relative_to(staged).as_posix(): version_files.file_facts(p) for p in files}
        index_bytes = json.dumps(index, indent=2, sort_keys=True).encode()
        (staged / FILES_INDEX).write_bytes(index_bytes)
        manifest_bytes = (staged / MANIFEST).read_bytes()
        version = self._claim(name)
        written: list[str] = []
        try:
            for path in files:
                rel = f"{name}/{version}/{path.relative_to(staged).as_posix()}"
                written.append(rel)
                self._bucket.upload(rel, path)
            written.append(f"{name}/{version}/{FILES_INDEX}")
            self._bucket.put(written[-1], index_bytes)
            etag = self._bucket.put(f"{name}/{version}/{MANIFEST}", manifest_bytes, if_absent=True)
        except BaseException:
            with contextlib.suppress(Exception):
                self._bucket.delete(written)  # the claim stays: the number is burnt, never reused
            raise
        self._cache.adopt(name, version, staged, manifest_bytes)
        with self._lock:
            state = self._model_locked(name)
            state.committed[version] = etag
            state.claims.add(version)
            self._manifests[(name, version)] = (etag, manifest_bytes)
        return version

    def _claim(self, name: str) -> int:
        """A version number of ``name`` no other writer gets (see the module docstring for why it is safe)."""
        me = uuid.uuid4().hex
        for attempt in range(_CLAIM_ATTEMPTS):
            state = self._refresh_model(name)
            number = max([0, *state.committed, *state.files, *state.claims]) + 1
            if number > MAX_VERSION:
                raise ResourceExhausted(f"model {shown(name)} has used every version number")
            mine = f"{name}/{_CLAIMS}/{number}/{me}"
            self._bucket.put(mine, b"")
            claims = self._bucket.list(f"{name}/{_CLAIMS}/{number}/")
            if set(claims) == {mine}:
                return number
            self._bucket.delete([mine])
            log.info("version %d of %s was claimed by another writer too; trying again", number, name)
            time.sleep(random.uniform(0, min(2.0, 0.01 * 2 ** attempt)))
        raise Unavailable(f"could not claim a version number of {shown(name)} after {_CLAIM_ATTEMPTS} attempts: "
                          "too many writers at once")

    def models(self) -> dict[str, list[int]]:
        """Every model with at least one committed version, and its versions ascending (one paginated LIST)."""
        with self._lock:
            epochs = dict(self._epochs)
        models = self._parse(self._bucket.list(""))
        with self._lock:
            before = self._state
            for name, epoch in self._epochs.items():
                if epochs.get(name, 0) != epoch and name in before:  # written while we listed: keep that
                    models[name] = before[name]
            self._state = models
        self._drop_cached({(n, v) for n, s in before.items() for v in s.committed}
                          - {(n, v) for n, s in models.items() for v in s.committed})
        return {name: sorted(state.committed) for name, state in sorted(models.items()) if state.committed}

    def size_bytes(self) -> int:
        """Bytes the stored versions take in the bucket (uncommitted uploads included)."""
        return sum(obj.size for obj in self._bucket.list("").values())

    def versions(self, name: str, *, missing_ok: bool = False) -> list[int]:
        """Committed versions of ``name`` ascending (listed now); NotFound when none (unless ``missing_ok``)."""
        found = sorted(self._refresh_model(validate_name(name)).committed) if valid_name(name) else []
        if not found and not missing_ok:
            raise NotFound(f"model {shown(name)} not found")
        return found

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        """The manifest of one version; InvalidArgument (naming the object) when it is not JSON."""
        data = self._manifest_bytes(name, version)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"{self.uri}/{name}/{version}/{MANIFEST} is not a valid manifest: "
                                  f"{str(exc)[:200]}") from None

    def _manifest_bytes(self, name: str, version: int) -> bytes:
        validate_name(name)
        etag = self._model(name).committed.get(version)
        if etag is None:
            etag = self._refresh_model(name).committed.get(version)
        if etag is None:
            raise NotFound(f"model {shown(name)} version {version} not found")
        with self._lock:
            cached = self._manifests.get((name, version))
        if cached is not None and cached[0] == etag:
            return cached[1]
        try:
            etag, data = self._bucket.get(f"{name}/{version}/{MANIFEST}", max_bytes=_MAX_MANIFEST_BYTES)
        except NotFound:
            raise NotFound(f"model {shown(name)} version {version} not found") from None
        with self._lock:
            self._manifests[(name, version)] = (etag, data)
        return data

    def path(self, name: str, version: int) -> Path:
        """A local folder holding the version's files (downloaded once, checked); NotFound when absent."""
        manifest_bytes = self._manifest_bytes(name, version)
        return self._cache.get(name, version, manifest_bytes, lambda tmp: self._download(name, version, tmp))

    def _download(self, name: str, version: int, tmp: Path) -> None:
        """Every file of the version but its manifest into ``tmp`` (sizes counted while reading)."""
        base = f"{name}/{version}/"
        listing = self._bucket.list(base)
        if f"{base}{MANIFEST}" not in listing:
            raise NotFound(f"model {shown(name)} version {version} not found")
        total = sum(obj.size for obj in listing.values())
        if self.max_version_bytes is not None and total > self.max_version_bytes:
            raise ResourceExhausted(f"{name} version {version} takes {total} bytes in the repository, more than "
                                    f"{self.max_version_bytes}")
        log.info("downloading %s version %d (%d bytes) from %s", name, version, total, self.uri)
        for rel, obj in listing.items():
            inner = rel[len(base):]
            if inner == MANIFEST:
                continue
            target = tmp / inner
            if not version_files.inside(target, tmp):
                raise InvalidArgument(f"unsafe file name in the repository: {shown(inner)}")
            target.parent.mkdir(parents=True, exist_ok=True)
            self._bucket.download(rel, target, obj.size)

    def _model_locked(self, name: str) -> ModelState:
        """The state of ``name`` about to be changed by a write of ours (caller holds the lock)."""
        self._epochs[name] = self._epochs.get(name, 0) + 1
        return self._state.setdefault(name, ModelState())

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version (or all): its manifest first (readers stop seeing it at once), then its files.
        Returns the deleted versions."""
        validate_name(name)
        state = self._refresh_model(name)
        targets = sorted(state.committed) if version is None else [version]
        if not targets or any(v not in state.committed for v in targets):
            raise NotFound(f"model {shown(name)}" + ("" if version is None else f" version {version}") + " not found")
        for v in targets:
            self._bucket.delete([f"{name}/{v}/{MANIFEST}"])
            self._bucket.delete([f"{name}/{v}/{rel}" for rel in state.files.get(v, {}) if rel != MANIFEST])
        if self.default_version(name) in targets:
            self._bucket.delete([f"{name}/{_DEFAULT}"])
        self._refresh_model(name)
        self._drop_cached({(name, v) for v in targets})
        return targets

    def default_version(self, name: str) -> int | None:
        """The pinned default version of ``name``, or None (the latest version is the default). A pin object that
        is too large or not a version number counts as no pin (with one warning): never raises for it (only
        Unavailable, when the store cannot be read)."""
        value = self._flag(validate_name(name), _DEFAULT)
        if value is None:
            return None
        version = parse_version(value.strip())
        if version is None:
            warn_once((self.uri, name, "pin", value[:80]), "model %s: ignoring the pin %s/%s/%s: %s is not a version "
                      "number; the latest version is the default", name, self.uri, name, _DEFAULT, shown(value))
        return version

    def set_default_version(self, name: str, version: int | None) -> None:
        """Pin ``version`` as the default of ``name``, or unpin with None."""
        self._set_flag(name, _DEFAULT, None if version is None else str(int(version)))

    def is_unloaded(self, name: str) -> bool:
        """True while ``name`` is marked unloaded (stored, not to be served until loaded again): the latest listing
        holds the mark, whatever it holds."""
        return _UNLOADED in self._model(validate_name(name)).flags

    def set_unloaded(self, name: str, unloaded: bool) -> None:
        """Mark ``name`` unloaded or not: every server following the repository follows the mark."""
        self._set_flag(name, _UNLOADED, "1" if unloaded else None)

    def _flag(self, name: str, flag: str) -> str | None:
        """The text of a per-model flag object, None when absent (an object too large to be a flag is shown as
        its start: the caller refuses it)."""
        etag = self._model(name).flags.get(flag)
        if etag is None:
            return None
        with self._lock:
            cached = self._flag_values.get((name, flag))
        if cached is not None and cached[0] == etag:
            return cached[1]
        try:
            etag, data = self._bucket.get(f"{name}/{flag}", max_bytes=MAX_PIN_BYTES)
        except NotFound:  # removed since the listing
            return None
        except InvalidArgument:  # larger than any pin: what the caller warns about, fetched once per ETag
            data = f"(more than {MAX_PIN_BYTES} bytes)".encode()
        value = data.decode("ascii", "replace")
        with self._lock:
            self._flag_values[(name, flag)] = (etag, value)
        return value

    def _set_flag(self, name: str, flag: str, value: str | None) -> None:
        validate_name(name)
        if value is None:
            self._bucket.delete([f"{name}/{flag}"])
        else:
            etag = self._bucket.put(f"{name}/{flag}", value.encode())
        with self._lock:
            state = self._model_locked(name)
            if value is None:
                state.flags.pop(flag, None)
                self._flag_values.pop((name, flag), None)
            else:
                state.flags[flag] = etag
                self._flag_values[(name, flag)] = (etag, value)

    # -- housekeeping ----------------------------------------------------------------------------------------
    def _drop_cached(self, gone: set[tuple[str, int]]) -> None:
        """Forget versions deleted from the store and remove their cached folders."""
        with self._lock:
            for key in gone:
                self._manifests.pop(key, None)
        self._cache.drop(gone)

    def _sweep(self) -> None:
        """Remove uploads that crashed long ago (files without a manifest) and cached versions the store no longer
        has; local staging folders of processes that ended too (at once: their locks tell, see ``liveness``)."""
        now = dt.datetime.now(dt.timezone.utc)
        models = self._parse(self._bucket.list(""))
        for name, state in models.items():
            for version, files in state.files.items():
                if version in state.committed:
                    continue
                newest = max(obj.modified for obj in files.values())
                if now - newest > ABANDONED_AFTER:
                    log.warning("removing an upload that never completed: %s version %d", name, version)
                    self._bucket.delete([f"{name}/{version}/{rel}" for rel in files])
        self._cache.sweep({name: set(state.committed) for name, state in models.items()})
        with self._lock:
            self._state = models


_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
