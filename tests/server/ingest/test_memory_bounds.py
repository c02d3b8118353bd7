"""Refusing a hostile upload costs at most about twice its bytes plus a fixed bound, measured as peak-RSS growth of a
server process (tests/fuzz/rss_probe.py) while it handles: zip bombs of the own format and of .keras (honest and
with a lying directory, over max_unpacked_bytes and under it), a Keras config declaring layers far larger than the
file, an HDF5 dataset declared far larger than the file, and a 0.5 MB .npz that inflates to 512 MiB sent to Optimize
(whose data cap is 256 MiB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.serverproc import server_env

FIXED_BOUND = 32 << 20
EXPECTED = {
    "leanserve bomb": "RESOURCE_EXHAUSTED",
    "leanserve bomb, lying directory": "INVALID_ARGUMENT",
    "leanserve bomb under the cap": "RESOURCE_EXHAUSTED",
    "keras bomb": "RESOURCE_EXHAUSTED",
    "keras weights bomb": "RESOURCE_EXHAUSTED",
    "keras layers wider than the file": "RESOURCE_EXHAUSTED",
    "h5 dataset larger than the file": "RESOURCE_EXHAUSTED",
    "npz bomb (512 MiB)": "RESOURCE_EXHAUSTED",
}


def test_refused_uploads_cost_at_most_twice_their_bytes_plus_a_fixed_bound(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.rss_probe", str(tmp_path)], cwd=root,
                          env=server_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(EXPECTED)
    for name, r in results.items():
        assert r["code"] == EXPECTED[name], r
        assert r["growth"] <= 2 * r["bytes"] + FIXED_BOUND, r
