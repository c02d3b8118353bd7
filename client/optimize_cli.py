"""``leanserve optimize`` and ``leanserve set-default``: prune / quantize a model within an accuracy budget."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from leanserve.client.cli_output import console, emit, no_progress, non_negative_int, readable_file
from leanserve.client.client import Client


def add_optimize_commands(sub: argparse._SubParsersAction,
                          common_args: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    p = common_args(sub.add_parser("optimize", help="prune and/or int8-quantize a model within an accuracy budget"))
    p.add_argument("name")
    p.add_argument("--data", type=Path, help=".npz with x, y (labels or one-hot), optionally x_val, y_val")
    p.add_argument("--version", type=non_negative_int, default=0, help="version to start from (0 = the default)")
    p.add_argument("--prune", type=float, default=0.0, metavar="SPARSITY", help="target sparsity, e.g. 0.9")
    p.add_argument("--block", default="", help="block shape RxC, e.g. 16x1 (default: unstructured)")
    p.add_argument("--global", dest="granularity", action="store_const", const="global", default="per_layer",
                   help="one magnitude ranking across layers (default: per layer)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="fraction, e.g. 0.015 = 1.5 points")
    p.add_argument("--epochs", type=non_negative_int, default=None,
                   help="fine-tuning epochs per candidate (default: the server sizes them from the data and the "
                        "time budget when --data is given; 0 = one-shot pruning)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="bound of the whole search while over budget (default: the server's)")
    p.add_argument("--search", action="store_true",
                   help="sweep lower sparsities and fp32, keep the smallest within budget (instead of the budget "
                        "search: fine-tune longer, block shapes, lower sparsity, int8 alone)")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                   help="make the result the default when it is within budget on held-out rows (default: on)")
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_optimize)

    p = common_args(sub.add_parser("set-default", help="pin the default version of a model (0 = latest)"))
    p.add_argument("name")
    p.add_argument("version", type=non_negative_int, help="the version to serve by default; 0 = the latest")
    p.set_defaults(func=cmd_set_default)


def cmd_optimize(client: Client, args: argparse.Namespace) -> Any:
    if args.data is not None:
        readable_file(args.data, "--data")
    columns = (TextColumn("{task.fields[stage]:<9}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=console, disable=no_progress(args), transient=True) as bar:
        task = bar.add_task("", total=1.0, stage="start")

        def progress(stage: str, fraction: float, message: str) -> None:
            bar.update(task, completed=fraction, stage=stage, description=message[:60])

        report = client.optimize(args.name, args.data, version=args.version, sparsity=args.prune, block=args.block,
                                 granularity=args.granularity, quantize=args.quantize,
                                 max_accuracy_drop=args.max_accuracy_drop, epochs=args.epochs, search=args.search,
                                 promote=args.promote, description=args.description,
                                 time_budget=args.time_budget, progress=progress)
    emit(args, report, Group(report_table(report), candidates_table(report), report.get("summary", "")))


def candidates_table(r: dict[str, Any]) -> Table:
    """Every candidate the search tried, in order: quality on the selection rows (and held out when checked),
    size and batch-1 latency."""
    t = Table(title=f"candidates tried ({r.get('search', {}).get('stopped', '')})")
    for col in ("candidate", f"{r['metric']} (select)", "held out", "size (bytes)", "b=1 (µs)", "s"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for c in r.get("candidates", []):
        held = "" if c.get("held_out_metric") is None else f"{c['held_out_metric']:.4f}"
        t.add_row(c.get("label", ""), f"{c['metric']:.4f}{'' if c['within_budget'] else ' over'}", held,
                  f"{c['size_bytes']:,}", f"{c.get('latency_b1_seconds', 0.0) * 1e6:.1f}",
                  f"{c.get('seconds', 0.0):.0f}")
    return t


def report_table(r: dict[str, Any]) -> Table:
    """The human summary of an optimization report."""
    b, a = r["before"], r["after"]
    t = Table(title=f"{r['options']['model_name']} v{r['from_version']} → v{r['version']} "
                    f"({'within' if r['within_budget'] else 'OVER'} budget, "
                    f"{'promoted' if r['promoted'] else 'not promoted'}; default v{r['default_version']})")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row(r["metric"], f"{b['metric']:.4f}", f"{a['metric']:.4f}")
    t.add_row("size (bytes)", f"{b['size_bytes']:,}", f"{a['size_bytes']:,}")
    for batch in b["latency_seconds"]:
        t.add_row(f"latency b={batch} (µs)", f"{b['latency_seconds'][batch] * 1e6:.1f}",
                  f"{a['latency_seconds'][batch] * 1e6:.1f}")
    for lb, la in zip(b["layers"], a["layers"]):
        t.add_row(f"layer {la['name']}", f"{lb['format']} {lb['sparsity']:.0%}", f"{la['format']} {la['sparsity']:.0%}")
    if "reference_check" in r:  # the stored check: the served kernels against an exact simulation of the plan
        t.add_row("reference check (vs simulation)", "", f"max abs {r['reference_check']['max_abs_error']:.2e}")
    t.add_row("max |served − TF| (quantization error)", "", f"{r['tf_reference']['max_abs_error']:.2e}")
    return t


def cmd_set_default(client: Client, args: argparse.Namespace) -> Any:
    default = client.set_default(args.name, args.version)
    emit(args, {"name": args.name, "default_version": default}, f"{args.name}: default version {default}")


def optimization_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The key facts of a stored optimization report (``leanserve info`` of an optimized version), as rows: where
    it came from, the verdict, quality, size and latency before → after, and the search. Missing keys are skipped
    (reports of older versions)."""
    rows: list[tuple[str, str]] = []
    chosen = r.get("chosen") or {}
    recipe = " ".join(x for x in (chosen.get("label", ""), chosen.get("granularity", "").replace("_", " ")) if x)
    if "from_version" in r:
        rows.append(("optimized from", f"v{r['from_version']}" + (f": {recipe}" if recipe else "")))
    if "summary" in r:
        rows.append(("optimization", str(r["summary"])))
    b, a = r.get("before") or {}, r.get("after") or {}
    if "metric" in b and "metric" in a:
        quality = f"{b['metric']:.4f} → {a['metric']:.4f} (drop {(b['metric'] - a['metric']) * 100:.2f} points"
        if "eval_rows" in r:
            kind = "held-out " if r.get("held_out") else "random " if r.get("eval_source") == "random" else ""
            quality += f" on {r['eval_rows']} {kind}rows"
        if "max_accuracy_drop" in r:
            verdict = "within" if r.get("within_budget") else "OVER"
            quality += f"; {verdict} the budget of {r['max_accuracy_drop'] * 100:.2f}"
        rows.append((str(r.get("metric", "metric")), quality + ")"))
    if "size_bytes" in b and "size_bytes" in a:
        ratio = a["size_bytes"] / max(b["size_bytes"], 1)
        rows.append(("weights size", f"{b['size_bytes']:,} B → {a['size_bytes']:,} B ({ratio:.1%})"))
    lat_b, lat_a = b.get("latency_seconds") or {}, a.get("latency_seconds") or {}
    for batch in lat_b:
        if batch in lat_a:
            rows.append((f"latency b={batch}", f"{lat_b[batch] * 1e6:.1f} µs → {lat_a[batch] * 1e6:.1f} µs"))
    search = r.get("search") or {}
    if search:
        tried = len(r.get("candidates") or [])
        text = f"{search.get('mode', '')}: {tried} candidate{'' if tried == 1 else 's'}, {search.get('stopped', '')}"
        if "elapsed_seconds" in r:
            text += f", {r['elapsed_seconds']:.0f} s"
        rows.append(("search", text))
    if "promoted" in r:
        promoted = "yes (made the default when optimized)" if r["promoted"] else "no (the default stayed as it was)"
        rows.append(("promoted", promoted))
    return rows
