"""``leanserve optimize`` / ``set-default`` against an in-process server (the CLI's main, real channel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import ServerHandle
from leanserve.server.cli import main
from tests.server.optimize.conftest import Digits


@pytest.mark.slow
def test_cli_optimize_json_and_set_default(client: Client, server: ServerHandle, digits: Digits, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    client.upload(digits.path, "cli")
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.x, y=np.eye(10)[digits.y], x_val=digits.x_val, y_val=digits.y_val)  # one-hot y
    addr = f"127.0.0.1:{server.port}"
    rc = main(["optimize", "cli", "--server", addr, "--data", str(data), "--prune", "0.8", "--block", "4x16",
               "--quantize", "int8", "--max-accuracy-drop", "0.03", "--epochs", "6", "--no-promote", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["version"] == 2 and report["options"]["block"] == "4x16"
    assert not report["promoted"] and report["default_version"] == 1  # --no-promote
    assert main(["set-default", "cli", "2", "--server", addr, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_version"] == 2 == client.info("cli").version
    assert main(["optimize", "cli", "--server", addr, "--quantize", "int8", "--max-accuracy-drop", "1"]) == 0
    assert "int8" in capsys.readouterr().out  # the human table names the layers' formats
    assert main(["optimize", "cli", "--server", addr, "--prune", "2", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "INVALID_ARGUMENT"
