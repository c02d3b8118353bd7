"""The rows of one optimization, never mixed: fine-tuning learns from the training rows; the selection rows choose
(early stopping, "is this candidate within budget?"); the held-out rows give the verdict on the candidate the search
stops at. Without ``x_val`` all three are seeded shares of ``x`` (held-out rows set aside before anything else);
with it, ``x`` trains and ``x_val`` is halved into selection and held-out rows (rows the original model was trained
on flatter it: a pruned model cannot keep what it memorised, so they would judge it unfairly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanserve.server.errors import InvalidArgument
from leanserve.server.optimize import evaluate
from leanserve.server.optimize.data import OptimizeData
from leanserve.server.optimize.evaluate import EvalSet
from leanserve.server.optimize.options import OptimizeOptions

#: fewest training rows for which the server fine-tunes on its own (an explicit epochs count needs 2)
MIN_AUTO_TRAIN_ROWS = 32
#: seeds every split (and fine-tuning's own shuffles), so an optimization is repeatable
SPLIT_SEED = 0


@dataclass
class Sets:
    """The rows of one optimization (see the module docstring)."""

    select: EvalSet
    verdict: EvalSet
    train_x: np.ndarray | None = None
    train_y: np.ndarray | None = None  # None with training rows: distillation from the original's outputs
    held_out: bool = True  # the verdict rows are disjoint from the training and selection rows


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held out) index arrays, at least one row on each side (n >= 2)."""
    idx = np.random.default_rng(seed).permutation(n)
    n_out = min(max(1, int(round(fraction * n))), n - 1)
    return idx[n_out:], idx[:n_out]


def _take(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def wants_training(opts: OptimizeOptions, output_activation: str) -> bool:
    """Fine-tune unless told not to (epochs 0), nothing is pruned, or the output is not a trainable classifier
    (an explicit epochs count then fails with FailedPrecondition)."""
    from leanserve.server.optimize.finetune import TRAINABLE_OUTPUTS, check_trainable

    if opts.epochs == 0 or opts.target_sparsity == 0.0:
        return False
    if opts.epochs:
        check_trainable(output_activation)
    return output_activation in TRAINABLE_OUTPUTS


def split_sets(data: OptimizeData | None, opts: OptimizeOptions, input_shape: tuple[int, ...],
               val_fraction: float, output_activation: str) -> Sets:
    """Held-out rows first (x_val, else a seeded share of x), then from the rest the selection rows and, when
    fine-tuning, the training rows."""
    if data is None:
        if opts.epochs:
            raise InvalidArgument("fine-tuning (epochs > 0) needs data: x, with y for labelled data")
        ev = evaluate.random_eval_set(input_shape)
        return Sets(ev, ev, held_out=False)
    x, y = data.x, data.y
    if data.x_val is not None:
        verdict = EvalSet(data.x_val, data.y_val, "x_val")
    elif len(x) >= 2:
        keep, out = _split(len(x), val_fraction, SPLIT_SEED)
        verdict = EvalSet(x[out], _take(y, out), "split")
        x, y = x[keep], _take(y, keep)
    else:
        if opts.epochs:
            raise InvalidArgument("fine-tuning (epochs > 0) needs at least 3 rows of data")
        ev = EvalSet(x, y, "x")
        return Sets(ev, ev, held_out=False)
    train = wants_training(opts, output_activation)
    enough = len(x) >= (3 if opts.epochs else MIN_AUTO_TRAIN_ROWS)
    if opts.epochs and not enough:
        raise InvalidArgument(f"fine-tuning (epochs > 0) needs more rows: {len(x)} left after the held-out rows")
    if not (train and enough):
        return Sets(EvalSet(x, y, "rest"), verdict)
    if verdict.source == "x_val" and len(verdict.x) >= 2:
        # the caller's validation rows choose and judge (half each); x, often what the original was trained on
        # and so flattering it, is all for training
        keep, sel = _split(len(verdict.x), 0.5, SPLIT_SEED + 1)
        return Sets(EvalSet(verdict.x[sel], _take(verdict.y, sel), "x_val"),
                    EvalSet(verdict.x[keep], _take(verdict.y, keep), "x_val"), x, y)
    keep, sel = _split(len(x), val_fraction, SPLIT_SEED + 1)
    return Sets(EvalSet(x[sel], _take(y, sel), "split"), verdict, x[keep], _take(y, keep))
