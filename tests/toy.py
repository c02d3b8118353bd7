"""A toy served model whose kernel can be held, for deterministic batching, deadline and queue tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from leanserve.server.serving.model import ServedModel, TensorSignature


class GatedRunner:
    """``y = 2x``. While ``gate`` is clear every call blocks; ``calls`` records the rows of each kernel call."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[int] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(int(x.shape[0]))
        self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.gate.wait(60), "test never opened the gate"
        return x * 2


def toy_model(runner: Callable[[np.ndarray], np.ndarray], name: str = "toy", version: int = 1,
              features: int = -1) -> ServedModel:
    """A float32 ``[batch, features]`` → ``[batch, features]`` model (-1 = any width)."""
    return ServedModel(
        name=name, version=version, runtime="plan", input=TensorSignature("x", "float32", (features,)),
        output=TensorSignature("y", "float32", (features,)), manifest={}, runner=runner,
    )


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll until ``predicate()`` holds (an ordering aid, never a pass/fail timing)."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.001)


def leanserve_file(folder: Path, seed: int = 0) -> tuple[Path, object]:
    """A one-layer Plan (6 features → 3, linear, random weights from ``seed``) written in the own format to
    ``folder/m<seed>.leanserve`` (no TensorFlow needed); the file and the Plan."""
    from leanserve.server.repository import artifacts
    from leanserve.server.runtime.plan import LayerSpec, build_plan

    rng = np.random.default_rng(seed)
    plan = build_plan((6,), [LayerSpec("o", rng.normal(size=(6, 3)).astype(np.float32), np.zeros(3, np.float32),
                                       "linear")])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    path = folder / f"m{seed}.leanserve"
    artifacts.write_zip(path, manifest, blob)
    return path, plan
