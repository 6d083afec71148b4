"""A message the stage syncer failed comes back after a short, growing delay (``retry_delay``), not after
the queue's visibility timeout (6 x the syncer's 300 s): a FIFO shard waits behind its failed message."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

from clinicsync.runtime.batch import retry_delay
from sandbox.local import LocalClinic

ROOT = Path(__file__).resolve().parents[2]
FIRST_VISIBILITY = 1  # seconds: the receive below stands in for the event source mapping's


def test_retry_delays_grow_from_two_minutes_and_keep_an_hour_of_outage_before_the_dlq() -> None:
    delays = [retry_delay(n) for n in range(1, 6)]
    assert delays == [120, 360, 1080, 1800, 1800]
    assert 50 * 60 <= sum(delays[:4]) <= 70 * 60  # the 5th receive (then the DLQ) about an hour after the 1st


def _received_event(clinic: LocalClinic, queue_id: str, arn_setting: str, body: str, **send: Any) -> dict[str, Any]:
    sqs = clinic.stack.aws.client("sqs")
    url = clinic.stack.physical[queue_id]
    sqs.send_message(QueueUrl=url, MessageBody=body, **send)
    received = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=FIRST_VISIBILITY, AttributeNames=["All"]
    )["Messages"]
    record = {
        "messageId": received[0]["MessageId"],
        "receiptHandle": received[0]["ReceiptHandle"],
        "body": received[0]["Body"],
        "attributes": received[0]["Attributes"],
        "messageAttributes": {},
        "md5OfBody": received[0]["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": clinic.stack.env[arn_setting],
        "awsRegion": "eu-central-1",
    }
    return {"Records": [record]}


def _visible_again(clinic: LocalClinic, queue_id: str) -> bool:
    time.sleep(FIRST_VISIBILITY + 0.5)
    sqs = clinic.stack.aws.client("sqs")
    return bool(sqs.receive_message(QueueUrl=clinic.stack.physical[queue_id], MaxNumberOfMessages=1).get("Messages"))


@pytest.mark.parametrize(
    ("queue_id", "arn_setting", "send"),
    [
        ("CrmEventQueue", "CRM_EVENT_QUEUE_ARN", {}),
        ("SyncQueue", "SYNC_QUEUE_ARN", {"MessageGroupId": "0", "MessageDeduplicationId": "poison-1"}),
    ],
)
def test_a_failed_message_is_held_back_for_its_retry_delay(
    make_clinic: Callable[..., LocalClinic], queue_id: str, arn_setting: str, send: dict[str, Any]
) -> None:
    clinic = make_clinic(patients=1, appointments=1, rate_limit=False)
    event = _received_event(clinic, queue_id, arn_setting, "not json", **send)
    with pytest.raises(BatchProcessingError):  # every record failed: the invocation fails, the batch returns
        clinic.stack.invoke("StageSyncerFunction", event)
    # Without the retry timer it would be back once the receive's 1 s visibility ran out.
    assert not _visible_again(clinic, queue_id)


def test_only_the_failed_record_of_a_partly_failed_batch_is_held_back(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=1, appointments=1, rate_limit=False)
    event = _received_event(clinic, "ConsentQueue", "CONSENT_QUEUE_ARN", "not json")
    sample = json.loads((ROOT / "events" / "stage_syncer_consent_jobs.json").read_text(encoding="utf-8"))
    good = sample["Records"][0] | {"eventSourceARN": clinic.stack.env["CONSENT_QUEUE_ARN"]}
    reply = clinic.stack.invoke("StageSyncerFunction", {"Records": [good, *event["Records"]]})
    assert reply == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    assert not _visible_again(clinic, "ConsentQueue")
