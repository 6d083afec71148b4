"""moto in its own process for the benchmark: our handlers, the CRM emulators and moto then no longer
share one interpreter lock, so a 3,000-patient backfill runs in minutes, and the CPU we measure on the
invoking thread is ours alone. ``python -m sandbox.bench.moto_process PORT`` serves it (with the
transaction backup made affordable, see :func:`sandbox.bench.harness.moto_transactions_copy_once`)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from typing import Any

from moto.moto_server.werkzeug_app import MotoRequestHandler

from sandbox.runtime import LocalAws


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessAws(LocalAws):
    """Same interface as :class:`LocalAws`; the server is a child process."""

    def __init__(self) -> None:
        self.endpoint = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> ProcessAws:
        port = _free_port()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.bench.moto_process", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto did not start")
        self.export_env()
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None

    def client(self, service: str) -> Any:
        return super().client(service)


class KeepAliveHandler(MotoRequestHandler):
    """HTTP/1.1 with keep-alive, as AWS's endpoints answer. werkzeug's dev server sends ``Connection: close``
    on every response and then drains whatever the socket holds (it could not tell an unread body from the
    next request), so each AWS call of ours paid a TCP connect and a new urllib3 connection on our thread,
    which a Lambda container reusing its pooled connections does not pay. Here the body is read whole
    first, and werkzeug's drain is handed an empty stream, so the socket is left at the next request. A
    chunked body (boto3 sends none to these services) is served as before and closes the connection."""

    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall between calls
    _eof: socket.socket | None = None  # always readable, never read: werkzeug's drain selects on it

    def run_wsgi(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
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
    if KeepAliveHandler._eof is None:
        mine, peer = socket.socketpair()
        peer.close()
        KeepAliveHandler._eof = mine
    return KeepAliveHandler._eof


def serve(port: int) -> None:
    """moto on 127.0.0.1:``port`` until the process ends, one thread per connection, kept alive."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    make_server("127.0.0.1", port, app, threaded=True, request_handler=KeepAliveHandler).serve_forever()


def main() -> None:
    from sandbox.bench.harness import moto_transactions_copy_once

    with moto_transactions_copy_once():
        serve(int(sys.argv[1]))


if __name__ == "__main__":
    main()
