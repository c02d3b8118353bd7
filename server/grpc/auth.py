"""Bearer tokens with roles, checked for every RPC by one interceptor; who made a change, for the audit log.

The token file holds one token per line: ``<role> <sha256 hex of the token> [label]`` (``#`` starts a comment),
so the file itself gives nothing away. Roles: ``admin`` may call everything, ``infer`` only what reads or predicts
(see ``INFER_METHODS``). Clients send the metadata ``authorization: Bearer <token>`` (what tritonclient sends with
``headers=``). Health checks and V2 ServerLive/ServerReady stay open for probes; every other method, including
ones the server does not know, needs a token. The file is re-read when it changes (checked at most once a second).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from leanserve.server.grpc.calls import request_context
from leanserve.server.grpc.interceptors import RateLimitedLog
from leanserve.server.serving.context import RequestContext

log = logging.getLogger(__name__)

ADMIN = "admin"
INFER = "infer"
ROLES = (ADMIN, INFER)
_OPEN = "open"

#: callable without a token: liveness and readiness probes
OPEN_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
})
#: callable with an ``infer`` token: predictions and read-only questions about models
INFER_METHODS = frozenset({
    "/leanserve.v1.InferenceService/Predict",
    "/leanserve.v1.InferenceService/PredictStream",
    "/leanserve.v1.ModelService/ListModels",
    "/leanserve.v1.ModelService/GetModel",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelStatistics",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/RepositoryIndex",  # read-only: lists what is stored
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
})
#: what each method needs; a method not listed (every admin method, and any unknown one) needs ``admin``
REQUIRED_ROLE: dict[str, str] = {**{m: _OPEN for m in OPEN_METHODS}, **{m: INFER for m in INFER_METHODS}}

_RECHECK_SECONDS = 1.0

#: who is calling, set by the auth interceptor for the call it admits (grpc runs the interceptor and the handler
#: of one call in the same contextvars.Context)
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("leanserve_caller", default=None)


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token, as the token file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """A known token: its role and the name it is logged and audited under."""

    role: str
    label: str
    digest: bytes


def parse_tokens(text: str, source: str = "token file") -> tuple[list[Caller], list[str]]:
    """The tokens of a token file and the problems of the lines that were skipped."""
    callers, problems = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or parts[0] not in ROLES:
            problems.append(f"{source} line {number}: expected '<{'|'.join(ROLES)}> <sha256 hex> [label]'")
            continue
        role, digest_hex = parts[0], parts[1].lower()
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            problems.append(f"{source} line {number}: the second field must be the 64 hex digits of a sha256")
            continue
        label = parts[2].strip() if len(parts) > 2 else f"{role}:{digest_hex[:8]}"
        callers.append(Caller(role, label, digest))
    return callers, problems


class TokenFile:
    """The tokens of a file, re-read when the file changes (looked at no more than once a second)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        callers, problems = parse_tokens(self.path.read_text(), str(self.path))  # missing file: fatal at start
        if problems:
            raise ValueError("; ".join(problems))
        if not callers:
            log.warning("%s holds no tokens: every call but health checks is refused", self.path)
        self._callers: tuple[Caller, ...] = tuple(callers)
        self._stamp = self._file_stamp()
        self._next_check = time.monotonic() + _RECHECK_SECONDS
        self._reloading = threading.Lock()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self, force: bool = False) -> None:
        """Read the file again if it changed (or ``force``). Bad lines are skipped and logged; a missing file
        leaves no token valid (fail closed)."""
        if not self._reloading.acquire(blocking=False):
            return  # another thread is at it
        try:
            self._next_check = time.monotonic() + _RECHECK_SECONDS
            stamp = self._file_stamp()
            if stamp == self._stamp and not force:
                return
            try:
                callers, problems = parse_tokens(self.path.read_text(), str(self.path))
            except OSError as exc:
                callers, problems = [], [f"cannot read {self.path}: {exc}; no token is valid until it can be read"]
            for problem in problems:
                log.error("%s (line skipped)", problem)
            self._callers, self._stamp = tuple(callers), stamp
            log.info("token file %s re-read: %d token(s)", self.path, len(callers))
        finally:
            self._reloading.release()

    def lookup(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None. Compares sha256 digests in constant time, against every entry."""
        if time.monotonic() >= self._next_check:
            self.reload()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for caller in self._callers:  # no early exit: the time taken does not say which entry matched
            if hmac.compare_digest(caller.digest, digest):
                found = caller
        return found


def bearer_token(metadata: Sequence[tuple[str, str]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    # A stream-stream handler answers any kind of call without reading a message of it.
    def refuse(request_iterator: object, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class AuthInterceptor(grpc.ServerInterceptor):
    """Admits a call when its token's role may call the method; else UNAUTHENTICATED (no or unknown token) or
    PERMISSION_DENIED (a known token without the role). Install it before the error interceptor."""

    def __init__(self, tokens: TokenFile, denials_per_second: int = 10) -> None:
        self.tokens = tokens
        self._denied_log = RateLimitedLog(log, denials_per_second, logging.WARNING)
        self._unauthenticated = _refusal(
            grpc.StatusCode.UNAUTHENTICATED, "this server needs a token: send the metadata 'authorization: Bearer "
            "<token>' with a token listed in its token file")
        self._denied = _refusal(grpc.StatusCode.PERMISSION_DENIED, "this token's role may not call this method "
                                "(role 'infer' may predict and read model metadata; changes need 'admin')")

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        needed = REQUIRED_ROLE.get(details.method, ADMIN)
        if needed == _OPEN:
            return continuation(details)
        token = bearer_token(details.invocation_metadata)
        caller = self.tokens.lookup(token) if token else None
        if caller is None:
            self._denied_log("unauthenticated", "refused %.200s: %s token", details.method,
                             "unknown" if token else "no")
            return self._unauthenticated
        if needed == ADMIN and caller.role != ADMIN:
            self._denied_log("denied", "refused %s to %s (role %s)", details.method, caller.label, caller.role)
            return self._denied
        _CALLER.set(caller.label)
        return continuation(details)


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate of an mTLS call."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode(errors="replace") if names else None


def caller_context(context: grpc.ServicerContext) -> RequestContext:
    """Who is calling (token label, else client certificate CN, else "anonymous") and from where, for the audit
    log of changes to the repository."""
    who = _CALLER.get() or peer_common_name(context) or "anonymous"
    return request_context(context)._replace(principal=who, peer=context.peer())
