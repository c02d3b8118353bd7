"""What the transport tells the layers below about a call (a leaf module: it imports nothing of leanserve)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


class RequestContext(NamedTuple):
    """What the transport knows about a call beyond its payload, in transport-free terms (immutable; a tuple
    because one is built for every request and a frozen dataclass costs several times as much to build)."""

    #: ``time.monotonic()`` after which the caller no longer wants the answer (None = no deadline)
    deadline: float | None = None
    #: False once the caller has gone away (cancelled RPC); None = cannot tell
    is_active: Callable[[], bool] | None = None
    #: who is calling, as the audit log names it: token label, client certificate CN or "anonymous" (None = not
    #: known, e.g. a call from inside the server)
    principal: str | None = None
    #: where the call comes from, as the transport spells it (e.g. "ipv4:127.0.0.1:53412")
    peer: str | None = None
    #: the call is a stream whose reader has more requests to read: a long request is computed off its thread
    stream: bool = False

    def within(self, seconds: float) -> "RequestContext":
        """This context with its deadline at most ``seconds`` from now."""
        deadline = time.monotonic() + seconds
        return self if self.deadline is not None and self.deadline <= deadline else self._replace(deadline=deadline)


NO_CONTEXT = RequestContext()
