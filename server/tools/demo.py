"""``leanserve demo``: the whole product in one command, printing what it does.

train the seed MLP with TensorFlow → save ``model.h5`` → start the server (port 0, a repository in the work
folder) → upload the file with the client → predict over gRPC and compare with Keras → restart the server on the
same repository → predict again → time gRPC predict against Keras ``model.predict``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()


def _step(text: str) -> None:
    console.print(f"[bold cyan]▶[/bold cyan] {text}")


def run_demo(workdir: Path, *, epochs: int = 3) -> int:
    """Run the end-to-end demo in ``workdir``; returns 0 when every check passed."""
    from leanserve.client import Client
    from leanserve.server.app import create_server
    from leanserve.server.ingest.keras_loader import import_keras
    from leanserve.server.tools.datasets import load_dataset
    from leanserve.server.settings import Settings
    from leanserve.server.tools.training import train_mlp

    workdir.mkdir(parents=True, exist_ok=True)
    model_path = workdir / "model.h5"
    _step(f"train the seed MLP (1000 → 128 → 64 → 10, Adam, cross-entropy, batch 32) on synthetic data, {epochs} epochs")
    result = train_mlp("synthetic", epochs=epochs, batch_size=32, out=model_path, seed=0)
    console.print(f"  train accuracy {result.train_accuracy:.3f}, validation accuracy {result.val_accuracy:.3f}, "
                  f"saved {model_path} ({model_path.stat().st_size:,} bytes)")

    settings = Settings(port=0, metrics_port=0, repository=workdir / "models")  # free ports: other servers may run
    _step(f"start the server on 127.0.0.1:0 with repository {settings.repository}")
    handle = create_server(settings)
    target = f"127.0.0.1:{handle.port}"
    console.print(f"  listening on {target}")
    ok = True
    try:
        with Client(target) as client:
            _step(f"upload {model_path} as 'seed-mlp'   (CLI: leanserve upload {model_path} --name seed-mlp --server {target})")
            info = client.upload(model_path, "seed-mlp")
            console.print(f"  version {info.version}, runtime {info.runtime}, layers: "
                          + ", ".join(f"{l.name}={l.format}" for l in info.layers))
            console.print(f"  reference check vs Keras on {info.reference.samples} rows: max abs error "
                          f"{info.reference.max_abs_error:.2e} ({'passed' if info.reference.passed else 'FAILED'})")

            _, _, x_val, y_val = load_dataset("synthetic", seed=0)
            keras = import_keras()
            reference = keras.models.load_model(model_path, compile=False).predict(x_val, verbose=0)
            _step(f"predict {len(x_val)} validation rows over gRPC and compare with Keras")
            served = client.predict("seed-mlp", x_val, version=info.version).output
            err = float(np.max(np.abs(served - reference)))
            acc = float(np.mean(served.argmax(1) == y_val))
            console.print(f"  max |served − keras| = {err:.2e}; accuracy {acc:.3f}")
            ok &= err <= 1e-5
            top = client.predict("seed-mlp", x_val[:3], postprocess="top_k", top_k=3)
            console.print(f"  top-3 of the first 3 rows: classes {top.outputs['indices'].tolist()}, "
                          "scores " + str([[f"{v:.3f}" for v in row] for row in top.outputs["scores"]]))
            latency = _time_grpc(client, x_val[:1])
    finally:
        handle.stop(1.0)

    _step("restart the server on the same repository and predict again")
    handle = create_server(settings)
    try:
        with Client(f"127.0.0.1:{handle.port}") as client:
            again = client.predict("seed-mlp", x_val, version=info.version).output
            console.print(f"  models after restart: {client.models()}; identical predictions: "
                          f"{bool(np.array_equal(again, served))}")
            ok &= bool(np.array_equal(again, served))
    finally:
        handle.stop(1.0)

    model = keras.models.load_model(model_path, compile=False)
    keras_latency = _time_keras(model, x_val[:1])
    table = Table("path (batch 1)", "median latency", "vs Keras model.predict")
    table.add_row("leanserve gRPC Predict", f"{latency * 1e3:.2f} ms", f"{keras_latency / latency:.1f}× faster")
    table.add_row("Keras model.predict (the seed's way)", f"{keras_latency * 1e3:.2f} ms", "1.0×")
    console.print(table)
    console.print("[bold green]demo passed[/bold green]" if ok else "[bold red]demo FAILED[/bold red]")
    return 0 if ok else 1


def _time_grpc(client, x: np.ndarray, n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.predict("seed-mlp", x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _time_keras(model, x: np.ndarray, n: int = 30) -> float:
    model.predict(x, verbose=0)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model.predict(x, verbose=0)
        times.append(time.perf_counter() - t)
    return float(np.median(times))
