"""The batch runtime tells the parts that wait (a CRM client pacing its budget) how long the Lambda
invocation has left, for the invocation only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.batch import process_partial_response
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel

from clinicsync.runtime import deadline
from clinicsync.runtime.batch import WholeBatch

EVENT = json.loads((Path(__file__).parents[2] / "events" / "stage_syncer_crm_events.json").read_text())


class LambdaContextStub:
    function_name = "StageSyncerFunction"
    aws_request_id = "req-1"

    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


class RecordingJob:
    queue = "crm-events"

    def __init__(self, fails: bool = False) -> None:
        self.seen: list[float | None] = []
        self.fails = fails

    def run(self, bodies: list[Any]) -> None:
        self.seen.append(deadline.time_left())
        if self.fails:
            raise RuntimeError("the job broke")

    def judge(self, record: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def test_an_invocations_time_left_is_known_while_its_batch_runs_and_forgotten_after() -> None:
    job = RecordingJob()
    processor = WholeBatch(job, SqsRecordModel, "https://sqs.local/crm-events")
    assert deadline.time_left() is None

    reply = process_partial_response(
        event=EVENT, record_handler=processor.judge, processor=processor, context=LambdaContextStub(120_000)
    )

    assert reply == {"batchItemFailures": []}
    (left,) = job.seen
    assert left is not None and 119.0 < left <= 120.0
    assert deadline.time_left() is None  # the next invocation, or a part used outside one, sees none


def test_a_batch_whose_job_raises_forgets_its_invocations_time_left_too() -> None:
    """A stale deadline would make the next work in this thread pause every paced method."""
    job = RecordingJob(fails=True)
    processor = WholeBatch(job, SqsRecordModel, "https://sqs.local/crm-events")

    with pytest.raises(RuntimeError):
        process_partial_response(
            event=EVENT, record_handler=processor.judge, processor=processor, context=LambdaContextStub(120_000)
        )

    assert job.seen[0] is not None and deadline.time_left() is None
