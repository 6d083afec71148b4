"""Small builders shared by the tests (not fixtures, so they stay explicit at the call site)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync.domain.crm_ports import ContactWrite, CrmMatches, CrmWrite, DealWrite, WriteOutcome
from clinicsync.domain.models import Appointment, AppointmentStatus, Consent, ConsentJob, Patient
from sandbox.cfn_yaml import load_template

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "sandbox" / "clinics" / "demo-dental.yaml"
MSK = ZoneInfo("Europe/Moscow")
T0 = datetime(2026, 11, 20, 10, 0, tzinfo=MSK)


# `CLINICSYNC_HYPOTHESIS=large` (tests/conftest.py) runs 20x the small profile's examples; a property that
# sets its own count takes it through here, so the large profile deepens it too.
EXAMPLES_SCALE = 20 if os.environ.get("CLINICSYNC_HYPOTHESIS") == "large" else 1


def examples(small: int) -> int:
    """``small`` examples in `make test`, 20 times as many under the large profile."""
    return small * EXAMPLES_SCALE


def template_table_spec(name: str = "clinic-table") -> dict[str, Any]:
    """``create_table`` arguments for the stack's table as template.yaml defines it."""
    props = load_template(ROOT / "template.yaml")["Resources"]["Table"]["Properties"]
    return {"TableName": name, **{k: props[k] for k in ("AttributeDefinitions", "KeySchema", "BillingMode")}}


def demo_config(**overrides: Any) -> ClinicConfig:
    config = parse_clinic_config(DEMO_CONFIG.read_text(encoding="utf-8"))
    return config.model_copy(update=overrides) if overrides else config


def patient(pid: str = "p1", version: int = 1, **kw: Any) -> Patient:
    defaults: dict[str, Any] = {
        "last_name": "Иванова",
        "first_name": "Мария",
        "middle_name": "Петровна",
        "phone": "+79161234567",
        "email": "maria@example.org",
        "consent": Consent(),
    }
    return Patient(mis_id=pid, version=version, **{**defaults, **kw})


def appointment(
    aid: str = "a1",
    pid: str = "p1",
    status: AppointmentStatus = AppointmentStatus.BOOKED,
    version: int = 1,
    start: datetime = T0,
    **kw: Any,
) -> Appointment:
    defaults: dict[str, Any] = {"doctor_id": "d1", "branch_id": "b1", "price": Decimal("2500.00")}
    return Appointment(
        mis_id=aid, patient_id=pid, status=status, starts_at=start, version=version, **{**defaults, **kw}
    )


def days(n: int) -> timedelta:
    return timedelta(days=n)


# Calls to the local HTTP API: the first one imports a handler (a cold start), which takes seconds on a
# loaded two-core machine, so allow more than httpx's default 5 s.
HTTP = httpx.Client(timeout=30.0)


CRM_CALL = "crm"  # the marker a CRM call of :class:`InstantCrm` leaves in its log


@dataclass
class InstantCrm:
    """A CRM that finds nothing and accepts every write: it keeps the writes, and notes each call in ``log``
    (a store's request log, to see the order of CRM and table requests)."""

    log: list[str] = field(default_factory=list)
    kind: str = "fake"
    lookups_need_intents: bool = True
    guards_writes: bool = True
    writes: list[CrmWrite] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def find(self, *args: Any, **kwargs: Any) -> CrmMatches:
        self.log.append(CRM_CALL)
        return CrmMatches()

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        self.log.append(CRM_CALL)
        self.writes.extend(writes)
        outcome = WriteOutcome()
        for w in writes:
            if isinstance(w, ContactWrite):
                outcome.contact_ids[w.patient_id] = w.contact_id or f"C{next(self.ids)}"
            elif isinstance(w, DealWrite):
                outcome.deal_ids[w.appointment_id] = w.deal_id or f"D{next(self.ids)}"
        return outcome

    def requests_made(self) -> int:
        return 0


class QueuedJobs:
    """A consent queue that keeps what was sent, for tests of the ledger and its outputs."""

    def __init__(self) -> None:
        self.sent: list[ConsentJob] = []

    def send(self, jobs: Sequence[ConsentJob]) -> None:
        self.sent.extend(jobs)
