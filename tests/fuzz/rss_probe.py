"""Measure what refusing hostile uploads costs in memory, in a process of its own (run by
tests/server/ingest/test_memory_bounds.py): ``python -m tests.fuzz.rss_probe WORKDIR`` starts a real server on
127.0.0.1:0, warms every code path once, then for each attack resets the peak-RSS counter (``/proc/self/clear_refs``),
sends the attack through a client and prints one JSON line: name, bytes sent, status code, peak RSS growth."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import grpc
import numpy as np

from leanserve.client import Client
from leanserve.server.app import create_server
from leanserve.server.repository import artifacts
from leanserve.server.settings import Settings
from tests.fuzz import hostile

MB = 1 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(name: str, data: bytes, send) -> dict[str, object]:
    """Peak RSS above the current RSS while ``send(data)`` runs, and the status code it ended with."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    try:
        send(data)
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return {"name": name, "bytes": len(data), "code": code, "growth": _status("VmHWM") - before}


def attacks(work: Path, keras_file: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, "upload" | "optimize")."""
    manifest, _ = hostile.files(hostile.plan("dense_f32"))
    text = json.dumps(manifest).encode()
    own_bomb = hostile.bomb_zip({artifacts.MANIFEST: text, artifacts.WEIGHTS: 600 * MB})
    with zipfile.ZipFile(keras_file) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    for layer in config["config"]["layers"]:
        layer.pop("build_config", None)
    config["config"]["layers"][1]["config"]["units"] = 20_000_000
    wide = hostile.zip_of({**members, "config.json": json.dumps(config).encode()})
    # an honest-looking archive under max_unpacked_bytes (1 GiB) whose weights would be refused later: it must be
    # refused for its expansion, not inflated
    under_cap = hostile.bomb_zip({artifacts.MANIFEST: text, artifacts.WEIGHTS: 300 * MB})
    import h5py

    hollow = work / "hollow.h5"
    hollow.write_bytes((work / "good.h5").read_bytes())
    with h5py.File(hollow, "r+") as f:  # a dataset whose unwritten chunks would read as 400 MB of zeros
        f["model_weights"].create_dataset("hollow", shape=(100_000_000,), dtype="f4", chunks=(1 << 20,))
    npz = hostile.npz_of({"x": hostile.npy_bytes(np.zeros((512 * MB // 4 // 64, 64), np.float32))})
    return {
        "leanserve bomb": (own_bomb, "upload"),
        "leanserve bomb, lying directory": (hostile.declare_size(own_bomb, artifacts.WEIGHTS, 100), "upload"),
        "leanserve bomb under the cap": (under_cap, "upload"),
        "keras bomb": (hostile.bomb_zip({**members, "assets/pad.bin": 900 * MB}), "upload"),
        "keras weights bomb": (hostile.bomb_zip({**members, "model.weights.h5": 900 * MB}), "upload"),
        "keras layers wider than the file": (wide, "upload"),
        "h5 dataset larger than the file": (hollow.read_bytes(), "upload"),
        "npz bomb (512 MiB)": (npz, "optimize"),
    }


def main(work: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((8,), name="x"), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.save(work / "good.keras")
    model.save(work / "good.h5")
    settings = Settings(host="127.0.0.1", port=0, repository=work / "models", metrics=False, reference_samples=16,
                        autotune=False, warmup_batch_sizes=(1,), worker_threads=8, max_open_streams=2,
                        shutdown_grace_seconds=0.5)
    handle = create_server(settings)
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=300) as client:
            def upload(data: bytes) -> None:
                hostile.upload_raw(client, data)

            def optimize(data: bytes) -> None:
                path = work / "data.npz"
                path.write_bytes(data)
                client.optimize("good", path, sparsity=0.5)

            client.upload(work / "good.h5", "good")
            client.upload(work / "good.keras", "good")
            client.predict("good", np.ones((1, 8), np.float32))
            found = attacks(work, work / "good.keras")
            for name, (data, how) in found.items():  # warm every path (imports, first-use buffers) once
                measure(name, data, upload if how == "upload" else optimize)
            for name, (data, how) in found.items():
                print(json.dumps(measure(name, data, upload if how == "upload" else optimize)), flush=True)
    finally:
        handle.stop(0.5)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
