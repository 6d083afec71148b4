"""Stage syncer: three SQS event sources.

- The FIFO sync queue carries patients' change sets and CRM observations, grouped by patient shard:
  CRM writes are planned and applied per message; failures are reported per record.
- The CRM event queue carries webhook events: the whole batch is re-fetched at once, then each event
  is judged on its own (echo, manual move, new lead, opt-out).
- The consent queue carries consent jobs: the whole batch's outputs (CRM opt-out fields, MIS flags,
  Mailchimp members) are pushed at once; a job whose outputs are not all done is reported failed and
  comes back after the visibility timeout, until done (then the DLQ alarm).
"""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    SqsFifoPartialProcessor,
    process_partial_response,
)
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.parser.types import Json
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from clinicsync import wiring
from clinicsync.crm_events import EventReport
from clinicsync.failures import describe
from clinicsync.models import ConsentJob, CrmEvent, SyncMessage
from clinicsync.observability import logger, metrics, tracer


class SyncRecord(SqsRecordModel):
    body: Json[SyncMessage]  # type: ignore[assignment]


class CrmEventRecord(SqsRecordModel):
    body: Json[CrmEvent]  # type: ignore[assignment]


class ConsentRecord(SqsRecordModel):
    body: Json[ConsentJob]  # type: ignore[assignment]


# FIFO: after a failure, the rest of that message group is returned too, so order per shard holds.
sync_processor = SqsFifoPartialProcessor(model=SyncRecord, skip_group_on_error=True)
event_processor = BatchProcessor(event_type=EventType.SQS, model=CrmEventRecord)
consent_processor = BatchProcessor(event_type=EventType.SQS, model=ConsentRecord)


def _remember_failure(queue: str, message_id: str, error: Exception) -> None:
    """Keep why it failed under the message id: if it ends in the DLQ, `clinicsync dlq list` shows it."""
    try:
        wiring.failure_log().record(queue, message_id, describe(error), int(time.time()))
        wiring.health().record_error()
    except Exception:  # never let the bookkeeping hide the real failure
        logger.exception("could not record a failure reason", extra={"message_id": message_id})


@tracer.capture_method(capture_response=False)
def sync_record(record: SyncRecord) -> None:
    message = record.body
    try:
        _, throttled_before = wiring.crm_counters()
        report = wiring.syncer().sync(message.changes, message.observations)
    except Exception as exc:
        _remember_failure("sync", record.messageId, exc)
        raise
    throttles = wiring.crm_counters()[1] - throttled_before
    lag = time.time() - message.produced_at.timestamp()  # from the poll that read the change to the CRM write
    metrics.add_metric(name="SyncLagSeconds", unit=MetricUnit.Seconds, value=max(0.0, lag))
    metrics.add_metric(name="CrmThrottles", unit=MetricUnit.Count, value=throttles)
    wiring.health().record_sync(
        patients=report.patients,
        contacts=report.contacts_created + report.contacts_updated,
        deals=report.deals_created + report.deals_updated,
        crm_requests=report.crm_requests,
        crm_throttles=throttles,
        lag_seconds=lag,
    )
    metrics.add_metric(
        name="ContactsWritten", unit=MetricUnit.Count, value=report.contacts_created + report.contacts_updated
    )
    metrics.add_metric(name="DealsWritten", unit=MetricUnit.Count, value=report.deals_created + report.deals_updated)
    metrics.add_metric(name="CrmRequests", unit=MetricUnit.Count, value=report.crm_requests)
    logger.info(
        "message synced",
        extra={
            "message_id": record.messageId,
            "shard": message.shard,
            "patients": report.patients,
            "observations": len(message.observations),
            "crm_requests": report.crm_requests,
            "skipped": report.skipped,
        },
    )


def _crm_use(before: tuple[int, int]) -> None:
    """CRM requests and throttles of a webhook or consent batch (sync messages report theirs per message)."""
    requests, throttles = (now - then for now, then in zip(wiring.crm_counters(), before, strict=True))
    metrics.add_metric(name="CrmRequests", unit=MetricUnit.Count, value=requests)
    metrics.add_metric(name="CrmThrottles", unit=MetricUnit.Count, value=throttles)
    wiring.health().record_crm_calls(requests, throttles)


def _crm_events(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    processor = wiring.crm_events()
    before = wiring.crm_counters()
    valid = []
    for raw in event.get("Records", []):
        try:
            valid.append(CrmEvent.model_validate_json(raw.get("body", "")))
        except ValidationError:
            continue  # reported as a failed item by the batch processor below
    processor.prefetch(valid)  # one batched re-fetch for the whole SQS batch
    report = EventReport()

    def handle(record: CrmEventRecord) -> None:
        try:
            processor.handle(record.body, report)
        except Exception as exc:
            _remember_failure("crm-events", record.messageId, exc)
            raise

    response = process_partial_response(event=event, record_handler=handle, processor=event_processor, context=context)
    processor.flush(report)
    _crm_use(before)
    metrics.add_metric(name="CrmEchoesIgnored", unit=MetricUnit.Count, value=report.echoes)
    metrics.add_metric(name="CrmManualMoves", unit=MetricUnit.Count, value=report.manual_moves)
    logger.info(
        "crm events handled",
        extra={
            "events": report.events,
            "echoes": report.echoes,
            "not_ours": report.not_ours,
            "manual_moves": report.manual_moves,
            "leads": report.leads_for_patients,
            "opt_outs": report.opt_outs,
        },
    )
    return response


def _consent_jobs(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    jobs = []
    for raw in event.get("Records", []):
        try:
            jobs.append(ConsentJob.model_validate_json(raw.get("body", "")))
        except ValidationError:
            continue  # reported as a failed item by the batch processor below
    outputs = wiring.consent_outputs()
    before = wiring.crm_counters()
    report = outputs.push(jobs)  # one CRM write and one e-mail read for the batch
    _crm_use(before)

    def check(record: ConsentRecord) -> None:
        if record.body.subject in report.failed:
            error = RuntimeError(f"consent outputs incomplete: {report.failed[record.body.subject]}")
            _remember_failure("consent", record.messageId, error)
            raise error

    response = process_partial_response(event=event, record_handler=check, processor=consent_processor, context=context)
    # Unsubscribe latency: from the opt-out being recorded to every output showing it.
    now = time.time()
    latencies = [now - job.produced_at for job in jobs if job.subject not in report.failed]
    for latency in latencies:
        metrics.add_metric(name="UnsubscribeLatencySeconds", unit=MetricUnit.Seconds, value=max(0.0, latency))
    wiring.health().record_unsubscribes(latencies)
    metrics.add_metric(name="ConsentCrmWrites", unit=MetricUnit.Count, value=report.crm_written)
    metrics.add_metric(name="ConsentMisWrites", unit=MetricUnit.Count, value=report.mis_written)
    metrics.add_metric(name="ConsentMailchimpUnsubscribes", unit=MetricUnit.Count, value=report.mailchimp_unsubscribed)
    metrics.add_metric(name="ConsentJobsFailed", unit=MetricUnit.Count, value=len(report.failed))
    logger.info(
        "consent outputs pushed",
        extra={"jobs": report.jobs, "skipped": report.skipped, "failed": sorted(set(report.failed.values()))},
    )
    return response


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    records = event.get("Records") or [{}]
    source = str(records[0].get("eventSourceARN", ""))
    if source.endswith("-consent"):
        return _consent_jobs(event, context)
    if not source.endswith(".fifo"):
        return _crm_events(event, context)
    return process_partial_response(event=event, record_handler=sync_record, processor=sync_processor, context=context)
