"""Why a queued message failed, kept next to the message id, so a dead letter can be read by a person.

SQS moves a message to its DLQ after ``maxReceiveCount`` receives and keeps its ``MessageId`` but says
nothing about why. The syncer records the last failure's reason (ids and error codes only, no PII) under
that id; ``clinicsync dlq list`` joins the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from clinicsync.adapters.aws.table import batch_get, batch_writer

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

KEEP_SECONDS = 15 * 86400  # one day longer than the DLQ keeps a message
MAX_REASON = 500


class FailureLog:
    def __init__(self, table: Table) -> None:
        self._table = table

    def record(self, queue: str, message_id: str, reason: str, at: int) -> None:
        self._table.update_item(
            Key={"pk": f"FAILURE#{queue}", "sk": message_id},
            UpdateExpression="SET reason = :r, last_at = :t, expires_at = :e ADD attempts :one",
            ExpressionAttributeValues={":r": reason[:MAX_REASON], ":t": at, ":e": at + KEEP_SECONDS, ":one": 1},
        )

    def reasons(self, queue: str, message_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        ids = list(dict.fromkeys(message_ids))
        for item in batch_get(self._table, [{"pk": f"FAILURE#{queue}", "sk": mid} for mid in ids]):
            out[str(item["sk"])] = {
                "reason": str(item.get("reason", "")),
                "attempts": int(item.get("attempts", 0)),
                "last_at": int(item.get("last_at", 0)),
            }
        return out

    def forget(self, queue: str, message_ids: Sequence[str]) -> None:
        with batch_writer(self._table) as batch:
            for mid in dict.fromkeys(message_ids):
                batch.delete_item(Key={"pk": f"FAILURE#{queue}", "sk": mid})


def describe(error: BaseException) -> str:
    """A reason a person can act on: the error's type and message (our errors carry ids, never PII)."""
    text = str(error).strip().replace("\n", " ")
    return f"{type(error).__name__}: {text}"[:MAX_REASON] if text else type(error).__name__
