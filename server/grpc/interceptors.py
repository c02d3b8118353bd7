"""Errors → status codes, in one place for every RPC of every service.

A ``LeanserveError`` aborts with its own code and message. Anything else is a bug: INTERNAL with a generic
message (details stay in the log, with the traceback, never in the answer).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from leanserve.server.errors import LeanserveError

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, LeanserveError):
        context.abort(exc.code, exc.message)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare Exception after setting the status; let it through untouched.
    return type(exc) is Exception and not exc.args


def _wrap_unary(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc, method)

    return wrapper


def _wrap_stream(fn: Callable[..., Iterator[Any]], method: str) -> Callable[..., Iterator[Any]]:
    @functools.wraps(fn)
    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc, method)

    return wrapper


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by any servicer method to gRPC status codes."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method))
        return handler
