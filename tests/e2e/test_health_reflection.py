"""Standard gRPC health and reflection services, so grpcurl / grpc_health_probe / k8s probes work."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings


def test_health_serving_then_not_serving_on_stop(server: ServerHandle) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "leanserve.v1.InferenceService", "leanserve.v1.ModelService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        server.health.enter_graceful_shutdown()
        assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_services(server: ServerHandle) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"leanserve.v1.InferenceService", "leanserve.v1.ModelService", "grpc.health.v1.Health"} <= names


def test_watchers_hear_of_shutdown_and_ending_watches_never_freeze_stop(repo_dir: Path) -> None:
    """Watches ending while ``stop()`` tells the others NOT_SERVING once froze the server for good (grpc-health
    sent under the lock its close callback takes, on the thread that completes sends): each round must stop."""
    for _ in range(8):
        handle = create_server(make_settings(repo_dir, max_health_watches=24))
        channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(24)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:  # the 25th watch
            next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for watch in watches[::2]:
            watch.cancel()
        stopper = threading.Thread(target=handle.stop, args=(0.5,), daemon=True)
        stopper.start()
        for watch in watches[1::2]:
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(30)
        assert not stopper.is_alive(), "stop() froze"
        channel.close()
