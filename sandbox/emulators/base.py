"""Shared plumbing for the vendor emulators: a controllable clock, a loopback WSGI server and fault queues.

Every emulator is a plain WSGI app (werkzeug) holding its state in memory, so tests can run it
in-process (werkzeug's test client) or on a real loopback port (``serve``) for real HTTP clients.
"""

from __future__ import annotations

import functools
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class Clock:
    """Wall clock by default; tests freeze it or move it forward to drive rate limits and expiries."""

    def __init__(self, start: float | None = None) -> None:
        self._frozen = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._frozen if self._frozen is not None else time.time()

    def freeze(self, at: float | None = None) -> None:
        with self._lock:
            self._frozen = time.time() if at is None else at

    def advance(self, seconds: float) -> None:
        with self._lock:
            if self._frozen is None:
                self._frozen = time.time()
            self._frozen += seconds

    def unfreeze(self) -> None:
        with self._lock:
            self._frozen = None


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@functools.cache
def webhook_sender() -> httpx.Client:
    """One pooled client for every emulator's outgoing webhooks (a vendor keeps its connections too):
    a client per event built a TLS context each time, a tenth of a chaos run's CPU."""
    return httpx.Client()


logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request access lines: paths can carry PII


class KeepAliveRequestHandler(WSGIRequestHandler):
    """HTTP/1.1 with keep-alive, as AWS's and the vendors' endpoints answer. werkzeug's dev server sends
    ``Connection: close`` on every response and then drains whatever the socket holds (it could not tell an
    unread body from the next request), so each request of ours paid a TCP connect and a new connection on
    our thread, which a Lambda container reusing its pooled connections does not pay. Here the body is read
    whole first, and werkzeug's drain is handed an empty stream, so the socket is left at the next request.
    A chunked body (boto3 sends none to these services) is served as before and closes the connection."""

    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall between calls
    _eof: socket.socket | None = None  # always readable, never read: werkzeug's drain selects on it

    def run_wsgi(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.__dict__.pop("body", None)  # an earlier request's on this connection
            super().run_wsgi()
            return
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length > 0 else b""
        real = self.rfile, self.connection
        self.rfile, self.connection = io.BytesIO(), _eof_socket()
        try:
            super().run_wsgi()
        finally:
            self.rfile, self.connection = real

    def make_environ(self) -> dict[str, Any]:
        environ = super().make_environ()
        if hasattr(self, "body"):
            environ["wsgi.input"] = io.BytesIO(self.body)
        return environ

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection" and value.lower() == "close" and hasattr(self, "body"):
            return  # the client's own Connection header (parse_request) still decides
        super().send_header(keyword, value)


def _eof_socket() -> socket.socket:
    """One socket whose peer has closed: a select on it returns at once (shared; nobody reads it)."""
    if KeepAliveRequestHandler._eof is None:
        mine, peer = socket.socketpair()
        peer.close()
        KeepAliveRequestHandler._eof = mine
    return KeepAliveRequestHandler._eof


class ServedApp:
    """Runs a WSGI app on 127.0.0.1 on a free port in a daemon thread."""

    def __init__(self, app: WsgiApp, host: str = "127.0.0.1", port: int = 0, *, keep_alive: bool = False) -> None:
        # Keep-alive for the bench, whose CPU per event should not count a TCP connect per request; the
        # tests keep werkzeug's close-per-response, under which their faults (dropped answers) were written.
        handler = KeepAliveRequestHandler if keep_alive else None
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True, request_handler=handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self._server.host}:{self._server.port}"

    def start(self) -> ServedApp:
        if not self._thread.is_alive():  # idempotent, so `with serve(app):` works too
            self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ServedApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(app: WsgiApp) -> ServedApp:
    return ServedApp(app).start()


# --- fault injection --------------------------------------------------------------------------
#
# Two mechanisms, because the emulators grew two test vocabularies: the CRM emulators return a ``Fault``
# object that tests inspect (``hits``, ``times``, ``after_apply``), the MIS emulators take "fail the next
# n requests" commands and report only how many are ``pending``. Each vendor keeps its own fault fields
# and matching rule; only the queue mechanics live here.


class QueuedFault(Protocol):
    """What :class:`FaultQueue` needs from a vendor's fault record."""

    times: int | None  # None = until cleared
    after_apply: bool
    hits: int


class FaultQueue[F: QueuedFault]:
    """Ordered, thread-safe queue of CRM faults; the first matching fault wins, so tests stay deterministic."""

    def __init__(self) -> None:
        self._faults: list[F] = []
        self._lock = threading.Lock()

    def push(self, fault: F) -> F:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def active(self) -> list[F]:
        with self._lock:
            return list(self._faults)

    def take_matching(self, predicate: Callable[[F], bool], *, after_apply: bool) -> F | None:
        """Consume one hit of the first fault for this phase that ``predicate`` accepts.

        Faults with ``after_apply`` set fire only after the request was served ("lost response"), the
        others only before it, so one request can meet one fault of each kind.
        """
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.after_apply != after_apply or not predicate(fault):
                    continue
                fault.hits += 1
                if fault.times is not None and fault.hits >= fault.times:
                    del self._faults[index]  # by position: equal-looking faults are still distinct entries
                return fault
        return None


@dataclass
class FaultRule:
    """One MIS fault command: ``remaining`` matching requests still to hit, then it stays inert.

    ``target`` is what the vendor matches on (a path prefix or an API method; None = any request). A
    failure rule carries ``status`` and at most one vendor payload; a delay rule carries ``seconds``.
    """

    remaining: int
    target: str | None
    status: int = 0
    seconds: float = 0.0
    retry_after: int | None = None  # MEDODS / InfoClinica: ``Retry-After`` header on the failure
    body: bytes | None = None  # InfoClinica: raw answer instead of the canned error page
    error: tuple[int, str] | None = None  # Renovatio: ``{"error": 1, "data": {code, desc}}`` answer


class RuleFaults:
    """Deterministic MIS fault queues: failures and delays, each consumed in the order they were added.

    A request meets at most one failure and one delay (both can hit the same request, so a test can make
    a slow failure). Subclasses add the vendor's ``fail_next``/``timeout_next`` commands and may
    override :meth:`matches`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: list[FaultRule] = []
        self._delays: list[FaultRule] = []

    def _add_failure(self, rule: FaultRule) -> None:
        with self._lock:
            self._failures.append(rule)

    def _add_delay(self, rule: FaultRule) -> None:
        with self._lock:
            self._delays.append(rule)

    def matches(self, rule: FaultRule, key: str | None) -> bool:
        """Whether ``rule`` applies to a request identified by ``key``: equality by default, None = any."""
        return rule.target is None or rule.target == key

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
            self._delays.clear()

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(r.remaining for r in (*self._failures, *self._delays))

    def take(self, key: str | None) -> tuple[FaultRule | None, float]:
        """The failure to answer with (if any) and the seconds to sleep first, consuming one hit of each."""
        with self._lock:
            failure = next((r for r in self._failures if r.remaining > 0 and self.matches(r, key)), None)
            delay = next((r for r in self._delays if r.remaining > 0 and self.matches(r, key)), None)
            for rule in (failure, delay):
                if rule is not None:
                    rule.remaining -= 1
            return failure, delay.seconds if delay else 0.0
