"""Dead letters: list them with the reason they failed, and replay them once the fault is gone.

Replay sends each dead letter back to the queue it came from, with its FIFO message group (so a patient's
shard still has a single writer) and a fresh deduplication id, and deletes it from the DLQ only after the
send succeeded. Replaying twice is harmless: every sync write is idempotent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from clinicsync.adapters.aws.failures import FailureLog
from clinicsync.adapters.ident.contract import ConnectorBatch
from clinicsync.domain.models import ConsentJob, CrmEvent, SyncMessage

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

NO_REASON = "the invocation failed without a recorded reason (a timeout or a crash of the function)"


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    receipt_handle: str
    body: str
    group_id: str | None
    receives: int
    sent_at: int
    reason: str
    attempts: int

    def summary(self) -> dict[str, Any]:
        """What the message is about, in ids and counts only."""
        try:
            body = json.loads(self.body)
        except ValueError:
            return {"kind": "unreadable"}
        if not isinstance(body, dict):
            return {"kind": "unreadable"}
        if "changes" in body or "observations" in body:
            return {
                "kind": "sync",
                "shard": body.get("shard"),
                "patients": len(body.get("changes") or []),
                "observations": len(body.get("observations") or []),
            }
        if "batch_id" in body:
            return {"kind": "ident_batch", "batch": body.get("batch_id"), "patients": len(body.get("changes") or [])}
        if "subject" in body:
            return {"kind": "consent", "subject": str(body.get("subject", ""))[:24]}
        return {"kind": "crm_event", "entity": body.get("entity"), "crm_id": body.get("crm_id")}


def _receive_all(sqs: SQSClient, dlq_url: str, visibility: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while True:
        page = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            AttributeNames=["All"],
            VisibilityTimeout=visibility,
            WaitTimeSeconds=0,
        ).get("Messages", [])
        if not page:
            return messages
        messages.extend(page)  # type: ignore[arg-type]


def dead_letters(sqs: SQSClient, dlq_url: str, failures: FailureLog, queue: str, hold: int = 0) -> list[DeadLetter]:
    """Every dead letter with its recorded reason. ``hold`` keeps them invisible that many seconds
    (replay uses it so nobody else picks them up meanwhile); 0 leaves them visible again at once."""
    raw = _receive_all(sqs, dlq_url, visibility=max(hold, 1))
    reasons = failures.reasons(queue, [m["MessageId"] for m in raw])
    letters = []
    for m in raw:
        attrs = m.get("Attributes", {})
        known = reasons.get(m["MessageId"], {})
        letters.append(
            DeadLetter(
                message_id=m["MessageId"],
                receipt_handle=m["ReceiptHandle"],
                body=m.get("Body", ""),
                group_id=attrs.get("MessageGroupId"),
                receives=int(attrs.get("ApproximateReceiveCount", 0)),
                sent_at=int(attrs.get("SentTimestamp", 0)) // 1000,
                reason=str(known.get("reason") or _unreadable(m.get("Body", ""), queue) or NO_REASON),
                attempts=int(known.get("attempts", 0)),
            )
        )
    if hold == 0:
        for letter in letters:
            sqs.change_message_visibility(QueueUrl=dlq_url, ReceiptHandle=letter.receipt_handle, VisibilityTimeout=0)
    return letters


def _unreadable(body: str, queue: str) -> str | None:
    """A message the handler could not even parse never reached the code that records reasons."""
    models: dict[str, type[BaseModel]] = {"sync": SyncMessage, "crm-events": CrmEvent, "consent": ConsentJob}
    model = models.get(queue, ConnectorBatch)
    try:
        model.model_validate_json(body)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"][:2]) or "body" for e in exc.errors()})[:5]
        return f"the body is not a valid {queue} message ({', '.join(fields)}); replaying cannot help"
    return None


@dataclass
class ReplayReport:
    replayed: int = 0
    failed: int = 0


def replay(
    sqs: SQSClient,
    dlq_url: str,
    source_url: str,
    failures: FailureLog,
    queue: str,
    on_message: Callable[[DeadLetter], None] | None = None,
) -> ReplayReport:
    report = ReplayReport()
    fifo = source_url.endswith(".fifo")
    for letter in dead_letters(sqs, dlq_url, failures, queue, hold=300):
        kwargs: dict[str, Any] = {"QueueUrl": source_url, "MessageBody": letter.body}
        if fifo:
            kwargs["MessageGroupId"] = letter.group_id or "replay"
            kwargs["MessageDeduplicationId"] = f"replay-{letter.message_id}-{int(time.time())}"[:128]
        try:
            sqs.send_message(**kwargs)
        except Exception:  # leave it in the DLQ, visible again after the hold, and say so
            report.failed += 1
            continue
        sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=letter.receipt_handle)
        report.replayed += 1
        if on_message is not None:
            on_message(letter)
    return report
