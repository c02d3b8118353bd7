"""Load generator for leanserve in the style of perf_analyzer (GitHub issue "Serving at speed", part 6).

Starts ``leanserve serve --port 0`` on a temporary repository (or targets ``--target host:port``), uploads the seed
MLP (1000→128→64→10, seeded random weights) and measures, with several client processes:

* closed loop over a concurrency sweep and open loop at ``--rate``: unary and stream, native (leanserve.v1) and
  v2 (tritonclient.grpc, when the server has the Open Inference Protocol endpoint);
* stream throughput: ``--rows`` rows through one PredictStream in batches of ``--stream-batch``, against the same
  batches run by the Plan in this process (target ≥ 50 %), and against the stream floor: the same client and batches
  through a bare grpcio server that decodes and computes nothing (floor_server.py). The server moves each message and
  then computes it, so ``1 / (1/floor + 1/Plan)`` rows/s is what a server with grpcio's transport and this Plan could
  reach on one core; the stream is reported against that bound too;
* batching overhead at concurrency 1: p50 with ``LEANSERVE_BATCHING=true`` vs ``false`` (two fresh servers).

    .venv/bin/python bench/serve.py [--quick] [--target HOST:PORT] [--rate 2000] [--duration 5]

Writes bench/results/serve.json, serve_sweep.png and prints rich tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loadgen  # noqa: E402

SWEEP = (1, 4, 16, 32, 64)
QUICK_SWEEP = (1, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="host:port of a running leanserve (default: start one)")
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 32 only, 2 s points, 200k stream rows")
    p.add_argument("--duration", type=float, help="seconds measured per point (default 5, quick 2)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each point")
    p.add_argument("--concurrency", type=int, nargs="+", help=f"closed-loop sweep (default {' '.join(map(str, SWEEP))})")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop requests/s (0 = skip)")
    p.add_argument("--procs", type=int, default=2, help="client processes per point")
    p.add_argument("--protocols", nargs="+", default=["native", "v2"], choices=["native", "v2"])
    p.add_argument("--modes", nargs="+", default=["unary", "stream"], choices=["unary", "stream"])
    p.add_argument("--rows", type=int, help="stream-throughput rows (default 1,000,000, quick 200,000)")
    p.add_argument("--stream-batch", type=int, default=256, help="rows per request in the stream-throughput test")
    p.add_argument("--stream-only", action="store_true", help="only the stream-throughput test (native and V2)")
    p.add_argument("--no-batching-check", action="store_true", help="skip the batching on/off comparison")
    p.add_argument("--out", type=Path, help="default bench/results/serve.json (serve_stream.json with --stream-only)")
    args = p.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.concurrency = args.concurrency or list(QUICK_SWEEP if args.quick else SWEEP)
    args.rows = args.rows or (200_000 if args.quick else 1_000_000)
    args.out = args.out or common.RESULTS / ("serve_stream.json" if args.stream_only else "serve.json")
    return args


def check_native(target: str, input_name: str, oracle: Any) -> float:
    """One native request, compared with the numpy oracle: the max abs error (the server must serve this model)."""
    from leanserve.client.client import Client

    x = np.random.default_rng(7).random((4, common.IN_FEATURES), dtype=np.float32)
    with Client(target, timeout=30) as c:
        y = c.predict(common.MODEL_NAME, x).output
    return float(np.abs(y - oracle(x)).max())


def stream_throughput(target: str, rows: int, batch: int, plan: Any, server_pgid: int | None = None) -> dict[str, Any]:
    """Rows/s through one native PredictStream vs the same batches through the Plan in this process. With
    ``server_pgid``: also the CPU the server (its process group) and this client process spend per message."""
    from leanserve.client.client import Client

    pool = [np.random.default_rng(i).random((batch, common.IN_FEATURES), dtype=np.float32) for i in range(16)]
    n_batches = max(1, rows // batch)
    batches = (pool[i % len(pool)] for i in range(n_batches))
    with Client(target, timeout=600) as c:
        list(c.stream(common.MODEL_NAME, iter(pool[:4])))  # warm the stream path
        server_cpu = common.process_group_cpu_s(server_pgid) if server_pgid else 0.0
        client_cpu = time.process_time()
        t = time.perf_counter()
        served = sum(out.output.shape[0] for out in c.stream(common.MODEL_NAME, batches))
        stream_s = time.perf_counter() - t
        client_cpu = time.process_time() - client_cpu
        server_cpu = common.process_group_cpu_s(server_pgid) - server_cpu if server_pgid else None
    result: dict[str, Any] = {"rows": served, "batch": batch, "stream_s": stream_s,
                              "stream_rows_per_s": served / stream_s,
                              "client_cpu_ms_per_message": 1e3 * client_cpu / n_batches}
    if server_cpu is not None:
        result["server_cpu_ms_per_message"] = 1e3 * server_cpu / n_batches
    if plan is not None:
        from leanserve.server.runtime.process import limit_blas_threads
        from leanserve.server.settings import Settings

        limit_blas_threads(Settings().blas_threads)  # the BLAS threads the server computes with, for a fair ratio
        for b in pool[:4]:
            plan(b)
        t = time.perf_counter()
        for i in range(n_batches):
            plan(pool[i % len(pool)])
        kernel_s = time.perf_counter() - t
        result.update(kernel_s=kernel_s, kernel_rows_per_s=n_batches * batch / kernel_s)
        result["stream_vs_kernel"] = result["stream_rows_per_s"] / result["kernel_rows_per_s"]
    return result


def stream_floor(rows: int, batch: int, v2: bool, input_name: str) -> dict[str, Any]:
    """The same streams through floor_server.py (grpcio alone: nothing decoded, nothing computed)."""
    argv = [str(common.VENV_BIN / "python"), str(common.ROOT / "bench" / "floor_server.py"), "--workers", "4"]
    floor = common.ServerProcess("floor", argv).start()
    try:
        st = stream_throughput(floor.target, rows, batch, None, floor.proc.pid)
        result = {"floor_rows_per_s": st["stream_rows_per_s"],
                  "floor_server_cpu_ms_per_message": st["server_cpu_ms_per_message"],
                  "floor_client_cpu_ms_per_message": st["client_cpu_ms_per_message"]}
        if v2:
            n, seconds, _ = loadgen.v2_stream_rows(floor.target, common.MODEL_NAME, input_name, max(1, rows // batch),
                                                   batch, common.IN_FEATURES)
            result["floor_v2_rows_per_s"] = n / seconds
    finally:
        floor.stop()
    return result


def load_plan(repository: Path | None, h5: Path) -> tuple[Any, str]:
    """The Plan the server serves (from its repository), or a fresh conversion of the same file with --target."""
    from leanserve.server.repository import artifacts

    if repository is not None:
        versions = sorted((repository / common.MODEL_NAME).glob("*/" + artifacts.MANIFEST))
        if versions:
            import json

            manifest = json.loads(versions[-1].read_text())
            if manifest.get("runtime") == "plan":
                blob = (versions[-1].parent / artifacts.WEIGHTS).read_bytes()
                return artifacts.plan_from_files(manifest, blob), "repository"
    from leanserve.server.ingest import build as ingest
    from leanserve.server.settings import Settings

    conv = ingest.convert("h5", h5, Settings())
    return conv.plan, "converted in-process"


def batching_overhead(
    h5: Path, tmp: Path, args: argparse.Namespace, v2: bool, input_name: str
) -> tuple[list[common.Point], dict[str, Any]]:
    """p50 at concurrency 1 (and throughput at 32) on two fresh servers: batching on and off."""
    points: list[common.Point] = []
    for enabled in ("true", "false"):
        server = common.start_leanserve(tmp / f"repo-batching-{enabled}", f"leanserve-batching-{enabled}",
                                        {"LEANSERVE_BATCHING": enabled})
        try:
            common.upload_seed(server.target, h5)
            for protocol in ["native"] + (["v2"] if v2 else []):
                for conc in (1, 32):
                    load = loadgen.Load(server.target, protocol, "unary", common.MODEL_NAME, input_name,
                                        common.IN_FEATURES, conc, duration=args.duration, warmup=args.warmup,
                                        procs=args.procs)
                    points.append(common.measure(load, label=f"batching={'on' if enabled == 'true' else 'off'}"))
        finally:
            server.stop()
    summary = {}
    for protocol in {p.protocol for p in points}:
        on = next(p for p in points if p.protocol == protocol and p.concurrency == 1 and p.label == "batching=on")
        off = next(p for p in points if p.protocol == protocol and p.concurrency == 1 and p.label == "batching=off")
        summary[protocol] = {"p50_on_ms": on.p50_ms, "p50_off_ms": off.p50_ms, "overhead_ms": on.p50_ms - off.p50_ms}
    return points, summary


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the tables, write JSON and plots."""
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=150)
    report: dict[str, Any] = {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    points: list[common.Point] = []
    with tempfile.TemporaryDirectory(prefix="leanserve-bench-") as tmpdir:
        tmp = Path(tmpdir)
        h5, npz = common.save_seed_model(tmp / "model")
        oracle = common.numpy_mlp(npz)
        server = None
        repository = None
        try:
            if args.target:
                target = args.target
            else:
                repository = tmp / "repo"
                server = common.start_leanserve(repository)
                target = server.target
            console.print(f"leanserve at {target}; uploading the seed MLP")
            input_name = common.upload_seed(target, h5)
            report["native_max_abs_error"] = check_native(target, input_name, oracle)

            x = np.random.default_rng(7).random((4, common.IN_FEATURES), dtype=np.float32)
            v2_ok, v2_value = loadgen.v2_probe(target, common.MODEL_NAME, input_name, x, timeout=10)
            v2 = v2_ok and "v2" in args.protocols
            report["v2_available"] = v2_ok
            if v2_ok:
                report["v2_max_abs_error"] = float(np.abs(v2_value - oracle(x)).max())
            else:
                report["v2_unavailable_reason"] = v2_value
                console.print(f"[yellow]V2 endpoint not available, native only: {v2_value}")
            protocols = [p for p in args.protocols if p == "native" or v2]

            for protocol in protocols if not args.stream_only else ():
                for mode in args.modes:
                    for conc in args.concurrency:
                        load = loadgen.Load(target, protocol, mode, common.MODEL_NAME, input_name,
                                            common.IN_FEATURES, conc, duration=args.duration, warmup=args.warmup,
                                            procs=args.procs)
                        points.append(common.measure(load))
                if args.rate > 0:
                    load = loadgen.Load(target, protocol, "unary", common.MODEL_NAME, input_name, common.IN_FEATURES,
                                        64, rate=args.rate, duration=args.duration, warmup=args.warmup,
                                        procs=args.procs)
                    points.append(common.measure(load))

            plan, plan_source = load_plan(repository, h5)
            report["stream_throughput"] = st = stream_throughput(target, args.rows, args.stream_batch, plan,
                                                                 server.proc.pid if server is not None else None)
            st["kernel_plan"] = plan_source
            if v2:
                # the same batches through tritonclient's ModelStreamInfer, as many in flight as the server reads ahead
                rows, seconds, errors = loadgen.v2_stream_rows(target, common.MODEL_NAME, input_name,
                                                              max(1, args.rows // args.stream_batch),
                                                              args.stream_batch, common.IN_FEATURES)
                st.update(v2_stream_rows=rows, v2_stream_s=seconds, v2_stream_rows_per_s=rows / seconds,
                          v2_stream_errors=errors, v2_vs_native=rows / seconds / st["stream_rows_per_s"])
            st.update(stream_floor(args.rows, args.stream_batch, v2, input_name))
            st["stream_vs_floor"] = st["stream_rows_per_s"] / st["floor_rows_per_s"]
            if "kernel_rows_per_s" in st:
                st["bound_rows_per_s"] = 1 / (1 / st["floor_rows_per_s"] + 1 / st["kernel_rows_per_s"])
                st["stream_vs_bound"] = st["stream_rows_per_s"] / st["bound_rows_per_s"]
        finally:
            if server is not None:
                server.stop()

        if not args.target and not args.no_batching_check and not args.stream_only:
            batch_points, report["batching_overhead"] = batching_overhead(h5, tmp, args, v2, input_name)
            points += batch_points

    report["points"] = points
    common.write_json(args.out, report)
    png = None
    if points:
        png = common.plot_sweep([p for p in points if not p.label], args.out.with_name("serve_sweep.png"),
                                "leanserve, seed MLP, batch-1 requests")
        console.print(common.points_table(points, "leanserve load points"))
    st = report["stream_throughput"]
    console.print(
        f"stream throughput: {st['stream_rows_per_s']:,.0f} rows/s through one PredictStream (batch {st['batch']}), "
        f"kernel in-process {st.get('kernel_rows_per_s', float('nan')):,.0f} rows/s "
        f"→ {100 * st.get('stream_vs_kernel', float('nan')):.0f} % (target ≥ 50 %)"
    )
    console.print(
        f"stream floor (bare grpcio, nothing decoded or computed, same client): {st['floor_rows_per_s']:,.0f} rows/s "
        f"→ the stream is {100 * st['stream_vs_floor']:.0f} % of it; transport + compute bound "
        f"{st.get('bound_rows_per_s', float('nan')):,.0f} rows/s → {100 * st.get('stream_vs_bound', float('nan')):.0f} %"
    )
    if "server_cpu_ms_per_message" in st:
        cpu_ms = st["server_cpu_ms_per_message"] + st["client_cpu_ms_per_message"]
        console.print(
            f"CPU per message: server {st['server_cpu_ms_per_message']:.2f} ms + client "
            f"{st['client_cpu_ms_per_message']:.2f} ms (the floor's: {st['floor_server_cpu_ms_per_message']:.2f} + "
            f"{st['floor_client_cpu_ms_per_message']:.2f} ms); with server and client sharing this machine's "
            f"{os.cpu_count()} cores the stream cannot pass {os.cpu_count() * st['batch'] / cpu_ms * 1e3:,.0f} rows/s")
    if "v2_stream_rows_per_s" in st:
        console.print(f"tritonclient ModelStreamInfer, same batches: {st['v2_stream_rows_per_s']:,.0f} rows/s → "
                      f"{100 * st['v2_vs_native']:.0f} % of the native stream (target ≥ 80 %); "
                      f"V2 stream floor {st.get('floor_v2_rows_per_s', float('nan')):,.0f} rows/s"
                      + (f"; errors: {st['v2_stream_errors']}" if st["v2_stream_errors"] else ""))
    for protocol, b in report.get("batching_overhead", {}).items():
        console.print(f"batching overhead at concurrency 1 ({protocol}): p50 {b['p50_on_ms']:.3f} ms on vs "
                      f"{b['p50_off_ms']:.3f} ms off ({b['overhead_ms'] * 1e3:+.0f} µs)")
    console.print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
