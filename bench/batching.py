"""Dynamic batching on and off, default settings otherwise, for a small model and a large one.

Batching must keep its win where it wins and cost nothing where it cannot win. Two models, each served by fresh
``leanserve serve`` processes with ``LEANSERVE_BATCHING=true`` (the default) and ``false``, under the same closed-loop
tritonclient V2 load (batch-1 requests, several client processes):

* ``seed``  — the seed MLP 1000→128→64→10 (a few tens of µs per request: the hand-off would cost more than it saves,
  so the batcher runs it at once on the caller's thread);
* ``large`` — 2048→2048→2048→10 (millisecond batch-1 kernel calls that stream 32 MB of weights: a batch of rows
  reads them once).

    python bench/batching.py [--quick] [--concurrency 1 32] [--duration 5]

Writes bench/results/batching.json and prints a table with the on/off ratios per model and concurrency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loadgen  # noqa: E402

LARGE = (2048, 2048, 2048)


def save_large_model(directory: Path, seed: int = 0) -> Path:
    """The large MLP (2048→2048→2048→10, relu, softmax) with seeded random weights, as ``large.h5``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((LARGE[0],), name="input"),
                              keras.layers.Dense(LARGE[1], activation="relu"),
                              keras.layers.Dense(LARGE[2], activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "large.h5"
    model.save(path)
    return path


def upload(target: str, path: Path, name: str) -> str:
    from leanserve.client.client import Client

    with Client(target, timeout=600) as c:
        c.wait_ready(60)
        info = c.upload(path, name)
    return info.inputs[0].name if info.inputs else "input"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 s points")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--out", type=Path, default=common.RESULTS / "batching.json")
    args = p.parse_args(argv)
    duration = 3.0 if args.quick else args.duration
    console = Console(width=150)
    points: list[common.Point] = []
    with tempfile.TemporaryDirectory(prefix="leanserve-batching-") as tmpdir:
        tmp = Path(tmpdir)
        models = {"seed": (common.save_seed_model(tmp / "m")[0], common.IN_FEATURES),
                  "large": (save_large_model(tmp / "m"), LARGE[0])}
        for model, (path, features) in models.items():
            for batching in ("true", "false"):
                label = f"{model} batching={'on' if batching == 'true' else 'off'}"
                server = common.start_leanserve(tmp / f"repo-{model}-{batching}", name=label,
                                                env={"LEANSERVE_BATCHING": batching})
                try:
                    input_name = upload(server.target, path, model)
                    for conc in args.concurrency:
                        load = loadgen.Load(server.target, "v2", "unary", model, input_name, features, conc,
                                            duration=duration, warmup=1.0, procs=args.procs)
                        points.append(common.measure(load, system="leanserve", label=label))
                finally:
                    server.stop()
    rows: list[dict[str, Any]] = []
    table = Table(title="dynamic batching on vs off (default settings otherwise), batch-1 V2 clients")
    for col in ("model", "clients", "on req/s", "off req/s", "on/off", "on p99 ms", "off p99 ms"):
        table.add_column(col, justify="right")
    for model in ("seed", "large"):
        for conc in args.concurrency:
            on = next(pt for pt in points if pt.label == f"{model} batching=on" and pt.concurrency == conc)
            off = next(pt for pt in points if pt.label == f"{model} batching=off" and pt.concurrency == conc)
            ratio = on.throughput / off.throughput if off.throughput else float("nan")
            rows.append({"model": model, "concurrency": conc, "on_rps": on.throughput, "off_rps": off.throughput,
                         "on_over_off": ratio, "on_p99_ms": on.p99_ms, "off_p99_ms": off.p99_ms})
            table.add_row(model, str(conc), f"{on.throughput:,.0f}", f"{off.throughput:,.0f}", f"×{ratio:.2f}",
                          f"{on.p99_ms:.1f}", f"{off.p99_ms:.1f}")
    console.print(table)
    common.write_json(args.out, {"machine": common.machine_info(), "rows": rows, "points": points,
                                 "large_model": list(LARGE) + [10]})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
