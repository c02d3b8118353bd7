"""asyncio Python client for the leanserve.v1 API: ``Client``'s methods, with the same parameters, awaitable
(tests/client/test_client_parity.py keeps the two in step)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import grpc
import numpy as np

from leanserve.client import common
from leanserve.client import optimize as opt
from leanserve.client.common import PredictOutput
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import optimize_service_pb2 as optimize_pb


class AsyncClient(common.Stubs):
    """asyncio client; use ``async with AsyncClient(target) as c:``. Arguments, methods and errors as ``Client``'s
    (``grpc.aio.AioRpcError``, a ``grpc.RpcError``; ``StreamError``; an exception raised while a request stream is
    sent is raised as it is once the call has ended). ``channel``: a ``grpc.aio`` channel to use as is."""

    def __init__(
        self,
        target: str = common.DEFAULT_SERVER,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_message_bytes: int = common.DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
    ) -> None:
        self.channel = channel or common.Connection(target, token, tls, tls_ca, tls_cert, tls_key,
                                                    max_message_bytes).aio_channel()
        super().__init__(self.channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the channel is connected; ``common.ReadyTimeout`` (a ``grpc.FutureTimeoutError`` and a
        ``TimeoutError``) after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:  # asyncio's, the builtin since 3.11
            raise common.ReadyTimeout(f"not connected to the server within {timeout} s") from None

    # -- models ----------------------------------------------------------------------------------------------
    async def upload(
        self, path: str | Path, name: str, *, format: str = "", description: str = "",
        progress: Callable[[int], None] | None = None,
    ) -> model_pb.ModelInfo:
        """Upload a ``.keras``, ``.h5`` or ``.leanserve`` file as the next version of ``name``."""
        msgs = common.upload_messages(Path(path), name, fmt=format, description=description, progress=progress)
        with common.CapturedRequests(msgs) as requests:
            return (await self.models_stub.UploadModel(requests, timeout=self.timeout)).model

    async def models(self) -> dict[str, list[int]]:
        """Every model and its versions."""
        return common.model_versions(await self.models_stub.ListModels(model_pb.ListModelsRequest(),
                                                                       timeout=self.timeout))

    async def info(self, name: str, version: int = 0) -> model_pb.ModelInfo:
        """Everything known about one version (the default version when 0: the latest unless one is pinned)."""
        req = model_pb.GetModelRequest(name=name, version=version)
        return await self.models_stub.GetModel(req, timeout=self.timeout)

    async def delete(self, name: str, version: int = 0) -> list[int]:
        """Delete one version, or all when 0; returns the deleted versions."""
        req = model_pb.DeleteModelRequest(name=name, version=version)
        return list((await self.models_stub.DeleteModel(req, timeout=self.timeout)).deleted_versions)

    # -- inference -------------------------------------------------------------------------------------------
    async def predict(
        self, name: str, x: np.ndarray, *, version: int = 0, postprocess: str = "raw", top_k: int = 0,
        timeout: float | None = None,
    ) -> PredictOutput:
        """One batch in, its outputs back."""
        req = common.predict_request_bytes(name, x, version=version, postprocess=postprocess, top_k=top_k)
        return common.predict_output(await self._raw.predict(req, timeout=timeout or self.timeout))

    async def stream(
        self, name: str, batches: Iterable[np.ndarray], *, version: int = 0, postprocess: str = "raw",
        top_k: int = 0, raise_on_error: bool = True,
    ) -> AsyncIterator[PredictOutput]:
        """Push many batches through one PredictStream; results come back in order, request ids "0", "1", ...

        A request the server fails raises ``StreamError`` (skipped when not ``raise_on_error``)."""
        requests = common.stream_requests(name, batches, version=version, postprocess=postprocess, top_k=top_k)
        call = self._raw.stream(requests, timeout=self.timeout)
        try:
            with requests:
                async for resp in call:
                    out = common.stream_output(resp, raise_on_error)
                    if out is not None:
                        yield out
        finally:
            call.cancel()  # no-op once the call has ended; frees the server when the caller stops early

    # -- optimization ----------------------------------------------------------------------------------------
    async def optimize(
        self, name: str, data: None | str | Path | dict[str, np.ndarray] = None, *, version: int = 0,
        sparsity: float = 0.0, block: str = "", granularity: str = "per_layer", quantize: str = "none",
        max_accuracy_drop: float = 0.01, epochs: int | None = None, search: bool = False, promote: bool = False,
        description: str = "", time_budget: float = 0.0, progress: opt.ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> dict:
        """As ``Client.optimize``: the report of a prune/quantize run within an accuracy budget (options that
        cannot be valid raise ``ValueError`` before the call starts)."""
        msgs = common.CapturedRequests(opt.requests(
            name, opt.data_bytes(data), version=version, sparsity=sparsity, block=block, granularity=granularity,
            quantize=quantize, max_accuracy_drop=max_accuracy_drop, epochs=epochs, search=search, promote=promote,
            description=description, time_budget=time_budget))
        call = self.optimize_stub.Optimize(msgs, timeout=timeout or self.timeout)
        try:
            with msgs:
                report = None
                async for event in call:
                    report = opt.handle_event(event, progress) or report
            return opt.final_report(report)
        finally:
            call.cancel()  # no-op once the call has ended; stops the run when ``progress`` raised

    async def set_default(self, name: str, version: int = 0) -> int:
        """Pin ``version`` as the version requests with version 0 get (0 = unpin: the latest); returns the default
        version afterwards (after unpinning, the latest)."""
        req = optimize_pb.SetDefaultVersionRequest(name=name, version=version)
        return (await self.optimize_stub.SetDefaultVersion(req, timeout=self.timeout)).default_version
