"""MIS poller: EventBridge Scheduler -> read the MIS feed -> enqueue per-patient change sets.

Three scheduled jobs share it: ``poll`` (incremental), ``resync`` (re-read a window, repair drift)
and ``catchup`` (read what changed in the CRM since the last run: its webhooks are never retried).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from clinicsync import wiring
from clinicsync.observability import logger, metrics, tracer


class ScheduledRun(BaseModel):
    """EventBridge Scheduler (ScheduleV2) sends the schedule's Input verbatim, not an EventBridge envelope."""

    model_config = ConfigDict(extra="ignore")

    scheduled_time: str | None = None
    execution_id: str | None = None
    job: Literal["poll", "resync", "catchup", "backfill"] = "poll"
    window_days: int = Field(default=3, ge=1, le=730, description="resync: how far back to re-read (a backfill: more)")
    restart: bool = Field(default=False, description="backfill: start over instead of resuming the checkpoint")
    max_pages: int = Field(default=1000, ge=1, le=1000, description="backfill: pages to read in this invocation")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
@event_parser(model=ScheduledRun)
def lambda_handler(event: ScheduledRun, context: LambdaContext) -> dict[str, Any]:
    logger.append_keys(execution_id=event.execution_id, job=event.job)
    try:
        return _run(event, context)
    except Exception:
        wiring.health().record_error()  # a MIS outage shows in `clinicsync status` (errors in the last hour)
        raise


def _run(event: ScheduledRun, context: LambdaContext) -> dict[str, Any]:
    if wiring.clinic_config().directory is not None:
        return _directory(event, context)
    if event.job == "catchup":
        caught = wiring.crm_catch_up().run()
        metrics.add_metric(name="CrmCatchUpEvents", unit=MetricUnit.Count, value=caught.events)
        metrics.add_metric(name="CrmCatchUpPaused", unit=MetricUnit.Count, value=int(caught.paused))
        return {
            "events": caught.events,
            "manual_moves": caught.manual_moves,
            "echoes": caught.echoes,
            "paused": caught.paused,
        }
    poller = wiring.poller()
    remaining = context.get_remaining_time_in_millis
    if event.job == "backfill":
        # The operator's first import (`clinicsync backfill`): checkpointed, resumable, invoked until done.
        state = poller.backfill(
            remaining, wiring.backfill_checkpoint(), event.window_days, event.restart, event.max_pages
        )
        metrics.add_metric(name="PatientsEnqueued", unit=MetricUnit.Count, value=state.step_patients)
        wiring.health().record_poll(state.step_patients, 0)
        logger.info("backfill step", extra=state.as_dict())
        return state.as_dict()
    resync = event.job == "resync"
    window = event.window_days * 86400
    report = poller.resync(remaining, window) if resync else poller.poll(remaining, owner=context.aws_request_id)
    metrics.add_metric(name="PatientsEnqueued", unit=MetricUnit.Count, value=report.patients)
    metrics.add_metric(name="MisRecordsRejected", unit=MetricUnit.Count, value=report.rejected)
    if not report.skipped_busy:
        wiring.health().record_poll(report.patients, report.rejected)
    logger.info("poll finished", extra=asdict(report))
    return asdict(report)


def _directory(event: ScheduledRun, context: LambdaContext) -> dict[str, Any]:
    """The lab case: the LIS's registers two-way with vTiger. vTiger has no webhooks, so ``poll`` and
    ``catchup`` are the same poll of both sides (``modifiedtime`` in vTiger, ``updated_since`` in the
    LIS); ``resync`` reads both registers in full (unchanged records cost no write)."""
    lease = context.get_remaining_time_in_millis() // 1000 + 1  # held at most until this invocation ends
    report = wiring.directory_sync().run(full=event.job == "resync", owner=context.aws_request_id, lease_seconds=lease)
    metrics.add_metric(name="DirectoryConflicts", unit=MetricUnit.Count, value=report.conflicts)
    metrics.add_metric(name="DirectoryFailures", unit=MetricUnit.Count, value=len(report.failed))
    result = asdict(report)
    logger.info(
        "directory sync", extra={k: v for k, v in result.items() if k != "failed"} | {"failed": len(report.failed)}
    )
    return result
