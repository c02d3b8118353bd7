"""Predict latency of one request at batch 1, 32 and 256: leanserve over gRPC beside the same model in process.

Side by side in one run (ratios, since this machine is shared and noisy):
  grpc          leanserve server (a subprocess) answering Predict over loopback, one caller
  plan          the same compiled Plan called in process (the kernels, no transport)
  numpy         the same weights as numpy matmuls (OpenBLAS)
  keras_call    the Keras model called directly (``model(x)``)
  keras_predict Keras ``model.predict`` — the seed's serving path

    python bench/predict.py [--quick] [--out bench/results/predict.json]
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

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
# the repo root first: bench/kernels.py would otherwise shadow the kernels package
sys.path.insert(0, str(ROOT))


def median_seconds(fn, x: np.ndarray, *, min_time: float, max_calls: int) -> float:
    """Median wall time of ``fn(x)`` over at least 5 calls, up to ``min_time`` seconds or ``max_calls`` calls."""
    fn(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_calls):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def build_seed_model(path: Path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.save(path)
    return model


def start_server(repo: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "leanserve.server.cli", "serve", "--port", "0", "--repository", str(repo),
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predict.json")
    args = parser.parse_args()
    min_time = 0.5 if args.quick else 2.0

    from rich.console import Console
    from rich.table import Table

    from leanserve.client import Client
    from leanserve.server.repository.artifacts import plan_from_files
    from leanserve.server.repository.store import Repository

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_seed_model(tmp / "model.h5")
        weights = [layer.get_weights() for layer in model.layers]
        proc, address = start_server(tmp / "repo")
        try:
            with Client(address) as client:
                client.upload(tmp / "model.h5", "seed")
                repo = Repository(tmp / "repo")
                manifest = repo.manifest("seed", 1)
                plan = plan_from_files(manifest, (repo.path("seed", 1) / "weights.safetensors").read_bytes())

                def numpy_mlp(x: np.ndarray) -> np.ndarray:
                    h = np.maximum(x @ weights[0][0] + weights[0][1], 0)
                    h = np.maximum(h @ weights[1][0] + weights[1][1], 0)
                    z = h @ weights[2][0] + weights[2][1]
                    e = np.exp(z - z.max(1, keepdims=True))
                    return e / e.sum(1, keepdims=True)

                paths = {
                    "grpc": lambda x: client.predict("seed", x),
                    "plan": plan,
                    "numpy": numpy_mlp,
                    "keras_call": lambda x: model(x, training=False),
                    "keras_predict": lambda x: model.predict(x, verbose=0),
                }
                for batch in (1, 32, 256):
                    x = np.random.default_rng(batch).normal(size=(batch, 1000)).astype(np.float32)
                    for name, fn in paths.items():
                        calls = 60 if name == "keras_predict" else 5000
                        sec = median_seconds(fn, x, min_time=min_time, max_calls=calls)
                        records.append({"path": name, "batch": batch, "median_seconds": sec})
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    by = {(r["path"], r["batch"]): r["median_seconds"] for r in records}
    for r in records:
        r["ratio_vs_keras_predict"] = by[("keras_predict", r["batch"])] / r["median_seconds"]
        r["rows_per_second"] = r["batch"] / r["median_seconds"]
    table = Table(title="seed MLP 1000→128→64→10: median latency per call (speed-up vs Keras model.predict)")
    table.add_column("path")
    for batch in (1, 32, 256):
        table.add_column(f"batch {batch}", justify="right")
    for name in ("grpc", "plan", "numpy", "keras_call", "keras_predict"):
        table.add_row(name, *(f"{by[(name, b)] * 1e6:,.0f} µs ({by[('keras_predict', b)] / by[(name, b)]:.1f}×)"
                              for b in (1, 32, 256)))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"records": records, "quick": args.quick}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
