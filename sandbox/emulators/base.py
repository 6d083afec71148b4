"""Shared plumbing for the vendor emulators: a controllable clock and a loopback WSGI server.

Every emulator is a plain WSGI app (werkzeug) holding its state in memory, so tests can run it
in-process (werkzeug's test client) or on a real loopback port (``serve``) for real HTTP clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server


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


logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request access lines: paths can carry PII


class ServedApp:
    """Runs a WSGI app on 127.0.0.1 on a free port in a daemon thread."""

    def __init__(self, app: WsgiApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True)
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
