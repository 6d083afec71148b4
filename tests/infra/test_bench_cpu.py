"""How the bench measures our CPU: the figure per event does not depend on which invocations were traced
for memory, and the bench's moto server keeps connections alive as AWS's endpoints do, so a call of ours
does not pay a TCP connect that Lambda does not pay."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.bench.harness import cpu_ms_per_event, metered
from sandbox.bench.moto_process import ProcessAws


class FakeStack:
    """Invocations that cost a chosen thread CPU on a controlled clock, carrying chosen appointments."""

    def __init__(self) -> None:
        self.now = 0.0

    def thread_time(self) -> float:
        return self.now

    def invoke(self, function_id: str, event: dict[str, Any]) -> None:
        self.now += event["cost"]


def _syncer_batch(appointments: int, cost: float) -> dict[str, Any]:
    body = {"kind": "mis_changes", "changes": [{"appointments": [{"id": i} for i in range(appointments)]}]}
    return {"Records": [{"body": json.dumps(body), "eventSourceARN": "arn:aws:sqs:eu:1:sync"}], "cost": cost}


@settings(max_examples=40, deadline=None)
@given(
    poll=st.floats(0.0, 5.0),
    per_event=st.floats(0.0001, 0.01),
    batches=st.lists(st.integers(1, 5000), min_size=2, max_size=8),
    traced=st.integers(0, 7),
)
def test_cpu_per_event_is_the_same_whichever_syncer_invocation_is_traced(
    poll: float, per_event: float, batches: list[int], traced: int
) -> None:
    """Every appointment costs ``per_event`` in the syncer and the poll serves them all: the figure is
    poll/all + per_event, whether or not (and whichever) invocation is traced and slowed by tracemalloc."""
    traced %= len(batches)
    figures = []
    for trace in (False, True):
        stack = FakeStack()
        with mock.patch("time.thread_time", stack.thread_time), metered(stack) as meter:
            stack.invoke("MisPollerFunction", {"cost": poll})
            for i, n in enumerate(batches):
                slowed = trace and i == traced
                meter.trace_left = 1 if slowed else 0
                stack.invoke("StageSyncerFunction", _syncer_batch(n, n * per_event * (4 if slowed else 1)))
            figures.append(cpu_ms_per_event(meter.snapshot()))
    expected = 1000 * (poll / sum(batches) + per_event)
    assert figures[0] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert figures[1] == pytest.approx(expected, rel=1e-3, abs=1e-3)


@pytest.fixture
def bench_moto() -> Iterator[ProcessAws]:
    saved = dict(os.environ)  # start() exports the endpoint: later tests in this worker must not inherit it
    aws = ProcessAws().start()
    try:
        yield aws
    finally:
        aws.stop()
        os.environ.clear()
        os.environ.update(saved)


def test_the_bench_moto_server_answers_several_calls_on_one_kept_alive_connection(bench_moto: ProcessAws) -> None:
    host, port = bench_moto.endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    scope = "testing/20260101/eu-central-1/dynamodb/aws4_request"
    signed = f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host, Signature=0"
    headers = {
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Content-Type": "application/x-amz-json-1.0",
        "Authorization": signed,
    }
    try:
        local_ends = set()
        for _ in range(3):
            connection.request("POST", "/", body=b"{}", headers=headers)
            response = connection.getresponse()
            assert response.status == 200 and "TableNames" in json.loads(response.read())
            assert (response.getheader("Connection") or "").lower() != "close"
            assert connection.sock is not None
            local_ends.add(connection.sock.getsockname())
        assert len(local_ends) == 1
    finally:
        connection.close()
