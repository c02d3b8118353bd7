"""The protobuf <-> domain boundary of leanserve.v1.OptimizeService (kept apart from converters.py)."""

from __future__ import annotations

import json

from leanserve.v1 import optimize_service_pb2 as pb
from leanserve.server.errors import InvalidArgument
from leanserve.server.optimize.options import OptimizeOptions, parse_block
from leanserve.server.optimize.service import Progress, Report

_GRANULARITY = {pb.PER_LAYER: "per_layer", pb.GLOBAL: "global"}
_QUANTIZATION = {pb.QUANTIZATION_NONE: "none", pb.INT8_DYNAMIC: "int8"}


def optimize_options(o: pb.OptimizeOptions) -> OptimizeOptions:
    """Domain options from the first message (values checked later by ``options.validate``)."""
    if o.granularity not in _GRANULARITY:
        raise InvalidArgument(f"unknown granularity value {o.granularity}")
    if o.quantization not in _QUANTIZATION:
        raise InvalidArgument(f"unknown quantization value {o.quantization}")
    return OptimizeOptions(
        model_name=o.model_name, version=int(o.version), target_sparsity=float(o.target_sparsity),
        block=parse_block(o.block), granularity=_GRANULARITY[o.granularity], quantize=_QUANTIZATION[o.quantization],
        max_accuracy_drop=float(o.max_accuracy_drop), epochs=int(o.epochs) if o.HasField("epochs") else None,
        search=bool(o.search), promote=bool(o.promote), data_size_bytes=int(o.data_size_bytes),
        description=o.description, time_budget_seconds=float(o.time_budget_seconds),
    )


def optimize_event(event: Progress | Report) -> pb.OptimizeEvent:
    if isinstance(event, Progress):
        return pb.OptimizeEvent(progress=pb.OptimizeProgress(stage=event.stage, fraction=event.fraction,
                                                             message=event.message))
    r = event.report
    return pb.OptimizeEvent(report=pb.OptimizeReport(
        model_name=event.model_name, version=event.version, from_version=event.from_version,
        within_budget=bool(r["within_budget"]), promoted=event.promoted, default_version=event.default_version,
        metric=r["metric"], metric_before=r["before"]["metric"], metric_after=r["after"]["metric"],
        size_bytes_before=int(r["before"]["size_bytes"]), size_bytes_after=int(r["after"]["size_bytes"]),
        report_json=json.dumps(r, sort_keys=True, default=float),
    ))
