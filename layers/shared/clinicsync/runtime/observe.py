"""What each invocation did, written in one place: the CloudWatch metrics, the health item that
``clinicsync status`` reads, and the log line. Handlers and batch jobs build a report; ``observe`` writes it.

Counts and seconds only: a report never carries a name, phone or e-mail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.metrics import MetricUnit

from clinicsync.observability import logger, metrics
from clinicsync.runtime import wiring

if TYPE_CHECKING:
    from clinicsync.application.consent_report import ConsentReport
    from clinicsync.application.crm_events import EventReport
    from clinicsync.application.directory import DirectoryReport
    from clinicsync.application.poll import PollReport
    from clinicsync.application.sync import SyncReport
    from clinicsync.domain.backfill import BackfillState


@dataclass(frozen=True)
class Counted:
    """Plain counts of one request (refusals, queued webhooks, served tickets); no health item."""

    counts: dict[str, int]


@dataclass(frozen=True)
class CrmUse:
    """CRM requests and throttled answers, as two readings of the container's CRM client differ."""

    requests: int = 0
    throttles: int = 0

    @classmethod
    def since(cls, before: tuple[int, int]) -> CrmUse:
        now = wiring.container().crm_counters()
        return cls(now[0] - before[0], now[1] - before[1])


@dataclass(frozen=True)
class SyncBatch:
    """A whole sync batch written; ``lag`` runs from the poll that read its oldest change to the CRM."""

    report: SyncReport
    throttles: int
    lag: float


@dataclass(frozen=True)
class EventBatch:
    report: EventReport
    crm: CrmUse


@dataclass(frozen=True)
class ConsentBatch:
    """``latencies``: seconds from each finished job's opt-out to every output showing it."""

    report: ConsentReport
    latencies: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class CatchUp:
    report: EventReport


@dataclass(frozen=True)
class Poll:
    report: PollReport


@dataclass(frozen=True)
class Backfill:
    state: BackfillState


@dataclass(frozen=True)
class Directory:
    report: DirectoryReport


@dataclass(frozen=True)
class Failed:
    """An invocation or a message failed: the health item's error count (``clinicsync status``)."""


Report = Counted | CrmUse | SyncBatch | EventBatch | ConsentBatch | CatchUp | Poll | Backfill | Directory | Failed


def _count(name: str, value: float, unit: MetricUnit = MetricUnit.Count) -> None:
    metrics.add_metric(name=name, unit=unit, value=value)


def _crm_use(crm: CrmUse) -> None:
    _count("CrmRequests", crm.requests)
    _count("CrmThrottles", crm.throttles)
    wiring.container().health().record_crm_calls(crm.requests, crm.throttles)


def observe(report: Report) -> None:
    match report:
        case Counted(counts):
            for name, value in counts.items():
                _count(name, value)
        case CrmUse():
            _crm_use(report)
        case SyncBatch(sync, throttles, lag):
            contacts, deals = sync.contacts_created + sync.contacts_updated, sync.deals_created + sync.deals_updated
            _count("ContactsWritten", contacts)
            _count("DealsWritten", deals)
            _count("CrmRequests", sync.crm_requests)
            _count("SyncLagSeconds", max(0.0, lag), MetricUnit.Seconds)
            wiring.container().health().record_sync(
                patients=sync.patients,
                contacts=contacts,
                deals=deals,
                crm_requests=sync.crm_requests,
                crm_throttles=throttles,
                lag_seconds=lag,
            )
            synced = {"patients": sync.patients, "crm_requests": sync.crm_requests, "skipped": sync.skipped}
            logger.info("batch synced", extra=synced)
        case EventBatch(events, crm):
            _crm_use(crm)
            _count("CrmEchoesIgnored", events.echoes)
            _count("CrmManualMoves", events.manual_moves)
            logger.info("crm events handled", extra=_event_counts(events))
        case ConsentBatch(consent, latencies):
            for latency in latencies:
                _count("UnsubscribeLatencySeconds", max(0.0, latency), MetricUnit.Seconds)
            wiring.container().health().record_unsubscribes(latencies)
            _count("ConsentCrmWrites", consent.crm_written)
            _count("ConsentMisWrites", consent.mis_written)
            _count("ConsentMailchimpUnsubscribes", consent.mailchimp_unsubscribed)
            _count("ConsentJobsFailed", len(consent.failed))
            pushed = {"jobs": consent.jobs, "skipped": consent.skipped, "failed": sorted(set(consent.failed.values()))}
            logger.info("consent outputs pushed", extra=pushed)
        case CatchUp(caught):
            _count("CrmCatchUpEvents", caught.events)
            _count("CrmCatchUpPaused", int(caught.paused))
        case Poll(poll):
            _count("PatientsEnqueued", poll.patients)
            _count("MisRecordsRejected", poll.rejected)
            if not poll.skipped_busy:
                wiring.container().health().record_poll(poll.patients, poll.rejected)
            logger.info("poll finished", extra=asdict(poll))
        case Backfill(state):
            _count("PatientsEnqueued", state.step_patients)
            wiring.container().health().record_poll(state.step_patients, 0)
            logger.info("backfill step", extra=state.as_dict())
        case Directory(directory):
            _count("DirectoryConflicts", directory.conflicts)
            _count("DirectoryFailures", len(directory.failed))
            extra: dict[str, Any] = {k: v for k, v in asdict(directory).items() if k != "failed"}
            logger.info("directory sync", extra=extra | {"failed": len(directory.failed)})
        case Failed():
            wiring.container().health().record_error()


def _event_counts(report: EventReport) -> dict[str, int]:
    return {
        "events": report.events,
        "echoes": report.echoes,
        "not_ours": report.not_ours,
        "manual_moves": report.manual_moves,
        "leads": report.leads_for_patients,
        "opt_outs": report.opt_outs,
    }
