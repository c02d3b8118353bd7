"""How the ``leanserve`` command ends when something is wrong: argument errors (exit 2, usage on stderr), a server
nobody listens on (exit 1, UNAVAILABLE), a port another process holds (exit 1, one line saying so, no traceback)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanserve.server.cli import main
from tests.serverproc import LEANSERVE, server_env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LEANSERVE, *args], capture_output=True, text=True, timeout=300, env=server_env(),
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("argv, complaint", [
    ([], "required: command"),
    (["fly"], "invalid choice: 'fly'"),
    (["info"], "required: name"),
    (["predict", "m"], "required: --input"),
    (["predict", "m", "--input", "x.npy", "--version", "two"], "invalid int value: 'two'"),
    (["serve", "--port", "http"], "invalid int value: 'http'"),
    (["upload", "m.keras"], "required: --name"),
    (["optimize", "m", "--quantize", "int4"], "invalid choice: 'int4'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_argument_errors_exit_2_with_usage(argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: leanserve" in err and complaint in err


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (bound once to find it, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process (this one) listens on, without SO_REUSEPORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("verb", [["models"], ["info", "m"], ["predict", "m", "--input", "x.npy"], ["delete", "m"]],
                         ids=lambda v: v[0])
def test_an_unreachable_server_exits_1_with_unavailable(verb: list[str], closed_port: int, tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    args = [a.replace("x.npy", str(tmp_path / "x.npy")) for a in verb]
    proc = run_cli(*args, "--server", f"127.0.0.1:{closed_port}", "--timeout", "30")
    assert proc.returncode == 1, proc.stderr
    assert "UNAVAILABLE" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(*args, "--server", f"127.0.0.1:{closed_port}", "--timeout", "30", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "UNAVAILABLE"


def test_serve_on_a_taken_port_exits_1_saying_so(taken_port: int, tmp_path: Path) -> None:
    proc = run_cli("serve", "--host", "127.0.0.1", "--port", str(taken_port), "--repository", str(tmp_path / "repo"))
    assert proc.returncode == 1
    assert "listening on" not in proc.stdout
    assert f"cannot listen on 127.0.0.1:{taken_port}" in proc.stderr and "Traceback" not in proc.stderr
