"""Loaded models and their versions: lookups for requests and atomic swaps for uploads and deletes.

The maps are replaced, never mutated, under a lock; a request that already holds a ``ServedModel`` keeps it
alive (Python's reference count is the in-flight count), so a delete or a new version never breaks a call in
progress.
"""

from __future__ import annotations

import threading

from leanserve.server.errors import NotFound, shown
from leanserve.server.serving.model import ServedModel
from leanserve.server.repository.store import validate_name


class ModelRegistry:
    """name -> version -> ServedModel, with "latest" resolution."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, ServedModel]] = {}
        #: pinned default versions (absent: the latest version is the default); see set_default
        self._defaults: dict[str, int] = {}

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The requested version, or the default (pinned, else the latest) when ``version`` is None or 0."""
        versions = self._models.get(name)
        if not versions:
            validate_name(name)  # a name no model can have is the caller's mistake, not a missing model
            raise NotFound(f"model {shown(name)} not found")
        if not version:
            pinned = self._defaults.get(name)
            return versions[pinned] if pinned in versions else versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise NotFound(
                f"model {name!r} has no version {version} (versions: {', '.join(map(str, sorted(versions)))})"
            ) from None

    def default_version(self, name: str) -> int:
        """The version served when a request names none (NotFound when the model is unknown)."""
        return self.get(name).version

    def add(self, model: ServedModel) -> ServedModel | None:
        """Publish a loaded version; returns the one it replaced (same number), if any."""
        with self._lock:
            models = dict(self._models)
            versions = dict(models.get(model.name, {}))
            replaced = versions.get(model.version)
            versions[model.version] = model
            models[model.name] = versions
            self._models = models
        return replaced

    def remove(self, name: str, versions: list[int]) -> list[ServedModel]:
        """Stop serving ``versions`` of ``name``; returns the versions that were served."""
        with self._lock:
            models = dict(self._models)
            current = models.get(name, {})
            removed = [m for v, m in current.items() if v in versions]
            remaining = {v: m for v, m in current.items() if v not in versions}
            if remaining:
                models[name] = remaining
            else:
                models.pop(name, None)
            self._models = models
        return removed

    def set_default(self, name: str, version: int | None) -> None:
        """Pin the version ``get(name)`` resolves to, or unpin with None. A pin on a version that is not served
        (e.g. deleted) is ignored by ``get``: the latest version answers."""
        with self._lock:
            defaults = dict(self._defaults)
            if version is None:
                defaults.pop(name, None)
            else:
                defaults[name] = int(version)
            self._defaults = defaults

    def versions(self, name: str) -> list[int]:
        """Served versions of ``name`` ascending (empty when unknown)."""
        return sorted(self._models.get(name, {}))

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[ServedModel]:
        return [m for name in sorted(self._models) for _, m in sorted(self._models[name].items())]
