"""IDENT rows -> clinicsync's canonical change sets, and the status IDENT never states.

IDENT has no status column. The state of a booking is derived, in this order:

1. a row in ``Receptions`` for it: the visit took place (``visited`` -> completed);
2. a cancel reason on the booking (``cancelled``);
3. its end plus the clinic's grace period has passed with neither: ``no_show``;
4. otherwise it is ``scheduled`` (booked).

The words are mapped to canonical statuses through ``clinicsync.domain.statuses`` like every MIS's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from clinicsync.domain.emails import normalise_email
from clinicsync.domain.models import Appointment, Patient
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.statuses import canonical_status
from clinicsync_ident.db import Row, as_datetime

DELETED_PATIENT = 3  # Patients.Status
SEX = {1: "m", 2: "f"}  # Persons.Sex; 0 or anything else: unknown


def _text(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def _opt(value: Any) -> str | None:
    return _text(value) or None


def _price(value: Any) -> Decimal | None:
    """The sum of the visit's treatments; None while nothing is priced (IDENT prices at the visit)."""
    if value is None:
        return None
    try:
        return Decimal(str(value)).quantize(Decimal("0.01"))
    except InvalidOperation as exc:
        raise ValueError("unreadable treatment cost") from exc


def _unix(moment: datetime | None, tz: ZoneInfo) -> int:
    return int(moment.replace(tzinfo=tz).timestamp()) if moment else 0


def booking_state(row: Row, now_local: datetime, grace: timedelta) -> str:
    if row.get("ReceptionId") is not None:
        return "visited"
    if row.get("ID_ReceptionCancelReasons") is not None:
        return "cancelled"
    start = as_datetime(row.get("PlanStart"))
    if start is not None and start + timedelta(minutes=int(row.get("Length") or 0)) + grace <= now_local:
        return "no_show"
    return "scheduled"


def no_show_due(row: Row, grace: timedelta) -> datetime | None:
    """When a booking without a visit becomes a no-show (its end plus the grace period)."""
    start = as_datetime(row.get("PlanStart"))
    return start + timedelta(minutes=int(row.get("Length") or 0)) + grace if start else None


def patient_from_row(row: Row, tz: ZoneInfo, region: str, doctors_seen: Sequence[str] = ()) -> Patient:
    phone = None
    for raw in (row.get("MobilePhone"), row.get("Phone")):
        phone = normalise_phone(_text(raw), region) if raw else None
        if phone:
            break
    email = normalise_email(_text(row.get("Email")))
    birthday = as_datetime(row.get("Birthday"))
    changed = max(
        (m for m in (as_datetime(row.get("PatientChanged")), as_datetime(row.get("PersonChanged"))) if m),
        default=None,
    )
    return Patient(
        mis_id=str(row["ID_Patients"]),
        last_name=_text(row.get("Surname")),
        first_name=_text(row.get("Name")),
        middle_name=_text(row.get("Patronymic")),
        phone=phone,
        email=email if email and "@" in email else None,
        birth_date=birthday.date().isoformat() if birthday else None,
        sex=SEX.get(int(row["Sex"])) if isinstance(row.get("Sex"), int) else None,
        archived=row.get("Status") == DELETED_PATIENT,
        version=_unix(changed, tz),
        city=_opt(row.get("City")),
        card_number=_opt(row.get("CardNumber")),
        card_comment=_opt(row.get("Comment")),
        policy_number=_opt(row.get("InsurancePolicy")),
        doctors_seen=tuple(doctors_seen),
    )


def doctors_seen(rows: Sequence[Row]) -> dict[str, list[str]]:
    """Patient id -> the full names of the doctors of their past visits, first seen first."""
    out: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: (str(r.get("FirstSeen") or ""), _staff_name(r) or "")):
        name = _staff_name(row)
        if name:
            out.setdefault(str(row["ID_Patients"]), []).append(name)
    return out


def _staff_name(row: Row) -> str | None:
    name = " ".join(_text(row.get(k)) for k in ("StaffSurname", "StaffName", "StaffPatronymic")).strip()
    return " ".join(name.split()) or None


def appointment_from_booking(row: Row, tz: ZoneInfo, now_local: datetime, grace: timedelta) -> Appointment:
    state = booking_state(row, now_local, grace)
    start = as_datetime(row.get("PlanStart"))
    if start is None:
        raise ValueError("booking without PlanStart")
    moments = [as_datetime(row.get(k)) for k in ("DateTimeAdded", "DateTimeChanged", "ReceptionChanged")]
    if state == "no_show":
        moments.append(no_show_due(row, grace))  # the moment it became one: newer than the booking itself
    version = max((_unix(m, tz) for m in moments if m), default=0)
    return Appointment(
        mis_id=str(row["ID_Receptions"]),
        patient_id=str(row["ID_Patients"]),
        status=canonical_status("ident", state),
        starts_at=start.replace(tzinfo=tz),
        duration_min=max(0, min(int(row.get("Length") or 0), 24 * 60)),
        doctor_id=_text(row.get("ID_Staffs")) or None,
        doctor_name=_staff_name(row),
        branch_id=_text(row.get("ID_Branches")) or None,
        version=version,
        **_visit_details(row),
    )


def _visit_details(row: Row) -> dict[str, Any]:
    """Price and policy (the DMS rule: zero price at the visit plus a policy on the card), the branch."""
    return {
        "price": _price(row.get("Price")),
        "insurance_policy": _opt(row.get("InsurancePolicy")),
        "branch_name": _opt(row.get("BranchName")),
        "branch_address": _opt(row.get("BranchAddress")),
    }


def appointment_from_walk_in(row: Row, tz: ZoneInfo) -> Appointment:
    recorded = as_datetime(row.get("DateTimeChanged"))
    if recorded is None:
        raise ValueError("reception without DateTimeChanged")
    return Appointment(
        mis_id=str(row["ID"]),
        patient_id=str(row["ID_Patients"]),
        status=canonical_status("ident", "visited"),
        starts_at=recorded.replace(tzinfo=tz),
        doctor_id=_text(row.get("ID_Staffs")) or None,
        doctor_name=_staff_name(row),
        branch_id=_text(row.get("ID_Branches")) or None,
        version=_unix(recorded, tz),
        **_visit_details(row),
    )
