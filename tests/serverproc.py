"""``leanserve serve`` in a subprocess, as a person starts it: loopback, port 0, metrics on a free port, output
drained (stderr to a log file, stdout read by a thread), and helpers to find and kill the processes it started."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

LEANSERVE = [sys.executable, "-m", "leanserve.server.cli"]
#: how long a server may take to print "listening on" (TensorFlow or a cold Numba cache make starts slow)
START_SECONDS = 300.0


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the test session's ``NUMBA_CACHE_DIR``) without any ``LEANSERVE_*``
    variable, then quiet TensorFlow, metrics on a free port, a short shutdown grace, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEANSERVE_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", LEANSERVE_METRICS_PORT="0", LEANSERVE_SHUTDOWN_GRACE_SECONDS="1")
    env.update(extra)
    return env


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
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServerProcess:
    """One ``leanserve serve`` subprocess on 127.0.0.1:0; ``address`` once it printed ``listening on``.

    Use as a context manager: on exit the process and any extra processes it started are killed by pid.
    """

    def __init__(self, repository: Path, *args: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [*LEANSERVE, "serve", "--host", "127.0.0.1", "--port", "0", "--repository", str(repository), *args],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True,
            env=server_env() if env is None else env,
        )
        self.stdout: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, args=(lines,), daemon=True)
        self._reader.start()
        try:
            first = lines.get(timeout=START_SECONDS)
        except queue.Empty:
            first = ""
        if not first.startswith("listening on 127.0.0.1:"):
            self.kill()
            raise AssertionError(f"the server did not start (first line {first!r}):\n{self.log()}")
        self.address = first.split()[-1]
        self.port = int(self.address.rsplit(":", 1)[1])

    def _drain(self, lines: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            lines.put(line)
        lines.put("")  # end of output: the process closed stdout (exited)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the extra processes (if any) and the server, and reap it."""
        for child in children(self.proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self._reader.join(10)
        self._log.close()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        self._log.close()
        return code

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None or children(self.proc.pid):
            self.kill()
        elif not self._log.closed:
            self._log.close()
