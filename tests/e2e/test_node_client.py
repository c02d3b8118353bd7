"""The Node.js example (examples/node/predict.js) against a real server: same numbers as the Python client."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from leanserve.client import Client

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` executable, with the example's dependencies installed (``npm ci`` from its lockfile)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the Node.js example needs `node` and `npm` on PATH (Node.js 18 or newer)")
    if not (EXAMPLE / "node_modules").is_dir():
        try:
            proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True,
                                  text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"npm ci in {EXAMPLE} timed out after 300 s:\n{exc.stdout}\n{exc.stderr}")
        if proc.returncode != 0:
            pytest.fail(f"npm ci in {EXAMPLE} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return node


def run_example(node: str, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, "predict.js", "--server", f"127.0.0.1:{port}", *args], cwd=EXAMPLE,
                          capture_output=True, text=True, timeout=120)


def test_node_example_matches_python_client(node: str, server, client: Client, model_files) -> None:
    client.upload(model_files["seed_h5"], "seed")

    proc = run_example(node, server.port, "--model", "seed", "--rows", "3")

    assert proc.returncode == 0, f"predict.js failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    answer = json.loads(lines[0])
    assert answer["shape"] == [3, 10]
    out = np.asarray(answer["output"], dtype=np.float64)
    assert out.shape == (3, 10)
    expected = client.predict("seed", np.zeros((3, 1000), np.float32)).output
    assert np.allclose(out, expected, atol=1e-5), f"node {out}\npython {expected}"


def test_node_example_reports_unknown_model(node: str, server) -> None:
    proc = run_example(node, server.port, "--model", "no-such-model", "--rows", "1")

    assert proc.returncode == 1, f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout == ""
    assert "error NOT_FOUND:" in proc.stderr
