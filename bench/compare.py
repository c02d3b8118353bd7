"""leanserve against its peers on the same model, machine and client (GitHub issue "Serving at speed", part 7).

One run starts, in turn, each system on 127.0.0.1 with the seed MLP (1000→128→64→10, seeded random weights) and
hits it with the same closed-loop tritonclient.grpc load (batch-1 requests, several client processes):

* ``floor``      — the physical floor: a bare grpcio V2 server answering a canned response (floor_server.py),
  measured with 1, 2 and 4 worker threads and as a ``grpc.aio`` server; the series is the best per point (named
  in its label);
* ``floor-model`` — the floor of serving this model: the same bare server, but ModelInfer reads the tensor, runs the
  seed MLP through leanserve's own fused fp32 kernel and answers its rows (``floor_server.py --model``; no
  validation, batching, statistics or error handling), in the same setups; ``floor-model / floor`` is the most any
  Python server computing the model in its request path could reach, ``leanserve / floor-model`` what leanserve's
  serving layers cost;
* ``mlserver``   — MLServer 1.7.1 in its own virtualenv (made on first use under ~/.cache/leanserve-bench), a custom
  numpy MLModel computing the MLP from the same weights (.npz). Measured in each setup its users would try
  (``parallel_workers`` 0 and 1 × adaptive batching on and off); the ``mlserver`` series is the best setup per
  point (named in its label), ``mlserver-default`` its out-of-the-box setup (one worker process, no batching);
* ``seed-keras`` — the seed's way: Keras ``model.predict`` per request behind a plain gRPC servicer (seed_server.py);
* ``leanserve``  — its Open Inference Protocol (V2) endpoint, default settings (one process);
* ``leanserve-2p`` — the same with ``LEANSERVE_PROCESSES=2`` (two processes on the port, one per core).

Each client thread is an independent client with its own connection (``--shared-connection`` for gRPC's default of
one connection per client process), so the kernel can spread connections over a multi-process server.

Every system's answer (but the floor's, which computes nothing) is checked against a numpy oracle before it is
loaded. ``--rounds N`` measures every system N times in alternation (floor, leanserve, ..., floor, leanserve, ...):
each point reported is the round with the median throughput, and the ratios are also given per round (systems
measured minutes apart in one round share the machine's state), so the spread shows how much the noise moves them.
Goals (issue "Performance to the floor"): leanserve ≥ 0.85× the floor and ≥ 1.6× MLServer's best setup at 32
concurrent batch-1 clients, p99 no worse than MLServer's.

A closed loop compares tails at different throughputs: a faster server also runs its clients harder (they share the
machine), and queueing grows with the load. ``--rate R`` adds an open-loop point at ``R`` requests/s offered to every
system (``--rate-threads`` client threads; for a system measured in several setups the series is the setup with the
lowest p99 among those that kept up), so p50/p99 are also compared under the same traffic.

Every point also reports the server's CPU per request answered (µs, all of the server's processes, read from /proc
over the measured window): what handling one request costs, the issue's "request handling within 15 % of bare
grpcio" measured directly. Other tenants on a shared machine move it far less than the throughput, which also
depends on how much CPU they leave to the server and its clients.

    python bench/compare.py [--quick] [--rounds 3] [--rate 600] [--systems floor leanserve mlserver seed-keras]

Writes bench/results/compare.json, compare.png and prints a rich table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loadgen  # noqa: E402

CACHE = Path(os.environ.get("LEANSERVE_BENCH_CACHE", Path.home() / ".cache" / "leanserve-bench"))
MLSERVER_VENV = CACHE / "mlserver-venv"
# uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which kills MLServer 1.7.1's inference
# worker processes at start (mlserver/parallel/worker.py _ignore_signals): pin the last release that works
MLSERVER_PINS = ["mlserver==1.7.1", "uvloop==0.21.0"]
SYSTEMS = ("floor", "floor-model", "leanserve", "leanserve-2p", "mlserver", "seed-keras")
#: MLServer setups measured: (parallel_workers, adaptive batching max_batch_size; <= 1 = off)
MLSERVER_SETUPS = ((0, 1), (0, 64), (1, 1), (1, 64))
MLSERVER_DEFAULT = (1, 1)
#: floor setups measured: worker threads of the thread-pool server (few threads = fewer GIL hand-offs; which count
#: wins is the machine's), and "aio" for grpcio's asyncio server
FLOOR_SETUPS = ("1", "2", "4", "aio")
SWEEP = (1, 4, 16, 32, 64)
QUICK_SWEEP = (1, 32)
HEADLINE = 32

MLSERVER_RUNTIME = '''
"""The seed MLP in numpy for MLServer (written by leanserve bench/compare.py)."""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class NumpyMLP(MLModel):
    async def load(self) -> bool:
        with np.load(self.settings.parameters.uri) as f:
            self._layers = [(f[f"w{i}"], f[f"b{i}"]) for i in range(3)]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        h = x.reshape(x.shape[0], -1)
        for i, (w, b) in enumerate(self._layers):
            h = h @ w + b
            if i < 2:
                h = np.maximum(h, 0.0)
        e = np.exp(h - h.max(axis=1, keepdims=True))
        y = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("output", y)])
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 32 only, 2 s points")
    p.add_argument("--duration", type=float, help="seconds measured per point (default 5, quick 2)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, nargs="+", help=f"closed-loop sweep (default {' '.join(map(str, SWEEP))})")
    p.add_argument("--procs", type=int, default=2, help="client processes per point")
    p.add_argument("--rate", type=float, default=0.0,
                   help="also an open-loop point at this many requests/s offered to every system (0 = none)")
    p.add_argument("--rate-threads", type=int, default=32, help="client threads of the open-loop point")
    p.add_argument("--rounds", type=int, default=1, help="measure every system this many times, in alternation")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--shared-connection", action="store_true",
                   help="one connection per client process (gRPC's default) instead of one per client thread")
    p.add_argument("--mlserver-setups", nargs="+", default=[f"{w}:{b}" for w, b in MLSERVER_SETUPS],
                   help="MLServer setups as WORKERS:BATCH (parallel_workers : adaptive max_batch_size, <= 1 = off)")
    p.add_argument("--mlserver-batch-time", type=float, default=0.0005,
                   help="MLServer adaptive batching max_batch_time (s)")
    p.add_argument("--floor-setups", nargs="+", default=list(FLOOR_SETUPS),
                   help="setups of the bare grpcio floor server: a number of worker threads, or 'aio' (grpc.aio); "
                   "each is measured, the best per point is the floor")
    p.add_argument("--out", type=Path, default=common.RESULTS / "compare.json")
    args = p.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.concurrency = args.concurrency or list(QUICK_SWEEP if args.quick else SWEEP)
    return args


def ensure_mlserver_venv() -> Path:
    """MLServer's own virtualenv (its pins clash with ours); created on first use. Returns its bin folder."""
    bin_dir = MLSERVER_VENV / "bin"
    marker = MLSERVER_VENV / "bench-pins.txt"
    if not (bin_dir / "python").exists():
        print(f"creating {MLSERVER_VENV} (python3.11 -m venv)", flush=True)
        subprocess.run(["python3.11", "-m", "venv", str(MLSERVER_VENV)], check=True, timeout=300)
    if not marker.exists() or marker.read_text().split() != MLSERVER_PINS:
        print(f"pip install {' '.join(MLSERVER_PINS)} into {MLSERVER_VENV}", flush=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", *MLSERVER_PINS], check=True, timeout=1800)
        marker.write_text("\n".join(MLSERVER_PINS))
    return bin_dir


def mlserver_version(bin_dir: Path) -> dict[str, str]:
    """Installed versions of what matters in the MLServer venv (for the record)."""
    out = subprocess.run([str(bin_dir / "pip"), "freeze"], capture_output=True, text=True, timeout=120).stdout
    keep = ("mlserver", "numpy", "grpcio", "protobuf", "uvicorn", "fastapi", "uvloop")
    pins = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {k: v for k, v in pins.items() if k.lower() in keep}


def start_mlserver(workdir: Path, npz: Path, args: argparse.Namespace, workers: int,
                   batch_size: int) -> tuple[common.ServerProcess, dict[str, Any]]:
    """Write settings.json, model-settings.json and the runtime into ``workdir`` and start ``mlserver start``."""
    bin_dir = ensure_mlserver_venv()
    model_dir = workdir / "seed"
    model_dir.mkdir(parents=True)
    (model_dir / "runtime.py").write_text(MLSERVER_RUNTIME)
    grpc_port, http_port, metrics_port = common.free_port(), common.free_port(), common.free_port()
    server_settings = {"host": common.HOST, "http_port": http_port, "grpc_port": grpc_port,
                       "metrics_port": metrics_port, "debug": False, "parallel_workers": workers}
    model_settings: dict[str, Any] = {
        "name": common.MODEL_NAME, "implementation": "runtime.NumpyMLP",
        "parameters": {"uri": str(npz)},
    }
    if batch_size > 1:
        model_settings.update(max_batch_size=batch_size, max_batch_time=args.mlserver_batch_time)
    (workdir / "settings.json").write_text(json.dumps(server_settings))
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
    server = common.ServerProcess("mlserver", [str(bin_dir / "mlserver"), "start", str(workdir)], port=grpc_port)
    server.start(ready_timeout=180)
    return server, {"settings.json": server_settings, "model-settings.json": model_settings,
                    "versions": mlserver_version(bin_dir)}


def start_system(name: str, tmp: Path, h5: Path, npz: Path, args: argparse.Namespace) -> tuple[common.ServerProcess, dict]:
    """Start one system with the seed model loaded; returns it and what to record about its configuration."""
    if name in ("leanserve", "leanserve-2p"):
        env = {"LEANSERVE_PROCESSES": "2"} if name == "leanserve-2p" else {}
        server = common.start_leanserve(tmp / name, name=name, env=env)
        common.upload_seed(server.target, h5)
        wait_all_processes(server.target)
        return server, {"settings": f"defaults except {env or 'nothing'}; V2 endpoint"}
    if name.startswith(("floor:", "floor-model:")):
        kind, setup = name.split(":")
        argv = [str(common.VENV_BIN / "python"), str(common.ROOT / "bench" / "floor_server.py"),
                *(["--aio"] if setup == "aio" else ["--workers", setup]),
                *(["--model", str(npz)] if kind == "floor-model" else [])]
        what = "bare grpcio" if kind == "floor" else "bare grpcio computing the model with leanserve's kernel"
        return common.ServerProcess(name, argv).start(), {"settings": f"{what}, {setup_label(name)}"}
    if name.startswith("mlserver:"):
        workers, batch = (int(v) for v in name.split(":")[1:])
        return start_mlserver(tmp / name.replace(":", "-"), npz, args, workers, batch)
    if name == "seed-keras":
        argv = [str(common.VENV_BIN / "python"), str(common.ROOT / "bench" / "seed_server.py"), "--model", str(h5)]
        return common.ServerProcess("seed-keras", argv).start(), {"settings": "Keras model.predict per request, 16 threads"}
    raise ValueError(f"unknown system {name!r}")


def setup_label(system: str) -> str:
    """What a measured setup ("mlserver:W:B", "floor:T", "floor:aio") was, in words."""
    kind, *values = system.split(":")
    if kind in ("floor", "floor-model"):
        return "grpc.aio server" if values[0] == "aio" else f"{values[0]} worker thread(s)"
    workers, batch = (int(v) for v in values)
    return f"parallel_workers={workers}, adaptive batching {'max_batch_size=' + str(batch) if batch > 1 else 'off'}"


def best_setups(points: list[common.Point]) -> list[common.Point]:
    """The points of systems measured in several setups ("floor:T", "mlserver:W:B") replaced by, per system and
    concurrency, the setup with the highest throughput (series ``floor``, ``mlserver``; the setup named in its
    label) and, for MLServer, its out-of-the-box setup (``mlserver-default``). Other points pass unchanged."""
    from dataclasses import replace

    out = [p for p in points if ":" not in p.system]
    for kind in dict.fromkeys(p.system.split(":")[0] for p in points if ":" in p.system):
        setups = [p for p in points if p.system.startswith(kind + ":")]
        for key in dict.fromkeys(point_key(p) for p in setups):
            at = [p for p in setups if point_key(p) == key]
            kept_up = [p for p in at if p.loop == "open" and p.throughput >= 0.95 * p.target_rate]
            best = min(kept_up, key=lambda p: p.p99_ms) if kept_up else max(at, key=lambda p: p.throughput)
            out.append(replace(best, system=kind, label=f"best: {setup_label(best.system)}"))
            default = next((p for p in at if p.system == f"mlserver:{MLSERVER_DEFAULT[0]}:{MLSERVER_DEFAULT[1]}"),
                           None)
            if default is not None:
                out.append(replace(default, system="mlserver-default", label=""))
    return out


def wait_all_processes(target: str, timeout: float = 60.0) -> None:
    """Until the uploaded model answers on fresh connections (extra processes pick it up by polling)."""
    import grpc

    from leanserve.client.client import Client

    x = np.zeros((1, common.IN_FEATURES), np.float32)
    end = time.monotonic() + timeout
    while True:
        try:
            for _ in range(8):
                channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                with Client(channel=channel, timeout=10) as c:
                    c.predict(common.MODEL_NAME, x)
            return
        except Exception:  # noqa: BLE001 -- NOT_FOUND until every process polled the repository
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def point_key(p: common.Point) -> str:
    """What a point is compared by: "32" (closed loop, 32 clients) or "600/s" (open loop, 600 requests/s offered)."""
    return f"{p.target_rate:g}/s" if p.loop == "open" else str(p.concurrency)


def key_text(key: str) -> str:
    return f"{key} offered (open loop)" if key.endswith("/s") else f"{key} clients"


def median_points(points: list[common.Point]) -> list[common.Point]:
    """Per (system, point), the round with the median throughput (closed loop) or p99 (open loop): a real point,
    not a mix of rounds."""
    out = []
    for key in dict.fromkeys((p.system, point_key(p)) for p in points):
        runs = sorted((p for p in points if (p.system, point_key(p)) == key),
                      key=lambda p: p.p99_ms if p.loop == "open" else p.throughput)
        out.append(runs[(len(runs) - 1) // 2])
    return out


def ratios(points: list[common.Point]) -> dict[str, Any]:
    """Each leanserve configuration / each peer: throughput (higher is better), p50 and p99 (lower is better)."""
    out: dict[str, Any] = {}
    systems = {p.system for p in points}
    for lean_name in sorted(s for s in systems if s.startswith("leanserve")):
        lean = {point_key(p): p for p in points if p.system == lean_name}
        for peer in sorted(s for s in systems if not s.startswith("leanserve")):
            for p in points:
                if p.system == peer and point_key(p) in lean and p.throughput > 0:
                    out.setdefault(f"{lean_name} / {peer}", {})[point_key(p)] = common.ratio(lean[point_key(p)], p)
    return out


def model_floor_share(points: list[common.Point]) -> dict[str, Any]:
    """Per point, floor-model / floor: what computing the model in the request path leaves of the canned floor."""
    floor = {point_key(p): p for p in points if p.system == "floor"}
    return {point_key(p): common.ratio(p, floor[point_key(p)])
            for p in points if p.system == "floor-model" and point_key(p) in floor}


def main(argv: list[str] | None = None) -> int:
    """Measure every system in turn, print the table, write JSON and the plot."""
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=150)
    report: dict[str, Any] = {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                              "systems": {}}
    points: list[common.Point] = []
    rounds: list[list[common.Point]] = []
    with tempfile.TemporaryDirectory(prefix="leanserve-compare-") as tmpdir:
        tmp = Path(tmpdir)
        h5, npz = common.save_seed_model(tmp / "model")
        oracle = common.numpy_mlp(npz)
        x = np.random.default_rng(7).random((1, common.IN_FEATURES), dtype=np.float32)
        runs = []
        for name in args.systems:
            if name in ("floor", "floor-model"):
                runs += [f"{name}:{w}" for w in args.floor_setups]
            elif name == "mlserver":
                runs += [f"mlserver:{s}" for s in args.mlserver_setups]
            else:
                runs.append(name)
        for round_no, name in ((r, n) for r in range(args.rounds) for n in runs):
            if name == runs[0]:
                rounds.append([])
            console.print(f"[bold]{name}[/]: starting (round {round_no + 1} of {args.rounds})")
            server, config = start_system(name, tmp / f"round{round_no}", h5, npz, args)
            try:
                ok, value = loadgen.v2_probe(server.target, common.MODEL_NAME, "input", x, timeout=120)
                if not ok:
                    raise RuntimeError(f"{name} failed its first request: {value}\n{server.log_tail()}")
                if not name.startswith("floor:"):  # the floor computes nothing: its answer is zeros by design
                    config["max_abs_error_vs_numpy"] = float(np.abs(np.asarray(value) - oracle(x)).max())
                report["systems"][name] = config
                for conc in args.concurrency:
                    load = loadgen.Load(server.target, "v2", "unary", common.MODEL_NAME, "input", common.IN_FEATURES,
                                        conc, duration=args.duration, warmup=args.warmup, procs=args.procs,
                                        own_connection=not args.shared_connection)
                    rounds[-1].append(common.measure(load, system=name, server_pid=server.proc.pid))
                if args.rate > 0:
                    load = loadgen.Load(server.target, "v2", "unary", common.MODEL_NAME, "input", common.IN_FEATURES,
                                        args.rate_threads, duration=args.duration, warmup=args.warmup,
                                        procs=args.procs, own_connection=not args.shared_connection, rate=args.rate)
                    rounds[-1].append(common.measure(load, system=name, server_pid=server.proc.pid))
            finally:
                server.stop()

    rounds = [best_setups(got) for got in rounds]
    points = median_points([p for got in rounds for p in got])
    report["points"] = points
    report["ratios_leanserve_over_peer"] = ratios(points)
    if args.rounds > 1:
        report["rounds"] = [{"points": got, "ratios_leanserve_over_peer": ratios(got)} for got in rounds]
    for pair, by_conc in report["ratios_leanserve_over_peer"].items():
        at = by_conc.get(str(HEADLINE))
        if at and pair.endswith("/ floor"):
            report.setdefault("goals_at_32", {})[pair] = {
                "throughput_ratio": at["throughput_ratio"], "throughput_goal": 0.85,
                "server_cpu_ratio": at["server_cpu_ratio"], "met": at["throughput_ratio"] >= 0.85}
        if at and pair.endswith("/ mlserver"):
            report.setdefault("goals_at_32", {})[pair] = {
                "throughput_ratio": at["throughput_ratio"], "throughput_goal": 1.6, "p99_ratio": at["p99_ratio"],
                "p99_goal": 1.0, "met": at["throughput_ratio"] >= 1.6 and at["p99_ratio"] <= 1.0}
    common.write_json(args.out, report)
    png = common.plot_sweep([p for p in points if p.loop == "closed"], args.out.with_name("compare.png"),
                            "seed MLP, batch-1 V2 requests (tritonclient.grpc, closed loop)")
    console.print(common.points_table(points, "same V2 load, same model, same machine"))
    for pair, by_conc in report["ratios_leanserve_over_peer"].items():
        for conc, r in by_conc.items():
            each = [got["ratios_leanserve_over_peer"].get(pair, {}).get(conc) for got in report.get("rounds", [])]
            spread = ", ".join(f"×{e['throughput_ratio']:.2f}" for e in each if e)
            console.print(f"{pair} at {key_text(conc)}: {common.ratio_text(r)}"
                          + (f" (throughput per round: {spread})" if spread else ""))
    model_share = model_floor_share(points)
    if model_share:
        report["floor_model_over_floor"] = model_share
        for key, r in model_share.items():
            console.print(f"floor-model / floor at {key_text(key)} (the most a server computing the model in its "
                          f"request path reaches): {common.ratio_text(r)}")
    for pair, goal in report.get("goals_at_32", {}).items():
        cpu = goal.get("server_cpu_ratio", float("nan"))
        console.print(f"goal at 32 clients for {pair} (throughput ≥ ×{goal['throughput_goal']}"
                      f"{', p99 ≤ ×1' if 'p99_goal' in goal else ''}): {'MET' if goal['met'] else 'NOT MET'}"
                      + (f" (server CPU per request ×{cpu:.2f} the floor's)" if cpu == cpu else ""))
    console.print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
