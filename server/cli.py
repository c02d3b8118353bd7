"""The ``leanserve`` command: ``serve``, ``train``, ``demo`` and the client verbs (see client/cli.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from client.cli import add_client_commands, run_client_command


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (env LEANSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port; 0 picks a free one (env LEANSERVE_PORT, default 8500)")
    p.add_argument("--repository", type=Path, help="model repository folder (env LEANSERVE_REPOSITORY, default ./models)")
    p.add_argument("--workers", type=int, dest="worker_threads", help="gRPC worker threads")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description="gRPC inference server with compiled kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    _serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train the classic Keras MLP (1000/64 → 128 → 64 → 10)")
    p.add_argument("--dataset", choices=["digits", "synthetic"], default="digits")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="model.keras or model.h5")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="end to end: train → serve → upload → predict → restart → predict")
    p.add_argument("--workdir", type=Path, default=Path("demo-output"))
    p.add_argument("--epochs", type=int, default=3)
    p.set_defaults(func=cmd_demo)

    add_client_commands(sub)
    return parser


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, overridden by the flags that were given."""
    from server.settings import Settings

    overrides = {k: getattr(args, k) for k in ("host", "port", "repository", "worker_threads", "log_level")
                 if getattr(args, k, None) is not None}
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import create_server

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handle = create_server(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {settings.host}:{handle.port}", flush=True)
    stop.wait()
    logging.getLogger("leanserve").info("stopping: %.1f s for in-flight requests", settings.shutdown_grace_seconds)
    handle.stop(settings.shutdown_grace_seconds)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from server.training import train_mlp

    result = train_mlp(args.dataset, epochs=args.epochs, batch_size=args.batch_size, out=args.out, seed=args.seed)
    print(f"trained on {args.dataset}: train accuracy {result.train_accuracy:.4f}, "
          f"validation accuracy {result.val_accuracy:.4f}; saved {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(args.workdir, epochs=args.epochs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "train", "demo"):
        return args.func(args)
    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
