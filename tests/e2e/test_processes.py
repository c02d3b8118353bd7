"""``leanserve serve --processes 2``: two processes on one port, both serving, following each other's uploads,
stopping together on SIGTERM, and the extra one never outliving the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.toy import wait_until

LEANSERVE = [sys.executable, "-m", "leanserve.server.cli"]


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", LEANSERVE_SHUTDOWN_GRACE_SECONDS="1",
               LEANSERVE_METRICS="false", LEANSERVE_REPOSITORY_POLL_SECONDS="0.1")
    proc = subprocess.Popen([*LEANSERVE, "serve", "--port", "0", "--processes", "2", "--repository",
                             str(tmp_path / "repo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stdout.readline()
    assert line.startswith("listening on 127.0.0.1:"), line + proc.stderr.read()
    yield line.split()[-1], proc
    for pid in children(proc.pid):
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _fresh_channel(address: str) -> grpc.Channel:
    # a private subchannel pool: a new TCP connection, which the kernel may give to either process
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_both_processes_serve_and_follow_each_other(two_processes, tmp_path: Path) -> None:
    address, proc = two_processes
    [extra] = children(proc.pid)
    rng = np.random.default_rng(0)
    plan = build_plan((5,), [LayerSpec("o", rng.normal(size=(5, 2)).astype(np.float32), np.zeros(2, np.float32),
                                       "linear")])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    artifacts.write_zip(tmp_path / "m.leanserve", manifest, blob)
    with Client(address, timeout=60) as c:
        c.upload(tmp_path / "m.leanserve", "m")

    x = rng.normal(size=(3, 5)).astype(np.float32)
    clients = [Client(channel=_fresh_channel(address), timeout=60) for _ in range(16)]
    try:
        def everyone_serves() -> bool:
            try:
                return all(c.predict("m", x).model_version == 1 for c in clients)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # the other process has not polled yet
                return False

        wait_until(everyone_serves, "every connection's process serves the upload")
        for c in clients:
            np.testing.assert_allclose(c.predict("m", x).outputs["y"], plan.reference(x), atol=1e-5)
        # each process counts its own requests: different counts mean both processes answered
        counts = set()
        for c in clients:
            stats = pb_grpc.GRPCInferenceServiceStub(c.channel).ModelStatistics(
                pb.ModelStatisticsRequest(name="m"), timeout=30)
            counts.add(stats.model_stats[0].inference_stats.success.count)
        assert len(counts) == 2, f"one process answered every connection: {counts}"
    finally:
        for c in clients:
            c.close()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    wait_until(lambda: not alive(extra), "the extra process stops with the first")


def test_the_extra_process_never_outlives_the_first(two_processes) -> None:
    _, proc = two_processes
    [extra] = children(proc.pid)
    assert alive(extra)
    proc.kill()  # no chance to clean up
    proc.wait()
    wait_until(lambda: not alive(extra), "the orphaned extra process stops", timeout=60)
