"""moto in its own process for the benchmark: our handlers, the CRM emulators and moto then no longer
share one interpreter lock, so a 3,000-patient backfill runs in minutes, and the CPU we measure on the
invoking thread is ours alone. ``python -m sandbox.bench.moto_process PORT`` serves it (with the
transaction backup made affordable, see :func:`sandbox.bench.harness.moto_transactions_copy_once`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

from moto.moto_server.werkzeug_app import MotoRequestHandler

from sandbox.emulators.base import KeepAliveRequestHandler
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


class KeepAliveHandler(KeepAliveRequestHandler, MotoRequestHandler):
    """moto's request handler with keep-alive (:class:`sandbox.emulators.base.KeepAliveRequestHandler`)."""


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
