"""Shared fixtures: settings on a temporary repository, a real server on 127.0.0.1:0, clients, toy models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from leanserve.client import Client  # noqa: E402
from leanserve.server.app import ServerHandle, create_server  # noqa: E402
from leanserve.server.settings import Settings  # noqa: E402


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
