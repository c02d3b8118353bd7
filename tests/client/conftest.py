"""Fixtures shared by the client tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from leanserve.server.app import ServerHandle
from tests.toy import GatedRunner, toy_model


@pytest.fixture
def gated(server: ServerHandle) -> Iterator[GatedRunner]:
    """``toy`` (y = 2x, 4 features) served by a runner the test can hold (``gated.gate.clear()``)."""
    runner = GatedRunner()
    server.dataplane.serve(toy_model(runner, features=4))
    yield runner
    runner.gate.set()
