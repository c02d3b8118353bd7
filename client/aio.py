"""asyncio Python client for the leanserve.v1 API (same methods as ``Client``, awaitable)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import numpy as np

from leanserve.client import common
from leanserve.client import optimize as opt
from leanserve.client.client import PredictOutput, StreamError
from leanserve.v1 import inference_service_pb2_grpc as inf_grpc
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import model_service_pb2_grpc as model_grpc
from leanserve.v1 import optimize_service_pb2_grpc as optimize_grpc


class AsyncClient:
    """asyncio client; use ``async with AsyncClient(target) as c:``. ``token`` and ``tls*``: as for ``Client``."""

    def __init__(self, target: str = common.DEFAULT_SERVER, *, token: str | None = None, tls: bool = False,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, max_message_bytes: int = common.DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float | None = None) -> None:
        self.channel = common.Connection(target, token, tls, tls_ca, tls_cert, tls_key, max_message_bytes).aio_channel()
        self.models_stub = model_grpc.ModelServiceStub(self.channel)
        self.inference_stub = inf_grpc.InferenceServiceStub(self.channel)
        self._raw = common.raw_predict_methods(self.channel)
        self.optimize_stub = optimize_grpc.OptimizeServiceStub(self.channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def upload(self, path: str | Path, name: str, *, format: str = "", description: str = "",
                     progress: Callable[[int], None] | None = None) -> model_pb.ModelInfo:
        msgs = common.upload_messages(Path(path), name, fmt=format, description=description, progress=progress)
        return (await self.models_stub.UploadModel(msgs, timeout=self.timeout)).model

    async def models(self) -> dict[str, list[int]]:
        resp = await self.models_stub.ListModels(model_pb.ListModelsRequest(), timeout=self.timeout)
        return {m.name: list(m.versions) for m in resp.models}

    async def info(self, name: str, version: int = 0) -> model_pb.ModelInfo:
        return await self.models_stub.GetModel(model_pb.GetModelRequest(name=name, version=version), timeout=self.timeout)

    async def delete(self, name: str, version: int = 0) -> list[int]:
        resp = await self.models_stub.DeleteModel(model_pb.DeleteModelRequest(name=name, version=version), timeout=self.timeout)
        return list(resp.deleted_versions)

    async def predict(self, name: str, x: np.ndarray, *, version: int = 0, postprocess: str = "raw",
                      top_k: int = 0) -> PredictOutput:
        req = common.predict_request_bytes(name, x, version=version, postprocess=postprocess, top_k=top_k)
        resp = await self._raw.predict(req, timeout=self.timeout)
        return PredictOutput(resp.model_name, resp.model_version, common.outputs(resp), resp.request_id)

    async def stream(self, name: str, batches: Iterable[np.ndarray], *, version: int = 0, postprocess: str = "raw",
                     top_k: int = 0) -> AsyncIterator[PredictOutput]:
        requests = (
            common.predict_request_bytes(name, x, version=version, postprocess=postprocess, top_k=top_k,
                                         request_id=str(i))
            for i, x in enumerate(batches)
        )
        async for resp in self._raw.stream(requests, timeout=self.timeout):
            if resp.HasField("error"):
                raise StreamError(resp.error.code, resp.error.message, resp.request_id)
            yield PredictOutput(resp.model_name, resp.model_version, common.outputs(resp), resp.request_id)

    async def optimize(self, name: str, data: None | str | Path | dict[str, np.ndarray] = None, *,
                       progress: opt.ProgressCallback | None = None, **options: object) -> dict:
        """Like ``Client.optimize``: the report of a prune/quantize run within an accuracy budget."""
        msgs = opt.requests(name, opt.data_bytes(data), **options)  # type: ignore[arg-type]
        report = None
        async for event in self.optimize_stub.Optimize(msgs, timeout=self.timeout):
            report = opt.handle_event(event, progress) or report
        if report is None:
            raise RuntimeError("the Optimize stream ended without a report")
        return report
