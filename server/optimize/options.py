"""The options of one optimization, transport-free and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository.manifest import check_description

MAX_SPARSITY = 0.99
MAX_BLOCK_SIDE = 64
#: sparsity levels the search tries below the target (the target itself is always tried)
SEARCH_SPARSITIES: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class OptimizeOptions:
    """What the caller asked for (see optimize_service.proto's OptimizeOptions for each field's meaning)."""

    model_name: str
    version: int = 0
    target_sparsity: float = 0.0
    block: tuple[int, int] | None = None
    granularity: str = "per_layer"  # "per_layer" | "global"
    quantize: str = "none"  # "none" | "int8"
    max_accuracy_drop: float = 0.01
    #: None: the server decides (fine-tunes when the data allows it); 0: one-shot pruning; N: N epochs
    epochs: int | None = None
    search: bool = False
    promote: bool = False
    data_size_bytes: int = 0
    description: str = ""
    #: bound of the whole search in seconds; 0: the server's default (settings.optimize_time_budget_seconds)
    time_budget_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block"] = format_block(self.block)
        return d

    @property
    def int8(self) -> bool:
        return self.quantize == "int8"


def parse_block(text: str) -> tuple[int, int] | None:
    """``"16x1"`` -> ``(16, 1)``; empty or ``"unstructured"`` -> None; InvalidArgument otherwise."""
    text = (text or "").strip().lower()
    if text in ("", "unstructured", "none", "1x1"):
        return None
    try:
        r, c = (int(v) for v in text.split("x"))
    except ValueError:
        raise InvalidArgument(f"block must look like 'RxC' (e.g. '16x1'), got {text!r}") from None
    if not (1 <= r <= MAX_BLOCK_SIDE and 1 <= c <= MAX_BLOCK_SIDE):
        raise InvalidArgument(f"block sides must be in 1..{MAX_BLOCK_SIDE}, got {text!r}")
    return r, c


def format_block(block: tuple[int, int] | None) -> str:
    return "" if block is None else f"{block[0]}x{block[1]}"


def validate(opts: OptimizeOptions, *, max_epochs: int, max_data_bytes: int,
             max_time_budget_seconds: float = float("inf")) -> OptimizeOptions:
    """Return ``opts`` or raise InvalidArgument / ResourceExhausted naming the bad option."""
    from leanserve.server.errors import ResourceExhausted

    if not opts.model_name:
        raise InvalidArgument("model_name is required")
    check_description(opts.description)
    if not 0.0 <= opts.target_sparsity <= MAX_SPARSITY:
        raise InvalidArgument(f"target_sparsity must be in [0, {MAX_SPARSITY}], got {opts.target_sparsity}")
    if opts.granularity not in ("per_layer", "global"):
        raise InvalidArgument(f"granularity must be 'per_layer' or 'global', got {opts.granularity!r}")
    if opts.quantize not in ("none", "int8"):
        raise InvalidArgument(f"quantize must be 'none' or 'int8', got {opts.quantize!r}")
    if not 0.0 <= opts.max_accuracy_drop <= 1.0:
        raise InvalidArgument(f"max_accuracy_drop is a fraction in [0, 1], got {opts.max_accuracy_drop}")
    if opts.epochs is not None and not 0 <= opts.epochs <= max_epochs:
        raise InvalidArgument(f"epochs must be in 0..{max_epochs}, got {opts.epochs}")
    if opts.epochs and opts.target_sparsity == 0.0:
        raise InvalidArgument("epochs > 0 fine-tunes the pruned model: set target_sparsity > 0")
    if opts.epochs and not opts.data_size_bytes:
        raise InvalidArgument("fine-tuning (epochs > 0) needs data: x, with y for labelled data, in the .npz")
    if not 0.0 <= opts.time_budget_seconds <= max_time_budget_seconds:
        raise InvalidArgument(f"time_budget_seconds must be in [0, {max_time_budget_seconds:g}] (0 = the server's "
                              f"default), got {opts.time_budget_seconds}")
    if opts.target_sparsity == 0.0 and not opts.int8:
        raise InvalidArgument("nothing to do: set target_sparsity > 0 and/or quantize int8")
    if opts.data_size_bytes < 0:
        raise InvalidArgument("data_size_bytes must not be negative")
    if opts.data_size_bytes > max_data_bytes:
        raise ResourceExhausted(f"optimization data of {opts.data_size_bytes} bytes exceeds the limit of "
                                f"{max_data_bytes} bytes")
    return opts
