"""The poller's ``MisSource`` for IDENT: the inbox queue that verified connector batches wait on."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

from clinicsync.adapters.ident.contract import ConnectorBatch
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync.observability import logger

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient


class IdentSource:
    """The poller's ``MisSource`` for IDENT: drains the inbox queue the receiver fills.

    Messages are deleted only in :meth:`acknowledge`, after their changes are on the sync queue; a
    poll that dies before that leaves them to reappear when their visibility timeout ends.
    """

    kind = "ident"

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        enrich: Callable[[Sequence[PatientChanges]], Sequence[PatientChanges]] | None = None,
        max_patients: int = 500,
        visibility_seconds: int = 300,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._enrich = enrich
        self._max_patients = max_patients
        self._visibility = visibility_seconds
        self._unacknowledged: list[str] = []

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        if cursor and cursor.get("resync"):
            # A resync cannot reach a database inside the clinic's LAN: the connector re-sends a window
            # itself (``clinicsync-ident run --resync-days N``), which arrives here as ordinary batches.
            return ChangePage(changes=(), cursor=dict(cursor), more=False)
        changes: list[PatientChanges] = []
        rejected = 0
        batches = 0
        drained = False
        while len(changes) < self._max_patients:
            reply = self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=self._visibility,
                WaitTimeSeconds=0,
            )
            messages = reply.get("Messages", [])
            if not messages:
                drained = True
                break
            for message in messages:
                self._unacknowledged.append(message["ReceiptHandle"])
                try:
                    batch = ConnectorBatch.model_validate_json(message.get("Body", ""))
                except ValidationError:
                    # The receiver validated it; a bad message here is a bug. Count it, never guess.
                    rejected += 1
                    logger.error("inbox message is not a connector batch", extra={"message_id": message["MessageId"]})
                    continue
                batches += 1
                rejected += batch.rejected
                changes.extend(batch.changes)
        if self._enrich is not None and changes:
            changes = list(self._enrich(changes))
        position = {"batches_read": int((cursor or {}).get("batches_read", 0)) + batches, "at": int(time.time())}
        return ChangePage(changes=tuple(changes), cursor=position, more=not drained, rejected=rejected)

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        return {"resync": True, "window_seconds": window_seconds, "requested_at": int(now)}

    def acknowledge(self, page: ChangePage) -> None:  # noqa: ARG002 - the handles of every page read so far
        handles, self._unacknowledged = self._unacknowledged, []
        for start in range(0, len(handles), 10):
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles[start : start + 10])]
            reply = self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)  # type: ignore[arg-type]
            if reply.get("Failed"):
                # Not fatal: an undeleted batch comes back and is re-applied, which changes nothing.
                logger.warning("some inbox messages were not deleted", extra={"failed": len(reply["Failed"])})
