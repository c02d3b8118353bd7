"""Building Optimize request streams and reading their events (shared by the sync and asyncio clients)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.v1 import optimize_service_pb2 as pb

CHUNK_BYTES = 1024 * 1024
GRANULARITY = {"per_layer": pb.PER_LAYER, "global": pb.GLOBAL}
QUANTIZATION = {"none": pb.QUANTIZATION_NONE, "": pb.QUANTIZATION_NONE, "int8": pb.INT8_DYNAMIC}

#: ``progress(stage, fraction, message)``
ProgressCallback = Callable[[str, float, str], None]


def data_bytes(data: None | str | Path | Mapping[str, np.ndarray]) -> bytes:
    """The .npz bytes to stream: read from a file, or saved from a dict of arrays (x, y, x_val, y_val)."""
    if data is None:
        return b""
    if isinstance(data, (str, Path)):
        return Path(data).read_bytes()
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in data.items()})
    return buf.getvalue()


def requests(name: str, blob: bytes, *, version: int = 0, sparsity: float = 0.0, block: str = "",
             granularity: str = "per_layer", quantize: str = "none", max_accuracy_drop: float = 0.01,
             epochs: int | None = None, search: bool = False, promote: bool = False,
             description: str = "", time_budget: float = 0.0) -> Iterator[pb.OptimizeRequest]:
    """Options first, then the data in 1 MiB chunks (``epochs`` None: the server decides).

    The options message is built now, so an option that cannot be sent (an unknown granularity or quantization,
    a negative version or epochs, a value of the wrong type) raises ``ValueError`` or ``TypeError`` here, before
    any call starts. Ranges (sparsity, accuracy drop, time budget, the most epochs) are the server's policy: it
    answers ``INVALID_ARGUMENT`` naming the option."""
    options = pb.OptimizeRequest(options=_options(
        name, len(blob), version=version, sparsity=sparsity, block=block, granularity=granularity,
        quantize=quantize, max_accuracy_drop=max_accuracy_drop, epochs=epochs, search=search, promote=promote,
        description=description, time_budget=time_budget))
    return _messages(options, blob)


def _options(name: str, size: int, *, version: int, sparsity: float, block: str, granularity: str, quantize: str,
             max_accuracy_drop: float, epochs: int | None, search: bool, promote: bool, description: str,
             time_budget: float) -> pb.OptimizeOptions:
    if granularity not in GRANULARITY:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITY)}")
    if quantize not in QUANTIZATION:
        raise ValueError("quantize must be 'none' or 'int8'")
    if version < 0:
        raise ValueError(f"version must be >= 0 (0 = the default version), got {version}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0 (None = the server decides, 0 = one-shot), got {epochs}")
    return pb.OptimizeOptions(
        model_name=name, version=version, target_sparsity=sparsity, block=block,
        granularity=GRANULARITY[granularity], quantization=QUANTIZATION[quantize],
        max_accuracy_drop=max_accuracy_drop, epochs=epochs, search=search, promote=promote,
        data_size_bytes=size, description=description, time_budget_seconds=time_budget,
    )


def _messages(options: pb.OptimizeRequest, blob: bytes) -> Iterator[pb.OptimizeRequest]:
    yield options
    for i in range(0, len(blob), CHUNK_BYTES):
        yield pb.OptimizeRequest(data_chunk=blob[i:i + CHUNK_BYTES])


def handle_event(event: pb.OptimizeEvent, progress: ProgressCallback | None) -> dict[str, Any] | None:
    """Call ``progress`` for a progress event; return the report dict for the final event."""
    if event.HasField("progress"):
        if progress:
            progress(event.progress.stage, event.progress.fraction, event.progress.message)
        return None
    return json.loads(event.report.report_json)


def final_report(report: dict[str, Any] | None) -> dict[str, Any]:
    """The report an Optimize stream ended with (RuntimeError when it ended without one)."""
    if report is None:
        raise RuntimeError("the Optimize stream ended without a report")
    return report
