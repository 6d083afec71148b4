"""InfoClinica (SDS) XML API as a ``MisSource``: an acknowledged change queue, over mutual TLS.

Feed style (b) of the reference (§1.7): ``SCHEDULE_CHANGE_LIST`` and ``CLIENTS_CHANGE_LIST`` return the
oldest changes nobody has acknowledged yet, and keep returning them until ``SCHEDULE_CHANGE_ACCEPT`` /
``CLIENTS_CHANGE_ACCEPT`` names them. ``fetch_changes`` reads both queues, fetches the current state of
every booking (``SCHEDULE_INFO``) and card (``CLIENT_INFO``) they mention and puts the change ids into the
page's cursor; ``acknowledge`` accepts exactly those ids, and the poller calls it only once the page is
safely on SQS. A crash before that simply gets the same changes again (the syncer skips them by hash).
``resync_cursor`` switches to a date window read with ``SCHEDULE_LIST`` (``FIRSTROW``/``LASTROW`` paging).

Transport (XML over mutual TLS, defused parsing): ``api.py``.

The MIS secret (JSON) holds:

* ``client_cert``, ``client_key``: PEM strings (the certificate may carry its chain);
* ``key_password``: optional, for an encrypted private key (the API itself has no password: its
  credential is the certificate);
* ``ca_cert``: optional PEM bundle to trust for the server instead of the system store;
* ``clinic_host``: optional ``X-Forwarded-Host`` (the clinic's host on the shared InfoClinica gateway);
* ``filial``: optional branch number sent as ``MSH.99`` (then only that branch's changes are read);
* ``system_id``: optional ``MSH.3`` (default ``clinicsync``).

Assumptions (public information is thin; see also ``sandbox/emulators/infoclinica.py``):

* The change entries are ``CHANGE_INFO`` (``CHANGEID``, ``SCHEDID``, ``PCODE``, ``CHANGEOP``,
  ``CHANGEDATE``) and ``CLIENT_CHANGE_INFO`` (``CHANGEID``, ``PCODE``, …); ACCEPT takes one such block per
  id. A LIST answer holds up to ~100 entries and ``RECORDSDATA/ITEMSNUMBER`` = all pending, so
  ``more`` is "pending > returned".
* Bookings carry ``SCHEDSTATUS`` (vocabulary in ``docs/statuses.md``), ``MODIFYDATE`` and
  ``CREATEDATE`` (``dd.mm.yyyy HH:MM:SS``), ``WORKDATE`` (``yyyymmdd``) with ``BHOUR``/``BMIN``/``FHOUR``/
  ``FMIN``, ``PRICE``, ``POLICYNUM`` (DMS) and ``ANONYMOUS``. Cards carry ``REFUSECALL``/``REFUSESMS``
  (seen in the vendor's fixtures), ``PADDR`` (home address, read by a public client; the contact's
  residence; docs/fields.md has every case C field's source) and ``REFUSEPD``/``ARCHIVED``/``MODIFYDATE``
  (assumed). All times are the clinic's wall time and are read in ``config.timezone``; ``MODIFYDATE``
  (unix seconds) is the version.
* A change whose booking or card cannot be translated (unknown status, unreadable record) is counted
  in ``rejected``, logged with its id and **acknowledged** with the rest: left in the queue it would come
  back forever and, once 100 of them piled up, block every later change. After the clinic maps the
  status, a resync repairs those bookings.
* A resync window runs from ``window_seconds`` ago to ``resync_ahead_days`` (60) ahead: bookings are
  dated by visit, and future visits need repairing as much as past ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, timedelta, tzinfo
from datetime import time as clock_time
from decimal import Decimal, InvalidOperation
from itertools import batched
from typing import TYPE_CHECKING, Any

from clinicsync.adapters.infoclinica.api import (
    InfoClinicaApi,
    InfoClinicaRefused,
    Record,
    child,
    children,
    record,
    text_at,
)
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.dates import parse_mis_date, parse_mis_datetime
from clinicsync.domain.emails import normalise_email
from clinicsync.domain.models import Appointment, Consent, Patient, PatientChanges
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync.domain.statuses import UnknownStatus, canonical_status
from clinicsync.observability import logger

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

ACCEPT_CHUNK = 100
RESYNC_AHEAD_DAYS = 60

# (cursor key, list method, accept method, entry block)
FEEDS = (
    ("schedule", "SCHEDULE_CHANGE_LIST", "SCHEDULE_CHANGE_ACCEPT", "CHANGE_INFO"),
    ("clients", "CLIENTS_CHANGE_LIST", "CLIENTS_CHANGE_ACCEPT", "CLIENT_CHANGE_INFO"),
)


# --- formats ----------------------------------------------------------------------------------


_IC_DATE = re.compile(r"\d{8}|\d{2}\.\d{2}\.\d{4}")
_IC_DATETIME = re.compile(r"\d{8}(\d{4}(\d{2})?)?|\d{2}\.\d{2}\.\d{4}( \d{1,2}:\d{2}(:\d{2})?)?")


def parse_ic_date(text: str) -> date:
    """``yyyymmdd`` or ``dd.mm.yyyy``."""
    return parse_mis_date(text, _IC_DATE, "an InfoClinica date")


def parse_ic_datetime(text: str, tz: tzinfo) -> datetime:
    """``yyyymmdd[HHMM[SS]]`` or ``dd.mm.yyyy[ HH:MM[:SS]]``, a wall time in the clinic's zone."""
    return parse_mis_datetime(text, tz, _IC_DATETIME, "an InfoClinica timestamp")


def ic_date(day: date) -> str:
    return day.strftime("%Y%m%d")


# --- XML --------------------------------------------------------------------------------------


# --- TLS --------------------------------------------------------------------------------------


# --- HTTP -------------------------------------------------------------------------------------


def _is_number(text: str | None) -> bool:
    """ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses."""
    return bool(text) and re.fullmatch(r"[0-9]{1,18}", text or "") is not None


def _items_total(out: Element, returned: int) -> int:
    text = text_at(out, "RECORDSDATA", "ITEMSNUMBER")
    return int(text) if text and _is_number(text) else returned


def _flag(value: str | None) -> bool:
    return (value or "").strip() in ("1", "Y", "y", "true", "True")


def _decimal(value: str | None) -> Decimal | None:
    if not value:
        return None
    try:
        return Decimal(value.replace(",", "."))
    except InvalidOperation:
        return None


# --- the source -------------------------------------------------------------------------------


class InfoClinicaSource:
    """``MisSource`` over the change queues; cursors:

    * queue (the poller's): ``{"mode": "queue", "ack": {"schedule": [CHANGEID…], "clients": [CHANGEID…]}}``,
      the ids this page will acknowledge (already acknowledged once the cursor is stored);
    * window (a resync's): ``{"mode": "window", "bdate": "yyyymmdd", "fdate": "yyyymmdd", "row": n}``.
    """

    kind = "infoclinica"

    def __init__(
        self, api: InfoClinicaApi, config: ClinicConfig, *, resync_ahead_days: int = RESYNC_AHEAD_DAYS
    ) -> None:
        self._api = api
        self._config = config
        self._ahead = resync_ahead_days

    # --- MisSource ----------------------------------------------------------------------------

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        state = dict(cursor or {})
        if state.get("mode") == "window":
            return self._read_window(state)
        return self._read_queues()

    def acknowledge(self, page: ChangePage) -> None:
        """Accept exactly the page's change ids (call only once its changes are safely enqueued)."""
        ack = page.cursor.get("ack") or {}
        for feed, _, accept_method, block in FEEDS:
            ids = [int(change_id) for change_id in ack.get(feed, ())]
            for chunk in batched(ids, ACCEPT_CHUNK, strict=False):
                self._api.call(accept_method, [(block, [("CHANGEID", change_id)]) for change_id in chunk])

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        tz = self._config.tz
        first = datetime.fromtimestamp(now - window_seconds, tz).date()
        last = datetime.fromtimestamp(now, tz).date() + timedelta(days=self._ahead)
        return {"mode": "window", "bdate": ic_date(first), "fdate": ic_date(last), "row": 1}

    # --- reading ------------------------------------------------------------------------------

    def _read_queues(self) -> ChangePage:
        entries: dict[str, list[Record]] = {}
        more = False
        for feed, list_method, _, block in FEEDS:
            out = self._api.call(list_method)
            entries[feed] = [record(el) for el in children(out, block)]
            more = more or _items_total(out, len(entries[feed])) > len(entries[feed])
        ack = {
            feed: [int(e["CHANGEID"]) for e in items if _is_number(e.get("CHANGEID"))]
            for feed, items in entries.items()
        }

        rejected = 0
        visits: list[Record] = []
        for sched_id in dict.fromkeys(e.get("SCHEDID", "") for e in entries["schedule"]):
            visit = self._schedule_info(sched_id)
            if visit is None:
                rejected += 1
            else:
                visits.append(visit)
        card_changes = [e.get("PCODE", "") for e in entries["clients"]]
        changes, more_rejected = self._translate(visits, card_changes)
        cursor = {"mode": "queue", "ack": ack}
        return ChangePage(changes=changes, cursor=cursor, more=more, rejected=rejected + more_rejected)

    def _read_window(self, state: dict[str, Any]) -> ChangePage:
        row = max(1, int(state.get("row", 1)))
        size = self._config.mis.page_size
        out = self._api.call(
            "SCHEDULE_LIST",
            [
                ("BDATE", str(state["bdate"])),
                ("FDATE", str(state["fdate"])),
                ("FIRSTROW", row),
                ("LASTROW", row + size - 1),
            ],
        )
        visits = [record(el) for el in children(out, "SCHEDULEREC")]
        total = _items_total(out, row - 1 + len(visits))
        changes, rejected = self._translate(visits, [])
        next_row = row + len(visits)
        cursor = {**state, "row": next_row}
        return ChangePage(changes=changes, cursor=cursor, more=bool(visits) and next_row <= total, rejected=rejected)

    def _schedule_info(self, sched_id: str) -> Record | None:
        if not _is_number(sched_id):
            logger.warning("change entry rejected", extra={"reason": "no SCHEDID"})
            return None
        try:
            out = self._api.call("SCHEDULE_INFO", [("SCHEDID", sched_id)])
        except InfoClinicaRefused as exc:
            logger.warning("appointment rejected", extra={"appointment_id": sched_id, "reason": str(exc)})
            return None
        rec = child(out, "SCHEDULEREC")
        if rec is None:
            logger.warning("appointment rejected", extra={"appointment_id": sched_id, "reason": "no SCHEDULEREC"})
            return None
        return record(rec)

    def _translate(self, visits: Sequence[Record], card_changes: Sequence[str]) -> tuple[list[PatientChanges], int]:
        rejected = 0
        by_patient: dict[str, list[Appointment]] = {}
        for visit in visits:
            try:
                appointment = self._appointment(visit)
            except (UnknownStatus, ValueError, KeyError) as exc:
                rejected += 1
                reason = str(exc) if isinstance(exc, UnknownStatus) else type(exc).__name__
                logger.warning("appointment rejected", extra={"appointment_id": visit.get("SCHEDID"), "reason": reason})
                continue
            by_patient.setdefault(appointment.patient_id, []).append(appointment)

        changes: list[PatientChanges] = []
        for pcode in dict.fromkeys([*by_patient, *card_changes]):
            appointments = tuple(by_patient.get(pcode, ()))
            try:
                patient = self._client_info(pcode)
            except (InfoClinicaRefused, ValueError, KeyError) as exc:
                rejected += 1 + len(appointments)
                reason = str(exc) if isinstance(exc, InfoClinicaRefused) else type(exc).__name__
                logger.warning("patient rejected", extra={"patient_id": pcode, "reason": reason})
                continue
            changes.append(PatientChanges(patient=patient, appointments=appointments))
        return changes, rejected

    # --- translation --------------------------------------------------------------------------

    def _client_info(self, pcode: str) -> Patient:
        if not _is_number(pcode):
            raise ValueError("no PCODE")
        out = self._api.call("CLIENT_INFO", [("PCODE", pcode)])
        info = child(out, "CLIENT_MAININFO")
        if info is None:
            raise KeyError("CLIENT_MAININFO")
        return self._patient(record(info))

    def _version(self, rec: Record) -> int:
        stamp = rec.get("MODIFYDATE") or rec.get("CREATEDATE")
        if not stamp:
            raise ValueError("record has no MODIFYDATE")
        return max(0, int(parse_ic_datetime(stamp, self._config.tz).timestamp()))

    def _patient(self, rec: Record) -> Patient:
        last, first, middle = rec.get("LASTNAME", ""), rec.get("FIRSTNAME", ""), rec.get("MIDNAME", "")
        if not (last or first) and rec.get("PNAME"):
            last, first, middle = ([*rec["PNAME"].split(maxsplit=2), "", ""])[:3]
        birth = rec.get("BDATE")
        return Patient(
            mis_id=rec["PCODE"],
            last_name=last,
            first_name=first,
            middle_name=middle,
            phone=normalise_phone(rec.get("PPHONE"), self._config.matching.default_region),
            email=normalise_email(rec.get("PMAIL")),
            residence=(rec.get("PADDR") or "").strip() or None,
            birth_date=parse_ic_date(birth).isoformat() if birth else None,
            sex={"1": "m", "2": "f"}.get(rec.get("GENDER", "")),
            consent=Consent(call_opt_out=_flag(rec.get("REFUSECALL")), sms_opt_out=_flag(rec.get("REFUSESMS"))),
            refused_data_processing=_flag(rec.get("REFUSEPD")),
            archived=_flag(rec.get("ARCHIVED")),
            version=self._version(rec),
        )

    def _appointment(self, rec: Record) -> Appointment:
        tz = self._config.tz
        status = canonical_status(self.kind, rec.get("SCHEDSTATUS", ""), self._config.mis.statuses)
        begin = int(rec["BHOUR"]) * 60 + int(rec["BMIN"])
        starts_at = datetime.combine(parse_ic_date(rec["WORKDATE"]), clock_time(begin // 60, begin % 60), tz)
        duration = 30
        if rec.get("FHOUR") and rec.get("FMIN"):
            duration = (int(rec["FHOUR"]) * 60 + int(rec["FMIN"]) - begin) % (24 * 60) or 30
        created = rec.get("CREATEDATE")
        return Appointment(
            mis_id=rec["SCHEDID"],
            patient_id=rec["PCODE"],
            status=status,
            starts_at=starts_at,
            duration_min=duration,
            doctor_id=rec.get("DCODE") or None,
            branch_id=rec.get("FILIAL") or None,
            price=_decimal(rec.get("PRICE")),
            insurance_policy=rec.get("POLICYNUM") or None,
            anonymous=_flag(rec.get("ANONYMOUS")),
            version=self._version(rec),
            doctor_name=rec.get("DNAME") or None,
            branch_name=rec.get("FNAME") or None,
            booked_at=parse_ic_datetime(created, tz) if created else None,
        )
