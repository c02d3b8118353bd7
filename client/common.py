"""What the sync and asyncio clients share: message building, answer reading, tensor conversion, channels
(options, TLS, token), and keeping a client-side error raised while a request stream is being sent."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np

from leanserve.client import codec, wire
from leanserve.v1 import inference_service_pb2 as inf_pb
from leanserve.v1 import inference_service_pb2_grpc as inf_grpc
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import model_service_pb2_grpc as model_grpc
from leanserve.v1 import optimize_service_pb2_grpc as optimize_grpc
from leanserve.v1 import tensor_pb2 as tensor_pb

DEFAULT_SERVER = "127.0.0.1:8500"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024

POSTPROCESS = {"raw": inf_pb.RAW, "probabilities": inf_pb.PROBABILITIES, "top_k": inf_pb.TOP_K, "argmax": inf_pb.ARGMAX}
FORMATS = {"": model_pb.MODEL_FORMAT_UNSPECIFIED, "keras": model_pb.KERAS, "h5": model_pb.H5,
           "leanserve": model_pb.LEANSERVE}


@dataclass(frozen=True)
class PredictOutput:
    """One answer: the version that served it and its named output arrays.

    The arrays are read-only views of the received bytes (no copy); ``np.array(y)`` makes a writable copy."""

    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray]
    request_id: str = ""

    @property
    def output(self) -> np.ndarray:
        """The only output (raises when there are several, e.g. top-k's indices and scores)."""
        if len(self.outputs) != 1:
            raise ValueError(f"several outputs: {', '.join(self.outputs)}")
        return next(iter(self.outputs.values()))


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


class StreamError(grpc.RpcError, RuntimeError):
    """A request inside a stream failed: the server's own error answer to it (the server goes on with the stream's
    other requests; ``stream(..., raise_on_error=False)`` skips such answers instead of raising).

    Read it like the ``grpc.RpcError`` a failed call raises: ``code()`` is the ``grpc.StatusCode`` (e.g.
    ``INVALID_ARGUMENT``), ``details()`` the server's message (also ``message``); ``request_id`` names the request.
    ``except grpc.RpcError as err: print(f"error {err.code().name}: {err.details()}")`` covers both."""

    def __init__(self, code: int | grpc.StatusCode, message: str, request_id: str) -> None:
        status = code if isinstance(code, grpc.StatusCode) else _STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
        super().__init__(f"request {request_id!r} failed with {status.name}: {message}")
        self._code, self.message, self.request_id = status, message, request_id

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message


class ReadyTimeout(grpc.FutureTimeoutError, TimeoutError):
    """``wait_ready`` timed out (both clients; catch it as either base)."""


class CapturedRequests:
    """The requests of a client-streaming call, with an exception raised while building one kept, not sent.

    grpc answers such an exception by cancelling the call with ``UNKNOWN "Exception iterating requests!"`` and drops
    the exception. Wrapped, it ends the request stream instead (the server answers what was sent), and leaving the
    ``with`` block around the call raises it (its own type and message) once the call has ended, whether the call
    ended well or with the error the server gave the unfinished stream. A ``StreamError`` or any other exception
    leaving the block goes on as it is. Used by the sync client (grpc iterates on its own thread) and the asyncio
    one (iterated on the event loop)."""

    def __init__(self, requests: Iterable[Any]) -> None:
        self._requests = iter(requests)
        self.error: Exception | None = None

    def __iter__(self) -> CapturedRequests:
        return self

    def __next__(self) -> Any:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except Exception as exc:  # noqa: BLE001 -- kept for the caller, see the class
            self.error = exc
            raise StopIteration from None

    def __enter__(self) -> CapturedRequests:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.error is not None and (exc is None or isinstance(exc, grpc.RpcError)
                                       and not isinstance(exc, StreamError)):
            error, self.error = self.error, None
            raise error


#: calls that change nothing on the server, which gRPC itself sends again when the answer is UNAVAILABLE: what a
#: call gets when its connection is reset, e.g. by a server process that is being restarted (``--processes``).
#: Calls that change something (upload, delete, optimize, set default) and streams are never sent twice.
RETRIED_METHODS = (("leanserve.v1.InferenceService", "Predict"), ("leanserve.v1.ModelService", "ListModels"),
                   ("leanserve.v1.ModelService", "GetModel"))
RETRY_POLICY = {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 4,
                "retryableStatusCodes": ["UNAVAILABLE"]}
#: gRPC retries a call only if it kept the whole request for resending (256 KiB by default): keep up to this much
RETRY_BUFFER_BYTES = 64 * 1024 * 1024
SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{"service": s, "method": m} for s, m in RETRIED_METHODS],
                                               "retryPolicy": RETRY_POLICY}]})


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Both clients' channel options: message sizes, and the retry policy of ``RETRIED_METHODS``."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.per_rpc_retry_buffer_size", min(RETRY_BUFFER_BYTES, max_message_bytes)),
    ]


@dataclass(frozen=True)
class Connection:
    """How to reach a server: plaintext, or TLS when ``tls`` or any ``tls_*`` file is given (``tls_ca`` = the CA
    the server's certificate must chain to, else the system's roots; ``tls_cert``/``tls_key`` = this client's
    certificate for mTLS); ``token`` is sent as ``authorization: Bearer <token>`` with every call, streams too."""

    target: str = DEFAULT_SERVER
    token: str | None = None
    tls: bool = False
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def secure(self) -> bool:
        return self.tls or any(f is not None for f in (self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials from the files (read now)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (the client certificate and its key)")

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        # checked here, where a bad file is the caller's to fix (ssl.SSLError is an OSError): gRPC would only fail
        # the connection, as UNAVAILABLE, with nothing said about the file
        checker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.tls_ca is not None:
            checker.load_verify_locations(cafile=str(self.tls_ca))
        if self.tls_cert is not None:
            checker.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key), read(self.tls_cert))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        """A blocking-API channel."""
        options = channel_options(self.max_message_bytes)
        if self.secure:
            channel = grpc.secure_channel(self.target, self.credentials(), options=options)
        else:
            channel = grpc.insecure_channel(self.target, options=options)
        return grpc.intercept_channel(channel, _Metadata(self.metadata())) if self.token else channel

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel."""
        options = channel_options(self.max_message_bytes)
        interceptors = _aio_metadata_interceptors(self.metadata()) if self.token else None
        if self.secure:
            return grpc.aio.secure_channel(self.target, self.credentials(), options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(self.target, options=options, interceptors=interceptors)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the token) to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = (*(d.metadata or ()), *self._metadata)
        details = _CallDetails(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                               getattr(d, "compression", None))
        return details  # type: ignore[return-value]  # duck-typed like grpc's own

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _aio_metadata_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    """asyncio interceptors adding fixed metadata to every call (one class per call kind, as grpc.aio wants)."""

    def details(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        merged = grpc.aio.Metadata(*(d.metadata or ()), *metadata)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, merged, d.credentials, d.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
            return await continuation(details(client_call_details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
            return await continuation(details(client_call_details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


def predict_request(
    model: str, x: np.ndarray, *, version: int = 0, postprocess: str = "raw", top_k: int = 0,
    request_id: str = "", input_name: str = "",
) -> inf_pb.PredictRequest:
    req = _request_head(model, version, postprocess, top_k, request_id)
    codec.fill(req.inputs.add(), x, input_name)
    return req


def _request_head(model: str, version: int, postprocess: str, top_k: int, request_id: str) -> inf_pb.PredictRequest:
    """A PredictRequest without its inputs."""
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS)}")
    return inf_pb.PredictRequest(model_name=model, model_version=version, postprocess=POSTPROCESS[postprocess],
                                 top_k=top_k, request_id=request_id)


def predict_request_bytes(
    model: str, x: np.ndarray, *, version: int = 0, postprocess: str = "raw", top_k: int = 0,
    request_id: str = "", input_name: str = "",
) -> bytes:
    """``predict_request(...)`` serialized, with ``x``'s bytes copied once, straight into the result (building
    the message and serializing it copies them three times). Send it with ``raw_predict_methods``."""
    x = np.asarray(x)
    if x.nbytes < wire.SPLIT_MIN_BYTES:  # the copies cost less than joining the parts
        return predict_request(model, x, version=version, postprocess=postprocess, top_k=top_k,
                               request_id=request_id, input_name=input_name).SerializeToString()
    head = _request_head(model, version, postprocess, top_k, request_id).SerializeToString()
    a, code = codec.wire_array(x)
    meta = tensor_pb.Tensor(name=input_name, dtype=code, shape=a.shape).SerializeToString()
    return wire.join(head, _INPUTS_FIELD, [(meta, a)], _DATA_FIELD, padding=_PADDING_FIELD)


_INPUTS_FIELD = inf_pb.PredictRequest.DESCRIPTOR.fields_by_name["inputs"].number
_DATA_FIELD = tensor_pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_PADDING_FIELD = inf_pb.PredictRequest.DESCRIPTOR.fields_by_name["padding"].number


class RawPredict(NamedTuple):
    """Predict and PredictStream taking requests already serialized (``predict_request_bytes``)."""

    predict: Any
    stream: Any


class Stubs:
    """The stubs of both clients on one grpc or grpc.aio channel, and the raw Predict methods beside them."""

    def __init__(self, channel: Any) -> None:
        self.models_stub = model_grpc.ModelServiceStub(channel)
        self.inference_stub = inf_grpc.InferenceServiceStub(channel)
        self.optimize_stub = optimize_grpc.OptimizeServiceStub(channel)
        self._raw = raw_predict_methods(channel)


def raw_predict_methods(channel: Any) -> RawPredict:
    """``RawPredict`` on a grpc or grpc.aio channel (the same methods as the stub's, without its serializer)."""
    answer = inf_pb.PredictResponse.FromString
    service = "/leanserve.v1.InferenceService/"
    return RawPredict(channel.unary_unary(service + "Predict", request_serializer=None, response_deserializer=answer),
                      channel.stream_stream(service + "PredictStream", request_serializer=None,
                                            response_deserializer=answer))


def outputs(resp: inf_pb.PredictResponse) -> dict[str, np.ndarray]:
    return {t.name: codec.to_numpy(t) for t in resp.outputs}


def predict_output(resp: inf_pb.PredictResponse) -> PredictOutput:
    return PredictOutput(resp.model_name, resp.model_version, outputs(resp), resp.request_id)


def stream_requests(name: str, batches: Iterable[np.ndarray], *, version: int, postprocess: str,
                    top_k: int) -> CapturedRequests:
    """PredictStream's requests, ids "0", "1", ... (built as grpc sends them; an error is kept, see the class)."""
    if postprocess not in POSTPROCESS:  # refused now rather than after the call starts
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS)}")
    return CapturedRequests(
        predict_request_bytes(name, x, version=version, postprocess=postprocess, top_k=top_k, request_id=str(i))
        for i, x in enumerate(batches)
    )


def stream_output(resp: inf_pb.PredictResponse, raise_on_error: bool) -> PredictOutput | None:
    """A stream's answer as a result; an error answer raises ``StreamError`` (None when not ``raise_on_error``)."""
    if resp.HasField("error"):
        if raise_on_error:
            raise StreamError(resp.error.code, resp.error.message, resp.request_id)
        return None
    return predict_output(resp)


def model_versions(resp: model_pb.ListModelsResponse) -> dict[str, list[int]]:
    return {m.name: list(m.versions) for m in resp.models}


def detect_format(path: Path) -> str:
    """Format from the file name (the server checks the content too)."""
    suffix = path.suffix.lower()
    return {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".leanserve": "leanserve"}.get(suffix, "")


def upload_messages(
    path: Path, name: str, *, fmt: str = "", description: str = "", progress: Callable[[int], None] | None = None
) -> Iterator[model_pb.UploadModelRequest]:
    """Header then 1 MiB chunks; the sha256 is computed in a first pass so the header carries it."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    size = path.stat().st_size
    header = model_pb.UploadHeader(
        name=name, format=FORMATS[fmt or detect_format(path)], size_bytes=size, sha256=digest.hexdigest(),
        description=description,
    )
    yield model_pb.UploadModelRequest(header=header)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            yield model_pb.UploadModelRequest(chunk=block)
            if progress:
                progress(len(block))
