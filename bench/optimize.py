"""Accuracy / size / latency of optimized models, through the optimizer's pipeline (the served kernels, the
autotuned formats, the budget search).

1. The plain command, ``leanserve optimize M --prune 0.9 --quantize int8 --data train.npz --max-accuracy-drop B``
   (no block shape, no epochs: the server fine-tunes and keeps searching until the budget holds), on digits (the
   seed-shaped MLP 64→128→64→10, trained like ``leanserve train --dataset digits --epochs 20``; data: 70 % of
   digits, seed 0, judged by the pipeline's own held-out share of it) and on the wide model (1000→4096→4096→10
   trained on 2,400 rows of the synthetic task; data: those rows plus 600 validation rows as x_val, which choose
   and judge). "external" is accuracy on rows the optimizer never saw (digits: the other 30 %; wide: 600 more
   validation rows), predicted with the stored plan.
2. Full run only: fixed configurations, each fine-tuned on its own (budget 1.0 so the search stops at it):
   pruned 50/80/90/95 %, int8, sparse-int8 90 % unstructured / 1x16 / 16x1.

Latencies are the pipeline's before/after medians, measured alternately in one process: compare ratios. Prints a
table and every candidate the plain commands tried, writes bench/results/optimize.json.

    .venv/bin/python bench/optimize.py [--quick] [--budget 0.01] [--time-budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# the repo root first: bench/kernels.py would otherwise shadow the kernels package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from leanserve.server.optimize import pipeline  # noqa: E402
from leanserve.server.optimize.data import OptimizeData  # noqa: E402
from leanserve.server.optimize.options import OptimizeOptions  # noqa: E402
from leanserve.server.repository.loading import served_from_plan  # noqa: E402
from leanserve.server.runtime.plan import build_plan  # noqa: E402
from leanserve.server.serving.model import ServedModel  # noqa: E402
from leanserve.server.settings import Settings  # noqa: E402
from leanserve.server.tools.datasets import load_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "optimize.json"
PLAIN: dict[str, Any] = {"target_sparsity": 0.9, "quantize": "int8"}
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("pruned 50%", {"target_sparsity": 0.5}),
    ("pruned 80%", {"target_sparsity": 0.8}),
    ("pruned 90%", {"target_sparsity": 0.9}),
    ("pruned 95%", {"target_sparsity": 0.95}),
    ("int8", {"quantize": "int8"}),
    ("sparse-int8 90%", {"target_sparsity": 0.9, "quantize": "int8"}),
    # blocks of 16 outputs: inputs are still pruned one by one, the int8 kernel broadcasts each input onto 16
    # output lanes
    ("sparse-int8 90% 1x16", {"target_sparsity": 0.9, "quantize": "int8", "block": (1, 16)}),
    # blocks of 16 inputs: inputs are dropped in groups of 16
    ("sparse-int8 90% 16x1", {"target_sparsity": 0.9, "quantize": "int8", "block": (16, 1)}),
]
CONFIG_EPOCHS = 15


def _served(name: str, plan: Any, shape: list[int], settings: Settings, source: dict[str, Any]) -> ServedModel:
    manifest = {"input": {"name": "input", "dtype": "float32", "shape": shape},
                "output": {"name": "output", "dtype": "float32", "shape": [plan.out_features]}, "source": source,
                "output_is_probability": True}
    return served_from_plan(name, 1, manifest, plan, settings)


def digits_model(settings: Settings, workdir: Path, epochs: int) -> tuple[ServedModel, OptimizeData, tuple]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from leanserve.server.ingest.keras_to_plan import keras_to_specs
    from leanserve.server.tools.training import train_mlp

    res = train_mlp("digits", epochs, out=workdir / "digits.keras", seed=0)
    shape, specs = keras_to_specs(res.model)
    d = load_digits()
    x, xe, y, ye = train_test_split((d.data / 16.0).astype(np.float32), d.target.astype(np.int64), test_size=0.3,
                                    random_state=0)
    served = _served("digits", build_plan(shape, specs), [64], settings, {"format": "keras", "file": "digits.keras"})
    return served, OptimizeData(x, y), (xe, ye)


def wide_model(settings: Settings, workdir: Path, epochs: int) -> tuple[ServedModel, OptimizeData, tuple]:
    """1000→4096→4096→10 trained (Adam, batch 32) on the synthetic task: a 4096-wide model whose accuracy means
    something, so "within budget" does too."""
    from leanserve.server.ingest.keras_loader import import_keras
    from leanserve.server.ingest.keras_to_plan import keras_to_specs

    keras = import_keras()
    keras.utils.set_random_seed(0)
    x, y, xv, yv = load_dataset("synthetic", 0, synthetic_samples=3600, val_fraction=1 / 3)  # 2,400 + 1,200
    model = keras.Sequential([keras.Input((1000,), name="input"),
                              keras.layers.Dense(4096, activation="relu", name="dense_1"),
                              keras.layers.Dense(4096, activation="relu", name="dense_2"),
                              keras.layers.Dense(10, activation="softmax", name="output")], name="wide")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    model.save(workdir / "wide.keras")
    shape, specs = keras_to_specs(model)
    served = _served("wide", build_plan(shape, specs), [1000], settings, {"format": "keras", "file": "wide.keras"})
    return served, OptimizeData(x, y, xv[:600], yv[:600]), (xv[600:], yv[600:])


def run(served: ServedModel, data: OptimizeData, external: tuple, settings: Settings, label: str,
        options: dict[str, Any], folder: Path, budget: float, time_budget: float) -> dict[str, Any]:
    opts = OptimizeOptions(served.name, max_accuracy_drop=budget, data_size_bytes=1,
                           time_budget_seconds=time_budget, **options)
    t0 = time.perf_counter()

    def progress(stage: str, fraction: float, message: str) -> None:
        if stage != "finetune" or "select" in message:
            print(f"  {served.name} {label}: {fraction:.2f} {stage} {message}", file=sys.stderr, flush=True)

    result = pipeline.run(served, folder, opts, data, settings, pipeline.JobControl(progress, lambda: False))
    r = result.report
    xv, yv = external
    assert served.plan is not None
    ext_before = float(np.mean(served.plan(xv).argmax(1) == yv))
    ext_after = float(np.mean(result.plan(xv).argmax(1) == yv))
    return {"model": served.name, "run": label, "chosen": r["chosen"]["label"], "metric": r["metric"],
            "before": r["before"]["metric"], "after": r["after"]["metric"], "held_out_rows": r["eval_rows"],
            "external_before": ext_before, "external_after": ext_after, "external_rows": int(len(xv)),
            "size_before": r["before"]["size_bytes"], "size_after": r["after"]["size_bytes"],
            "latency_before": r["before"]["latency_seconds"], "latency_after": r["after"]["latency_seconds"],
            "formats": [layer["format"] for layer in r["after"]["layers"]],
            "sparsity": 1 - sum(layer["nonzero"] for layer in r["after"]["layers"]) / sum(
                int(np.prod(layer["shape"])) for layer in r["after"]["layers"]),
            "within_budget": r["within_budget"], "budget": budget, "summary": r["summary"],
            "stopped": r["search"]["stopped"], "candidates": r["candidates"],
            "tf_max_abs_error": r["tf_reference"]["max_abs_error"], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the plain commands only")
    ap.add_argument("--budget", type=float, default=0.01, help="largest accuracy drop counted as within budget")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds per plain command's search (0: the server's default)")
    args = ap.parse_args()
    settings = Settings(optimize_latency_repeats=5 if args.quick else 15, warmup_batch_sizes=(1, 32),
                        optimize_tf_threads=os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for build, epochs in ((digits_model, 20), (wide_model, 3)):
            served, data, external = build(settings, Path(tmp), epochs)
            rows.append(run(served, data, external, settings, "plain", PLAIN, Path(tmp), args.budget,
                            args.time_budget))
            if not args.quick:
                for label, options in CONFIGS:
                    fixed = {"epochs": CONFIG_EPOCHS if options.get("target_sparsity") else 0, **options}
                    rows.append(run(served, data, external, settings, label, fixed, Path(tmp), 1.0, 0.0))

    header = (f"{'model':<7} {'run':<21} {'kept':<36} {'held-out':>15} {'external':>15} {'size KiB':>15} "
              f"{'size':>6} {'b=1 µs':>17} {'b=1 ×':>6} {'b=32 ×':>6} {'budget':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        lb, la = r["latency_before"], r["latency_after"]
        ok = r["before"] - r["after"] <= args.budget + 1e-12 if r["run"] != "plain" else r["within_budget"]
        print(f"{r['model']:<7} {r['run']:<21} {r['chosen']:<36} {r['before']:>7.4f}→{r['after']:<7.4f} "
              f"{r['external_before']:>7.4f}→{r['external_after']:<7.4f} "
              f"{r['size_before'] / 1024:>7.0f}→{r['size_after'] / 1024:<7.0f} "
              f"{r['size_after'] / r['size_before']:>6.3f} {lb['1'] * 1e6:>8.1f}→{la['1'] * 1e6:<8.1f} "
              f"{lb['1'] / la['1']:>6.2f} {lb['32'] / la['32']:>6.2f} {'ok' if ok else 'over':>6}")
    for r in rows:
        if r["run"] != "plain":
            continue
        print(f"\n{r['model']} plain command: {r['summary']}; search {r['stopped']} after {r['seconds']:.0f} s; "
              f"sparsity {r['sparsity']:.3f}, formats {','.join(r['formats'])}")
        for c in r["candidates"]:
            held = "" if c["held_out_metric"] is None else f" held-out {c['held_out_metric']:.4f}"
            print(f"  {c['label']:<36} select {c['metric']:.4f} (drop {c['drop']:+.4f}){held:<18} "
                  f"{c['size_bytes']:>10,} B  b=1 {c['latency_b1_seconds'] * 1e6:8.1f} µs  {c['seconds']:6.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"quick": args.quick, "budget": args.budget, "time_budget": args.time_budget,
                                   "rows": rows}, indent=2, default=float))
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
