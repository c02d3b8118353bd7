"""``leanserve ray``: replicas of the data plane behind Ray Serve's gRPC proxy (extra ``leanserve[ray]``).

Each replica is a ``LeanserveReplica``: its own DataPlane (registry, batchers, Numba kernels) on the shared
repository, which it polls like any server, so a version published to the store reaches every replica. Ray Serve's
gRPC proxy routes a call by its method name to the replica method of the same name, so the methods here are named
like the RPCs of ``inference.GRPCInferenceService`` (KServe V2: ModelInfer, ModelStreamInfer, metadata, ready) and
``leanserve.v1.InferenceService`` (Predict, PredictStream); each runs the very servicer code ``leanserve serve``
runs, in a thread pool (the servicers are synchronous; the replica's event loop must stay free).

What the proxy does not carry:
- no TLS and no tokens: the proxy speaks plaintext (put a TLS-terminating load balancer or a service mesh in
  front, and keep the port inside the cluster network);
- no admin calls: uploads, deletes and optimizations go to the store (``leanserve publish``) or to a plain
  ``leanserve serve`` on the same repository; every replica follows the store. RepositoryModelLoad/Unload answer
  UNIMPLEMENTED here.

Every unary answer carries trailing metadata ``leanserve-ray-node`` and ``leanserve-ray-replica`` (which node and
replica answered), so clients and tests can see the spread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from leanserve.v1 import inference_service_pb2 as v1_pb
from leanserve.v1 import inference_service_pb2_grpc as v1_grpc
from leanserve.v2 import grpc_service_pb2 as v2_pb
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from leanserve.server.serving.workers import WorkerPool

log = logging.getLogger(__name__)

APP_NAME = "leanserve"
DEPLOYMENT_NAME = "LeanserveReplica"
NODE_METADATA = "leanserve-ray-node"
REPLICA_METADATA = "leanserve-ray-replica"
_END = object()


# -- registering the services on Ray's proxy ---------------------------------------------------------------------
class _GenericOnly:
    """Stands in for the server while a generated ``add_*_to_server`` runs: passes the generic handlers on and drops
    ``add_registered_method_handlers``. Stubs from grpcio-tools >= 1.63 call both; Ray Serve before 2.5x overrode
    only the generic path, so registered handlers reached the servicer Ray passes (a Mock) and failed with
    "Mock ... SerializeToString". The generic path alone routes every method through Ray on every version."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        pass


def add_v2_servicer(servicer: Any, server: Any) -> None:
    """For ``gRPCOptions.grpc_servicer_functions``: inference.GRPCInferenceService on Ray's proxy."""
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _GenericOnly(server))


def add_v1_inference_servicer(servicer: Any, server: Any) -> None:
    """For ``gRPCOptions.grpc_servicer_functions``: leanserve.v1.InferenceService on Ray's proxy."""
    v1_grpc.add_InferenceServiceServicer_to_server(servicer, _GenericOnly(server))


SERVICER_FUNCTIONS = [f"{__name__}.add_v2_servicer", f"{__name__}.add_v1_inference_servicer"]


# -- one call's context, as the servicers expect it ----------------------------------------------------------------
class _CallContext:
    """The part of ``grpc.ServicerContext`` the servicers use, over Ray's ``RayServegRPCContext``."""

    def __init__(self, ray_context: Any, timeout: float | None) -> None:
        self._ray = ray_context
        self._timeout = timeout

    def time_remaining(self) -> float | None:
        return self._timeout

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True  # Ray does not tell a replica that its caller went away; the deadline still bounds the wait

    def peer(self) -> str:
        return self._ray.peer() if self._ray is not None else ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._ray.invocation_metadata()) if self._ray is not None else []

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # the proxy is plaintext: no client certificates


# -- the replica ---------------------------------------------------------------------------------------------------
class LeanserveReplica:
    """One replica: a DataPlane on the shared repository, answering the RPCs Ray routes to it by method name."""

    def __init__(self, settings: dict[str, Any], request_timeout_s: float | None = None) -> None:
        from leanserve.server.dataplane import DataPlane
        from leanserve.server.grpc.calls import StreamSlots
        from leanserve.server.grpc.inference_servicer import InferenceServicer
        from leanserve.server.grpc.v2_servicer import V2Servicer
        from leanserve.server.repository.open import open_repository
        from leanserve.server.runtime.process import apply_process_settings
        from leanserve.server.repository.poll import RepositoryPoller
        from leanserve.server.serving.registry import ModelRegistry
        from leanserve.server.settings import Settings

        import ray
        from ray import serve

        self.settings = Settings(**settings)
        logging.basicConfig(level=self.settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        context = serve.get_replica_context()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = str(getattr(context.replica_id, "unique_id", context.replica_id))
        apply_process_settings(self.settings)
        repository = open_repository(self.settings.repository, self.settings, sweep=False)
        self.dataplane = DataPlane(self.settings, repository, ModelRegistry())
        self.dataplane.load_all()
        streams = StreamSlots(self.settings.max_open_streams)
        self._v2 = V2Servicer(self.dataplane, streams)
        self._v1 = InferenceServicer(self.dataplane, streams)
        self._metadata = v2_pb.ServerMetadataResponse()
        self._metadata.CopyFrom(self._v2.ServerMetadata(None, None))
        self._metadata.extensions.extend([f"leanserve_ray_node={self.node_id}",
                                          f"leanserve_ray_replica={self.replica_id}"])
        self._timeout = request_timeout_s
        # as in create_server: unary calls on a pool bounding the threads computing, streams on threads of their own
        self._pool = WorkerPool(self.settings.worker_threads,
                                max(self.settings.worker_threads, self.settings.max_worker_threads), "leanserve-ray")
        self._stream_pool = ThreadPoolExecutor(self.settings.stream_threads, thread_name_prefix="leanserve-ray-stream")
        interval = self.settings.poll_seconds or 1.0  # replicas always follow the store: that is how they agree
        self._poller = RepositoryPoller(self.dataplane, interval)
        log.info("replica %s on node %s serves %s from %s", self.replica_id, self.node_id,
                 self.dataplane.list_models(), self.settings.repository)

    def __del__(self) -> None:
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.stop()
            self.dataplane.close()

    def check_health(self) -> None:
        """Ray's health probe: a replica whose data plane is not ready is restarted."""
        if not self.dataplane.ready:
            raise RuntimeError("the data plane is not ready")

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _mark(self, grpc_context: Any) -> None:
        if grpc_context is not None:
            grpc_context.set_trailing_metadata([(NODE_METADATA, self.node_id), (REPLICA_METADATA, self.replica_id)])

    @staticmethod
    def _fail(grpc_context: Any, exc: BaseException) -> None:
        from leanserve.server.errors import LeanserveError
        from leanserve.server.grpc.calls import status_code

        if isinstance(exc, LeanserveError):
            message = exc.message
        else:
            log.error("unexpected error in a Ray replica call", exc_info=exc)
            message = "internal error; see the replica's log"
        if grpc_context is not None:
            grpc_context.set_code(status_code(exc))
            grpc_context.set_details(message)

    async def _unary(self, method: Callable[[Any, Any], Any], request: Any, grpc_context: Any, empty: Any) -> Any:
        call = _CallContext(grpc_context, self._timeout)
        self._mark(grpc_context)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, method, request, call)
        except Exception as exc:  # noqa: BLE001 -- answered with its status, as the interceptor does
            self._fail(grpc_context, exc)
            return empty

    async def _stream(self, method: Callable[[Iterator[Any], Any], Iterator[Any]], requests: AsyncIterator[Any],
                      grpc_context: Any) -> AsyncIterator[Any]:
        """Run a servicer's synchronous bidirectional stream (its read-ahead window, per-request error answers and
        idle timeout included) in a thread, fed from Ray's async request stream."""
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        call = _CallContext(grpc_context, self._timeout)
        stop = threading.Event()

        def incoming() -> Iterator[Any]:
            while not stop.is_set():
                try:
                    yield asyncio.run_coroutine_threadsafe(requests.__anext__(), loop).result()
                except StopAsyncIteration:
                    return

        def run() -> None:
            try:
                for answer in method(incoming(), call):
                    loop.call_soon_threadsafe(answers.put_nowait, (answer, None))
            except BaseException as exc:  # noqa: BLE001 -- handed to the event loop, answered there
                loop.call_soon_threadsafe(answers.put_nowait, (None, exc))
            else:
                loop.call_soon_threadsafe(answers.put_nowait, (_END, None))

        worker = loop.run_in_executor(self._stream_pool, run)
        try:
            while True:
                answer, exc = await answers.get()
                if exc is not None:
                    self._fail(grpc_context, exc)
                    return
                if answer is _END:
                    return
                yield answer
        finally:
            stop.set()
            if worker.done():
                worker.result()

    # -- inference.GRPCInferenceService ----------------------------------------------------------------------------
    async def ServerLive(self, request: v2_pb.ServerLiveRequest, grpc_context: Any = None):
        return await self._unary(self._v2.ServerLive, request, grpc_context, v2_pb.ServerLiveResponse())

    async def ServerReady(self, request: v2_pb.ServerReadyRequest, grpc_context: Any = None):
        return await self._unary(self._v2.ServerReady, request, grpc_context, v2_pb.ServerReadyResponse())

    async def ModelReady(self, request: v2_pb.ModelReadyRequest, grpc_context: Any = None):
        return await self._unary(self._v2.ModelReady, request, grpc_context, v2_pb.ModelReadyResponse())

    async def ServerMetadata(self, request: v2_pb.ServerMetadataRequest, grpc_context: Any = None):
        self._mark(grpc_context)
        return self._metadata

    async def ModelMetadata(self, request: v2_pb.ModelMetadataRequest, grpc_context: Any = None):
        return await self._unary(self._v2.ModelMetadata, request, grpc_context, v2_pb.ModelMetadataResponse())

    async def ModelInfer(self, request: v2_pb.ModelInferRequest, grpc_context: Any = None):
        return await self._unary(self._v2.ModelInfer, request, grpc_context, v2_pb.ModelInferResponse())

    async def ModelStreamInfer(self, request_stream: AsyncIterator[v2_pb.ModelInferRequest], grpc_context: Any = None):
        async for answer in self._stream(self._v2.ModelStreamInfer, request_stream, grpc_context):
            yield answer

    async def ModelStatistics(self, request: v2_pb.ModelStatisticsRequest, grpc_context: Any = None):
        """This replica's statistics (each replica counts its own calls)."""
        return await self._unary(self._v2.ModelStatistics, request, grpc_context, v2_pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: v2_pb.RepositoryIndexRequest, grpc_context: Any = None):
        return await self._unary(self._v2.RepositoryIndex, request, grpc_context, v2_pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: v2_pb.RepositoryModelLoadRequest, grpc_context: Any = None):
        return self._admin_refused(grpc_context, v2_pb.RepositoryModelLoadResponse())

    async def RepositoryModelUnload(self, request: v2_pb.RepositoryModelUnloadRequest, grpc_context: Any = None):
        return self._admin_refused(grpc_context, v2_pb.RepositoryModelUnloadResponse())

    def _admin_refused(self, grpc_context: Any, empty: Any) -> Any:
        self._mark(grpc_context)
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            grpc_context.set_details("the Ray ingress serves inference only (it has no authentication): change the "
                                     "repository with `leanserve publish` or through a `leanserve serve` on it")
        return empty

    # -- leanserve.v1.InferenceService -----------------------------------------------------------------------------
    async def Predict(self, request: v1_pb.PredictRequest, grpc_context: Any = None):
        return await self._unary(self._v1.Predict, request, grpc_context, v1_pb.PredictResponse())

    async def PredictStream(self, request_stream: AsyncIterator[v1_pb.PredictRequest], grpc_context: Any = None):
        async for answer in self._stream(self._v1.PredictStream, request_stream, grpc_context):
            yield answer


# -- deploying -----------------------------------------------------------------------------------------------------
def build_app(settings: Any, *, replicas: int = 1, min_replicas: int | None = None,
              max_replicas: int | None = None, target_ongoing_requests: float | None = None,
              max_ongoing_requests: int = 256, replica_cpus: float = 1.0, request_timeout_s: float | None = None):
    """The Ray Serve application: ``replicas`` fixed replicas, or autoscaling between ``min_replicas`` and
    ``max_replicas`` aiming at ``target_ongoing_requests`` per replica; at most one replica per node."""
    from ray import serve

    options: dict[str, Any] = dict(
        name=DEPLOYMENT_NAME,
        max_replicas_per_node=1,  # spread over nodes: no packing on the head
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus},
        health_check_period_s=10,
        graceful_shutdown_timeout_s=max(1.0, float(settings.shutdown_grace_seconds)),
    )
    if min_replicas is not None or max_replicas is not None or target_ongoing_requests is not None:
        low = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, replicas),
            "max_replicas": max_replicas if max_replicas is not None else max(low, replicas),
            "target_ongoing_requests": target_ongoing_requests if target_ongoing_requests is not None else 32,
        }
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(LeanserveReplica).options(**options)
    return deployment.bind(settings.model_dump(mode="json"), request_timeout_s)


def wait_for_proxy(address: str, timeout: float) -> None:
    """Return once ServerReady through the proxy says ready; TimeoutError otherwise."""
    import time

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(v2_pb.ServerReadyRequest(), timeout=5).ready:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.5)
    raise TimeoutError(f"the Ray gRPC proxy on {address} did not answer ready: {last}. If Serve was already "
                       "running in this cluster, it kept the gRPC port it started with: use that port, or stop Serve "
                       "(`serve shutdown`) first")
