"""Shared fixtures: settings on a temporary repository, a real server on 127.0.0.1:0, clients, toy models.

Also the session's hygiene, set here because this file is imported before any test module (and so before Numba,
the server and every module-level ``Settings``):

- ``NUMBA_CACHE_DIR`` points at a folder of this run only. Numba's ``cache=True`` keys a cached function on its own
  source file, not on the functions it calls in other files, so a cache kept across edits can run stale kernel
  code; a per-run folder also keeps the source tree free of ``__pycache__/*.nbi``. Server subprocesses inherit it.
- ``LEANSERVE_*`` variables of whoever runs the tests are removed (and put back at the end), so every setting a
  test does not pass explicitly is the documented default.
- Hypothesis runs derandomized (the same examples every run) with an explicit deadline and no example database;
  ``HYPOTHESIS_PROFILE=explore`` draws fresh examples locally.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_NUMBA_CACHE_DIR = tempfile.mkdtemp(prefix="leanserve-tests-numba-")
os.environ["NUMBA_CACHE_DIR"] = _NUMBA_CACHE_DIR
atexit.register(shutil.rmtree, _NUMBA_CACHE_DIR, True)
if "numba" in sys.modules:  # imported by a plugin before us: make it read the variable again
    from numba.core import config as _numba_config

    _numba_config.reload_config()

_USER_LEANSERVE_ENV = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LEANSERVE_")}

hypothesis_settings.register_profile("leanserve", derandomize=True, deadline=None, print_blob=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "leanserve"))

from leanserve.client import Client  # noqa: E402
from leanserve.server.app import ServerHandle, create_server  # noqa: E402
from leanserve.server.settings import Settings  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_leanserve_environment() -> Iterator[None]:
    """No ``LEANSERVE_*`` variable reaches a test's settings (removed at import, checked here, restored at the end)."""
    for key in [k for k in os.environ if k.startswith("LEANSERVE_")]:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("LEANSERVE_")]:
        del os.environ[key]
    os.environ.update(_USER_LEANSERVE_ENV)


def make_settings(repository: Path, **overrides: object) -> Settings:
    """Settings for a test server: port 0, loopback, small reference check and warm-up to keep tests quick."""
    base = dict(
        host="127.0.0.1", port=0, repository=repository, reference_samples=128, autotune_batch_sizes=(1, 16),
        warmup_batch_sizes=(1,), shutdown_grace_seconds=0.5, worker_threads=8, max_open_streams=4,
        metrics_port=0,  # a free port: never clash with a running server or another test's
    )
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def server(repo_dir: Path) -> Iterator[ServerHandle]:
    handle = create_server(make_settings(repo_dir))
    yield handle
    handle.stop(0.5)


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c
