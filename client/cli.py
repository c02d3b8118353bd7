"""Client verbs of the ``leanserve`` command: upload, models, info, predict, delete.

Every verb takes ``--server`` (default: $LEANSERVE_SERVER or 127.0.0.1:8500), ``--json``, and the connection flags
``--token`` (default: $LEANSERVE_TOKEN), ``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``. A failed call exits
with status 1 and prints the gRPC status code and the server's message (with ``--json`` also as
``{"error": {"code", "message"}}`` on stdout); a problem with the command line or a local file it names exits with
status 2 and one ``error:`` line on stderr, as argparse's own errors do. A reader of stdout that goes away
(``| head``) ends the command quietly (status 1, as the signal module's "Note on SIGPIPE" advises).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from leanserve.client import codec, common
from leanserve.client.cli_output import (
    CallFailed, UsageError, call_failed, console, emit, flush_stdout, no_progress, non_negative_int, positive_float,
    positive_int, readable_file, rpc_failure, usage_failed,
)
from leanserve.client.client import Client, StreamError
from leanserve.client.optimize_cli import add_optimize_commands, optimization_rows

STREAM_BATCH_ROWS = 256  # rows per request of ``predict --stream`` without --batch-size

def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client verbs on the top-level parser."""
    def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default=os.environ.get("LEANSERVE_SERVER", common.DEFAULT_SERVER),
                       help="host:port of the server (env LEANSERVE_SERVER)")
        p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        p.add_argument("--timeout", type=positive_float, default=None, help="seconds before giving up")
        conn = p.add_argument_group("connection")
        conn.add_argument("--token", default=os.environ.get("LEANSERVE_TOKEN"),
                          help="token sent as 'authorization: Bearer <token>' (env LEANSERVE_TOKEN; prefer the "
                          "variable: arguments show in the process list)")
        conn.add_argument("--tls", action="store_true", help="TLS, checking the server against the system's CAs")
        conn.add_argument("--tls-ca", type=Path, metavar="FILE", help="TLS, checking the server against this CA")
        conn.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (mTLS) and TLS")
        conn.add_argument("--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert")
        return p

    p = common_args(sub.add_parser("upload", help="upload a .keras, .h5 or .leanserve model"))
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--format", choices=["keras", "h5", "leanserve"], default="")
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_upload)

    p = common_args(sub.add_parser("models", help="list models and versions"))
    p.set_defaults(func=cmd_models)

    p = common_args(sub.add_parser("info", help="describe a model version"))
    p.add_argument("name")
    p.add_argument("--version", type=non_negative_int, default=0, help="0 = the default version")
    p.set_defaults(func=cmd_info)

    p = common_args(sub.add_parser("predict", help="run a model on a .npy file"))
    p.add_argument("name")
    p.add_argument("--input", type=Path, required=True, help=".npy file, first dimension = rows")
    p.add_argument("--output", type=Path,
                   help="file for the results (printed when absent), written at exactly this path: a name ending "
                   "in .npz holds every output array by name; any other name holds the one output as .npy "
                   "(refused with --postprocess top_k, which returns two arrays: indices and scores)")
    p.add_argument("--version", type=non_negative_int, default=0, help="0 = the default version")
    p.add_argument("--postprocess", choices=list(common.POSTPROCESS), default="raw")
    p.add_argument("--top-k", type=positive_int, default=0,
                   help="classes per row with --postprocess top_k (default: the server's, 5)")
    p.add_argument("--stream", action="store_true", help="send the file in batches over one stream")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"rows per streamed request, with --stream (default {STREAM_BATCH_ROWS})")
    p.set_defaults(func=cmd_predict)

    p = common_args(sub.add_parser("delete", help="delete a model version (or all versions)"))
    p.add_argument("name")
    p.add_argument("--version", type=non_negative_int, default=0, help="0 = every version")
    p.set_defaults(func=cmd_delete)

    add_optimize_commands(sub, common_args)


def run_client_command(args: argparse.Namespace) -> int:
    """Run a client verb: 0 when it worked, 1 when a call failed (the code and message printed), 2 for a problem
    with the command line or a local file (TLS files included)."""
    try:
        return _run(args)
    except BrokenPipeError:  # whoever read stdout went away (`| head -1`): stop without a traceback
        _stdout_gone()
        return 1


def _run(args: argparse.Namespace) -> int:
    try:
        client = Client(args.server, token=args.token or None, tls=args.tls, tls_ca=args.tls_ca,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout)
    except (OSError, ValueError) as err:  # a TLS file missing, or --tls-cert without --tls-key
        return usage_failed(args, str(err))
    try:
        with client:
            args.func(client, args)
        status = 0
    except UsageError as err:
        return usage_failed(args, str(err))
    except CallFailed as err:
        status = call_failed(args, err.code, err.message, err.detail, **err.extra)
    except (grpc.RpcError, StreamError) as err:  # StreamError: a request of a stream the verb read as is
        failed = rpc_failure(err)
        status = call_failed(args, failed.code, failed.message, **failed.extra)
    except (ValueError, TypeError) as err:  # refused by the client before sending (an option, a batch's dtype)
        return usage_failed(args, str(err))
    flush_stdout()  # inside the BrokenPipeError handler's reach, not at interpreter exit
    return status


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so flushing it at exit raises nothing more (the signal module's advice)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (replaced in-process): nothing to redirect
        pass


def _info_dict(info: Any) -> dict[str, Any]:
    """The ModelInfo as JSON, with ``metadata`` the parsed ``metadata_json`` (e.g. ``metadata.optimization``)."""
    d = MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["metadata"] = _metadata(info)
    return d


def _metadata(info: Any) -> dict[str, Any]:
    try:
        metadata = json.loads(info.metadata_json or "{}")
    except ValueError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _info_table(info: Any) -> Table:
    t = Table(title=f"{info.name} v{info.version} ({info.runtime} runtime)", show_header=False)
    t.add_row("versions", ", ".join(map(str, info.versions)))
    for spec in info.inputs:
        t.add_row(f"input {spec.name}", f"{list(spec.shape)}")
    for spec in info.outputs:
        t.add_row(f"output {spec.name}", f"{list(spec.shape)}")
    r = info.reference
    t.add_row("reference check", f"{'passed' if r.passed else 'FAILED'} vs {r.reference}: {r.samples} rows, "
              f"max abs {r.max_abs_error:.2e}, max rel {r.max_rel_error:.2e}")
    for layer in info.layers:
        t.add_row(f"layer {layer.name}", f"{layer.in_features}→{layer.out_features} {layer.format} "
                  f"{layer.activation} sparsity {layer.sparsity:.0%} {layer.size_bytes:,} B")
    report = _metadata(info).get("optimization")
    if isinstance(report, dict):  # an optimized version: no uploaded file, the report says where it came from
        for key, value in optimization_rows(report):
            t.add_row(key, value)
    if info.source_sha256 or not isinstance(report, dict):
        t.add_row("source", f"{info.source_size_bytes:,} B sha256 {info.source_sha256[:16]}…")
    t.add_row("created", info.created_at)
    return t


def cmd_upload(client: Client, args: argparse.Namespace) -> None:
    size = readable_file(args.file, "").stat().st_size
    columns = (TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=no_progress(args), transient=True) as progress:
        task = progress.add_task("upload", total=size)
        info = client.upload(args.file, args.name, format=args.format, description=args.description,
                             progress=lambda n: progress.advance(task, n))
    emit(args, _info_dict(info), _info_table(info))


def cmd_models(client: Client, args: argparse.Namespace) -> None:
    models = client.models()
    t = Table("model", "versions")
    for name, versions in models.items():
        t.add_row(name, ", ".join(map(str, versions)))
    emit(args, models, t)


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    info = client.info(args.name, args.version)
    emit(args, _info_dict(info), _info_table(info))


def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    deleted = client.delete(args.name, args.version)
    emit(args, {"deleted_versions": deleted}, f"deleted {args.name} version(s) {', '.join(map(str, deleted))}")


# -- predict: read the --input array, call Predict (or one PredictStream), write or print the outputs ---------
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def cmd_predict(client: Client, args: argparse.Namespace) -> None:
    check_options(args)
    x = load_input(args.input, mmap=args.stream)
    if args.stream:
        outputs, version = _predict_stream(client, args, x)
    else:
        result = client.predict(args.name, np.ascontiguousarray(x), version=args.version,
                                postprocess=args.postprocess, top_k=args.top_k)
        outputs, version = result.outputs, result.model_version
    summary: dict[str, Any] = {
        "model": args.name, "version": version, "rows": int(x.shape[0]),
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
    }
    if args.output:
        summary["written"] = str(write_outputs(args.output, outputs))
    elif args.json:
        summary["values"] = {k: v.tolist() for k, v in outputs.items()}
    emit(args, summary, summary if args.output else dict(outputs))


def check_options(args: argparse.Namespace) -> None:
    """Combinations argparse cannot check on its own; ``UsageError`` before anything is read or sent."""
    if args.batch_size is not None and not args.stream:
        raise UsageError("--batch-size needs --stream (without it the whole file is one request)")
    if args.top_k and args.postprocess != "top_k":
        raise UsageError(f"--top-k needs --postprocess top_k (with --postprocess {args.postprocess} it would be "
                         "ignored)")
    out = args.output
    if out is None:
        return
    if args.postprocess == "top_k" and not _is_npz(out):
        raise UsageError(f"--output {out}: --postprocess top_k returns two arrays (indices, scores); name an .npz "
                         f"file to hold both, e.g. --output {out.with_suffix('.npz')}")
    if out.is_dir():
        raise UsageError(f"--output {out}: is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--output {out}: folder {out.parent} does not exist")


def load_input(path: Path, *, mmap: bool = False) -> np.ndarray:
    """The array of the .npy file ``path`` (memory-mapped when ``mmap``); ``UsageError`` naming the file when it
    cannot be read, is not an .npy file (an .npz archive, a pickle, anything else), holds no rows dimension or a
    dtype that cannot be sent."""
    readable_file(path, "--input")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = ", ".join(archive.files) or "no arrays"
        except (OSError, ValueError, EOFError):
            names = "unreadable"
        raise UsageError(f"--input {path}: is an .npz archive ({names}); predict takes one array in an .npy file")
    if head != _NPY_MAGIC:
        raise UsageError(f"--input {path}: not an .npy file (it does not start with the .npy signature)")
    try:
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # a damaged header, truncated data, object arrays
        raise UsageError(f"--input {path}: cannot read this .npy file ({err})") from None
    if x.ndim == 0:
        raise UsageError(f"--input {path}: holds a single value; predict needs an array whose first dimension is "
                         "the rows")
    if x.dtype.name not in codec.DTYPE_NAMES:
        raise UsageError(f"--input {path}: holds {x.dtype} values, which cannot be sent (sendable: "
                         f"{', '.join(codec.DTYPE_NAMES)})")
    return x


def write_outputs(path: Path, outputs: dict[str, np.ndarray]) -> Path:
    """Write the answer at exactly ``path`` (numpy would append .npy or .npz to other names): every output by name
    when it ends in .npz, else the one output as .npy. Returns the path written."""
    if not _is_npz(path) and len(outputs) != 1:
        raise UsageError(f"--output {path}: the answer holds {len(outputs)} arrays ({', '.join(outputs)}); name an "
                         ".npz file to hold them")
    try:
        with open(path, "wb") as f:
            if _is_npz(path):
                np.savez(f, **outputs)
            else:
                np.save(f, next(iter(outputs.values())))
    except OSError as err:
        raise UsageError(f"--output {path}: cannot write it ({err.strerror or err})") from None
    return path


def _is_npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


def _predict_stream(client: Client, args: argparse.Namespace, x: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Every row through one PredictStream in ``--batch-size`` requests; the outputs joined and the version that
    answered. An empty input still makes one (empty) request, so the server answers it as it answers Predict.
    The version is asked first and every request names it: a default that moves during a long run (an upload,
    set-default, a promoted optimization) must not score part of the file."""
    info = client.info(args.name, args.version)
    pinned = info.version
    # without --batch-size, never more rows than the model takes per request (a model with a large working memory
    # takes fewer than the default)
    rows, size = x.shape[0], args.batch_size or min(STREAM_BATCH_ROWS, info.max_batch_size or STREAM_BATCH_ROWS)
    starts = range(0, rows, size) if rows else range(1)
    batches = (np.ascontiguousarray(x[i:i + size]) for i in starts)
    parts: dict[str, list[np.ndarray]] = {}
    version = 0
    with Progress(TextColumn("predict"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} rows"),
                  TimeRemainingColumn(), console=console, disable=no_progress(args), transient=True) as progress:
        task = progress.add_task("rows", total=rows)
        try:
            for out in client.stream(args.name, batches, version=pinned, postprocess=args.postprocess,
                                     top_k=args.top_k):
                version = out.model_version
                for k, v in out.outputs.items():
                    parts.setdefault(k, []).append(v)
                progress.advance(task, next(iter(out.outputs.values())).shape[0] if out.outputs else 0)
        except StreamError as err:
            raise _stream_failure(err, rows, size) from None
    return {k: np.concatenate(v) for k, v in parts.items()}, version


def _stream_failure(err: StreamError, rows: int, size: int) -> CallFailed:
    """A failed request of the stream as the CLI reports it: the server's code and message, and its rows."""
    failed = rpc_failure(err)
    request_id = failed.extra.get("request_id", "")
    if request_id.isdigit() and rows:
        first = int(request_id) * size
        failed.detail = f" (stream request {request_id}: rows {first}..{min(first + size, rows) - 1})"
    return failed
