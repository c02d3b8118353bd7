"""The ``leanserve`` command: ``serve``, ``train``, ``demo`` and the client verbs (see client/cli.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from leanserve.client.cli import add_client_commands, run_client_command


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (env LEANSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port; 0 picks a free one (env LEANSERVE_PORT, default 8500)")
    p.add_argument("--repository", help="model repository: a folder or s3://BUCKET/PREFIX (env LEANSERVE_REPOSITORY, "
                   "default ./models)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="publish a model file (.h5, .keras, .leanserve) as NAME at startup, unless its newest version "
                   "came from the same file; repeatable. A --repository folder holding model files instead of model "
                   "folders (KServe's /mnt/models) is served the same way, each file named after its stem")
    p.add_argument("--model-name", help="the name of the one model file in a --repository folder of model files "
                   "(e.g. the InferenceService's name)")
    p.add_argument("--workers", type=int, dest="worker_threads",
                   help="unary gRPC calls computing at once per process (calls waiting for a batch do not count)")
    p.add_argument("--processes", type=int,
                   help="server processes sharing the port, e.g. one per core (env LEANSERVE_PROCESSES, default 1)")
    # set by the first process for the extra ones it starts (server/processes.py)
    p.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    trust = p.add_argument_group("credentials", "a host other than loopback needs TLS, tokens or --insecure")
    trust.add_argument("--tls-cert", type=Path, dest="tls_cert_file", metavar="FILE",
                       help="PEM certificate chain: serve TLS only (env LEANSERVE_TLS_CERT_FILE); re-read when "
                       "the file changes or on SIGHUP")
    trust.add_argument("--tls-key", type=Path, dest="tls_key_file", metavar="FILE",
                       help="PEM private key of --tls-cert (env LEANSERVE_TLS_KEY_FILE)")
    trust.add_argument("--tls-client-ca", type=Path, dest="tls_client_ca_file", metavar="FILE",
                       help="require client certificates signed by this CA (mTLS; env LEANSERVE_TLS_CLIENT_CA_FILE)")
    trust.add_argument("--auth-tokens", type=Path, dest="auth_tokens_file", metavar="FILE",
                       help="token file, lines '<admin|infer> <sha256 hex of token> [label]' (env "
                       "LEANSERVE_AUTH_TOKENS_FILE); see `leanserve token`")
    trust.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=None,
                       help="serve gRPC reflection (default: on, off with --auth-tokens)")
    trust.add_argument("--insecure", action="store_true", default=None,
                       help="allow a non-loopback host with neither TLS nor tokens (env LEANSERVE_INSECURE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description="gRPC inference server with compiled kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    _serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("publish", help="convert, check and store a model file as a new version (no server needed)")
    p.add_argument("file", type=Path, help="model.keras, model.h5 or a .leanserve file")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--repository", help="a folder or s3://BUCKET/PREFIX (env LEANSERVE_REPOSITORY, default ./models)")
    p.add_argument("--description", default="", help="stored in the version's manifest")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("ray", help="serve through Ray Serve: replicas of the data plane behind its gRPC proxy "
                       "(needs leanserve[ray]; stays in the foreground, removes the application on SIGTERM)")
    p.add_argument("--address", required=True, help="Ray cluster address, e.g. 127.0.0.1:6379 or auto")
    p.add_argument("--port", type=int, required=True, help="port of Ray Serve's gRPC proxy (plaintext)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address of the proxy to wait for and print (default 127.0.0.1; Ray binds every interface)")
    p.add_argument("--repository", help="the shared model repository: s3://BUCKET/PREFIX, or a folder every node sees")
    p.add_argument("--replicas", type=int, default=1, help="replicas, at most one per node (default 1)")
    p.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas")
    p.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    p.add_argument("--target-ongoing-requests", type=float,
                   help="autoscaling: requests in flight per replica to aim at (default 32 when autoscaling)")
    p.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests in flight per replica before Ray queues more (default 256)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--proxy-location", choices=["HeadOnly", "EveryNode"], default="HeadOnly",
                   help="run the proxy on the head only (default) or on every node with a replica")
    p.add_argument("--http-port", type=int, help="port of Ray Serve's HTTP proxy on 127.0.0.1 (unused; default: a "
                   "free one)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the proxy to answer")
    p.add_argument("--node-ip-address", help="this machine's address in the Ray cluster (e.g. 127.0.0.1 when the "
                   "cluster runs on loopback); default: Ray finds it")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    p.set_defaults(func=cmd_ray)

    p = sub.add_parser("token", help="make a random token and print its line for the --auth-tokens file")
    p.add_argument("--role", choices=["admin", "infer"], required=True)
    p.add_argument("--label", default="", help="name the logs and the audit log use for this token")
    p.set_defaults(func=cmd_token)

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


class SettingsError(ValueError):
    """Flags or ``LEANSERVE_*`` variables the settings refuse, in one line per problem."""


def _problem(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "settings"
    given = error.get("input")
    return f"{where}: {error['msg']}" + ("" if given is None or isinstance(given, dict) else f" (got {given!r})")


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, overridden by the flags that were given; SettingsError when invalid."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError as SourceError

    from leanserve.server.settings import Settings

    flags = ("host", "port", "repository", "worker_threads", "processes", "log_level", "tls_cert_file", "tls_key_file",
             "tls_client_ca_file", "auth_tokens_file", "reflection", "insecure")
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k, None) is not None}
    try:
        return Settings(**overrides)
    except SourceError as exc:  # a LEANSERVE_* variable that is not even JSON where JSON is expected
        raise SettingsError(f"invalid settings: {exc}: {exc.__cause__}") from None
    except ValidationError as exc:
        problems = [_problem(e) for e in exc.errors()]
        raise SettingsError("invalid settings (flags or LEANSERVE_* variables): " + "; ".join(problems)) from None


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the server then lets its in-flight calls finish."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def cmd_serve(args: argparse.Namespace) -> int:
    from leanserve.server.app import ConfigurationError, create_server
    from leanserve.server.processes import READY, ExtraProcesses, watch_first_process
    from leanserve.server.settings import listen_address
    from leanserve.server.runtime.process import apply_process_settings

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"leanserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_process_settings(settings)  # --model files are converted and tuned before create_server
    stop = threading.Event()
    if settings.process_index == 0:
        _stop_on_signals(stop)
    else:
        # an extra process that serves nothing yet has nothing to drain: SIGTERM ends it at once instead of after
        # its models load; SIGINT (a terminal's ^C reaches the whole group) is left to the first, which sends SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.supervisor_fd is not None:
        watch_first_process(args.supervisor_fd, stop)
    if settings.process_index == 0:  # the extra processes get the prepared settings from the first
        from leanserve.server.app import check_exposure
        from leanserve.server.errors import LeanserveError
        from leanserve.server.ingest.model_files import parse_model_arg, prepare

        try:
            check_exposure(settings)  # before model files are converted
            settings = prepare(settings, [parse_model_arg(m) for m in args.model], args.model_name)
        except ConfigurationError as exc:
            print(f"leanserve serve: {exc}", file=sys.stderr)
            return 2
        except LeanserveError as exc:
            print(f"leanserve serve: {exc.code.value}: {exc.message}", file=sys.stderr)
            return 2
        except OSError as exc:  # a --model file that cannot be read
            print(f"leanserve serve: {exc}", file=sys.stderr)
            return 2
    try:
        handle = create_server(settings)
    except ConfigurationError as exc:  # raised before anything is loaded or bound
        print(f"leanserve serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"leanserve serve: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGHUP, lambda *_: handle.reload_credentials())  # rotate certificates and tokens now
    extra = None
    if settings.processes > 1 and settings.process_index == 0:
        extra = ExtraProcesses(settings, handle.port)
        try:
            extra.start(stop=stop)
        except RuntimeError:
            handle.stop(0)
            raise
    if settings.process_index != 0:
        _stop_on_signals(stop)
    if args.ready_fd is not None:
        os.write(args.ready_fd, READY)
        os.close(args.ready_fd)
    if settings.process_index == 0 and not stop.is_set():
        print(f"listening on {listen_address(settings.host, handle.port)}", flush=True)
    stop.wait()
    logging.getLogger("leanserve").info("stopping: %.1f s for in-flight requests", settings.shutdown_grace_seconds)
    if extra is not None:
        extra.terminate()  # all processes drain at the same time
    handle.stop(settings.shutdown_grace_seconds)
    if extra is not None:
        extra.stop(settings.shutdown_grace_seconds)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Prints the new version number on stdout (and what it became on stderr); exit 1 with the reason if refused."""
    from leanserve.server.errors import LeanserveError
    from leanserve.server.ingest.publish import publish_file
    from leanserve.server.runtime.process import apply_process_settings

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"leanserve publish: {exc}", file=sys.stderr)
        return 2
    apply_process_settings(settings)  # the tuner measures under the limits the server will serve with
    logging.basicConfig(level=(args.log_level or "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        published = publish_file(args.file, args.name, settings, description=args.description)
    except LeanserveError as exc:
        print(f"leanserve publish: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    print(f"published {published.name} version {published.version} ({published.runtime} runtime) to "
          f"{settings.repository}", file=sys.stderr)
    print(published.version, flush=True)
    return 0


def cmd_ray(args: argparse.Namespace) -> int:
    """Deploy, print ``listening on HOST:PORT`` once the proxy answers, wait for SIGTERM/SIGINT, remove the app."""
    import importlib.util
    import socket

    if importlib.util.find_spec("ray") is None:
        print("leanserve ray needs the ray extra: pip install 'leanserve[ray]'", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from leanserve.server.ray_app import APP_NAME, SERVICER_FUNCTIONS, build_app, wait_for_proxy

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"leanserve ray: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    http_port = args.http_port
    if http_port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http_port = s.getsockname()[1]
    # without it the proxy sends every call to the replica on its own node
    env_vars = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    ray.init(address=args.address, namespace="leanserve", runtime_env={"env_vars": env_vars},
             logging_level=logging.WARNING, log_to_driver=False,
             **({"_node_ip_address": args.node_ip_address} if args.node_ip_address else {}))
    # after ray.init, which installs handlers of its own that would end the process without removing the app
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        serve.start(proxy_location=args.proxy_location, http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": args.port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
                    controller_options={"runtime_env": {"env_vars": env_vars}})
        app = build_app(settings, replicas=args.replicas, min_replicas=args.min_replicas,
                        max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                        max_ongoing_requests=args.max_ongoing_requests, replica_cpus=args.replica_cpus)
        # a route makes the app an ingress: the only app then gets calls without "application" metadata
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        wait_for_proxy(f"{args.host}:{args.port}", args.start_timeout)
        print(f"listening on {args.host}:{args.port}", flush=True)
        stop.wait()
        logging.getLogger("leanserve").info("removing the Ray Serve application %r", APP_NAME)
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    import secrets
    from hashlib import sha256

    token = secrets.token_urlsafe(32)
    print(f"{args.role} {sha256(token.encode()).hexdigest()} {args.label}".rstrip())
    print(f"token (give it to the client, e.g. as LEANSERVE_TOKEN; it is stored nowhere): {token}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from leanserve.server.tools.training import train_mlp

    result = train_mlp(args.dataset, epochs=args.epochs, batch_size=args.batch_size, out=args.out, seed=args.seed)
    print(f"trained on {args.dataset}: train accuracy {result.train_accuracy:.4f}, "
          f"validation accuracy {result.val_accuracy:.4f}; saved {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from leanserve.server.tools.demo import run_demo

    return run_demo(args.workdir, epochs=args.epochs)


#: modules of the ``leanserve[server]`` extra each server-side command needs
SERVER_MODULES = {
    "serve": ("numba", "pydantic_settings", "safetensors", "grpc_health", "grpc_reflection", "prometheus_client"),
    "train": ("tensorflow", "sklearn"),
    "demo": ("numba", "pydantic_settings", "tensorflow", "sklearn"),
    "publish": ("numba", "pydantic_settings", "safetensors"),
    "ray": ("numba", "pydantic_settings", "safetensors", "ray"),
}


def missing_server_modules(command: str) -> list[str]:
    """The modules ``command`` needs that are not installed (``pip install leanserve`` is the client only)."""
    import importlib.util

    return [m for m in SERVER_MODULES.get(command, ()) if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return args.func(args)
    if args.command in SERVER_MODULES:
        missing = missing_server_modules(args.command)
        if missing:
            extra = "ray" if "ray" in missing else "server"
            print(f"leanserve {args.command} needs the {extra} extra: pip install 'leanserve[{extra}]' "
                  f"(missing: {', '.join(missing)})", file=sys.stderr)
            return 2
        return args.func(args)
    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
