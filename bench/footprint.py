"""What one batch-1 V2 request touches with cold caches, stage by stage: counted under valgrind, not timed.

On a two-core machine shared with other tenants, the same request costs ×3-×4 its hot-loop time while serving (its
code and data are evicted between requests, by the clients and by the neighbours), and timings of it swing by ×2
from one run to the next. Counting does not: callgrind simulates the caches, so the instructions and the cache lines
each stage fetches from memory come out the same on every run. Each stage runs ``--calls`` times, each time after
a sum over an array twice the simulated last-level cache (every line evicted); the cost of that eviction loop alone
is subtracted.

Stages: ``floor`` is what the bare grpcio floor (floor_server.py) does per request (parse the request, serialize a
canned answer); ``request`` is leanserve's whole handler as the server runs it (the unary ModelInfer deserializer
with its header memo, ``V2Servicer.ModelInfer``, the answer's bytes); then its parts: ``decode`` (a request whose
header the memo knows), ``decode_first`` (a request decoded and checked from scratch, as the first of its header),
``dataplane`` (model lookup, validation, batcher, the kernel, statistics, post-processing), ``kernel`` (the Plan
alone), ``response`` (the answer from its cached header) and ``response_first`` (built and serialized as a message).
The model is the seed MLP's shape (1000→128→64→10, fp32, random weights), served by the same classes as a loaded
model.

``--timed`` measures the same stages on the real CPU instead, in thread CPU time per call: hot (back to back) and
cold (each call after ``--sweep-mb`` MiB were read through the caches, as the clients and other threads sharing the
cores do between two requests of a served model). Seconds, not minutes; noisier than the counts.

    python bench/footprint.py [--calls 20] [--ll-mb 32]
    python bench/footprint.py --timed [--calls 2000] [--sweep-mb 8]

Needs valgrind (``apt-get install valgrind``, not for ``--timed``); takes 5-10 minutes (the interpreter, and Numba
compiling for valgrind's CPU, run under it). Prints the table and writes bench/results/footprint.json
(footprint_timed.json with ``--timed``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

#: in the order the inner run measures them; "none" is the eviction loop alone
STAGES = ("none", "floor", "request", "decode", "decode_first", "dataplane", "kernel", "response", "response_first")
EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
#: a libpython function the inner run calls between stages; callgrind dumps its counters before each call
MARKER = "os_getppid"
LINE_BYTES = 64


def stage_calls() -> dict[str, Callable[[], Any]]:
    """The stages, ready to call (imports leanserve; runs inside valgrind)."""
    import numpy as np

    from leanserve.server.dataplane import DataPlane
    from leanserve.server.grpc import v2_converters as conv
    from leanserve.server.grpc.calls import StreamSlots, request_context
    from leanserve.server.grpc.infer_memo import MODEL_INFER, with_infer_memo
    from leanserve.server.grpc.request_decoders import REQUEST_DECODERS
    from leanserve.server.grpc.v2_servicer import V2Servicer
    from leanserve.server.repository.store import Repository
    from leanserve.server.runtime.plan import LayerSpec, build_plan
    from leanserve.server.serving.model import ServedModel, TensorSignature
    from leanserve.server.serving.registry import ModelRegistry
    from leanserve.server.settings import Settings
    from leanserve.v2 import grpc_service_pb2 as pb

    rng = np.random.default_rng(0)
    widths = (common.IN_FEATURES, 128, 64, 10)
    specs = [LayerSpec(f"dense_{i}", rng.standard_normal((k, n), np.float32) * 0.05,
                       rng.standard_normal(n, np.float32) * 0.05, "softmax" if i == 2 else "relu")
             for i, (k, n) in enumerate(zip(widths, widths[1:]))]
    plan = build_plan((common.IN_FEATURES,), specs)
    plan.warmup()
    root = Path(tempfile.mkdtemp(prefix="footprint-"))
    settings = Settings(repository=str(root), metrics=False)
    dp = DataPlane(settings, Repository(root), ModelRegistry())
    dp.serve(ServedModel(name="seed", version=1, runtime="plan", input=TensorSignature("input", "float32", widths[:1]),
                         output=TensorSignature("output", "float32", widths[-1:]), manifest={}, runner=plan,
                         output_is_probability=True, plan=plan))
    v2 = V2Servicer(dp, StreamSlots(1))

    class Context:  # what ModelInfer asks of grpc's ServicerContext
        def time_remaining(self) -> None:
            return None

        def is_active(self) -> bool:
            return True

        def add_callback(self, callback: Callable[[], None]) -> bool:
            return True

    context = Context()
    x = rng.standard_normal((1, common.IN_FEATURES), np.float32)
    request = pb.ModelInferRequest(model_name="seed")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    data = request.SerializeToString()
    decoder = with_infer_memo(REQUEST_DECODERS, settings.max_message_bytes)[MODEL_INFER]
    decoder(data)  # the first request of its header: the memo keeps it
    call = conv.infer_request(request, settings.max_message_bytes)
    ctx = request_context(context)  # type: ignore[arg-type]
    result = dp.submit("seed", None, call.inputs, call.postprocess, call.top_k, ctx).result()
    canned = conv.infer_response(result, call)
    rows = call.inputs["input"]

    def serialized(answer: Any) -> bytes:  # what grpc's response serializer does with the handler's answer
        return answer if type(answer) is bytes else answer.SerializeToString()

    return {
        "none": lambda: None,
        "floor": lambda: (pb.ModelInferRequest.FromString(data), canned.SerializeToString()),
        "request": lambda: serialized(v2.ModelInfer(decoder(data), context)),  # type: ignore[arg-type]
        "decode": lambda: decoder(data),
        "decode_first": lambda: conv.infer_request(pb.ModelInferRequest.FromString(data), settings.max_message_bytes),
        "dataplane": lambda: dp.submit("seed", None, call.inputs, call.postprocess, call.top_k, ctx).result(),
        "kernel": lambda: plan(rows),
        "response": lambda: conv.infer_response_bytes(result, call),
        "response_first": lambda: conv.infer_response(result, call).SerializeToString(),
    }


def timed(calls: int, sweep_bytes: int) -> dict[str, dict[str, float]]:
    """Thread CPU µs per call of each stage, hot and after ``sweep_bytes`` were read through the caches."""
    import time

    import numpy as np

    stages = stage_calls()
    junk = np.ones(sweep_bytes // 4, np.float32)
    out: dict[str, dict[str, float]] = {}
    for name in STAGES[1:]:
        run = stages[name]
        for _ in range(20):
            run()
        hot = np.empty(calls)
        for i in range(calls):
            t0 = time.thread_time_ns()
            run()
            hot[i] = time.thread_time_ns() - t0
        cold = np.empty(calls)
        for i in range(calls):
            junk.sum()
            t0 = time.thread_time_ns()
            run()
            cold[i] = time.thread_time_ns() - t0
        out[name] = {"hot_us": float(np.median(hot)) / 1e3, "cold_us": float(np.median(cold)) / 1e3}
    return out


def inner(calls: int, evict_bytes: int) -> None:
    """Run every stage ``calls`` times after a full eviction, calling MARKER after each stage (and before the
    first): callgrind writes one dump per stage."""
    import numpy as np

    stages = stage_calls()
    junk = np.ones(evict_bytes // 4, np.float32)
    for run in stages.values():  # compiled, allocated, cached: what a served model has done before
        for _ in range(5):
            run()
    os.getppid()  # dump 1: start-up
    for name in STAGES:
        run = stages[name]
        for _ in range(calls):
            junk.sum()
            run()
        os.getppid()


def read_dump(path: Path) -> dict[str, int]:
    events: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            return dict(zip(events, map(int, line.split()[1:])))
    raise ValueError(f"{path}: no totals (not a callgrind dump?)")


def per_call(dumps: list[dict[str, int]], calls: int) -> dict[str, dict[str, float]]:
    """Per call of each stage, minus the eviction loop's own counts."""
    by_stage = dict(zip(STAGES, dumps))
    none = by_stage["none"]
    out = {}
    for name in STAGES[1:]:
        d = {e: (by_stage[name][e] - none[e]) / calls for e in EVENTS}
        out[name] = {
            "instructions": d["Ir"],
            "l1i_misses": d["I1mr"],
            "l1d_misses": d["D1mr"] + d["D1mw"],
            "code_lines_from_memory": d["ILmr"],
            "data_lines_from_memory": d["DLmr"] + d["DLmw"],
            "kib_from_memory": (d["ILmr"] + d["DLmr"] + d["DLmw"]) * LINE_BYTES / 1024,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20, help="cold calls of each stage")
    p.add_argument("--ll-mb", type=int, default=32, help="simulated last-level cache, MiB")
    p.add_argument("--out", type=Path, default=common.RESULTS / "footprint.json")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timed", action="store_true", help="time the stages hot and cold instead (no valgrind)")
    p.add_argument("--sweep-mb", type=int, default=8, help="--timed: MiB read through the caches before a cold call")
    args = p.parse_args(argv)
    if args.timed:
        out = args.out if args.out != common.RESULTS / "footprint.json" else common.RESULTS / "footprint_timed.json"
        calls = args.calls if args.calls != 20 else 2000
        stages_t = timed(calls, args.sweep_mb << 20)
        print(f"per batch-1 request, thread CPU µs (median of {calls} calls; cold = after {args.sweep_mb} MiB read "
              f"through the caches):")
        print(f"{'stage':15s} {'hot':>8s} {'cold':>8s}")
        for name, t in stages_t.items():
            print(f"{name:15s} {t['hot_us']:8.1f} {t['cold_us']:8.1f}")
        common.write_json(out, {"machine": common.machine_info(), "args": {**vars(args), "calls": calls},
                                "stages": stages_t})
        print(f"wrote {out}")
        return 0
    ll_bytes = args.ll_mb << 20
    if args.inner:
        inner(args.calls, 2 * ll_bytes)
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [valgrind, "--tool=callgrind", "--cache-sim=yes", f"--LL={ll_bytes},16,{LINE_BYTES}",
               f"--dump-before={MARKER}", f"--callgrind-out-file={out}",
               sys.executable, str(Path(__file__).resolve()), "--inner", "--calls", str(args.calls),
               "--ll-mb", str(args.ll_mb)]
        print("running under callgrind (several minutes) ...", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        # dump 1 is the start-up, then one per stage; the final file is what ran after the last marker
        dumps = [read_dump(out.with_name(f"{out.name}.{i}")) for i in range(2, len(STAGES) + 2)]
    stages = per_call(dumps, args.calls)
    print(f"per batch-1 request, caches cold (simulated LL {args.ll_mb} MiB, {args.calls} calls per stage):")
    print(f"{'stage':10s} {'instructions':>12s} {'L1i miss':>9s} {'L1d miss':>9s} {'code lines':>11s} "
          f"{'data lines':>11s} {'KiB from memory':>16s}")
    for name, s in stages.items():
        print(f"{name:10s} {s['instructions']:12,.0f} {s['l1i_misses']:9,.0f} {s['l1d_misses']:9,.0f} "
              f"{s['code_lines_from_memory']:11,.0f} {s['data_lines_from_memory']:11,.0f} "
              f"{s['kib_from_memory']:16,.1f}")
    common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "stages": stages})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
