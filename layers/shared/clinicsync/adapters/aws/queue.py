"""The sync queue (SQS FIFO). Messages are grouped by patient shard, so one patient's changes are
never processed by two syncer invocations at once, while different shards run in parallel."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from clinicsync.domain.models import ConsentJob, CrmEvent, SyncMessage, lean_json
from clinicsync.observability import logger

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient
    from mypy_boto3_sqs.type_defs import ChangeMessageVisibilityBatchRequestEntryTypeDef

SQS_BATCH = 10
MAX_BODY_BYTES = 240_000  # SQS caps a message at 256 KiB; keep a margin for attributes
MAX_BATCH_BYTES = 1_000_000  # SQS caps a whole SendMessageBatch at 1 MiB; keep a margin for attributes


def batches(entries: Sequence[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """SendMessageBatch chunks, in order: at most 10 entries and MAX_BATCH_BYTES of bodies each (ten
    messages near MAX_BODY_BYTES would be refused whole)."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        body = len(str(entry["MessageBody"]).encode())
        if chunk and (len(chunk) == SQS_BATCH or size + body > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += body
    if chunk:
        yield chunk


class SqsChangeQueue:
    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url
        self.sent = 0

    def send(self, messages: Sequence[SyncMessage]) -> None:
        """Send all messages or raise; the caller advances its cursor only after this returns."""
        entries: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            body = lean_json(message)
            if len(body.encode()) > MAX_BODY_BYTES:
                raise ValueError("sync message too large; lower patients_per_message")
            entries.append(
                {
                    "Id": str(index),
                    "MessageBody": body,
                    "MessageGroupId": f"shard-{message.shard}",
                    # Same content, same id: a poller retry inside 5 minutes is dropped by SQS itself.
                    "MessageDeduplicationId": hashlib.sha256(body.encode()).hexdigest(),
                }
            )
        for chunk in batches(entries):
            response = self._sqs.send_message_batch(QueueUrl=self._url, Entries=chunk)  # type: ignore[arg-type]
            failed = response.get("Failed", [])
            if failed:
                retry = [e for e in chunk if e["Id"] in {f["Id"] for f in failed}]
                again = self._sqs.send_message_batch(QueueUrl=self._url, Entries=retry)  # type: ignore[arg-type]
                if again.get("Failed"):
                    raise RuntimeError(f"{len(again['Failed'])} sync messages could not be enqueued")
            self.sent += len(chunk)


class SqsEventQueue:
    """The CRM event queue (SQS standard): order does not matter, because the syncer re-fetches the
    entity's current state; the event source batches up to 100 events so re-fetches are batched too."""

    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def send(self, events: Sequence[CrmEvent]) -> None:
        entries = [{"Id": str(i), "MessageBody": e.model_dump_json()} for i, e in enumerate(events)]
        for chunk in batches(entries):
            response = self._sqs.send_message_batch(QueueUrl=self._url, Entries=chunk)  # type: ignore[arg-type]
            if response.get("Failed"):
                raise RuntimeError(f"{len(response['Failed'])} CRM events could not be enqueued")


class SqsConsentQueue:
    """Consent jobs (SQS standard): each carries one subject; the consumer pushes the ledger's current
    state, so order and duplicates do not matter, and a failed job comes back until every output is done."""

    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def send(self, jobs: Sequence[ConsentJob]) -> None:
        entries = [{"Id": str(i), "MessageBody": j.model_dump_json()} for i, j in enumerate(jobs)]
        for chunk in batches(entries):
            response = self._sqs.send_message_batch(QueueUrl=self._url, Entries=chunk)  # type: ignore[arg-type]
            if response.get("Failed"):
                retry = [e for e in chunk if e["Id"] in {f["Id"] for f in response["Failed"]}]
                again = self._sqs.send_message_batch(QueueUrl=self._url, Entries=retry)  # type: ignore[arg-type]
                if again.get("Failed"):
                    raise RuntimeError(f"{len(again['Failed'])} consent jobs could not be enqueued")


class SqsConnectorInbox:
    """The IDENT inbox queue: one message per connector batch, its id as an attribute."""

    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def send(self, body: str, batch_id: str) -> None:
        self._sqs.send_message(
            QueueUrl=self._url,
            MessageBody=body,
            MessageAttributes={"batch_id": {"DataType": "String", "StringValue": batch_id}},
        )


class SqsRetryTimer:
    """Sets when failed messages of one queue are received again (ChangeMessageVisibilityBatch, 10 a call).

    Best effort: a message whose visibility cannot be changed comes back after the queue's own visibility
    timeout, which stays long enough for the longest invocation."""

    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def come_back_after(self, delays: Sequence[tuple[str, int]]) -> None:
        """``delays``: (receipt handle, seconds) per failed message."""
        for start in range(0, len(delays), SQS_BATCH):
            entries: list[ChangeMessageVisibilityBatchRequestEntryTypeDef] = [
                {"Id": str(n), "ReceiptHandle": handle, "VisibilityTimeout": seconds}
                for n, (handle, seconds) in enumerate(delays[start : start + SQS_BATCH])
            ]
            try:
                missed = self._sqs.change_message_visibility_batch(QueueUrl=self._url, Entries=entries).get("Failed")
            except Exception:
                logger.exception("could not set when failed messages come back")
                continue
            if missed:
                logger.warning("failed messages keep the queue's visibility timeout", extra={"messages": len(missed)})
