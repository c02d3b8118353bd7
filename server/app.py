"""Building the server: settings → repository → registry → dataplane → servicers → a started grpc.Server.

Production (``leanserve serve``) and the tests both go through ``create_server``.
"""

from __future__ import annotations

import ipaddress
import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from leanserve.v2 import grpc_service_pb2, grpc_service_pb2_grpc
from leanserve.v1 import inference_service_pb2, inference_service_pb2_grpc, model_service_pb2, model_service_pb2_grpc
from leanserve.server.dataplane import DataPlane
from leanserve.server.grpc.calls import StreamSlots
from leanserve.server.grpc.health import SERVICE_NAME as HEALTH_SERVICE_NAME, SERVING, HealthServicer
from leanserve.server.grpc.inference_servicer import InferenceServicer
from leanserve.server.grpc.auth import AuthInterceptor, TokenFile
from leanserve.server.grpc.interceptors import ErrorInterceptor
from leanserve.server.grpc.reflection import add_reflection
from leanserve.server.grpc.infer_memo import with_infer_memo
from leanserve.server.grpc.request_decoders import REQUEST_DECODERS
from leanserve.server.grpc.send_watchdog import SendWatchdog
from leanserve.server.grpc.tls import ServerCertificates
from leanserve.server.grpc.model_servicer import ModelServicer
from leanserve.server.grpc.optimize_servicer import OptimizeServicer
from leanserve.v1 import optimize_service_pb2, optimize_service_pb2_grpc
from leanserve.server.optimize.service import Optimizer
from leanserve.server.grpc.v2_servicer import V2Servicer
from leanserve.server.serving.metrics import MetricsServer
from leanserve.server.serving.registry import ModelRegistry
from leanserve.server.serving.workers import WorkerPool
from leanserve.server.repository.poll import RepositoryPoller
from leanserve.server.repository.open import open_repository
from leanserve.server.runtime.process import apply_process_settings
from leanserve.server.settings import Settings, listen_address

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    optimize_service_pb2.DESCRIPTOR.services_by_name["OptimizeService"].full_name,
)


@dataclass
class ServerHandle:
    """A started server and what tests and the CLI need to reach into it."""

    server: grpc.Server
    port: int
    dataplane: DataPlane
    health: HealthServicer
    metrics: MetricsServer | None = None
    poller: RepositoryPoller | None = None
    certificates: ServerCertificates | None = None
    tokens: TokenFile | None = None
    stream_pool: futures.ThreadPoolExecutor | None = None
    rpc_pool: WorkerPool | None = None
    watchdog: SendWatchdog | None = None

    def reload_credentials(self) -> None:
        """Re-read the TLS files (for the next handshake) and the token file now, changed or not (SIGHUP)."""
        if self.certificates is not None:
            self.certificates.reload()
        if self.tokens is not None:
            self.tokens.reload(force=True)

    @property
    def metrics_port(self) -> int | None:
        """Port of the Prometheus endpoint (None when metrics are off)."""
        return self.metrics.port if self.metrics else None

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for ``grace`` seconds, then drain the batchers."""
        self.health.enter_graceful_shutdown()
        self.dataplane.ready = False
        if self.poller is not None:
            self.poller.stop()
        self.server.stop(grace).wait()
        for pool in (self.stream_pool, self.rpc_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.dataplane.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options shared by server and clients: large messages (gRPC's own 4 MiB cap is too small)."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]


class ConfigurationError(ValueError):
    """Settings the server must not or cannot start with: exposed without credentials, unusable TLS or token files."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine: 127.0.0.0/8, ::1 or localhost."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # another name, or "" / "0.0.0.0" / "::" (every interface)


def check_exposure(settings: Settings) -> None:
    """ConfigurationError when the server would listen beyond loopback with neither TLS nor tokens and
    ``insecure`` was not given (like Redis' protected mode)."""
    if is_loopback(settings.host) or settings.insecure:
        return
    if settings.tls_cert_file is None and settings.auth_tokens_file is None:
        raise ConfigurationError(
            f"refusing to listen on {settings.host!r} without credentials: anyone who reaches the port could upload, "
            "delete and predict. Set --tls-cert/--tls-key (LEANSERVE_TLS_CERT_FILE/LEANSERVE_TLS_KEY_FILE) and/or "
            "--auth-tokens (LEANSERVE_AUTH_TOKENS_FILE), listen on 127.0.0.1, or pass --insecure (LEANSERVE_INSECURE="
            "true) to run without them on purpose."
        )


def create_server(settings: Settings) -> ServerHandle:
    """Load the repository, bind ``settings.host:settings.port`` (0 = any free port) and start serving.

    ConfigurationError, before anything is loaded or bound, for a non-loopback host without credentials (see
    ``check_exposure``) and for unusable TLS or token files."""
    check_exposure(settings)
    try:
        certificates = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            certificates = ServerCertificates(settings.tls_cert_file, settings.tls_key_file,
                                              settings.tls_client_ca_file)
        tokens = TokenFile(settings.auth_tokens_file) if settings.auth_tokens_file is not None else None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from exc
    apply_process_settings(settings)  # before any model is tuned or served
    # one process sweeps leftovers at start (the sweep keeps every writer's staging that is still in use)
    repository = open_repository(settings.repository, settings, sweep=settings.process_index == 0)
    registry = ModelRegistry()
    dataplane = DataPlane(settings, repository, registry)
    dataplane.load_all()

    # streams hold a thread for their whole life: they get a pool of their own, sized by their slots
    stream_pool = futures.ThreadPoolExecutor(max_workers=settings.stream_threads, thread_name_prefix="leanserve-stream")
    rpc_pool = WorkerPool(settings.worker_threads, max(settings.worker_threads, settings.max_worker_threads),
                          "leanserve-rpc")
    watchdog = SendWatchdog(settings.stream_idle_timeout_seconds)
    server = grpc.server(
        rpc_pool,
        # auth first: a refused call costs no more than the refusal; no token file = no auth interceptor at all
        interceptors=[*([AuthInterceptor(tokens, settings.client_error_log_per_second)] if tokens else []),
                      ErrorInterceptor(settings.client_error_log_per_second, stream_pool,
                                       with_infer_memo(REQUEST_DECODERS, settings.max_message_bytes),
                                       watchdog)],
        # gRPC sets SO_REUSEPORT by default: a second, unrelated server on the same port would bind it too and
        # take half the connections; only the processes of one ``--processes`` server share a port
        options=[*grpc_options(settings), ("grpc.so_reuseport", int(settings.processes > 1))],
        maximum_concurrent_rpcs=None,
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(dataplane), server)
    streams = StreamSlots(settings.max_open_streams)  # shared: both protocols' streams hold the same threads
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(dataplane, streams), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(V2Servicer(dataplane, streams), server)
    optimize_service_pb2_grpc.add_OptimizeServiceServicer_to_server(OptimizeServicer(Optimizer(dataplane)), server)

    health_servicer = HealthServicer(settings.max_health_watches)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, SERVING)
    if settings.serves_reflection:
        add_reflection(server, (*SERVICE_NAMES, HEALTH_SERVICE_NAME), settings.max_open_reflection_streams,
                       settings.stream_idle_timeout_seconds)

    address = listen_address(settings.host, settings.port)
    try:
        if certificates is not None:
            port = server.add_secure_port(address, certificates.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address"
        port = 0
    if port == 0:
        dataplane.close()
        stream_pool.shutdown(wait=False)
        rpc_pool.shutdown(wait=False)
        raise OSError(f"cannot listen on {address}: in use by another process, or not an address of this machine")
    metrics = None
    if settings.metrics:
        try:
            metrics = MetricsServer(registry.all, settings.host, settings.metrics_port,
                                    tls=certificates.ssl_context if certificates is not None else None)
        except OSError as exc:  # metrics are auxiliary: a taken port must not stop inference
            log.error("metrics endpoint off: cannot listen on %s: %s",
                      listen_address(settings.host, settings.metrics_port), exc)
    server.start()
    poller = RepositoryPoller(dataplane, settings.poll_seconds) if settings.poll_seconds > 0 else None
    log.info("serving %d model(s) from %s", len(registry.names()), settings.repository)
    log.info("gRPC on %s: %s, %s", listen_address(settings.host, port),
             "mTLS" if settings.tls_client_ca_file else "TLS" if certificates else "plaintext",
             f"tokens from {settings.auth_tokens_file}" if tokens else "no authentication")
    return ServerHandle(server=server, port=port, dataplane=dataplane, health=health_servicer, metrics=metrics,
                        poller=poller, certificates=certificates, tokens=tokens, stream_pool=stream_pool,
                        rpc_pool=rpc_pool, watchdog=watchdog)
