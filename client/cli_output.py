"""What every CLI verb shares: the progress/error console, ``emit`` (JSON or a human rendering), how failures are
reported, and the argument types that check numbers while argparse parses them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape

#: progress bars and errors go to stderr, so stdout stays clean for --json and piping
console = Console(stderr=True)

#: argparse's exit status for a command line it refuses; the CLI uses it for every local input problem too
USAGE_EXIT = 2


class UsageError(Exception):
    """A problem with the command line or the local files it names (found before or without a server call):
    ``leanserve VERB: error: MESSAGE`` on stderr and exit status 2, like argparse's own errors."""


class CallFailed(Exception):
    """A server call failed in a way that is not a ``grpc.RpcError`` (a request inside a stream): reported as
    ``error CODE: message`` + ``detail``, exit status 1; ``extra`` goes into the ``--json`` error object."""

    def __init__(self, code: str, message: str, detail: str = "", **extra: Any) -> None:
        super().__init__(f"{code}: {message}{detail}")
        self.code, self.message, self.detail, self.extra = code, message, detail, extra


_STATUS_BY_NUMBER = {s.value[0]: s.name for s in grpc.StatusCode}


def status_name(code: Any) -> str:
    """The ``grpc.StatusCode`` name of ``code``: a StatusCode, its name, its number (as a stream's Error carries
    it), or a method returning one (``RpcError.code``); ``UNKNOWN`` for anything else."""
    if callable(code):
        code = code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, str) and code in grpc.StatusCode.__members__:
        return code
    try:
        return _STATUS_BY_NUMBER.get(int(code), "UNKNOWN")
    except (TypeError, ValueError):
        return "UNKNOWN"


def rpc_failure(err: Exception) -> CallFailed:
    """A ``grpc.RpcError`` (or a stream's error answer, ``StreamError``) as the CLI reports it: the status code's
    name and the server's message; ``request_id`` too when it names a request of a stream."""
    details = getattr(err, "details", None)
    message = details() if callable(details) else getattr(err, "message", None)
    request_id = getattr(err, "request_id", None)
    extra = {} if request_id is None else {"request_id": str(request_id)}
    return CallFailed(status_name(getattr(err, "code", None)), str(message or err or ""), **extra)


def no_progress(args: argparse.Namespace) -> bool:
    """No progress bar with ``--json`` or when stderr is not a terminal (a log file or a pipe would only get the
    bar's leftovers, e.g. a blank line before an error)."""
    return bool(args.json) or not console.is_terminal


def emit(args: argparse.Namespace, obj: Any, human: Any) -> None:
    """Print ``obj`` as JSON with ``--json``, else ``human`` (anything rich can render) on stdout."""
    if args.json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        Console().print(human)


def call_failed(args: argparse.Namespace, code: str, message: str, detail: str = "", **extra: Any) -> int:
    """A failed call: ``error CODE: message`` on stderr (one line), with ``--json`` also
    ``{"error": {"code", "message", ...extra}}`` on stdout; exit status 1."""
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message, **extra}}))
    console.print(f"[red]error[/red] {escape(f'{code}: {message}{detail}')}", soft_wrap=True)
    return 1


def usage_failed(args: argparse.Namespace, message: str) -> int:
    """A local problem (``UsageError``): one line on stderr, nothing on stdout (as argparse); exit status 2."""
    console.print(f"leanserve {escape(str(getattr(args, 'command', '')))}: [red]error[/red]: {escape(message)}",
                  soft_wrap=True)
    return USAGE_EXIT


def readable_file(path: Path, option: str) -> Path:
    """``path`` when it is a file this process can read; else a ``UsageError`` naming ``option`` and the file."""
    named = f"{option} {path}" if option else str(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise UsageError(f"{named}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{named}: is a directory, not a file") from None
    except OSError as err:
        raise UsageError(f"{named}: cannot read it ({err.strerror or err})") from None
    return path


def _number(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (versions: 0 = the default or latest)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    if value >= 2**32:  # versions and epochs travel as uint32 in some messages
        raise argparse.ArgumentTypeError(f"must be less than 2**32, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (seconds)."""
    value = _number(float, text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def flush_stdout() -> None:
    """Flush stdout now, so a reader that went away (``| head``) shows up as ``BrokenPipeError`` while the caller
    can still handle it, instead of at interpreter exit."""
    sys.stdout.flush()
