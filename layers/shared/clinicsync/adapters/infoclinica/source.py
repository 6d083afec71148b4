"""InfoClinica (SDS) XML API as a ``MisSource``: an acknowledged change queue, over mutual TLS.

Feed style (b) of the reference (§1.7): ``SCHEDULE_CHANGE_LIST`` and ``CLIENTS_CHANGE_LIST`` return the
oldest changes nobody has acknowledged yet, and keep returning them until ``SCHEDULE_CHANGE_ACCEPT`` /
``CLIENTS_CHANGE_ACCEPT`` names them. ``fetch_changes`` reads both queues, fetches the current state of
every booking (``SCHEDULE_INFO``) and card (``CLIENT_INFO``) they mention and puts the change ids into the
page's cursor; ``acknowledge`` accepts exactly those ids, and the poller calls it only once the page is
safely on SQS. A crash before that simply gets the same changes again (the syncer skips them by hash).
``resync_cursor`` switches to a date window read with ``SCHEDULE_LIST`` (``FIRSTROW``/``LASTROW`` paging).

Transport: XML POSTed to the API URL (``…/api/xml``) over HTTPS with the clinic's client certificate.
Every response is parsed with defusedxml with DTDs forbidden, so entity expansion (billion laughs) and
external entities (XXE) are refused with :class:`UnsafeXml` before anything is expanded or fetched.

The MIS secret (JSON) holds:

* ``client_cert``, ``client_key``: PEM strings (the certificate may carry its chain);
* ``key_password``: optional, for an encrypted private key (the API itself has no password: its
  credential is the certificate);
* ``ca_cert``: optional PEM bundle to trust for the server instead of the system store;
* ``clinic_host``: optional ``X-Forwarded-Host`` (the clinic's host on the shared InfoClinica gateway);
* ``filial``: optional branch number sent as ``MSH.99`` (then only that branch's changes are read);
* ``system_id``: optional ``MSH.3`` (default ``clinicsync``).

``ssl`` loads certificates only from files, so the PEMs are written to a private temporary directory
(mode 0700, files 0600), loaded into an ``ssl.SSLContext`` and deleted at once; httpx gets the context.

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

import html
import os
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as clock_time
from decimal import Decimal, InvalidOperation
from itertools import batched
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError
from defusedxml.ElementTree import fromstring as _defused_fromstring

from clinicsync.adapters.http.retrying import Transient, call_with_retries, exponential
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

NS = "http://sdsys.ru/"
DEFAULT_SYSTEM_ID = "clinicsync"
MAX_RESPONSE_BYTES = 20 * 1024 * 1024
ACCEPT_CHUNK = 100
RESYNC_AHEAD_DAYS = 60

# (cursor key, list method, accept method, entry block)
FEEDS = (
    ("schedule", "SCHEDULE_CHANGE_LIST", "SCHEDULE_CHANGE_ACCEPT", "CHANGE_INFO"),
    ("clients", "CLIENTS_CHANGE_LIST", "CLIENTS_CHANGE_ACCEPT", "CLIENT_CHANGE_INFO"),
)

type XmlValue = str | int | Sequence[tuple[str, XmlValue]]
type XmlFields = Sequence[tuple[str, XmlValue]]
Record = dict[str, str]

_METHOD = re.compile(r"[A-Z][A-Z0-9_]{1,63}")
_TAG = re.compile(r"[A-Z][A-Z0-9_.]{0,63}")


class InfoClinicaError(Exception):
    """A call failed: transport, HTTP status, envelope, malformed or unsafe XML. Never holds PII."""


class UnsafeXml(InfoClinicaError):
    """The response carried a DTD (entity expansion, external entities): refused before parsing it."""


class InfoClinicaRefused(InfoClinicaError):
    """The MIS answered but refused (``SPRESULT`` 0 or negative). ``comment`` is kept out of ``str()``:
    it is free text for humans and may name a patient."""

    def __init__(self, method: str, spresult: int, comment: str) -> None:
        super().__init__(f"{method} refused: SPRESULT={spresult}")
        self.method = method
        self.spresult = spresult
        self.comment = comment


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


def parse_xml(raw: bytes) -> Element:
    """Parse untrusted XML; any DTD (so any entity declaration) is refused."""
    try:
        root: Element = _defused_fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise UnsafeXml(f"unsafe XML refused ({type(exc).__name__})") from None
    except ParseError:
        raise InfoClinicaError("malformed XML") from None
    return root


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def children(parent: Element | None, name: str) -> Iterator[Element]:
    if parent is not None:
        yield from (el for el in parent if local_name(el.tag) == name)


def child(parent: Element | None, name: str) -> Element | None:
    return next(children(parent, name), None)


def text_at(parent: Element | None, *path: str) -> str | None:
    node = parent
    for name in path:
        node = child(node, name)
    return None if node is None else (node.text or "").strip()


def record(element: Element) -> Record:
    """A flat record (``SCHEDULEREC``, ``CLIENT_MAININFO``, ``CHANGE_INFO``) as tag -> stripped text."""
    return {local_name(el.tag): (el.text or "").strip() for el in element if len(el) == 0}


def _fields_xml(fields: XmlFields) -> str:
    parts: list[str] = []
    for tag, value in fields:
        if not _TAG.fullmatch(tag):
            raise ValueError(f"bad XML tag {tag!r}")
        inner = html.escape(str(value), quote=False) if isinstance(value, str | int) else _fields_xml(value)
        parts.append(f"<{tag}>{inner}</{tag}>")
    return "".join(parts)


# --- TLS --------------------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def tls_context(
    client_cert: str, client_key: str, *, key_password: str | None = None, ca_cert: str | None = None
) -> ssl.SSLContext:
    """A client context presenting the clinic's certificate; trusts ``ca_cert`` or the system store."""
    try:
        context = ssl.create_default_context(cadata=ca_cert) if ca_cert else ssl.create_default_context()
        with tempfile.TemporaryDirectory(prefix="clinicsync-mis-") as tmp:  # created 0700
            cert_path, key_path = Path(tmp) / "client.pem", Path(tmp) / "client.key"
            _write_private(cert_path, client_cert)
            _write_private(key_path, client_key)
            context.load_cert_chain(cert_path, key_path, password=key_password)
    except (ssl.SSLError, ValueError) as exc:
        raise InfoClinicaError(
            f"the client certificate, key or CA in the MIS secret is unusable ({exc!s:.80})"
        ) from None
    return context


def _secret_text(secret: Mapping[str, Any], key: str) -> str:
    value = secret.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InfoClinicaError(f"the MIS secret has no {key!r}")
    return value


def _optional_text(secret: Mapping[str, Any], key: str) -> str | None:
    value = secret.get(key)
    return str(value) if value not in (None, "") else None


# --- HTTP -------------------------------------------------------------------------------------


class InfoClinicaApi:
    """One XML call per ``call``: envelope out, ``ACK`` checked (``MSA``, ``SPRESULT``), ``{METHOD}_OUT`` back.

    Retries transport errors, 429 and 5xx with backoff (every method we use is a read or an idempotent
    acknowledgement); an envelope rejection, an unsafe or malformed answer or a refusal is raised at once.
    """

    def __init__(
        self,
        base_url: str,
        http: httpx.Client,
        *,
        clinic_host: str | None = None,
        filial: int | None = None,
        system_id: str = DEFAULT_SYSTEM_ID,
        tz: tzinfo = UTC,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
    ) -> None:
        self._url = base_url
        self._http = http
        self._clinic_host = clinic_host
        self._filial = filial
        self._system_id = system_id
        self._tz = tz
        self._clock = clock
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.requests = 0

    @classmethod
    def from_secret(
        cls,
        base_url: str,
        secret: Mapping[str, Any],
        *,
        tz: tzinfo = UTC,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
    ) -> InfoClinicaApi:
        """Build the mutual-TLS client from the clinic's MIS secret (keys in the module docstring)."""
        context = tls_context(
            _secret_text(secret, "client_cert"),
            _secret_text(secret, "client_key"),
            key_password=_optional_text(secret, "key_password"),
            ca_cert=_optional_text(secret, "ca_cert"),
        )
        filial = _optional_text(secret, "filial")
        if filial is not None and not filial.isdigit():
            raise InfoClinicaError("the MIS secret's 'filial' must be a branch number")
        http = httpx.Client(verify=context, timeout=httpx.Timeout(timeout, connect=5.0))
        return cls(
            base_url,
            http,
            clinic_host=_optional_text(secret, "clinic_host"),
            filial=int(filial) if filial is not None else None,
            system_id=_optional_text(secret, "system_id") or DEFAULT_SYSTEM_ID,
            tz=tz,
            clock=clock,
            sleep=sleep,
            max_attempts=max_attempts,
        )

    def close(self) -> None:
        self._http.close()

    def envelope(self, method: str, message_id: str, fields: XmlFields = ()) -> str:
        if not _METHOD.fullmatch(method):
            raise ValueError(f"bad method name {method!r}")
        stamp = datetime.fromtimestamp(self._clock(), self._tz).strftime("%Y%m%d%H%M%S")
        filial = f"<MSH.99>{self._filial}</MSH.99>" if self._filial is not None else ""
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<WEB_{method} xmlns="{NS}">'
            f"<MSH><MSH.3>{html.escape(self._system_id, quote=False)}</MSH.3><MSH.7><TS.1>{stamp}</TS.1></MSH.7>"
            f"<MSH.9><MSG.1>WEB</MSG.1><MSG.2>{method}</MSG.2></MSH.9><MSH.10>{message_id}</MSH.10>"
            f"<MSH.18>UTF-8</MSH.18>{filial}</MSH>"
            f"<{method}_IN>{_fields_xml(fields)}</{method}_IN></WEB_{method}>"
        )

    def call(self, method: str, fields: XmlFields = ()) -> Element:
        """Send ``WEB_{method}``; return its ``{method}_OUT`` after checking the acknowledgement."""
        message_id = uuid.uuid4().hex[:24]
        payload = self.envelope(method, message_id, fields).encode("utf-8")
        headers = {"Content-Type": "text/xml; charset=utf-8", "Accept": "text/xml"}
        if self._clinic_host:
            headers["X-Forwarded-Host"] = self._clinic_host

        def attempt(_: int) -> Element:
            self.requests += 1
            try:
                response = self._http.post(self._url, content=payload, headers=headers)
            except httpx.TransportError as exc:
                failure = type(exc).__name__
                logger.warning("infoclinica transport error", extra={"method": method, "error": failure})
                raise Transient(failure) from None
            if response.status_code < 500 and response.status_code != 429:
                return self._read(method, message_id, response)
            logger.warning("infoclinica server error", extra={"method": method, "status": response.status_code})
            raise Transient(f"HTTP {response.status_code}")

        return call_with_retries(
            attempt,
            attempts=self._max_attempts,
            wait=exponential(0.5, cap=8.0),
            sleep=self._sleep,
            exhausted=lambda failure: InfoClinicaError(f"{method}: retries exhausted ({failure})"),
        )

    @staticmethod
    def _read(method: str, message_id: str, response: httpx.Response) -> Element:
        if response.status_code not in (200, 400):
            raise InfoClinicaError(f"{method}: HTTP {response.status_code}")
        raw = response.content
        if len(raw) > MAX_RESPONSE_BYTES:
            raise InfoClinicaError(f"{method}: response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            root = parse_xml(raw)
        except UnsafeXml as exc:
            raise UnsafeXml(f"{method}: {exc}") from None
        except InfoClinicaError as exc:
            raise InfoClinicaError(f"{method}: HTTP {response.status_code}, {exc}") from None
        if local_name(root.tag) != "ACK":
            raise InfoClinicaError(f"{method}: answer is not an ACK")
        code = text_at(root, "MSA", "MSA.1")
        if code != "AA":
            raise InfoClinicaError(f"{method}: envelope rejected ({code}): {text_at(root, 'MSA', 'MSA.3') or ''}")
        if text_at(root, "MSA", "MSA.2") != message_id:
            raise InfoClinicaError(f"{method}: the answer acknowledges another message")
        out = child(root, f"{method}_OUT")
        if out is None:
            raise InfoClinicaError(f"{method}: {method}_OUT is missing")
        result_text = text_at(out, "SPRESULT") or ""
        if not re.fullmatch(r"-?\d{1,9}", result_text):
            raise InfoClinicaError(f"{method}: SPRESULT is missing or not a number")
        if int(result_text) < 1:
            raise InfoClinicaRefused(method, int(result_text), text_at(out, "SPCOMMENT") or "")
        return out


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
