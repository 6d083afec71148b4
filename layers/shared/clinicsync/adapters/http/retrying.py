"""HTTP's rule on top of :mod:`clinicsync.retrying`: :func:`send_with_retries` sends one request that is safe
to repeat (a read, an idempotent write) with the classification every MIS, LIS, Mailchimp and vTiger client
shares: a transport error, 429 or a 5xx is :class:`~clinicsync.retrying.Transient`; any other answer goes
to the vendor's reader once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import httpx

from clinicsync.observability import logger
from clinicsync.retrying import Transient, call_with_retries


def busy(status: int) -> bool:
    """A rate limit or a server error: the request is worth sending again after a backoff."""
    return status == 429 or status >= 500


def send_with_retries[T](
    send: Callable[[], httpx.Response],
    read: Callable[[httpx.Response], T],
    *,
    vendor: str,
    attempts: int,
    wait: Callable[[int], float],
    sleep: Callable[[float], None],
    exhausted: Callable[[str], Exception],
    wait_after_last: bool = False,
    context: Mapping[str, object] | None = None,
) -> T:
    """``read(response)`` of the first answer that is not :func:`busy`; ``send()`` is called again after a
    transport error or a busy answer (so only for a request safe to repeat). ``read`` raises the vendor's
    own error for a refusal, which is never retried. ``vendor`` and ``context`` (no PII) go to the logs."""
    extra = dict(context or {})

    def attempt(_: int) -> T:
        try:
            response = send()
        except httpx.TransportError as exc:
            failure = type(exc).__name__
            logger.warning(f"{vendor} transport error", extra={**extra, "error": failure})
            raise Transient(failure) from None
        if not busy(response.status_code):
            return read(response)
        logger.warning(f"{vendor} busy", extra={**extra, "status": response.status_code})
        raise Transient(f"HTTP {response.status_code}")

    return call_with_retries(
        attempt, attempts=attempts, wait=wait, sleep=sleep, exhausted=exhausted, wait_after_last=wait_after_last
    )
