"""Talking to the clinic's stack: signed requests, retried on what is worth retrying.

The retry mechanics are the core's (``clinicsync.retrying``, tenacity); the classification is the
connector's own: a clinic's desktop on a flaky line also retries 408 and 425, and both routes are safe to
send again (settings is a read; a re-sent batch re-applies records that carry their IDENT version)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from clinicsync.adapters.http.signing import sign_request
from clinicsync.retrying import Transient, call_with_retries, exponential

RETRYABLE = {408, 425, 429, 500, 502, 503, 504}


class StackRefused(Exception):
    """The stack said no (a 4xx other than a throttle): retrying the same request cannot help."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class StackUnavailable(Exception):
    pass


class StackClient:
    def __init__(
        self,
        base_url: str,
        key: bytes,
        http: httpx.Client,
        clock: Callable[[], float] = time.time,
        attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._prefix = httpx.URL(self._base).path.rstrip("/")
        self._key = key
        self._http = http
        self._clock = clock
        self._attempts = attempts
        self._sleep = sleep

    def _send(self, method: str, route: str, body: bytes = b"") -> httpx.Response:
        def attempt(_: int) -> httpx.Response:
            # Signed afresh on every attempt: a retry minutes later must not fail the freshness check.
            headers = sign_request(self._key, int(self._clock()), method, self._prefix + route, body)
            if body:
                headers["Content-Type"] = "application/json"
            try:
                response = self._http.request(method, self._base + route, content=body, headers=headers)
            except httpx.TransportError as exc:
                raise Transient(type(exc).__name__) from None
            if response.status_code < 300:
                return response
            if response.status_code in RETRYABLE:
                raise Transient(f"HTTP {response.status_code}")
            raise StackRefused(response.status_code, response.text[:500])

        def exhausted(reason: str) -> Exception:
            return StackUnavailable(f"{method} {route} failed after {self._attempts} attempts ({reason})")

        return call_with_retries(
            attempt,
            attempts=self._attempts,
            wait=exponential(1.0, cap=30.0),
            sleep=self._sleep,
            exhausted=exhausted,
            wait_after_last=True,
        )

    def settings(self) -> dict[str, Any]:
        body = self._send("GET", "/ident/connector/settings").json()
        if not isinstance(body, dict) or "filters" not in body:
            raise StackRefused(200, "settings reply without filters")
        return body

    def push(self, batch_json: bytes) -> dict[str, Any]:
        reply = self._send("POST", "/ident/connector/batches", batch_json).json()
        return reply if isinstance(reply, dict) else {}
