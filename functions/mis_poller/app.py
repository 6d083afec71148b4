"""MIS poller: EventBridge Scheduler -> read the MIS feed -> enqueue per-patient change sets.

Three scheduled jobs share it: ``poll`` (incremental), ``resync`` (re-read a window, repair drift)
and ``catchup`` (read what changed in the CRM since the last run: its webhooks are never retried);
the operator's ``backfill`` runs here too (see ``clinicsync.runtime.scheduled``).
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from clinicsync.observability import logger, metrics, tracer
from clinicsync.runtime import scheduled


class ScheduledRun(BaseModel):
    """EventBridge Scheduler (ScheduleV2) sends the schedule's Input verbatim, not an EventBridge envelope."""

    model_config = ConfigDict(extra="ignore")

    scheduled_time: str | None = None
    execution_id: str | None = None
    job: scheduled.Job = "poll"
    window_days: int = Field(default=3, ge=1, le=730, description="resync: how far back to re-read (a backfill: more)")
    restart: bool = Field(default=False, description="backfill: start over instead of resuming the checkpoint")
    max_pages: int = Field(default=1000, ge=1, le=1000, description="backfill: pages to read in this invocation")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any] | str, context: LambdaContext) -> dict[str, Any]:
    # As Powertools' event_parser did (a ValidationError fails the run), without its parser package's imports.
    run = ScheduledRun.model_validate_json(event) if isinstance(event, str) else ScheduledRun.model_validate(event)
    logger.append_keys(execution_id=run.execution_id, job=run.job)
    return scheduled.run(run.job, context, run.window_days, run.restart, run.max_pages)
