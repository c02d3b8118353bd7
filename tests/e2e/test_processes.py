"""``leanserve serve --processes 2``: two processes on one port, both serving, following each other's uploads,
stopping together on SIGTERM, the extra one never outliving the first, and the failure paths: an extra process
that cannot start, one that dies later, a bad ``--processes`` value.

Which process answers a connection is asked, not inferred: V2 ServerMetadata names it (``PROCESS_EXTENSION``)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.grpc.v2_servicer import PROCESS_EXTENSION
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, build_plan
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tests.serverproc import LEANSERVE, ServerProcess, alive, children, server_env
from tests.toy import wait_until

pytestmark = pytest.mark.slow

#: fresh connections opened at most while looking for one to each process (the kernel hashes each new
#: connection to one of two processes, so missing one after this many is a 2**-199 event, not a flake)
MAX_CONNECTIONS = 200


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[ServerProcess]:
    env = server_env(LEANSERVE_METRICS="false", LEANSERVE_REPOSITORY_POLL_SECONDS="0.1")
    with ServerProcess(tmp_path / "repo", "--processes", "2", log=tmp_path / "server.log", env=env) as server:
        yield server


def _fresh_channel(address: str) -> grpc.Channel:
    # a private subchannel pool: a new TCP connection, which the kernel may give to either process
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def process_index(channel: grpc.Channel) -> int:
    """The index of the server process this connection talks to (0 = the first one)."""
    md = pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=60)
    [entry] = [e for e in md.extensions if e.startswith(PROCESS_EXTENSION)]
    return int(entry[len(PROCESS_EXTENSION):])


def one_connection_per_process(address: str, processes: int = 2) -> dict[int, Client]:
    """Open fresh connections until each process answered one; the others are closed."""
    found: dict[int, Client] = {}
    for _ in range(MAX_CONNECTIONS):
        client = Client(channel=_fresh_channel(address), timeout=60)
        index = process_index(client.channel)
        if index in found:
            client.close()
        else:
            found[index] = client
        if len(found) == processes:
            return found
    for client in found.values():
        client.close()
    raise AssertionError(f"{MAX_CONNECTIONS} connections reached only processes {sorted(found)}")


def _model(tmp_path: Path) -> tuple[Path, object]:
    rng = np.random.default_rng(0)
    plan = build_plan((5,), [LayerSpec("o", rng.normal(size=(5, 2)).astype(np.float32), np.zeros(2, np.float32),
                                       "linear")])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    artifacts.write_zip(tmp_path / "m.leanserve", manifest, blob)
    return tmp_path / "m.leanserve", plan


def _successes(client: Client, name: str) -> int:
    stats = pb_grpc.GRPCInferenceServiceStub(client.channel).ModelStatistics(
        pb.ModelStatisticsRequest(name=name), timeout=60)
    return stats.model_stats[0].inference_stats.success.count


def test_both_processes_serve_and_follow_each_other(two_processes: ServerProcess, tmp_path: Path) -> None:
    server = two_processes
    [extra] = children(server.pid)
    path, plan = _model(tmp_path)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    clients = one_connection_per_process(server.address)
    try:
        clients[1].upload(path, "m")  # through the extra process: the first one must follow it

        def serves(c: Client) -> bool:
            try:
                return c.predict("m", x).model_version == 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # not polled yet
                return False

        wait_until(lambda: serves(clients[0]), "the first process serves the upload made through the extra one")
        # each process counts the requests it answered: send 3 through one and 5 through the other
        before = {i: _successes(c, "m") for i, c in clients.items()}
        sent = {0: 3, 1: 5}
        for i, c in clients.items():
            for _ in range(sent[i]):
                np.testing.assert_allclose(c.predict("m", x).outputs["y"], plan.reference(x), atol=1e-5)
        assert {i: _successes(c, "m") - before[i] for i, c in clients.items()} == sent
    finally:
        for c in clients.values():
            c.close()

    assert server.terminate() == 0
    wait_until(lambda: not alive(extra), "the extra process stops with the first")


def test_the_extra_process_never_outlives_the_first(two_processes: ServerProcess) -> None:
    [extra] = children(two_processes.pid)
    assert alive(extra)
    two_processes.proc.kill()  # no chance to clean up
    two_processes.proc.wait()
    wait_until(lambda: not alive(extra), "the orphaned extra process stops", timeout=60)


def test_a_killed_extra_process_is_started_again(two_processes: ServerProcess) -> None:
    server = two_processes
    [extra] = children(server.pid)
    os.kill(extra, signal.SIGKILL)
    wait_until(lambda: [p for p in children(server.pid) if p != extra and alive(p)], "a new extra process runs",
               timeout=120)

    def reached_by_a_connection() -> bool:
        with _fresh_channel(server.address) as channel:
            return process_index(channel) == 1

    wait_until(reached_by_a_connection, "the new extra process answers connections", timeout=120)
    clients = one_connection_per_process(server.address)
    try:
        assert sorted(clients) == [0, 1]
        assert clients[1].models() == {}
    finally:
        for c in clients.values():
            c.close()
    assert server.proc.poll() is None


def _extra_processes_run(tmp_path: Path, statement: str) -> dict[str, str]:
    """The server's environment, in which the extra processes (and only they: the first has no
    LEANSERVE_PROCESS_INDEX) run ``statement`` at start-up: Python runs ``sitecustomize`` in every process whose
    path holds it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        f"import os, sys, time\nif os.environ.get('LEANSERVE_PROCESS_INDEX', '0') != '0':\n    {statement}\n")
    return server_env(PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
                      LEANSERVE_METRICS="false")


def _extra_processes(pid: int) -> list[int]:
    """The extra server processes ``pid`` started (after their exec: each is told where to report ready)."""
    found = []
    for child in children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--ready-fd" in argv:
            found.append(child)
    return found


def test_an_extra_process_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    env = _extra_processes_run(tmp_path, "sys.exit(7)")  # like a process that crashes while starting
    proc = subprocess.run([*LEANSERVE, "serve", "--port", "0", "--processes", "2", "--repository",
                           str(tmp_path / "repo")], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "listening on" not in proc.stdout
    assert "server process 1" in proc.stderr, proc.stderr[-2000:]


def test_sigterm_while_an_extra_process_starts_stops_the_server_at_once(tmp_path: Path) -> None:
    # the extra process takes 600 s to start: SIGTERM to the first must not wait for it
    env = _extra_processes_run(tmp_path, "time.sleep(600)")
    proc = subprocess.Popen([*LEANSERVE, "serve", "--host", "127.0.0.1", "--port", "0", "--processes", "2",
                             "--repository", str(tmp_path / "repo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        # the first process may run short-lived children of its own while it starts: find the one that serves
        wait_until(lambda: _extra_processes(proc.pid), "the extra process is started", timeout=120)
        [extra] = _extra_processes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert "listening on" not in out
        wait_until(lambda: not alive(extra), "the extra process is gone", timeout=30)
    finally:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_processes_value_is_refused(tmp_path: Path, value: str) -> None:
    proc = subprocess.run([*LEANSERVE, "serve", "--port", "0", "--processes", value, "--repository",
                           str(tmp_path / "repo")], capture_output=True, text=True, env=server_env(), timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "listening on" not in proc.stdout
    assert "processes" in proc.stderr, proc.stderr[-2000:]


def _free_port_pair() -> int:
    """A port P with P + 1 free too (each extra process serves metrics on the first one's port + its index)."""
    import socket

    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two consecutive free ports")


def _scraped_successes(port: int, model: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "nv_inference_request_success_total" and s.labels.get("model") == model)


def test_each_process_serves_its_own_metrics(tmp_path: Path) -> None:
    port = _free_port_pair()
    env = server_env(LEANSERVE_METRICS_PORT=str(port), LEANSERVE_REPOSITORY_POLL_SECONDS="0.1")
    path, _ = _model(tmp_path)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    with ServerProcess(tmp_path / "repo", "--processes", "2", log=tmp_path / "server.log", env=env) as server:
        clients = one_connection_per_process(server.address)
        try:
            clients[0].upload(path, "m")
            wait_until(lambda: clients[1].models() == {"m": [1]}, "the extra process serves the upload")
            for i, c in clients.items():
                for _ in range(2 + 3 * i):  # 2 through the first process, 5 through the extra one
                    c.predict("m", x)
            for i, c in clients.items():  # process i's endpoint counts exactly what process i answered
                assert _scraped_successes(port + i, "m") == _successes(c, "m") == 2 + 3 * i
        finally:
            for c in clients.values():
                c.close()
