"""Stage syncer: SQS FIFO batch -> plan and apply CRM writes per message, report partial failures."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import SqsFifoPartialProcessor, process_partial_response
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.parser.types import Json
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync import wiring
from clinicsync.models import SyncMessage
from clinicsync.observability import logger, metrics, tracer


class SyncRecord(SqsRecordModel):
    body: Json[SyncMessage]  # type: ignore[assignment]


# FIFO: after a failure, the rest of that message group is returned too, so order per shard holds.
processor = SqsFifoPartialProcessor(model=SyncRecord, skip_group_on_error=True)


@tracer.capture_method(capture_response=False)
def record_handler(record: SyncRecord) -> None:
    report = wiring.syncer().sync(record.body.changes)
    metrics.add_metric(
        name="ContactsWritten", unit=MetricUnit.Count, value=report.contacts_created + report.contacts_updated
    )
    metrics.add_metric(name="DealsWritten", unit=MetricUnit.Count, value=report.deals_created + report.deals_updated)
    metrics.add_metric(name="CrmRequests", unit=MetricUnit.Count, value=report.crm_requests)
    logger.info(
        "message synced",
        extra={
            "message_id": record.messageId,
            "shard": record.body.shard,
            "patients": report.patients,
            "crm_requests": report.crm_requests,
            "skipped": report.skipped,
        },
    )


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
