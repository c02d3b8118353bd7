"""Issue 13's promise, as a new user runs it: train digits, upload, then the plain command

    leanserve optimize digits --prune 0.9 --quantize int8 --data train.npz --max-accuracy-drop 0.015

gives a promoted version, 90 % sparse and int8, within 1.5 points of the fp32 version on the 30 % of digits the
optimizer never saw, measured by predicting through the server (not read from the report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import ServerHandle
from leanserve.server.cli import main

INT8_FORMATS = {"int8", "csr_int8", "bsr_int8"}


def _digits_70_30() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # the scaling `leanserve train` uses
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target.astype(np.int64), test_size=0.3, random_state=0)
    return x_tr, y_tr, x_te, y_te


def _accuracy(client: Client, x: np.ndarray, y: np.ndarray, version: int = 0) -> tuple[float, int]:
    out = client.predict("digits", x, version=version)
    return float(np.mean(out.output.argmax(1) == y)), out.model_version


@pytest.mark.slow
def test_plain_command_lands_within_budget_and_is_promoted(client: Client, server: ServerHandle, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "digits.keras"
    assert main(["train", "--dataset", "digits", "--epochs", "20", "--out", str(model)]) == 0
    x_tr, y_tr, x_te, y_te = _digits_70_30()
    data = tmp_path / "train.npz"
    np.savez(data, x=x_tr, y=y_tr)
    client.upload(model, "digits")
    capsys.readouterr()

    rc = main(["optimize", "digits", "--prune", "0.9", "--quantize", "int8", "--data", str(data),
               "--max-accuracy-drop", "0.015", "--server", f"127.0.0.1:{server.port}", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["within_budget"] and report["promoted"], report["summary"]
    assert (report["version"], report["default_version"]) == (2, 2)
    assert report["held_out"] and report["eval_source"] == "split"
    assert report["summary"].startswith("within budget")
    # every candidate tried is reported with its quality, size and latency; the kept one is the last tried
    tried = report["candidates"]
    assert tried and all({"label", "metric", "size_bytes", "latency_b1_seconds"} <= set(c) for c in tried)
    assert tried[-1]["label"] == report["chosen"]["label"] and tried[-1]["held_out_within_budget"]
    assert report["chosen"]["sparsity"] == pytest.approx(0.9) and report["chosen"]["int8"]
    assert report["fine_tuning"] is not None  # labels were sent: the server fine-tuned without being told to

    # the promise, measured by predicting: the default is the optimized version, within 1.5 points of v1
    fp32, v_fp32 = _accuracy(client, x_te, y_te, version=1)
    optimized, v_default = _accuracy(client, x_te, y_te)
    assert (v_fp32, v_default) == (1, 2)
    assert fp32 - optimized <= 0.015, (fp32, optimized)

    info = client.info("digits")
    assert info.version == 2 and all(layer.format in INT8_FORMATS for layer in info.layers)
    weights = sum(layer.in_features * layer.out_features for layer in info.layers)
    zeros = sum(layer.sparsity * layer.in_features * layer.out_features for layer in info.layers)
    assert zeros / weights >= 0.9 - 1e-3
