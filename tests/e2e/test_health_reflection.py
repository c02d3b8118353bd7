"""Standard gRPC health and reflection services, so grpcurl / grpc_health_probe / k8s probes work."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from leanserve.server.app import ServerHandle


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
