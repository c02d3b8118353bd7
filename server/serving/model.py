"""A served model version and what a predict call returns (no protobuf, no TensorFlow)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from leanserve.server.repository.manifest import Manifest
from leanserve.server.runtime.plan import Plan
from leanserve.server.runtime.working_memory import UNBOUNDED_ROWS
from leanserve.server.serving.stats import ModelStats

if TYPE_CHECKING:
    from leanserve.server.serving.batching import Batcher


@dataclass(frozen=True)
class TensorSignature:
    """One model input or output: name, numpy dtype name, shape without the batch dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @cached_property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype (cached: building it from the name costs microseconds per request)."""
        return np.dtype(self.dtype)

    @cached_property
    def row_bytes(self) -> int:
        """Bytes of one row (a dimension of unknown size counts as 1)."""
        return math.prod(max(d, 1) for d in self.shape) * self.np_dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSignature":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(s) for s in d["shape"]))


@dataclass
class ServedModel:
    """One loaded, ready version: what the registry hands to a request."""

    name: str
    version: int
    runtime: str
    input: TensorSignature
    output: TensorSignature
    #: the version's typed manifest (a plain dict given here, e.g. by a model built in code, is parsed into one)
    manifest: Manifest
    runner: Callable[[np.ndarray], np.ndarray]
    #: True when the output already is a probability distribution (the last layer is a softmax)
    output_is_probability: bool = False
    plan: Plan | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stats: ModelStats = field(default_factory=ModelStats)
    #: set by the dataplane when the version is published; stopped when it stops being served
    batcher: Batcher | None = None
    #: the most rows one request or kernel call may take: its intermediate results stay under max_activation_bytes
    #: (server/runtime/working_memory.py); the dataplane lowers it to max_batch_size when it serves the version
    max_rows: int = UNBOUNDED_ROWS

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, Manifest):
            self.manifest = Manifest.parse({"input": self.input.to_dict(), "output": self.output.to_dict(),
                                            **self.manifest})

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run the model on an already validated batch."""
        return self.runner(x)



class PredictResult(NamedTuple):
    """Outputs of one predict call, keyed by output name (a tuple: one is built per request)."""

    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray]
