"""Scaling out: the same tritonclient.grpc load (closed loop, batch-1 V2 ModelInfer, seed MLP) through

* ``leanserve serve --processes 1`` and ``--processes 2`` (one machine, SO_REUSEPORT), and
* ``leanserve ray --replicas 1`` and ``--replicas 2`` on a 2-node Ray cluster (one machine: both nodes, the proxy
  and the clients share its cores), run inside a loopback-only network namespace made for it
  (``unshare -n -p -f --mount-proc``, then ``ip link set lo up``): nothing talks to any other address.

Reports req/s, p50/p99 and the 2-over-1 scaling ratio of each; writes bench/results/scale.json.

    .venv/bin/python bench/scale.py [--quick] [--concurrency 32] [--duration 5] [--skip-ray] [--skip-processes]

Needs root (or user namespaces) for ``unshare`` and ``leanserve[ray]`` for the Ray half.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loadgen  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 s points")
    p.add_argument("--duration", type=float, help="seconds measured per point (default 5, quick 3)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients in flight")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-processes", action="store_true")
    p.add_argument("--ray-inner", type=Path, help=argparse.SUPPRESS)  # set when re-run inside the namespace
    p.add_argument("--out", type=Path, default=common.RESULTS / "scale.json")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 5.0)
    return args


def _load(target: str, args: argparse.Namespace) -> loadgen.Load:
    return loadgen.Load(target, "v2", "unary", common.MODEL_NAME, "input", common.IN_FEATURES, args.concurrency,
                        duration=args.duration, warmup=args.warmup, procs=args.procs)


def _publish(h5: Path, repository: str, env: dict[str, str]) -> None:
    subprocess.run([str(common.VENV_BIN / "leanserve"), "publish", str(h5), "--name", common.MODEL_NAME,
                    "--repository", repository], env=env, check=True, capture_output=True)


def processes_points(args: argparse.Namespace, tmp: Path, h5: Path) -> list[common.Point]:
    repo = tmp / "repo"
    _publish(h5, str(repo), {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    points = []
    for n in (1, 2):
        server = common.start_leanserve(repo, f"processes-{n}", {"LEANSERVE_PROCESSES": str(n)})
        try:
            if n > 1:
                time.sleep(5)  # the extra process reports ready before it prints; let it take connections
            points.append(common.measure(_load(server.target, args), system="leanserve", label=f"processes={n}"))
        finally:
            server.stop()
    return points


# -- Ray, inside the namespace -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_inner(args: argparse.Namespace) -> None:
    """Runs inside the loopback-only namespace: a 2-node cluster, then 1 and 2 replicas under the same load."""
    found = sorted(name for _, name in socket.if_nameindex())
    if found != ["lo"]:
        raise SystemExit(f"refusing to start Ray outside a loopback-only namespace (interfaces: {found})")
    ray = str(common.VENV_BIN / "ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEANSERVE_")}
    env.update(RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0", RAY_USAGE_STATS_ENABLED="0", TF_CPP_MIN_LOG_LEVEL="3",
               LEANSERVE_LOG_LEVEL="WARNING")
    out: dict[str, Any] = {"points": []}
    with tempfile.TemporaryDirectory(prefix="leanserve-scale-ray-") as tmpdir:
        tmp = Path(tmpdir)
        h5, _ = common.save_seed_model(tmp / "model")
        repo = tmp / "repo"  # both nodes are on this machine: a folder is a store they share
        _publish(h5, str(repo), env)
        gcs = _free_port()
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus",
                        "1", "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                       capture_output=True)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--disable-usage-stats"], env=env, check=True, capture_output=True)
        try:
            port = _free_port()  # one port: Serve keeps the gRPC options it first started with
            for replicas in (1, 2):
                proc = subprocess.Popen(
                    [str(common.VENV_BIN / "leanserve"), "ray", "--address", f"127.0.0.1:{gcs}", "--replicas",
                     str(replicas), "--port", str(port), "--repository", str(repo), "--node-ip-address",
                     "127.0.0.1", "--start-timeout", "300"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                try:
                    assert proc.stdout is not None
                    line = proc.stdout.readline()
                    if not line.startswith("listening on"):
                        raise RuntimeError(f"leanserve ray --replicas {replicas} did not start: {line!r}")
                    point = common.measure(_load(f"127.0.0.1:{port}", args), system="leanserve-ray",
                                           label=f"replicas={replicas}")
                    out["points"].append(asdict(point))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        finally:
            subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    args.ray_inner.write_text(json.dumps(out))


def ray_points(args: argparse.Namespace, tmp: Path) -> list[common.Point]:
    result = tmp / "ray.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--ray-inner", str(result), "--concurrency",
            str(args.concurrency), "--duration", str(args.duration), "--warmup", str(args.warmup), "--procs",
            str(args.procs)]
    proc = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", 'ip link set lo up && exec "$@"',
                           "sh", *argv], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the Ray run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(proc.stdout, end="")
    return [common.Point(**p) for p in json.loads(result.read_text())["points"]]


def ratios(points: list[common.Point]) -> dict[str, dict[str, float]]:
    """Throughput and latency of 2 over 1, per kind (processes, replicas)."""
    out = {}
    for kind in ("processes", "replicas"):
        one = next((p for p in points if p.label == f"{kind}=1"), None)
        two = next((p for p in points if p.label == f"{kind}=2"), None)
        if one and two and one.throughput:
            out[kind] = common.ratio(two, one)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ray_inner:
        ray_inner(args)
        return 0
    from rich.console import Console

    console = Console(width=150)
    points: list[common.Point] = []
    with tempfile.TemporaryDirectory(prefix="leanserve-scale-") as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_processes:
            h5, _ = common.save_seed_model(tmp / "model")
            points += processes_points(args, tmp, h5)
        if not args.skip_ray:
            points += ray_points(args, tmp)
    report = {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
              "points": points, "ratios_2_over_1": ratios(points)}
    common.write_json(args.out, report)
    console.print(common.points_table(points, f"seed MLP, batch-1 V2 ModelInfer, {args.concurrency} clients"))
    for kind, r in report["ratios_2_over_1"].items():
        console.print(f"{kind} 2 vs 1: {common.ratio_text(r)}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
