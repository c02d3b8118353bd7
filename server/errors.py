"""The one error hierarchy. Each class carries the gRPC status code the interceptor answers with.

Layers below the transport raise these (never grpc exceptions); ``server/grpc/interceptors.py`` maps them for
every RPC. Anything else that escapes becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations

import grpc


class LeanserveError(Exception):
    """Base class: a failure with a status code and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(LeanserveError):
    """An unknown model or version."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(LeanserveError):
    """A malformed request: wrong shape, dtype, a corrupt file, a bad option."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(LeanserveError):
    """The request is well-formed but the system's state refuses it (e.g. a model outside reference tolerance)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LeanserveError):
    """A size limit or a full queue."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AlreadyExists(LeanserveError):
    """Creating something that is already there."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(LeanserveError):
    """Missing or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LeanserveError):
    """Valid credentials without the right to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(LeanserveError):
    """The caller's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(LeanserveError):
    """The server (or a model) is shutting down or not ready."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(LeanserveError):
    """The caller went away."""

    code = grpc.StatusCode.CANCELLED


class UnsupportedModel(InvalidArgument):
    """A model the Plan converter cannot express (the TensorFlow runtime may still serve it)."""
