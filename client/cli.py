"""Client verbs of the ``leanserve`` command: upload, models, info, predict, delete.

Every verb takes ``--server`` (default: $LEANSERVE_SERVER or 127.0.0.1:8500), ``--json``, and the connection flags
``--token`` (default: $LEANSERVE_TOKEN), ``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``; a failed call exits
with status 1 and prints the gRPC status code and the server's message.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from leanserve.client import common
from leanserve.client.cli_output import console, emit
from leanserve.client.client import Client
from leanserve.client.optimize_cli import add_optimize_commands


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client verbs on the top-level parser."""
    def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default=os.environ.get("LEANSERVE_SERVER", common.DEFAULT_SERVER),
                       help="host:port of the server (env LEANSERVE_SERVER)")
        p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        p.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
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
    p.add_argument("--version", type=int, default=0)
    p.set_defaults(func=cmd_info)

    p = common_args(sub.add_parser("predict", help="run a model on a .npy file"))
    p.add_argument("name")
    p.add_argument("--input", type=Path, required=True, help=".npy file, first dimension = rows")
    p.add_argument("--output", type=Path, help=".npy file for the results (printed when absent)")
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--postprocess", choices=list(common.POSTPROCESS), default="raw")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="send the file in batches over one stream")
    p.add_argument("--batch-size", type=int, default=256, help="rows per streamed request")
    p.set_defaults(func=cmd_predict)

    p = common_args(sub.add_parser("delete", help="delete a model version (or all versions)"))
    p.add_argument("name")
    p.add_argument("--version", type=int, default=0, help="0 = every version")
    p.set_defaults(func=cmd_delete)

    add_optimize_commands(sub, common_args)


def run_client_command(args: argparse.Namespace) -> int:
    """Run a client verb, turning gRPC failures into a message and exit status 1 (2 for unusable TLS files)."""
    try:
        client = Client(args.server, token=args.token or None, tls=args.tls, tls_ca=args.tls_ca,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout)
    except (OSError, ValueError) as err:  # a TLS file missing, or --tls-cert without --tls-key
        console.print(f"[red]error[/red] {err}")
        return 2
    try:
        with client:
            args.func(client, args)
        return 0
    except grpc.RpcError as err:
        code = err.code().name if err.code() else "UNKNOWN"
        if args.json:
            print(json.dumps({"error": {"code": code, "message": err.details()}}))
        console.print(f"[red]error[/red] {code}: {err.details()}")
        return 1


def _info_dict(info: Any) -> dict[str, Any]:
    return MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


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
    t.add_row("source", f"{info.source_size_bytes:,} B sha256 {info.source_sha256[:16]}…")
    t.add_row("created", info.created_at)
    return t


def cmd_upload(client: Client, args: argparse.Namespace) -> None:
    size = args.file.stat().st_size
    columns = (TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=args.json, transient=True) as progress:
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


def cmd_predict(client: Client, args: argparse.Namespace) -> None:
    x = np.load(args.input, mmap_mode="r" if args.stream else None, allow_pickle=False)
    if args.stream:
        outputs = _predict_stream(client, args, x)
        version = outputs.pop("__version__")
    else:
        result = client.predict(args.name, np.ascontiguousarray(x), version=args.version,
                                postprocess=args.postprocess, top_k=args.top_k)
        outputs, version = result.outputs, result.model_version
    if args.output:
        if len(outputs) == 1:
            np.save(args.output, next(iter(outputs.values())))
        else:
            np.savez(args.output.with_suffix(".npz"), **outputs)
    summary = {"model": args.name, "version": version, "rows": int(x.shape[0]),
               "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()}}
    if args.output:
        summary["written"] = str(args.output)
    elif args.json:
        summary["values"] = {k: v.tolist() for k, v in outputs.items()}
    emit(args, summary, summary if args.output else {k: v for k, v in outputs.items()})


def _predict_stream(client: Client, args: argparse.Namespace, x: np.ndarray) -> dict[str, Any]:
    rows = x.shape[0]
    batches = (np.ascontiguousarray(x[i:i + args.batch_size]) for i in range(0, rows, args.batch_size))
    parts: dict[str, list[np.ndarray]] = {}
    version = 0
    with Progress(TextColumn("predict"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} rows"),
                  TimeRemainingColumn(), console=console, disable=args.json, transient=True) as progress:
        task = progress.add_task("rows", total=rows)
        for out in client.stream(args.name, batches, version=args.version, postprocess=args.postprocess,
                                 top_k=args.top_k):
            version = out.model_version
            for k, v in out.outputs.items():
                parts.setdefault(k, []).append(v)
            progress.advance(task, next(iter(out.outputs.values())).shape[0])
    result: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
    result["__version__"] = version
    return result
