"""The bench serves the vendors' emulators with keep-alive, as their real endpoints answer: a warm container
sends its CRM and MIS requests on a pooled connection, so the CPU per event must not count a TCP connect
per request. The tests' emulators keep werkzeug's close-per-response."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import httpx
import pytest

from sandbox.emulators.base import ServedApp


def _echo_client_port(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    reply = f'{{"port": {environ["REMOTE_PORT"]}, "size": {len(body)}}}'.encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(reply)))])
    return [reply]


@pytest.mark.parametrize("keep_alive", [True, False])
def test_requests_share_one_connection_only_when_the_app_is_served_with_keep_alive(keep_alive: bool) -> None:
    with ServedApp(_echo_client_port, keep_alive=keep_alive) as server, httpx.Client(timeout=5) as client:
        answers = [client.post(f"{server.base_url}/x", content=b"a" * n).json() for n in (10, 0, 2000)]
        done = client.get(f"{server.base_url}/y").json()
    assert [a["size"] for a in answers] == [10, 0, 2000]  # each body read whole, none left for the next
    ports = {a["port"] for a in [*answers, done]}
    assert len(ports) == (1 if keep_alive else 4)


def test_the_bench_serves_the_clinics_emulators_with_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.local as local
    from sandbox.bench.harness import simulated
    from sandbox.bench.simclock import SimClock

    built: list[dict[str, Any]] = []

    def record(app: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(kwargs)
        return ServedApp(app, *args, **kwargs)

    monkeypatch.setattr(local, "ServedApp", record)
    with simulated(SimClock()):
        local.ServedApp(_echo_client_port).start().stop()
    assert built == [{"keep_alive": True}]
