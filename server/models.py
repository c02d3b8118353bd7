"""Domain types shared by the dataplane, registry and loaders (no protobuf, no TensorFlow)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from server.runtime.plan import Plan
from server.stats import ModelStats

if TYPE_CHECKING:
    from server.batching import Batcher


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
    manifest: dict[str, Any]
    runner: Callable[[np.ndarray], np.ndarray]
    #: True when the output already is a probability distribution (the last layer is a softmax)
    output_is_probability: bool = False
    plan: Plan | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stats: ModelStats = field(default_factory=ModelStats)
    #: set by the dataplane when the version is published; stopped when it stops being served
    batcher: Batcher | None = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run the model on an already validated batch."""
        return self.runner(x)


@dataclass(frozen=True)
class RequestContext:
    """What the transport knows about a call beyond its payload, in transport-free terms."""

    #: ``time.monotonic()`` after which the caller no longer wants the answer (None = no deadline)
    deadline: float | None = None
    #: False once the caller has gone away (cancelled RPC); None = cannot tell
    is_active: Callable[[], bool] | None = None


NO_CONTEXT = RequestContext()


@dataclass(frozen=True)
class UploadRequest:
    """The header of an upload, transport-free."""

    name: str
    format: str  # "keras" | "h5" | "leanserve" | "" (detect)
    size_bytes: int
    sha256: str
    description: str = ""


@dataclass(frozen=True)
class PredictResult:
    """Outputs of one predict call, keyed by output name."""

    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray]
