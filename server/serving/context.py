"""What the transport tells the layers below about a call (a leaf module: it imports nothing of leanserve)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    """What the transport knows about a call beyond its payload, in transport-free terms."""

    #: ``time.monotonic()`` after which the caller no longer wants the answer (None = no deadline)
    deadline: float | None = None
    #: False once the caller has gone away (cancelled RPC); None = cannot tell
    is_active: Callable[[], bool] | None = None


NO_CONTEXT = RequestContext()
