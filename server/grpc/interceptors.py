"""Errors → status codes, in one place for every RPC of every service.

A ``LeanserveError`` aborts with the grpc.StatusCode of its transport-neutral code and its message; it is a
client mistake, logged as one line without a traceback, at most ``per_second`` lines per code and second (the
dropped lines are counted in the next one). Anything else is a bug: INTERNAL with a generic message, the details
and the traceback in the log only.

Each method's handler is wrapped once, the first time the method is called, and reused: the per-call cost is a
dict lookup.
"""

from __future__ import annotations

import logging
from concurrent import futures
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from leanserve.server.errors import Code, LeanserveError
from leanserve.server.grpc.request_decoders import check, refusing
from leanserve.server.grpc.send_watchdog import SendWatchdog

log = logging.getLogger(__name__)

#: the gRPC status of each transport-neutral code
STATUS: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}


def grpc_status(code: Code) -> grpc.StatusCode:
    """The grpc.StatusCode a transport-neutral code is answered with."""
    return STATUS[code]


class RateLimitedLog:
    """One log line per event, at most ``per_second`` per key and second; the next line that gets through says
    how many were dropped since, so a flood of bad requests costs neither the disk nor the log's reader."""

    def __init__(self, logger: logging.Logger, per_second: int, level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._per_second, self._level, self._clock = logger, per_second, level, clock
        self._lock = threading.Lock()
        self._windows: dict[object, list[int]] = {}  # key -> [second, lines in it, dropped since the last line]

    def __call__(self, key: object, fmt: str, *args: object) -> None:
        second = int(self._clock())
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = [second, 0, 0]
            elif window[0] != second:
                window[0], window[1] = second, 0
            if window[1] >= self._per_second:
                window[2] += 1
                return
            window[1] += 1
            dropped, window[2] = window[2], 0
        if dropped:
            fmt += " (%d similar lines dropped before this one)"
            args = (*args, dropped)
        self._log.log(self._level, fmt, *args)


def _serialized(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serialize``, except that a response already serialized (bytes) is sent as it is."""
    if serialize is None:
        return None

    def serializer(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serializer


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    """A request stream whose undecodable message raises InvalidArgument where the servicer reads it."""
    for request in requests:
        yield check(request)


def _watched(responses: Iterator[Any], context: grpc.ServicerContext, watchdog: SendWatchdog) -> Iterator[Any]:
    """``responses``, each of which must be sent within the watchdog's timeout (gRPC resumes a stream's handler
    only once its last response is sent)."""
    try:
        for response in responses:
            watchdog.arm(context)
            yield response
            watchdog.disarm(context)
    finally:
        watchdog.disarm(context)
        close = getattr(responses, "close", None)
        if close is not None:  # the handler's own cleanup (its stream slot) now, not when collected
            close()


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare Exception after setting the status; let it through untouched.
    return type(exc) is Exception and not exc.args


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by any servicer method to gRPC status codes.

    With ``stream_pool``, every streaming method (client, server or bidirectional) runs on that pool instead of the
    server's: an open stream holds its thread for its whole life, so streams get threads of their own and the
    server's pool, kept small, serves unary calls only (few runnable handler threads = no GIL convoy).
    ``request_decoders`` (full method name -> deserializer) replace the registered request deserializers of those
    methods (see request_decoders.py): this wrapper is the one place every handler passes through.
    With ``send_watchdog``, a streaming response that cannot be sent within its timeout (the client stopped reading)
    cancels the call (see send_watchdog.py).
    """

    def __init__(self, client_errors_per_second: int = 10, stream_pool: futures.ThreadPoolExecutor | None = None,
                 request_decoders: Mapping[str, Callable[[bytes], Any]] | None = None,
                 send_watchdog: SendWatchdog | None = None) -> None:
        self._client_error = RateLimitedLog(log, client_errors_per_second)
        self._stream_pool = stream_pool
        self._watchdog = send_watchdog
        self._decoders = dict(request_decoders or {})
        # method -> (handler as registered, wrapped handler); only methods that exist get an entry
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None:
            return handler
        entry = self._wrapped.get(details.method)
        if entry is None or entry[0] is not handler:
            entry = (handler, self._wrap(handler, details.method))
            self._wrapped[details.method] = entry
        return entry[1]

    def _abort(self, context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
        if isinstance(exc, LeanserveError):
            status = STATUS[exc.code]
            self._client_error(exc.code, "%s %s: %s", method, status.name, exc.message)
            context.abort(status, exc.message)
        log.exception("unexpected error in %s", method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # every method's request deserializer turns bytes that are not a message into Undecodable (answered
        # INVALID_ARGUMENT): the inference methods' own decoders, and for the rest their deserializer wrapped here,
        # its requests checked before the servicer sees them
        checked = False
        if method in self._decoders:
            # a handler of such a method may answer bytes it serialized itself (v2_converters.infer_response_bytes)
            handler = handler._replace(request_deserializer=self._decoders[method],
                                       response_serializer=_serialized(handler.response_serializer))
        elif handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=refusing(handler.request_deserializer))
            checked = True
        abort = self._abort
        watchdog = self._watchdog
        stream_pool = self._stream_pool

        def unary(fn: Callable[..., Any], streaming: bool = False) -> Callable[..., Any]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    if checked:
                        request = _checked_stream(request) if streaming else check(request)
                    return fn(request, context)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    abort(context, exc, method)

            if streaming and stream_pool is not None:
                # grpc runs a method on its behaviour's ``experimental_thread_pool`` when it has one
                wrapper.experimental_thread_pool = stream_pool  # type: ignore[attr-defined]
            return wrapper

        def stream(fn: Callable[..., Iterator[Any]], streaming: bool) -> Callable[..., Any]:
            if getattr(fn, "experimental_non_blocking", False):
                return non_blocking(fn)

            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    if checked:
                        request = _checked_stream(request) if streaming else check(request)
                    if watchdog is None:
                        yield from fn(request, context)
                    else:
                        yield from _watched(fn(request, context), context, watchdog)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    abort(context, exc, method)

            if stream_pool is not None:
                wrapper.experimental_thread_pool = stream_pool  # type: ignore[attr-defined]
            return wrapper

        def non_blocking(fn: Callable[..., Any]) -> Callable[..., Any]:
            # A server-streaming method that answers through grpc's send callback (grpc-health's Watch) returns at
            # once and holds no thread while its call stays open: keep it so. As a generator on the stream pool it
            # would hold a thread per open call, and the open Watch method would let anyone take them all.
            def wrapper(request: Any, context: grpc.ServicerContext,
                        send_response_callback: Callable[[Any], None] | None = None) -> Any:
                try:
                    return fn(check(request) if checked else request, context,
                              send_response_callback=send_response_callback)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    abort(context, exc, method)

            wrapper.experimental_non_blocking = True  # type: ignore[attr-defined]
            wrapper.experimental_thread_pool = getattr(fn, "experimental_thread_pool", None)  # type: ignore[attr-defined]
            return wrapper

        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary, streaming=True))
        if handler.unary_stream:
            return handler._replace(unary_stream=stream(handler.unary_stream, streaming=False))
        if handler.stream_stream:
            return handler._replace(stream_stream=stream(handler.stream_stream, streaming=True))
        return handler
