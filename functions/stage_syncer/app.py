"""Stage syncer: three SQS event sources.

- The FIFO sync queue carries patients' change sets and CRM observations, grouped by patient shard:
  the whole SQS batch (up to 10 messages of 50 patients) is planned and applied as one sync, so CRM
  batches and bulk writes go out full; a message fails if any of its patients failed (then the rest
  of its group comes back too, and the finished patients cost nothing on the retry).
- The CRM event queue carries webhook events: the whole batch is re-fetched at once, then each event
  is judged on its own (echo, manual move, new lead, opt-out).
- The consent queue carries consent jobs: the whole batch's outputs (CRM opt-out fields, MIS flags,
  Mailchimp members) are pushed at once; a job whose outputs are not all done is reported failed and
  comes back after the visibility timeout, until done (then the DLQ alarm).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
from clinicsync.sync import SyncIncomplete, SyncReport


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


@dataclass
class _BatchSync:
    """The outcome of syncing a whole SQS batch at once, judged per record afterwards."""

    report: SyncReport | None = None
    failed: dict[str, str] = field(default_factory=dict)  # patient id -> reason
    error: Exception | None = None  # the whole sync failed
    oldest_change: float | None = None  # when the poll read the batch's oldest change (epoch seconds)


def _sync_batch(event: dict[str, Any]) -> _BatchSync:
    messages: list[SyncMessage] = []
    for raw in event.get("Records", []):
        try:
            messages.append(SyncMessage.model_validate_json(raw.get("body", "")))
        except ValidationError:
            continue  # reported as a failed item by the batch processor below
    changes = [c for m in messages for c in m.changes]
    observations = [o for m in messages for o in m.observations]
    if not changes and not observations:
        return _BatchSync()
    oldest = min(m.produced_at.timestamp() for m in messages)
    try:
        return _BatchSync(report=wiring.syncer().sync(changes, observations), oldest_change=oldest)
    except SyncIncomplete as exc:
        return _BatchSync(failed=exc.failed)
    except Exception as exc:  # every record of the batch fails with it
        logger.exception("batch sync failed")
        return _BatchSync(error=exc)


def _message_patients(message: SyncMessage) -> set[str]:
    return {c.patient.mis_id for c in message.changes} | {o.patient_id for o in message.observations}


def _sync_messages(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    before = wiring.crm_counters()
    outcome = _sync_batch(event)
    throttles = wiring.crm_counters()[1] - before[1]
    metrics.add_metric(name="CrmThrottles", unit=MetricUnit.Count, value=throttles)

    def judge(record: SyncRecord) -> None:
        message = record.body
        failed = {pid: outcome.failed[pid] for pid in _message_patients(message) if pid in outcome.failed}
        error: Exception | None = outcome.error or (SyncIncomplete(failed) if failed else None)
        if error is not None:
            _remember_failure("sync", record.messageId, error)
            raise error
        logger.info(
            "message synced",
            extra={
                "message_id": record.messageId,
                "shard": message.shard,
                "patients": len(message.changes),
                "observations": len(message.observations),
            },
        )

    response = process_partial_response(event=event, record_handler=judge, processor=sync_processor, context=context)
    report = outcome.report
    if report is not None:
        metrics.add_metric(
            name="ContactsWritten", unit=MetricUnit.Count, value=report.contacts_created + report.contacts_updated
        )
        metrics.add_metric(
            name="DealsWritten", unit=MetricUnit.Count, value=report.deals_created + report.deals_updated
        )
        metrics.add_metric(name="CrmRequests", unit=MetricUnit.Count, value=report.crm_requests)
        lag = time.time() - (outcome.oldest_change or time.time())  # from the poll that read it to the CRM
        metrics.add_metric(name="SyncLagSeconds", unit=MetricUnit.Seconds, value=max(0.0, lag))
        wiring.health().record_sync(
            patients=report.patients,
            contacts=report.contacts_created + report.contacts_updated,
            deals=report.deals_created + report.deals_updated,
            crm_requests=report.crm_requests,
            crm_throttles=throttles,
            lag_seconds=lag,
        )
        logger.info(
            "batch synced",
            extra={"patients": report.patients, "crm_requests": report.crm_requests, "skipped": report.skipped},
        )
    return response


def _crm_use(before: tuple[int, int]) -> None:
    """CRM requests and throttles of a webhook or consent batch (sync batches report theirs with their report)."""
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
    return _sync_messages(event, context)
