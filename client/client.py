"""Blocking Python client for the leanserve.v1 API."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np

from leanserve.client import common
from leanserve.client import optimize as opt
from leanserve.client.common import PredictOutput, StreamError
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import optimize_service_pb2 as optimize_pb

__all__ = ["Client", "PredictOutput", "StreamError"]


class Client(common.Stubs):
    """Talks to one leanserve server. Errors surface as ``grpc.RpcError`` with the server's status code (a failed
    request inside a stream as ``StreamError``, a ``grpc.RpcError`` too). An exception raised on this side while a
    request stream is sent (a batch the codec refuses, a ``progress`` callback failing) ends the call and is
    raised as it is once the call has ended (``stream`` first yields the results answered before it).

    ``token``: sent as ``authorization: Bearer <token>`` with every call. TLS when ``tls`` or any ``tls_*`` file is
    given: ``tls_ca`` is the CA the server's certificate must chain to (default: the system's roots),
    ``tls_cert``/``tls_key`` this client's certificate for servers that require one (mTLS). ``channel``: use this
    channel as is instead (the other connection arguments are then ignored)."""

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
        channel: grpc.Channel | None = None,
        timeout: float | None = None,
    ) -> None:
        self.channel = channel or common.Connection(target, token, tls, tls_ca, tls_cert, tls_key,
                                                    max_message_bytes).channel()
        super().__init__(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel is connected; ``common.ReadyTimeout`` (a ``grpc.FutureTimeoutError`` and a
        ``TimeoutError``) after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise common.ReadyTimeout(f"not connected to the server within {timeout} s") from None

    # -- models ----------------------------------------------------------------------------------------------
    def upload(
        self, path: str | Path, name: str, *, format: str = "", description: str = "",
        progress: Callable[[int], None] | None = None,
    ) -> model_pb.ModelInfo:
        """Upload a ``.keras``, ``.h5`` or ``.leanserve`` file as the next version of ``name``."""
        msgs = common.upload_messages(Path(path), name, fmt=format, description=description, progress=progress)
        with common.CapturedRequests(msgs) as requests:
            return self.models_stub.UploadModel(requests, timeout=self.timeout).model

    def models(self) -> dict[str, list[int]]:
        """Every model and its versions."""
        resp = self.models_stub.ListModels(model_pb.ListModelsRequest(), timeout=self.timeout)
        return common.model_versions(resp)

    def info(self, name: str, version: int = 0) -> model_pb.ModelInfo:
        """Everything known about one version (the default version when 0: the latest unless one is pinned)."""
        return self.models_stub.GetModel(model_pb.GetModelRequest(name=name, version=version), timeout=self.timeout)

    def delete(self, name: str, version: int = 0) -> list[int]:
        """Delete one version, or all when 0; returns the deleted versions."""
        req = model_pb.DeleteModelRequest(name=name, version=version)
        return list(self.models_stub.DeleteModel(req, timeout=self.timeout).deleted_versions)

    # -- inference -------------------------------------------------------------------------------------------
    def predict(
        self, name: str, x: np.ndarray, *, version: int = 0, postprocess: str = "raw", top_k: int = 0,
        timeout: float | None = None,
    ) -> PredictOutput:
        """One batch in, its outputs back."""
        req = common.predict_request_bytes(name, x, version=version, postprocess=postprocess, top_k=top_k)
        return common.predict_output(self._raw.predict(req, timeout=timeout or self.timeout))

    def stream(
        self, name: str, batches: Iterable[np.ndarray], *, version: int = 0, postprocess: str = "raw",
        top_k: int = 0, raise_on_error: bool = True,
    ) -> Iterator[PredictOutput]:
        """Push many batches through one PredictStream; results come back in order, request ids "0", "1", ...

        A request the server fails raises ``StreamError`` (skipped when not ``raise_on_error``)."""
        requests = common.stream_requests(name, batches, version=version, postprocess=postprocess, top_k=top_k)
        call = self._raw.stream(requests, timeout=self.timeout)
        try:
            with requests:
                for resp in call:
                    out = common.stream_output(resp, raise_on_error)
                    if out is not None:
                        yield out
        finally:
            call.cancel()  # no-op once the call has ended; frees the server when the caller stops early

    # -- optimization ----------------------------------------------------------------------------------------
    def optimize(
        self, name: str, data: None | str | Path | dict[str, np.ndarray] = None, *, version: int = 0,
        sparsity: float = 0.0, block: str = "", granularity: str = "per_layer", quantize: str = "none",
        max_accuracy_drop: float = 0.01, epochs: int | None = None, search: bool = False, promote: bool = False,
        description: str = "", time_budget: float = 0.0, progress: opt.ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> dict:
        """Prune and/or quantize ``name`` within an accuracy budget; returns the report (``report["version"]``
        is the new version, ``report["promoted"]`` whether it became the default).

        ``data``: an .npz path or a dict with ``x`` and optionally ``y`` (labels or one-hot), ``x_val``,
        ``y_val``; None = one-shot, judged by agreement on random inputs. ``block``: "RxC" or "" (unstructured).
        ``epochs``: None = the server fine-tunes when the data allows it, 0 = one-shot, N = N epochs per candidate.
        While over ``max_accuracy_drop`` the server keeps trying candidates, within ``time_budget`` seconds
        (0 = the server's default). ``progress(stage, fraction, message)`` is called for every progress event.
        Options that cannot be valid raise ``ValueError`` before the call starts."""
        msgs = common.CapturedRequests(opt.requests(
            name, opt.data_bytes(data), version=version, sparsity=sparsity, block=block, granularity=granularity,
            quantize=quantize, max_accuracy_drop=max_accuracy_drop, epochs=epochs, search=search, promote=promote,
            description=description, time_budget=time_budget))
        call = self.optimize_stub.Optimize(msgs, timeout=timeout or self.timeout)
        try:
            with msgs:
                report = None
                for event in call:
                    report = opt.handle_event(event, progress) or report
            return opt.final_report(report)
        finally:
            call.cancel()  # no-op once the call has ended; stops the run when ``progress`` raised

    def set_default(self, name: str, version: int = 0) -> int:
        """Pin ``version`` as the version requests with version 0 get (0 = unpin: the latest); returns the default
        version afterwards (after unpinning, the latest)."""
        req = optimize_pb.SetDefaultVersionRequest(name=name, version=version)
        return self.optimize_stub.SetDefaultVersion(req, timeout=self.timeout).default_version
