"""The one error hierarchy. Each class carries a transport-neutral ``Code``; the transport maps it to its own
status (``server/grpc/interceptors.py`` to a grpc.StatusCode, for every RPC).

Layers below the transport raise these (never grpc exceptions, and nothing here imports grpc). Anything else that
escapes a call is a bug: INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations

import enum

#: longest message an error carries to the caller: gRPC sends it in a trailer, and clients refuse trailers past
#: a few KiB (percent-encoding can make each character 12 bytes), which would hide the status itself
MAX_MESSAGE_CHARS = 600
#: longest client-supplied value echoed inside a message (see ``shown``)
MAX_SHOWN_CHARS = 80


class Code(enum.Enum):
    """What kind of failure, without saying how a transport spells it. Member names are gRPC's status names."""

    NOT_FOUND = "not_found"
    INVALID_ARGUMENT = "invalid_argument"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    ALREADY_EXISTS = "already_exists"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr`` of a client-supplied value for a message, cut to ``limit`` characters of it (a 100 KB model name
    is echoed as its start and its length)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}… ({len(text)} characters)"


def brief(exc: BaseException, limit: int = 300, *, first_line: bool = False) -> str:
    """A third-party error as one bounded line for a message to the caller: its text with whitespace collapsed, cut
    to ``limit`` characters; ``first_line``: only its first line (TensorFlow's errors carry the graph trace after
    it)."""
    text = str(exc).strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}… (message cut from {len(message)} characters)"


class LeanserveError(Exception):
    """Base class: a failure with a code and a message meant for the caller (cut to ``MAX_MESSAGE_CHARS``)."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        message = _capped(str(message))
        super().__init__(message)
        self.message = message


class NotFound(LeanserveError):
    """An unknown model or version."""

    code = Code.NOT_FOUND


class InvalidArgument(LeanserveError):
    """A malformed request: wrong shape, dtype, a corrupt file, a bad option."""

    code = Code.INVALID_ARGUMENT


class FailedPrecondition(LeanserveError):
    """The request is well-formed but the system's state refuses it (e.g. a model outside reference tolerance)."""

    code = Code.FAILED_PRECONDITION


class ResourceExhausted(LeanserveError):
    """A size limit or a full queue."""

    code = Code.RESOURCE_EXHAUSTED


class AlreadyExists(LeanserveError):
    """Creating something that is already there."""

    code = Code.ALREADY_EXISTS


class Unauthenticated(LeanserveError):
    """Missing or invalid credentials."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(LeanserveError):
    """Valid credentials without the right to do this."""

    code = Code.PERMISSION_DENIED


class DeadlineExceeded(LeanserveError):
    """The caller's deadline passed before the work was done."""

    code = Code.DEADLINE_EXCEEDED


class Unavailable(LeanserveError):
    """The server (or a model) is shutting down or not ready."""

    code = Code.UNAVAILABLE


class Cancelled(LeanserveError):
    """The caller went away."""

    code = Code.CANCELLED


class UnsupportedModel(InvalidArgument):
    """A model the Plan converter cannot express (the TensorFlow runtime may still serve it)."""
