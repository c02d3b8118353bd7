"""What bench/serve.py and bench/compare.py share: result records, percentiles, server subprocesses, the seed model,
tables and plots. Everything listens and connects on 127.0.0.1 only."""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: the environment running this script: its `leanserve` and `python` are the ones the benchmarks start
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MODEL_NAME = "seed"
IN_FEATURES = 1000
for _p in (str(ROOT), str(ROOT / "protos"), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


# -- statistics --------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN when empty."""
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


@dataclass
class Point:
    """One measured load point (closed loop at a concurrency, or open loop at a target rate)."""

    system: str  # "leanserve", "mlserver", "seed-keras"
    protocol: str  # "native" (leanserve.v1) or "v2" (tritonclient.grpc)
    mode: str  # "unary" or "stream"
    loop: str  # "closed" or "open"
    concurrency: int  # closed: requests in flight; open: client threads available
    target_rate: float  # open loop: requests/s asked for; 0 for closed loop
    duration_s: float
    requests: int
    errors: int
    throughput: float  # completed requests/s in the measured window
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu: float  # client CPU seconds / wall seconds, all client processes (2 cores here: max 2.0)
    procs: int
    batch: int = 1
    first_error: str = ""
    label: str = ""  # free-form variant, e.g. "batching=off"
    in_flight: float = float("nan")  # Little's law: throughput × mean latency, to compare with concurrency
    loadavg_1m: float = float("nan")  # machine load when the point ended: other tenants make this box noisy
    #: the server's CPU (all its processes) per request answered in the window, µs: what handling a request costs,
    #: which noise from other tenants changes far less than the throughput; NaN when the server's pid is unknown
    server_cpu_us: float = float("nan")

    @property
    def series(self) -> str:
        parts = [self.system, self.protocol, self.mode]
        return "/".join(parts) + (f" [{self.label}]" if self.label else "")


def summarize(
    latencies_s: np.ndarray, errors: int, duration: float, cpu_s: float, first_error: str,
    server_cpu_s: float = float("nan"), **kw: Any
) -> Point:
    """A Point from the raw latencies (seconds) of the requests that started inside the measured window."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    return Point(
        server_cpu_us=server_cpu_s / ms.size * 1e6 if ms.size else float("nan"),
        duration_s=duration, requests=int(ms.size), errors=errors, throughput=ms.size / duration,
        p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90), p99_ms=percentile(ms, 99),
        mean_ms=float(ms.mean()) if ms.size else float("nan"), client_cpu=cpu_s / duration,
        first_error=first_error, loadavg_1m=os.getloadavg()[0],
        in_flight=ms.size / duration * float(ms.mean()) / 1e3 if ms.size else 0.0, **kw,
    )


def measure(load: Any, system: str = "leanserve", label: str = "", server_pid: int | None = None) -> Point:
    """Run one ``loadgen.Load`` point with its client processes, print a line and return its summary.
    ``server_pid``: the leader of the server's process group, whose CPU per request the point then reports."""
    import loadgen

    try:
        got = loadgen.run(load, server_pid)
    except (RuntimeError, TimeoutError, OSError) as exc:
        # a server that cannot even start a point (e.g. every worker thread held by open streams) is a result too
        lines = str(exc).strip().splitlines() or [repr(exc)]
        why = next((ln.strip() for ln in lines if "StatusCode" in ln or "Error:" in ln), lines[-1])
        got = loadgen.Collected(np.zeros(0), 1, 0.0, why[:300], load.procs)
    point = summarize(
        got.latencies, got.errors, load.duration, got.cpu_s, got.first_error, got.server_cpu_s,
        system=system, protocol=load.protocol,
        mode=load.mode, loop="open" if load.rate else "closed", concurrency=load.concurrency,
        target_rate=load.rate, procs=got.procs, batch=load.batch, label=label,
    )
    print(one_line(point), flush=True)
    return point


def ratio(new: Point, base: Point) -> dict[str, float]:
    """``new`` over ``base``: throughput (higher is better), p50 and p99 latency and server CPU per request (lower
    is better; NaN when either lacks it)."""
    return {"throughput_ratio": new.throughput / base.throughput, "p50_ratio": new.p50_ms / base.p50_ms,
            "p99_ratio": new.p99_ms / base.p99_ms, "server_cpu_ratio": new.server_cpu_us / base.server_cpu_us}


def ratio_text(r: dict[str, float]) -> str:
    """One line for a ``ratio``: "throughput ×1.20, p50 ×0.80, p99 ×0.90, server CPU per request ×1.10"."""
    cpu = r.get("server_cpu_ratio", float("nan"))
    return (f"throughput ×{r['throughput_ratio']:.2f}, p50 ×{r['p50_ratio']:.2f}, p99 ×{r['p99_ratio']:.2f}"
            + (f", server CPU per request ×{cpu:.2f}" if cpu == cpu else ""))


def process_group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group ``pgid`` (a server started
    in its own session, with its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "kernel": platform.release(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Point):
        return asdict(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


# -- subprocesses ------------------------------------------------------------------------------------------------
_CHILDREN: list["ServerProcess"] = []


def _stop_all() -> None:
    for child in list(_CHILDREN):
        child.stop()


atexit.register(_stop_all)
# atexit does not run on SIGTERM by default: turn it into a normal exit so servers are always killed
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for servers that cannot pick their own, like MLServer)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout:.0f} s")


@dataclass
class ServerProcess:
    """A server subprocess in its own process group (so its workers die with it), output logged to a file."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0  # known in advance, or parsed from "listening on HOST:PORT"
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    _listening: threading.Event = field(default_factory=threading.Event)

    def start(self, ready_timeout: float = 180.0) -> "ServerProcess":
        """Start it and wait until it listens: its "listening on" line, else the known port accepting."""
        env = {**os.environ, **self.env}
        fd, log = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self.proc = subprocess.Popen(
            self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, cwd=str(ROOT),
        )
        _CHILDREN.append(self)
        threading.Thread(target=self._drain, daemon=True).start()
        if self.port:
            wait_port(self.port, ready_timeout, self.proc)
        elif not self._listening.wait(ready_timeout) or not self.port:
            self.stop()
            raise RuntimeError(f"{self.name} did not print 'listening on' in {ready_timeout:.0f} s; log {self.log_path}")
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.log_path is not None
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                m = _LISTENING.search(line)
                if m and not self._listening.is_set():
                    self.port = int(m.group(2))
                    self._listening.set()
        self._listening.set()  # exited: let start() fail fast

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
        if self in _CHILDREN:
            _CHILDREN.remove(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


def start_leanserve(repository: Path, name: str = "leanserve", env: dict[str, str] | None = None) -> ServerProcess:
    """``leanserve serve --port 0`` on a repository; metrics on a free port so several servers can coexist."""
    base = {"LEANSERVE_METRICS_PORT": "0", "LEANSERVE_LOG_LEVEL": "WARNING"}
    argv = [str(VENV_BIN / "leanserve"), "serve", "--host", HOST, "--port", "0", "--repository", str(repository)]
    return ServerProcess(name, argv, {**base, **(env or {})}).start()


# -- the seed model ----------------------------------------------------------------------------------------------
def save_seed_model(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """The seed MLP (1000→128→64→10) with seeded random weights (not trained), as ``seed.h5`` and ``seed.npz``.

    The .npz holds w0, b0, w1, b1, w2, b2 ([in, out] float32) for the peers that compute it in numpy.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from leanserve.server.ingest.keras_loader import import_keras
    from leanserve.server.tools.training import build_mlp

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = build_mlp(IN_FEATURES)
    directory.mkdir(parents=True, exist_ok=True)
    h5, npz = directory / "seed.h5", directory / "seed.npz"
    model.save(h5)
    arrays = {}
    for i, layer in enumerate(l for l in model.layers if l.get_weights()):
        w, b = layer.get_weights()
        arrays[f"w{i}"], arrays[f"b{i}"] = w.astype(np.float32), b.astype(np.float32)
    np.savez(npz, **arrays)
    return h5, npz


def numpy_mlp(npz: Path) -> Any:
    """The seed MLP in plain numpy (relu, relu, softmax), the oracle every server's answers are checked against."""
    with np.load(npz) as f:
        layers = [(f[f"w{i}"], f[f"b{i}"]) for i in range(3)]

    def forward(x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32).reshape(x.shape[0], -1)
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < 2:
                h = np.maximum(h, 0.0)
        e = np.exp(h - h.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return forward


def upload_seed(target: str, h5: Path) -> str:
    """Upload the .h5 as model ``seed`` over the native API; returns the served input name."""
    from leanserve.client.client import Client

    with Client(target, timeout=300) as c:
        c.wait_ready(60)
        info = c.upload(h5, MODEL_NAME)
    return info.inputs[0].name if info.inputs else "input"


# -- output ------------------------------------------------------------------------------------------------------
def points_table(points: Sequence[Point], title: str) -> Any:
    """A rich table of points."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title)
    for col in ("series", "loop", "conc", "rate", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "client cpu",
                "server µs/req", "load 1m"):
        t.add_column(col, justify="left" if col in ("series", "loop") else "right")
    for p in points:
        t.add_row(
            escape(p.series), p.loop, str(p.concurrency), f"{p.target_rate:.0f}" if p.target_rate else "-",
            f"{p.throughput:,.0f}", f"{p.p50_ms:.2f}", f"{p.p90_ms:.2f}", f"{p.p99_ms:.2f}",
            str(p.errors), f"{p.client_cpu:.2f}", f"{p.server_cpu_us:.0f}", f"{p.loadavg_1m:.1f}",
        )
    return t


def one_line(p: Point) -> str:
    """A progress line for one point."""
    rate = f" rate {p.target_rate:.0f}/s" if p.target_rate else ""
    cpu = f", server {p.server_cpu_us:.0f} µs/req" if p.server_cpu_us == p.server_cpu_us else ""
    return (f"{p.series:<34} {p.loop} c={p.concurrency}{rate}: {p.throughput:,.0f} req/s, p50 {p.p50_ms:.2f} ms, "
            f"p99 {p.p99_ms:.2f} ms{cpu}, errors {p.errors}{' ' + p.first_error[:80] if p.first_error else ''}")


def plot_sweep(points: Sequence[Point], path: Path, title: str) -> Path:
    """Two panels over the closed-loop points: throughput and p99 latency against concurrency, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [p for p in points if p.loop == "closed" and p.requests]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for series in dict.fromkeys(p.series for p in closed):
        pts = sorted((p for p in closed if p.series == series), key=lambda p: p.concurrency)
        xs = [p.concurrency for p in pts]
        ax1.plot(xs, [p.throughput for p in pts], marker="o", label=series)
        ax2.plot(xs, [p.p99_ms for p in pts], marker="o", label=series)
    for ax, ylabel in ((ax1, "requests/s"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop, batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
