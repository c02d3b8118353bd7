"""Which candidates an optimization tries, in order: pure lists of recipes, built and judged by ``pipeline``.

The budget search (the default) goes the way a practitioner would, from what was asked towards what is safe, and
stops at the first candidate within budget: the requested configuration (one-shot when that is free to check, then
fine-tuned), fine-tuned longer (again from the original weights, over twice the epochs), the block shapes the
kernels serve fastest (only when no block was asked for: 1x16 before 16x1, same sparsity, smaller and faster than
unstructured), lower sparsities in steps, and finally int8 without pruning. Each step is smaller/faster than the
ones after it, so the first candidate within budget is the one to keep.

The sweep (``search=True``, the older mode) tries ascending sparsities up to the target, fp32 next to int8, and
keeps the smallest candidate within budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanserve.kernels import f32_block_supported, int8_block_supported
from leanserve.server.optimize.options import SEARCH_SPARSITIES, OptimizeOptions, format_block

#: block shapes tried when none was asked for, fastest first (bench/kernels.py: at batch 1 the 1x16 kernels
#: broadcast one input onto 16 output lanes, 16x1 blocks drop inputs in groups of 16)
FAST_BLOCKS: tuple[tuple[int, int], ...] = ((1, 16), (16, 1))
#: sparsities the budget search steps down through, below the target
LOWER_SPARSITIES: tuple[float, ...] = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)

ONE_SHOT, FINE_TUNE, LONGER, QUANTIZE = "one-shot", "fine-tune", "fine-tune longer", "quantize only"


@dataclass(frozen=True)
class Recipe:
    """One candidate: how many weights to drop, in which shape, int8 or fp32, and how the weights are made."""

    sparsity: float
    block: tuple[int, int] | None
    int8: bool
    method: str  # ONE_SHOT | FINE_TUNE | LONGER | QUANTIZE

    @property
    def label(self) -> str:
        shape = format_block(self.block) or "unstructured"
        parts = [f"{self.sparsity:.2f} {shape}" if self.sparsity else "unpruned", "int8" if self.int8 else "fp32"]
        return " ".join(parts + [self.method])

    def to_dict(self) -> dict[str, object]:
        return {"sparsity": self.sparsity, "block": format_block(self.block), "int8": self.int8,
                "method": self.method, "label": self.label}


def _block_supported(block: tuple[int, int], int8: bool) -> bool:
    return int8_block_supported(*block) if int8 else f32_block_supported(*block)


def budget_ladder(opts: OptimizeOptions, trainable: bool) -> list[Recipe]:
    """The budget search's candidates in the order they are tried (see the module docstring).

    ``trainable``: fine-tuning is possible (data, a trainable output, epochs not 0). A one-shot candidate comes
    before each fine-tuned one unless the caller asked for a number of epochs (then fine-tuning is what they
    want); one-shot costs milliseconds, and when it is within budget no training is needed."""
    s, b, q = opts.target_sparsity, opts.block, opts.int8
    if s == 0.0:
        return [Recipe(0.0, None, q, QUANTIZE)]
    explicit = bool(opts.epochs)

    def made(sparsity: float, block: tuple[int, int] | None) -> list[Recipe]:
        out = [] if (trainable and explicit) else [Recipe(sparsity, block, q, ONE_SHOT)]
        return out + ([Recipe(sparsity, block, q, FINE_TUNE)] if trainable else [])

    rungs = made(s, b)
    if trainable:
        rungs.append(Recipe(s, b, q, LONGER))
    if b is None:
        for fast in FAST_BLOCKS:
            if _block_supported(fast, q):
                rungs += made(s, fast)
    for lower in LOWER_SPARSITIES:
        if lower < s - 1e-9:
            rungs += made(lower, b)
    if q:
        rungs.append(Recipe(0.0, None, True, QUANTIZE))
    return rungs


def sweep_levels(opts: OptimizeOptions, trainable: bool) -> list[list[Recipe]]:
    """The sweep's candidates, grouped by sparsity level (ascending): int8 then fp32 when int8 was asked for."""
    levels = sorted({s for s in SEARCH_SPARSITIES if s < opts.target_sparsity} | {opts.target_sparsity})
    quants = [True, False] if opts.int8 else [False]
    method = FINE_TUNE if trainable else ONE_SHOT
    return [[Recipe(level, opts.block if level else None, q, method if level else QUANTIZE)
             for q in quants if level or q] for level in levels]
