"""The running Lambda invocation's deadline, for the parts that wait (a CRM client pacing its budget).

Set by the batch runtime when an invocation starts, from the Lambda context. Wall clock: a wait that is
slept counts against it. Per thread (a context variable), so the local runtime's concurrent invocations
each see their own; outside an invocation there is none.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

_deadline: ContextVar[float | None] = ContextVar("invocation_deadline", default=None)


def start(remaining_ms: int) -> Token[float | None]:
    """The invocation has ``remaining_ms`` left (``LambdaContext.get_remaining_time_in_millis()``)."""
    return _deadline.set(time.monotonic() + remaining_ms / 1000)


def end(token: Token[float | None]) -> None:
    _deadline.reset(token)


def time_left() -> float | None:
    """Seconds until the invocation's deadline, or None outside an invocation."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()
