"""The stage syncer's three SQS queues, each processed as one batch (Powertools' custom partial processor).

Powertools' processors call a handler per record. Our queues want the whole batch at once: the sync
plans and applies every patient of the batch as one sync (CRM batches and bulk writes go out full), CRM
events are re-fetched in one go, consent outputs are pushed together. So ``WholeBatch`` parses every
record once, hands the valid bodies to the queue's job in one call, then judges each record by the
job's outcome, keeping Powertools' partial-failure reply (and FIFO group skipping for the sync queue).
"""

from __future__ import annotations

from contextvars import Token
from typing import Any, Protocol

import tenacity  # noqa: F401 - every batch's table reads retry through it (clinicsync.retrying loads it on use)
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, SqsFifoPartialProcessor
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.parser.types import Json
from pydantic import ValidationError

from clinicsync.adapters.aws import health, store  # noqa: F401 - every batch's, built on first use (wiring)
from clinicsync.adapters.aws.failures import describe
from clinicsync.application.consent_report import ConsentReport
from clinicsync.application.crm_events import EventReport
from clinicsync.application.sync import SyncIncomplete, SyncReport
from clinicsync.domain.models import SYNC_MESSAGE_MODELS, ConsentJob, CrmEvent, SyncMessage, build_now
from clinicsync.domain.state import STATE_MODELS
from clinicsync.observability import logger
from clinicsync.runtime import deadline, wiring
from clinicsync.runtime.observe import ConsentBatch, Counted, CrmUse, EventBatch, Failed, SyncBatch, observe

# Every batch validates its queue's messages and the sync reads its patients' state: built with the import
# (Lambda's init), before the records that hold them.
build_now(*SYNC_MESSAGE_MODELS, CrmEvent, *STATE_MODELS)


class SyncRecord(SqsRecordModel):
    body: Json[SyncMessage]


class CrmEventRecord(SqsRecordModel):
    body: Json[CrmEvent]


class ConsentRecord(SqsRecordModel):
    body: Json[ConsentJob]


class BatchJob(Protocol):
    queue: str  # names the queue in the failure log (`clinicsync dlq list`)

    def run(self, bodies: list[Any]) -> None:
        """The whole batch's work, once, with every body that parsed."""

    def judge(self, record: Any) -> None:
        """Raises when this record's part of the work failed (it comes back, then goes to the DLQ)."""

    def finish(self) -> None:
        """Reports the batch (not when every record failed: then the whole batch is returned)."""


def remember_failure(queue: str, message_id: str, error: Exception) -> None:
    """Keep why it failed under the message id: if it ends in the DLQ, `clinicsync dlq list` shows it."""
    try:
        wiring.container().failure_log().record(queue, message_id, describe(error), int(wiring.container().clock()))
        observe(Failed())
    except Exception:  # never let the bookkeeping hide the real failure
        logger.exception("could not record a failure reason", extra={"message_id": message_id})


RETRY_FIRST_SECONDS = 120
RETRY_MAX_SECONDS = 1800


def retry_delay(receive_count: int) -> int:
    """When a failed message is received again: 2, 6, 18, then 30 minutes. The first retry comes soon
    (a FIFO shard waits behind it), and a sync or CRM event's five receives still span about an hour of a
    CRM's outage before the DLQ. The queues' own visibility timeout (6 x the syncer's) is the fallback."""
    return int(min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 3 ** (max(receive_count, 1) - 1)))


class WholeBatch(BatchProcessor):
    """Parses each record once, runs the job on the whole batch, then judges record by record; failed
    records come back after :func:`retry_delay`, not after the queue's long visibility timeout."""

    def __init__(self, job: BatchJob, model: type[SqsRecordModel], queue_url: str) -> None:
        self._init_processor(model)
        self._record_model = model
        self.job = job
        self._queue_url = queue_url
        self._parsed: dict[int, SqsRecordModel | ValidationError] = {}
        self._deadline: Token[float | None] | None = None

    def _init_processor(self, model: type[SqsRecordModel]) -> None:
        BatchProcessor.__init__(self, EventType.SQS, model=model)

    def _prepare(self) -> None:
        super()._prepare()  # type: ignore[no-untyped-call]
        context = getattr(self, "lambda_context", None)
        if context is not None:  # a CRM client pacing its budget stops waiting before Lambda's deadline
            self._deadline = deadline.start(context.get_remaining_time_in_millis())
        try:
            self._parsed = {}
            for record in self.records:
                try:
                    self._parsed[id(record)] = self._record_model.model_validate(record)
                except ValidationError as exc:  # a poison message: it fails alone, below
                    self._parsed[id(record)] = exc
            self.job.run([p.body for p in self._parsed.values() if not isinstance(p, ValidationError)])
        except BaseException:
            self._end_deadline()  # _clean does not run when _prepare raises
            raise

    def _to_batch_type(self, record: dict[str, Any], event_type: EventType, model: Any = None) -> Any:
        parsed = self._parsed.get(id(record)) if model is not None else None
        if parsed is None:
            return super()._to_batch_type(record, event_type, model)
        if isinstance(parsed, ValidationError):
            raise parsed
        return parsed

    def _clean(self) -> None:
        self._end_deadline()
        self._schedule_retries()  # before the base class raises when every record failed
        super()._clean()  # type: ignore[no-untyped-call]
        self.job.finish()

    def _end_deadline(self) -> None:
        if self._deadline is not None:
            deadline.end(self._deadline)
            self._deadline = None

    def _schedule_retries(self) -> None:
        failed = {f["itemIdentifier"] for f in self._collect_sqs_failures()}  # type: ignore[no-untyped-call]
        delays = [
            (str(r["receiptHandle"]), retry_delay(int((r.get("attributes") or {}).get("ApproximateReceiveCount", 1))))
            for r in self.records
            if r.get("messageId") in failed and r.get("receiptHandle")
        ]
        if delays:
            wiring.container().retry_timer(self._queue_url).come_back_after(delays)

    def judge(self, record: Any) -> None:
        try:
            self.job.judge(record)
        except Exception as exc:
            remember_failure(self.job.queue, record.messageId, exc)
            raise


class WholeFifoBatch(WholeBatch, SqsFifoPartialProcessor):
    """The same for the FIFO sync queue: after a failure the rest of its message group is returned too,
    so changes of one shard stay in order."""

    def _init_processor(self, model: type[SqsRecordModel]) -> None:
        SqsFifoPartialProcessor.__init__(self, model=model, skip_group_on_error=True)


# --- the three queues' jobs -------------------------------------------------------------------------------------


def _patients(message: SyncMessage) -> set[str]:
    return {c.patient.mis_id for c in message.changes} | {o.patient_id for o in message.observations}


class SyncJob:
    """Patients' change sets and CRM observations: one sync for the batch; a message fails if any of its
    patients failed (finished patients cost nothing when it comes back)."""

    queue = "sync"

    def __init__(self) -> None:
        self.report: SyncReport | None = None
        self.failed: dict[str, str] = {}  # patient id -> reason
        self.error: Exception | None = None  # the whole sync failed
        self.throttles = 0
        self.oldest = 0.0  # when the poll read the batch's oldest change (epoch seconds)

    def run(self, bodies: list[SyncMessage]) -> None:
        before = wiring.container().crm_counters()
        self._sync(bodies)
        self.throttles = wiring.container().crm_counters()[1] - before[1]
        observe(Counted({"CrmThrottles": self.throttles}))

    def _sync(self, messages: list[SyncMessage]) -> None:
        # Each change set knows its poll run: a re-booking continues only a deal an earlier run made.
        changes = [c.model_copy(update={"polled_at": m.produced_at}) for m in messages for c in m.changes]
        observations = [o for m in messages for o in m.observations]
        if not changes and not observations:
            return
        try:
            self.report = wiring.container().syncer().sync(changes, observations)
            self.oldest = min(m.produced_at.timestamp() for m in messages)
        except SyncIncomplete as exc:
            self.failed = exc.failed
        except Exception as exc:  # every record of the batch fails with it
            logger.exception("batch sync failed")
            self.error = exc

    def judge(self, record: SyncRecord) -> None:
        message = record.body
        failed = {pid: self.failed[pid] for pid in _patients(message) if pid in self.failed}
        error = self.error or (SyncIncomplete(failed) if failed else None)
        if error is not None:
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

    def finish(self) -> None:
        if self.report is not None:  # lag: from the poll that read the oldest change to the CRM write
            observe(SyncBatch(self.report, self.throttles, wiring.container().clock() - self.oldest))


class CrmEventJob:
    """Webhook events: the whole batch re-fetched at once, then each event judged on its own (echo, manual
    move, new lead, opt-out)."""

    queue = "crm-events"

    def __init__(self) -> None:
        self.processor = wiring.container().crm_events()
        self.report = EventReport()
        self.before = (0, 0)

    def run(self, bodies: list[CrmEvent]) -> None:
        self.before = wiring.container().crm_counters()
        self.processor.prefetch(bodies)  # one batched re-fetch for the whole SQS batch

    def judge(self, record: CrmEventRecord) -> None:
        self.processor.handle(record.body, self.report)

    def finish(self) -> None:
        self.processor.flush(self.report)
        observe(EventBatch(self.report, CrmUse.since(self.before)))


class ConsentJobs:
    """Consent jobs: the batch's outputs (CRM opt-out fields, MIS flags, Mailchimp members) pushed at once;
    a job whose outputs are not all done fails and comes back after :func:`retry_delay`."""

    queue = "consent"

    def __init__(self) -> None:
        self.jobs: list[ConsentJob] = []
        self.report: ConsentReport | None = None

    def run(self, bodies: list[ConsentJob]) -> None:
        self.jobs = bodies
        outputs = wiring.container().consent_outputs()
        before = wiring.container().crm_counters()
        self.report = outputs.push(bodies)  # one CRM write and one e-mail read for the batch
        observe(CrmUse.since(before))

    def judge(self, record: ConsentRecord) -> None:
        failed = self.report.failed if self.report is not None else {}
        if record.body.subject in failed:
            raise RuntimeError(f"consent outputs incomplete: {failed[record.body.subject]}")

    def finish(self) -> None:
        if self.report is not None:  # unsubscribe latency: from the opt-out recorded to every output showing it
            now = wiring.container().clock()
            latencies = [now - job.produced_at for job in self.jobs if job.subject not in self.report.failed]
            observe(ConsentBatch(self.report, latencies))


def processor_for(source_arn: str) -> WholeBatch:
    """The queue's processor, by the event source's ARN as the template configures it (never by its name)."""
    settings = wiring.container().settings
    if source_arn == settings.sync_queue_arn:
        return WholeFifoBatch(SyncJob(), SyncRecord, settings.sync_queue_url)
    if source_arn == settings.crm_event_queue_arn:
        return WholeBatch(CrmEventJob(), CrmEventRecord, settings.crm_event_queue_url)
    if source_arn == settings.consent_queue_arn:
        return WholeBatch(ConsentJobs(), ConsentRecord, settings.consent_queue_url)
    raise ValueError("the event comes from a queue this function is not configured to read")
