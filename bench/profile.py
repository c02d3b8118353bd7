"""Where a batch-1 V2 request's time goes: leanserve and the bare grpcio floor, profiled under the same load.

Each server is started under ``py-spy record --gil`` (sampling only the thread that holds the GIL: this server is
GIL-bound, so GIL time is the cost that limits throughput) while independent tritonclient processes drive the
closed-loop batch-1 ModelInfer load of bench/compare.py. Every sample is put in one stage by the innermost frame
that names one (see ``STAGES``), and each stage is reported as microseconds of GIL time per completed request.

    python bench/profile.py [--duration 20] [--concurrency 32] [--systems leanserve floor] [--env K=V ...]

Needs py-spy (``pip install py-spy``; it starts the server as its child, so no ptrace permission is needed).
Prints the table and writes bench/results/profile.json.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loadgen  # noqa: E402

#: (stage, pattern on "function (file:line)" frames), tried from the innermost frame outwards; first match wins
STAGES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(p)) for name, p in (
    ("kernel (model math)", r"(kernels/|runtime/plan\.py|runtime/tf_runtime)"),
    ("batcher hand-off", r"serving/batching\.py"),
    ("validation", r"serving/validation\.py"),
    ("post-processing", r"serving/postprocess\.py"),
    ("stats and metrics", r"serving/(stats|metrics)\.py"),
    ("registry lookup", r"serving/registry\.py"),
    ("decode request", r"(v2_converters\.py:\d+\)$|infer_request|_tensor \(|codec\.py)"),
    ("encode response", r"infer_response"),
    ("dataplane", r"dataplane\.py"),
    ("servicer", r"(v2_servicer|inference_servicer)\.py"),
    ("interceptors", r"grpc/(interceptors|auth)\.py"),
    ("floor handler", r"floor_server\.py"),
    ("grpc: serialize + send", r"(_send_response|_serialize_response|SerializeToString|_unary_response_in_pool)"),
    ("grpc: receive + deserialize", r"(_unary_request|FromString|_deserialize)"),
    ("grpc: poll + dispatch", r"grpc/_server\.py"),
    ("thread pool", r"concurrent/futures/thread\.py|threading\.py|serving/workers\.py"),
))


#: stacks of start-up and the model upload (conversion, reference check, autotuning, imports): not request work
SETUP = re.compile(r"(ingest/|UploadModel|tensorflow|keras|tuning\.py|autotune|warmup|load_all|frozen importlib|"
                   r"create_server|cmd_serve|plan\.py:\d+\);.*reference)")


def classify(stack: str) -> str:
    """The stage of one collapsed stack (outermost frame first, ``;``-separated)."""
    if SETUP.search(stack):
        return "setup"
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, pattern in STAGES:
            if pattern.search(frame):
                return name
    return "other"


def parse_raw(path: Path) -> Counter[str]:
    """Samples per stage from py-spy's raw (collapsed) output."""
    stages: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stages[classify(stack)] += int(count)
    return stages


def run_one(system: str, args: argparse.Namespace, tmp: Path, h5: Path) -> dict[str, Any]:
    """Start ``system`` under py-spy, load it, stop it; samples per stage and completed requests."""
    raw = tmp / f"{system}.raw"
    spy = [shutil.which("py-spy") or str(common.VENV_BIN / "py-spy"), "record", "--gil", "--format", "raw",
           "--rate", str(args.rate), "--duration", "3600", "-o", str(raw), "--"]
    env = {"LEANSERVE_METRICS_PORT": "0", "LEANSERVE_LOG_LEVEL": "WARNING"}
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    if system == "floor":
        argv = [str(common.VENV_BIN / "python"), str(common.ROOT / "bench" / "floor_server.py"),
                "--workers", str(args.floor_workers)]
    else:
        argv = [str(common.VENV_BIN / "leanserve"), "serve", "--host", common.HOST, "--port", "0", "--repository",
                str(tmp / "repo")]
    server = common.ServerProcess(system, spy + argv, env).start()
    try:
        if system != "floor":
            common.upload_seed(server.target, h5)
        load = loadgen.Load(server.target, "v2", "unary", common.MODEL_NAME, "input", common.IN_FEATURES,
                            args.concurrency, duration=args.duration, warmup=args.warmup, procs=args.procs)
        point = common.measure(load, system=system)
    finally:
        stop_profiled(server)
    shutil.copy(raw, args.out.with_name(f"profile-{system}.raw.tmp"))  # kept for a closer look (not committed)
    stages = parse_raw(raw)
    total = sum(stages.values())
    # samples cover the whole run (start, upload, warm-up, load, stop): only those taken while the load ran count,
    # which are the ones of the request path; idle threads are not sampled (--gil)
    seconds = total / args.rate
    requests = max(point.throughput * (args.duration + args.warmup), 1)
    per_request_us = {k: v / args.rate / requests * 1e6 for k, v in stages.items() if k not in ("setup",)}
    return {"system": system, "throughput": point.throughput, "p99_ms": point.p99_ms, "samples": dict(stages),
            "gil_seconds": seconds, "us_per_request": per_request_us}


def stop_profiled(server: common.ServerProcess) -> None:
    """SIGTERM the profiled server (py-spy's child) so py-spy writes its file and exits, then clean up."""
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    try:
        server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--floor-workers", type=int, default=2, help="threads of the floor server (2: its best here)")
    p.add_argument("--systems", nargs="+", default=["floor", "leanserve"])
    p.add_argument("--env", nargs="*", default=[], help="LEANSERVE_* settings for the leanserve run, as K=V")
    p.add_argument("--out", type=Path, default=common.RESULTS / "profile.json")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="leanserve-profile-") as d:
        tmp = Path(d)
        h5, _ = common.save_seed_model(tmp / "model")
        for system in args.systems:
            results.append(run_one(system, args, tmp, h5))
    stages = sorted({s for r in results for s in r["us_per_request"]},
                    key=lambda s: -max(r["us_per_request"].get(s, 0) for r in results))
    print(f"\nGIL time per completed request (µs), {args.concurrency} closed-loop batch-1 V2 clients")
    print(f"{'stage':<32}" + "".join(f"{r['system']:>14}" for r in results))
    for s in stages:
        print(f"{s:<32}" + "".join(f"{r['us_per_request'].get(s, 0):>14.1f}" for r in results))
    print(f"{'total':<32}" + "".join(f"{sum(r['us_per_request'].values()):>14.1f}" for r in results))
    print(f"{'req/s':<32}" + "".join(f"{r['throughput']:>14,.0f}" for r in results))
    common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
