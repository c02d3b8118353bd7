"""What every CLI verb shares for output: the progress/error console and ``emit`` (JSON or a human rendering)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

#: progress bars and errors go to stderr, so stdout stays clean for --json and piping
console = Console(stderr=True)


def emit(args: argparse.Namespace, obj: Any, human: Any) -> None:
    """Print ``obj`` as JSON with ``--json``, else ``human`` (anything rich can render) on stdout."""
    if args.json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        Console().print(human)
