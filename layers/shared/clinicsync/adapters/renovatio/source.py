"""Renovatio (rnova.org) public API as a ``MisSource``: a date-window feed diffed by content hash.

Feed style (c) of the reference (§1.7). The API has no updated-since filter and no server paging, so
every poll walks a rolling window of visit dates (``past_days`` back to ``ahead_days`` ahead; by default
-45/+30, the window Medlock/MedFlex use) in chunks of ``chunk_days`` (client-side batching: one
``getAppointments(date_from, date_to, show_patient_data=1)`` call per chunk, one page per chunk). Each row
is reduced to a short keyed hash; only rows whose hash differs from the last read become changes, so an
unchanged re-read returns nothing. Patients of changed rows are read with ``getPatient`` (names, phone,
refusal flags).

Cursor (JSON, stored by the poller after the page is enqueued)::

    {"from": "dd.mm.yyyy", "to": "dd.mm.yyyy",   # the pass over the window in progress
     "next": "dd.mm.yyyy" | None,                # first day of the next chunk; None: the pass is complete
     "hashes": {appointment id: hash},           # rows read in this pass
     "previous": {appointment id: hash}}         # rows of the last pass not re-read yet in this one

A pass starts with ``previous`` = everything known; rows move to ``hashes`` as their chunk is read; what is
left in ``previous`` when the pass completes (visits that left the window or vanished) is dropped, so the
cursor stays the size of the window: about 30 bytes a visit. Past ~10,000 visits in the window it no
longer fits one DynamoDB item (400 KB); the store then spills it, compressed, into part items written in
one transaction (``clinicsync.adapters.aws.spill``), up to ~250,000 visits (13 bytes a visit
compressed). The whole cursor is still rewritten on each poll, so such a clinic pays that size in write
units per poll.

``resync_cursor`` returns a cursor with no hashes over ``window_seconds`` back to ``ahead_days`` ahead:
every row in it is a change.

The MIS secret (JSON) holds ``api_key``. Row hashes are HMAC-SHA256 under that key (truncated to 16 hex
digits): rows carry names and phones, and a plain hash of them could be confirmed by guessing.

Assumptions (see also ``sandbox/emulators/renovatio.py``):

* Rows carry no modification time, so a changed row's ``version`` is the time it was observed (unix
  seconds), which only grows; patients likewise.
* A visit that disappears from the API (deleted rather than cancelled) is not reported.
* A row that cannot be translated (unknown status, patient not found, bad time) is counted in
  ``rejected``, logged with its id and **not** hashed: every poll reports it again until the clinic maps
  the status, and then it syncs without a resync.
* Refusal flags of ``getPatient`` (assumed names ``refuse_sms``/``refuse_call``/``refuse_email``/
  ``refuse_adv``/``refuse_pd``, ``is_archive``) are read whenever one of the patient's visits changes,
  and for everyone on a resync.
* ``gender`` is 1 male / 2 female; dates are ``dd.mm.yyyy``, times ``dd.mm.yyyy hh:mm``, in
  ``config.timezone``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.dates import parse_mis_date, parse_mis_datetime
from clinicsync.domain.emails import normalise_email
from clinicsync.domain.models import Appointment, Consent, Patient, PatientChanges
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync.domain.statuses import UnknownStatus, canonical_status
from clinicsync.observability import logger
from clinicsync.retrying import exponential

PAST_DAYS = 45
AHEAD_DAYS = 30
CHUNK_DAYS = 7
MAX_CHUNK_DAYS = 31
HASH_CHARS = 16


class RenovatioError(Exception):
    """A call failed (transport, HTTP status, not the ``{error, data}`` envelope). Never holds PII or the key."""


class RenovatioRefused(RenovatioError):
    """The API answered ``{"error": 1, "data": {"code": …, "desc": …}}``. ``desc`` is the vendor's note
    about the request (a bad parameter, a missing record) and is kept, truncated, in ``str()``."""

    def __init__(self, method: str, code: object, desc: str) -> None:
        super().__init__(f"{method} refused: code {code}: {desc[:120]}")
        self.method = method
        self.code = code
        self.desc = desc


def rn_date(day: date) -> str:
    return day.strftime("%d.%m.%Y")


_RN_DATE = re.compile(r"\d{2}\.\d{2}\.\d{4}")
_RN_TIME = re.compile(r"\d{2}\.\d{2}\.\d{4} \d{1,2}:\d{2}(:\d{2})?")


def parse_rn_date(text: str) -> date:
    """``dd.mm.yyyy``."""
    return parse_mis_date(text, _RN_DATE, "a Renovatio date")


def parse_rn_time(text: str, tz: tzinfo) -> datetime:
    """``dd.mm.yyyy hh:mm`` (seconds optional), a wall time in the clinic's zone."""
    return parse_mis_datetime(text, tz, _RN_TIME, "a Renovatio time")


class RenovatioApi:
    """Form POSTs to ``{base_url}/{method}`` with ``api_key``; unwraps ``{error, data}``.

    Retries transport errors, 429 and 5xx with backoff (the methods we call are reads); an ``error: 1``
    answer is raised at once as :class:`RenovatioRefused`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
    ) -> None:
        if not api_key:
            raise RenovatioError("the MIS secret has no 'api_key'")
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._http = http or httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))
        self._clock = clock
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.requests = 0

    @classmethod
    def from_secret(cls, base_url: str, secret: Mapping[str, Any], http: httpx.Client | None = None) -> RenovatioApi:
        return cls(base_url, str(secret.get("api_key") or ""), http=http)

    def fingerprint(self, payload: Any) -> str:
        """Short HMAC of a JSON-able payload under the API key (not reversible without the key)."""
        canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        return hmac.new(self._key.encode(), canonical.encode(), hashlib.sha256).hexdigest()[:HASH_CHARS]

    def call(self, method: str, **params: str | int) -> Any:
        form = {"api_key": self._key, **{k: str(v) for k, v in params.items()}}

        def send() -> httpx.Response:
            self.requests += 1
            return self._http.post(f"{self._base}/{method}", data=form)

        return send_with_retries(
            send,
            lambda response: self._unwrap(method, response),
            vendor="renovatio",
            context={"method": method},
            attempts=self._max_attempts,
            wait=exponential(0.5, cap=8.0),
            sleep=self._sleep,
            exhausted=lambda failure: RenovatioError(f"{method}: retries exhausted ({failure})"),
        )

    @staticmethod
    def _unwrap(method: str, response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise RenovatioError(f"{method}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise RenovatioError(f"{method}: the answer is not JSON") from None
        if not isinstance(body, dict) or "error" not in body:
            raise RenovatioError(f"{method}: the answer is not an {{error, data}} envelope")
        data = body.get("data")
        if body["error"] in (0, "0", False):
            return data
        detail = data if isinstance(data, dict) else {"desc": str(data or "")}
        raise RenovatioRefused(method, detail.get("code", "?"), str(detail.get("desc") or detail.get("message") or ""))


def _flag(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y")


def _price(services: object) -> Decimal | None:
    if not isinstance(services, list) or not services:
        return None
    total = Decimal("0")
    for service in services:
        if not isinstance(service, dict):
            continue
        try:
            total += Decimal(str(service.get("price") or "0").replace(",", ".")) * int(service.get("count") or 1)
        except (InvalidOperation, ValueError):
            return None
    return total.quantize(Decimal("0.01"))


class RenovatioSource:
    kind = "renovatio"

    def __init__(
        self,
        api: RenovatioApi,
        config: ClinicConfig,
        *,
        clock: Callable[[], float] = time.time,
        past_days: int = PAST_DAYS,
        ahead_days: int = AHEAD_DAYS,
        chunk_days: int = CHUNK_DAYS,
    ) -> None:
        if not 1 <= chunk_days <= MAX_CHUNK_DAYS:
            raise ValueError(f"chunk_days must be between 1 and {MAX_CHUNK_DAYS}")
        self._api = api
        self._config = config
        self._clock = clock
        self._past = past_days
        self._ahead = ahead_days
        self._chunk = chunk_days

    # --- MisSource ----------------------------------------------------------------------------

    def acknowledge(self, page: ChangePage) -> None:
        """A window feed has nothing to confirm: the stored hashes are the acknowledgement."""

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        tz = self._config.tz
        first = datetime.fromtimestamp(now - window_seconds, tz).date()
        last = datetime.fromtimestamp(now, tz).date() + timedelta(days=self._ahead)
        return {"from": rn_date(first), "to": rn_date(last), "next": rn_date(first), "hashes": {}, "previous": {}}

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        state = dict(cursor or {})
        hashes: dict[str, str] = {str(k): str(v) for k, v in dict(state.get("hashes") or {}).items()}
        previous: dict[str, str] = {str(k): str(v) for k, v in dict(state.get("previous") or {}).items()}
        if state.get("next"):
            first, last = parse_rn_date(str(state["from"])), parse_rn_date(str(state["to"]))
            start = parse_rn_date(str(state["next"]))
        else:  # a new pass over today's window; what the last pass read becomes the reference
            today = datetime.fromtimestamp(self._clock(), self._config.tz).date()
            first, last = today - timedelta(days=self._past), today + timedelta(days=self._ahead)
            start = first
            previous = {**previous, **hashes}
            hashes = {}
        end = min(start + timedelta(days=self._chunk - 1), last)
        rows = self._api.call("getAppointments", date_from=rn_date(start), date_to=rn_date(end), show_patient_data=1)
        if not isinstance(rows, list):
            rows = [rows] if isinstance(rows, dict) else []

        now = int(self._clock())
        changed, rejected = self._diff(rows, hashes, previous, now)
        changes, unknown_patients = self._with_patients(changed, hashes, now)

        following = end + timedelta(days=1)
        more = following <= last
        new_cursor = {
            "from": rn_date(first),
            "to": rn_date(last),
            "next": rn_date(following) if more else None,
            "hashes": hashes,
            # once the pass is complete, visits it did not see have left the window: forget them
            "previous": previous if more else {},
        }
        return ChangePage(changes=changes, cursor=new_cursor, more=more, rejected=rejected + unknown_patients)

    def _diff(
        self, rows: list[Any], hashes: dict[str, str], previous: dict[str, str], now: int
    ) -> tuple[list[tuple[str, Appointment]], int]:
        """Rows whose hash changed, as (hash, appointment); unchanged rows move to ``hashes``."""
        rejected = 0
        changed: list[tuple[str, Appointment]] = []
        for row in rows:
            if not isinstance(row, dict) or row.get("id") in (None, ""):
                rejected += 1
                logger.warning("appointment rejected", extra={"reason": "row without id"})
                continue
            appointment_id = str(row["id"])
            digest = self._api.fingerprint(row)
            known = hashes.get(appointment_id) or previous.pop(appointment_id, None)
            if known == digest:
                hashes[appointment_id] = digest
                continue
            try:
                changed.append((digest, self._appointment(row, now)))
            except (UnknownStatus, ValueError, KeyError, TypeError) as exc:
                rejected += 1
                reason = str(exc) if isinstance(exc, UnknownStatus) else type(exc).__name__
                logger.warning("appointment rejected", extra={"appointment_id": appointment_id, "reason": reason})
        return changed, rejected

    def _with_patients(
        self, changed: list[tuple[str, Appointment]], hashes: dict[str, str], now: int
    ) -> tuple[list[PatientChanges], int]:
        """Group by patient, read each patient once; hash only the rows that made it into a change set."""
        by_patient: dict[str, list[tuple[str, Appointment]]] = {}
        for digest, appointment in changed:
            by_patient.setdefault(appointment.patient_id, []).append((digest, appointment))
        rejected = 0
        changes: list[PatientChanges] = []
        for patient_id, items in by_patient.items():
            try:
                patient = self._patient(patient_id, now)
            except (RenovatioRefused, ValueError, KeyError, TypeError) as exc:
                rejected += len(items)
                reason = str(exc) if isinstance(exc, RenovatioRefused) else type(exc).__name__
                logger.warning("patient rejected", extra={"patient_id": patient_id, "reason": reason})
                continue
            changes.append(PatientChanges(patient=patient, appointments=tuple(a for _, a in items)))
            hashes.update({a.mis_id: digest for digest, a in items})
        return changes, rejected

    # --- translation --------------------------------------------------------------------------

    def _patient(self, patient_id: str, now: int) -> Patient:
        data = self._api.call("getPatient", patient_id=patient_id)
        if not isinstance(data, dict):
            raise TypeError("getPatient answered no object")
        birth = str(data.get("birth_date") or "").strip()
        phone = str(data.get("mobile") or data.get("phone") or "")
        return Patient(
            mis_id=str(data.get("id") or patient_id),
            last_name=str(data.get("last_name") or ""),
            first_name=str(data.get("first_name") or ""),
            middle_name=str(data.get("third_name") or ""),
            phone=normalise_phone(phone, self._config.matching.default_region),
            email=normalise_email(str(data.get("email") or "")),
            birth_date=parse_rn_date(birth).isoformat() if birth else None,
            sex={"1": "m", "2": "f", "male": "m", "female": "f"}.get(str(data.get("gender", "")).lower()),
            consent=Consent(
                sms_opt_out=_flag(data.get("refuse_sms")),
                call_opt_out=_flag(data.get("refuse_call")),
                email_opt_out=_flag(data.get("refuse_email")),
                marketing_opt_out=_flag(data.get("refuse_adv")),
            ),
            refused_data_processing=_flag(data.get("refuse_pd")),
            archived=_flag(data.get("is_archive")),
            version=now,
        )

    def _appointment(self, row: Mapping[str, Any], now: int) -> Appointment:
        tz = self._config.tz
        status = canonical_status(self.kind, str(row.get("status", "")), self._config.mis.statuses)
        starts_at = parse_rn_time(str(row["time_start"]), tz)
        duration = 30
        if row.get("time_end"):
            minutes = int((parse_rn_time(str(row["time_end"]), tz) - starts_at).total_seconds() // 60)
            duration = minutes if 0 < minutes <= 24 * 60 else 30
        created = str(row.get("date_created") or "").strip()
        return Appointment(
            mis_id=str(row["id"]),
            patient_id=str(row["patient_id"]),
            status=status,
            starts_at=starts_at,
            duration_min=duration,
            doctor_id=str(row["doctor_id"]) if row.get("doctor_id") not in (None, "") else None,
            branch_id=str(row["clinic_id"]) if row.get("clinic_id") not in (None, "") else None,
            price=_price(row.get("services")),
            insurance_policy=str(row.get("policy_number") or "") or None,
            anonymous=_flag(row.get("is_anonymous")),
            version=now,
            doctor_name=str(row.get("doctor") or "") or None,
            visit_category=str(row.get("type") or "") or None,
            booked_at=parse_rn_time(created, tz) if created else None,
        )
