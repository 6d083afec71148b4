"""SendMessageBatch stays within SQS's limits whatever the message sizes: at most 10 entries and at most
1 MiB in total per call (SQS refuses a longer batch whole, so a poll of big change sets never enqueued)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.adapters.aws.queue import MAX_BATCH_BYTES, MAX_BODY_BYTES, SQS_BATCH, SqsChangeQueue, batches
from clinicsync.domain.models import CrmObservation, SyncMessage
from sandbox.runtime import LocalAws


@given(st.lists(st.integers(min_value=1, max_value=MAX_BODY_BYTES), max_size=40))
def test_batches_keep_order_and_stay_within_count_and_bytes(sizes: list[int]) -> None:
    entries = [{"Id": str(i), "MessageBody": "x" * size} for i, size in enumerate(sizes)]
    chunks = list(batches(entries))
    assert [e for chunk in chunks for e in chunk] == entries
    for chunk in chunks:
        assert 1 <= len(chunk) <= SQS_BATCH
        assert sum(len(e["MessageBody"]) for e in chunk) <= MAX_BATCH_BYTES


@pytest.fixture
def fifo_queue(local_aws: LocalAws) -> str:
    """A queue on the session's moto server (an in-process mock_aws would reset the backends it shares)."""
    name = f"batches-{uuid.uuid4().hex[:8]}.fifo"
    url: str = local_aws.client("sqs").create_queue(QueueName=name, Attributes={"FifoQueue": "true"})["QueueUrl"]
    return url


def _message(shard: int, approx_bytes: int) -> SyncMessage:
    observation = CrmObservation(kind="deal_stage", patient_id=f"p{shard}", crm_id="9" * approx_bytes)
    return SyncMessage(
        clinic_id="c1", shard=shard, produced_at=datetime(2026, 1, 1, tzinfo=UTC), observations=(observation,)
    )


def test_ten_large_sync_messages_are_all_enqueued(local_aws: LocalAws, fifo_queue: str) -> None:
    messages = [_message(shard, 200_000) for shard in range(10)]  # 2 MB in total, each under MAX_BODY_BYTES
    SqsChangeQueue(local_aws.client("sqs"), fifo_queue).send(messages)
    sqs = local_aws.client("sqs")
    received: list[int] = []
    while batch := sqs.receive_message(QueueUrl=fifo_queue, MaxNumberOfMessages=10).get("Messages", []):
        for message in batch:
            received.append(json.loads(message["Body"])["shard"])
            sqs.delete_message(QueueUrl=fifo_queue, ReceiptHandle=message["ReceiptHandle"])
    assert sorted(received) == list(range(10))
