"""InfoClinica (SDS) XML API emulator (WSGI), loaded from the MIS-neutral sample clinic.

Modelled on public client code and the vendor's Java autotest fixtures (docs reference §1.2):

* one endpoint, ``POST /api/xml``, over HTTPS with a **client certificate** (mutual TLS). The app is
  plain WSGI; :func:`serve_tls` runs it behind an ``ssl.SSLContext`` that requires a client certificate
  signed by the clinic's CA, so a client without one never gets an HTTP answer at all;
* requests are ``<WEB_{METHOD} xmlns="http://sdsys.ru/">`` with an ``MSH`` header (``MSH.7/TS.1``
  timestamp ``yyyyMMddHHmmss``, ``MSH.9`` = ``WEB``/``{METHOD}``, ``MSH.10`` message id, ``MSH.18``
  ``UTF-8``, optional ``MSH.3`` system id and ``MSH.99`` branch) and a ``{METHOD}_IN`` body;
* answers are ``<ACK>`` with their own ``MSH``, an ``MSA`` block (``MSA.1`` ``AA`` accepted or ``AE``
  envelope error, ``MSA.2`` the request's ``MSH.10``, ``MSA.3`` the error text) and ``{METHOD}_OUT``
  holding ``SPRESULT`` (``1`` ok, ``0`` or negative: refused) and ``SPCOMMENT``;
* ids: ``PCODE`` patient, ``SCHEDID`` appointment, ``DCODE`` doctor, ``FILIAL`` branch, ``DEPNUM``
  department; dates ``yyyymmdd`` (``WORKDATE``, ``BDATE``) and ``dd.mm.yyyy HH:MM:SS``
  (``CREATEDATE``, ``MODIFYDATE``, ``CHANGEDATE``), all clinic-local (Moscow) wall time.

Methods: ``GET_FILIAL_LIST``, ``GET_DOCTOR_LIST`` (paged), ``SCHEDULE_LIST`` (``BDATE``/``FDATE`` window,
optional ``EXTPCODE``, paged), ``SCHEDULE_INFO`` (``SCHEDID``), ``SCHEDULE_CHANGE_LIST`` +
``SCHEDULE_CHANGE_ACCEPT``, ``CLIENT_INFO`` (``PCODE``), ``CLIENTS_CHANGE_LIST`` + ``CLIENTS_CHANGE_ACCEPT``.

Assumptions (the vendor does not publish these; keep them in one place so they are easy to fix):

* **Change queues.** Every booking change appends an entry ``CHANGE_INFO`` (``CHANGEID`` increasing,
  ``SCHEDID``, ``PCODE``, ``FILIAL``, ``CHANGEOP`` 1 new / 2 changed / 3 removed, ``CHANGEDATE``) to the
  schedule queue; every card change appends ``CLIENT_CHANGE_INFO`` to the clients queue. A LIST call
  returns the oldest ``change_batch`` (100) **unacknowledged** entries (only the ``MSH.99`` branch's, if
  given) and ``RECORDSDATA/ITEMSNUMBER`` = all pending; it removes nothing. Entries leave the queue only
  through ACCEPT with one ``CHANGE_INFO/CHANGEID`` (``CLIENT_CHANGE_INFO/CHANGEID``) block per entry;
  ACCEPT without a block answers ``SPRESULT -99`` (seen in the fixtures). Accepting an unknown or
  already accepted id is a no-op. The queue starts empty (a new integration reads history with
  ``SCHEDULE_LIST``) unless ``preload_queue=True``.
* **Status.** The fixtures show no status enum, so records carry ``SCHEDSTATUS``: ``reserved`` (online
  reservation waiting for the front desk), ``booked``, ``confirmed``, ``arrived``, ``visited``, ``paid``,
  ``cancelled``, ``removed`` (SCHEDULE_REC_REMOVE; the record stays readable) and ``noshow``. A reschedule
  keeps the ``SCHEDID``, changes ``WORKDATE``/``BHOUR``/``BMIN`` and goes back to ``booked``.
* **Paging.** ``FIRSTROW``/``LASTROW`` are 1-based and inclusive, at most 500 rows per call (default
  1..100); ``SCHEDULE_LIST`` is ordered by (``WORKDATE``, ``BHOUR``, ``BMIN``, ``SCHEDID``) and also returns
  cancelled, removed and no-show records. ``ITEMSNUMBER`` counts the whole filtered set.
* **Card fields.** ``CLIENT_INFO`` returns ``CLIENT_MAININFO`` with ``PCODE``, ``LASTNAME``, ``FIRSTNAME``,
  ``MIDNAME``, ``PNAME``, ``BDATE``, ``GENDER`` (1 male, 2 female), ``PPHONE`` (as typed), ``PMAIL``,
  ``PADDR`` (the home address; a public client reads it from ``CLIENT_MAININFO``),
  ``REFUSECALL``/``REFUSESMS`` (0/1, seen in the fixtures), plus assumed ``REFUSEPD`` (refused personal
  data processing), ``ARCHIVED`` and ``MODIFYDATE``. Visits carry assumed ``PRICE``, ``POLICYNUM`` (DMS
  policy; price 0.00) and ``ANONYMOUS``.
* ``MODIFYDATE`` has whole seconds and strictly increases per record on every change, even on a frozen
  clock.
* Envelope errors answer ``AE`` with HTTP 200; unparseable or unsafe XML (any DTD: entities, XXE)
  answers ``AE`` with HTTP 400. Injected 502/503/504 faults answer with an nginx HTML page.
"""

from __future__ import annotations

import itertools
import re
import ssl
import threading
import time as _time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from xml.etree.ElementTree import Element, ParseError, SubElement, tostring

from cryptography import x509
from cryptography.x509.oid import NameOID
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as safe_fromstring
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, FaultRule, RuleFaults, WsgiApp
from sandbox.seed import CLINIC_TZ, SampleClinic, VisitStatus

NS = "http://sdsys.ru/"
STATUSES: tuple[str, ...] = (
    "reserved",
    "booked",
    "confirmed",
    "arrived",
    "visited",
    "paid",
    "cancelled",
    "removed",
    "noshow",
)
STATUS_FROM_VISIT: dict[VisitStatus, str] = {
    VisitStatus.PENDING: "reserved",
    VisitStatus.BOOKED: "booked",
    VisitStatus.CONFIRMED: "confirmed",
    VisitStatus.ARRIVED: "arrived",
    VisitStatus.COMPLETED: "visited",
    VisitStatus.BILLED: "visited",
    VisitStatus.PAID: "paid",
    VisitStatus.CANCELLED: "cancelled",
    VisitStatus.NO_SHOW: "noshow",
}
CHANGE_NEW, CHANGE_MODIFIED, CHANGE_REMOVED = 1, 2, 3
CHANGE_BATCH = 100
DEFAULT_ROWS = 100
MAX_ROWS = 500
METHODS = (
    "GET_FILIAL_LIST",
    "GET_DOCTOR_LIST",
    "SCHEDULE_LIST",
    "SCHEDULE_INFO",
    "SCHEDULE_CHANGE_LIST",
    "SCHEDULE_CHANGE_ACCEPT",
    "CLIENT_INFO",
    "CLIENTS_CHANGE_LIST",
    "CLIENTS_CHANGE_ACCEPT",
)
CLIENT_FIELDS = frozenset(
    {"LASTNAME", "FIRSTNAME", "MIDNAME", "BDATE", "GENDER", "PPHONE", "PMAIL", "PADDR",
     "REFUSECALL", "REFUSESMS", "REFUSEPD", "ARCHIVED"}
)  # fmt: skip
REFUSAL_FLAGS = ("REFUSECALL", "REFUSESMS", "REFUSEPD")

Json = dict[str, Any]
_DIGITS = re.compile(r"[0-9]{1,12}")


# --- formats ----------------------------------------------------------------------------------


def ic_date(day: date) -> str:
    return day.strftime("%Y%m%d")


def ic_stamp(moment: datetime) -> str:
    """``dd.mm.yyyy HH:MM:SS`` in clinic time: how InfoClinica prints modification times."""
    return _local(moment).strftime("%d.%m.%Y %H:%M:%S")


def _local(moment: datetime) -> datetime:
    return moment.replace(tzinfo=CLINIC_TZ) if moment.tzinfo is None else moment.astimezone(CLINIC_TZ)


def _parse_day(text: str | None) -> date | None:
    if not text or not re.fullmatch(r"[0-9]{8}", text.strip()):
        return None
    try:
        return datetime.strptime(text.strip(), "%Y%m%d").date()
    except ValueError:
        return None


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def child(parent: Element | None, name: str) -> Element | None:
    if parent is None:
        return None
    return next((el for el in parent if local_name(el.tag) == name), None)


def text_of(parent: Element | None, *path: str) -> str | None:
    node = parent
    for name in path:
        node = child(node, name)
    return None if node is None else (node.text or "").strip()


def _add(parent: Element, tag: str, value: object = None) -> Element:
    el = SubElement(parent, tag)
    if value is not None:
        el.text = str(value)
    return el


# --- fault injection --------------------------------------------------------------------------


class Faults(RuleFaults):
    """Deterministic fault queue, per InfoClinica method (all requests share one path).

    ``take(None)`` (an envelope that did not parse, so no method is known) meets only rules for any method.
    """

    def fail_next(
        self, n: int = 1, status: int = 503, method: str | None = None, retry_after: int | None = None
    ) -> None:
        """Answer the next ``n`` matching requests with HTTP ``status`` instead of serving them."""
        self._add_failure(FaultRule(n, method, status=status, retry_after=retry_after))

    def respond_next(self, body: bytes, n: int = 1, method: str | None = None, status: int = 200) -> None:
        """Answer the next ``n`` matching requests with this raw body (e.g. a hostile XML document)."""
        self._add_failure(FaultRule(n, method, status=status, body=body))

    def timeout_next(self, n: int = 1, seconds: float = 5.0, method: str | None = None) -> None:
        """Sleep ``seconds`` (real time) before answering the next ``n`` matching requests."""
        self._add_delay(FaultRule(n, method, seconds=seconds))


_NGINX_PAGE = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
            504: "Gateway Time-out", 429: "Too Many Requests"}  # fmt: skip


class _EnvelopeError(Exception):
    def __init__(self, message: str, http_status: int = 200) -> None:
        super().__init__(message)
        self.http_status = http_status


@dataclass
class _Envelope:
    method: str
    message_id: str
    filial: int | None
    body: Element


# --- the emulator -----------------------------------------------------------------------------


class InfoClinicaEmulator:
    """In-memory InfoClinica XML API. Tests drive state through the mutation helpers below."""

    def __init__(
        self,
        clinic: SampleClinic,
        clock: Clock | None = None,
        *,
        change_batch: int = CHANGE_BATCH,
        preload_queue: bool = False,
    ) -> None:
        self.clock = clock or Clock()
        self.faults = Faults()
        self.change_batch = change_batch
        self.request_count = 0
        self.calls: Counter[str] = Counter()  # per method
        # (method, MSA code, HTTP status); never bodies: they carry names and phones.
        self.request_log: list[tuple[str, str, int]] = []
        self.client_subjects: list[str] = []  # CN of the TLS client certificate of each request, if any
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._branches: dict[int, Json] = {
            b.id: {"FILIAL": b.id, "FNAME": b.title, "FADDR": b.address, "FCITY": b.city} for b in clinic.branches
        }
        specialties = sorted({d.specialty for d in clinic.doctors})
        self._departments = {spec: 40000001 + i for i, spec in enumerate(specialties)}
        self._doctors: dict[int, Json] = {
            d.id: {
                "DCODE": d.id,
                "DNAME": " ".join((d.surname, d.name, d.patronymic)),
                "DEPNUM": self._departments[d.specialty],
                "DEPNAME": d.specialty,
                "FILIALS": list(d.branch_ids),
            }
            for d in clinic.doctors
        }
        self._clients: dict[int, Json] = {}
        for p in clinic.patients:
            self._clients[p.id] = {
                "PCODE": p.id,
                "LASTNAME": p.surname,
                "FIRSTNAME": p.name,
                "MIDNAME": p.patronymic,
                "BDATE": p.birthdate,
                "GENDER": 1 if p.sex == "male" else 2,
                "PPHONE": p.phone,
                "PMAIL": p.email,
                "PADDR": _home_address(p.id, clinic.branches[p.id % len(clinic.branches)].city),
                "REFUSECALL": p.deny_calls,
                "REFUSESMS": p.deny_sms_notifications or p.deny_sms_dispatches,
                "REFUSEPD": p.deny_data_processing,
                "ARCHIVED": p.archived,
                "MODIFYDATE": _local(p.updated_at).replace(microsecond=0),
            }
        self._visits: dict[int, Json] = {}
        for a in clinic.appointments:
            self._visits[a.id] = {
                "SCHEDID": a.id,
                "PCODE": a.patient_id,
                "DCODE": a.doctor_id,
                "FILIAL": a.branch_id,
                "START": _local(a.start),
                "DURATION": a.duration_min,
                "SCHEDSTATUS": STATUS_FROM_VISIT[a.status],
                "PRICE": f"{a.price:.2f}",
                "POLICYNUM": a.insurance_policy,
                "ANONYMOUS": a.anonymous,
                "ONLINETYPE": 1 if a.source in ("website", "aggregator") else 0,
                "CREATEDATE": _local(a.created_at).replace(microsecond=0),
                "MODIFYDATE": _local(a.updated_at).replace(microsecond=0),
            }
        self._schedule_changes: dict[int, Json] = {}
        self._client_changes: dict[int, Json] = {}
        self._next_change = 1
        if preload_queue:
            for visit in sorted(self._visits.values(), key=lambda v: (v["MODIFYDATE"], v["SCHEDID"])):
                self._enqueue_visit(visit, CHANGE_NEW, visit["MODIFYDATE"])
        self._next_client = max(self._clients, default=10000) + 1
        self._next_visit = max(self._visits, default=500000) + 1
        self._handlers: dict[str, Callable[[_Envelope], Element]] = {
            "GET_FILIAL_LIST": self._filial_list,
            "GET_DOCTOR_LIST": self._doctor_list,
            "SCHEDULE_LIST": self._schedule_list,
            "SCHEDULE_INFO": self._schedule_info,
            "SCHEDULE_CHANGE_LIST": self._schedule_change_list,
            "SCHEDULE_CHANGE_ACCEPT": self._schedule_change_accept,
            "CLIENT_INFO": self._client_info,
            "CLIENTS_CHANGE_LIST": self._clients_change_list,
            "CLIENTS_CHANGE_ACCEPT": self._clients_change_accept,
        }

    # --- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        method, code, response = self._handle(request)
        with self._lock:
            self.request_log.append((method, code, response.status_code))
        return response(environ, start_response)

    def _handle(self, request: Request) -> tuple[str, str, Response]:
        with self._lock:
            self.request_count += 1
        subject = _client_subject(request.environ.get("SSL_CLIENT_CERT"))
        if subject is not None:
            with self._lock:
                self.client_subjects.append(subject)
        if request.path.rstrip("/") != "/api/xml":
            return "?", "", Response("not found", 404, mimetype="text/plain")
        if request.method != "POST":
            return "?", "", Response("method not allowed", 405, {"Allow": "POST"}, mimetype="text/plain")
        try:
            envelope = self._parse(request.get_data())
        except _EnvelopeError as exc:
            failure, _ = self.faults.take(None)
            if failure is not None:
                return "?", "", self._fault_response(failure)
            return "?", "AE", self._ack(None, "", None, "AE", str(exc), exc.http_status)
        failure, delay = self.faults.take(envelope.method)
        if delay:
            _time.sleep(delay)
        with self._lock:
            self.calls[envelope.method] += 1
        if failure is not None:
            return envelope.method, "", self._fault_response(failure)
        handler = self._handlers.get(envelope.method)
        if handler is None:
            text = f"method {envelope.method} is not supported"
            return envelope.method, "AE", self._ack(envelope.method, envelope.message_id, None, "AE", text)
        with self._lock:
            out = handler(envelope)
        return envelope.method, "AA", self._ack(envelope.method, envelope.message_id, out)

    def _parse(self, raw: bytes) -> _Envelope:
        if not raw.strip():
            raise _EnvelopeError("empty request", 400)
        try:
            root = safe_fromstring(raw, forbid_dtd=True)
        except DefusedXmlException as exc:
            raise _EnvelopeError(f"unsafe XML refused ({type(exc).__name__})", 400) from None
        except ParseError:
            raise _EnvelopeError("malformed XML", 400) from None
        tag = root.tag
        if not tag.startswith("{" + NS + "}") or not local_name(tag).startswith("WEB_"):
            raise _EnvelopeError(f"root element must be WEB_{{METHOD}} in namespace {NS}")
        method = local_name(tag)[4:]
        msh = child(root, "MSH")
        if msh is None:
            raise _EnvelopeError("MSH header is missing")
        if text_of(msh, "MSH.9", "MSG.1") != "WEB" or text_of(msh, "MSH.9", "MSG.2") != method:
            raise _EnvelopeError(f"MSH.9 must name WEB/{method}")
        message_id = text_of(msh, "MSH.10") or ""
        if not message_id:
            raise _EnvelopeError("MSH.10 (message id) is missing")
        stamp = text_of(msh, "MSH.7", "TS.1") or ""
        if not re.fullmatch(r"[0-9]{12}|[0-9]{14}", stamp):
            raise _EnvelopeError("MSH.7/TS.1 must be yyyyMMddHHmmss")
        encoding = text_of(msh, "MSH.18")
        if encoding is not None and encoding.upper() != "UTF-8":
            raise _EnvelopeError("MSH.18 must be UTF-8")
        filial_text = text_of(msh, "MSH.99")
        filial = None
        if filial_text:
            if not _DIGITS.fullmatch(filial_text):
                raise _EnvelopeError("MSH.99 must be a branch number")
            filial = int(filial_text)
        body = child(root, f"{method}_IN")
        if body is None:
            raise _EnvelopeError(f"{method}_IN is missing")
        return _Envelope(method, message_id, filial, body)

    def _ack(
        self, method: str | None, request_id: str, out: Element | None, code: str = "AA", text: str = "",
        http_status: int = 200,
    ) -> Response:  # fmt: skip
        root = Element("ACK")
        root.set("xmlns", NS)
        msh = _add(root, "MSH")
        _add(_add(msh, "MSH.7"), "TS.1", datetime.fromtimestamp(self.clock.now(), CLINIC_TZ).strftime("%Y%m%d%H%M%S"))
        msh9 = _add(msh, "MSH.9")
        _add(msh9, "MSG.1", "WEB")
        _add(msh9, "MSG.2", method or "")
        _add(msh, "MSH.10", f"{next(self._ids):024x}")
        _add(msh, "MSH.18", "UTF-8")
        msa = _add(root, "MSA")
        _add(msa, "MSA.1", code)
        _add(msa, "MSA.2", request_id)
        if text:
            _add(msa, "MSA.3", text)
        if out is not None:
            root.append(out)
        body = tostring(root, encoding="utf-8", xml_declaration=True)
        return Response(body, http_status, mimetype="text/xml", content_type="text/xml; charset=utf-8")

    def _fault_response(self, rule: FaultRule) -> Response:
        if rule.body is not None:
            return Response(rule.body, rule.status, content_type="text/xml; charset=utf-8")
        reason = _REASONS.get(rule.status, "Error")
        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
        if rule.status in (502, 503, 504):
            return Response(_NGINX_PAGE.format(code=rule.status, reason=reason), rule.status, headers,
                            mimetype="text/html")  # fmt: skip
        return Response(reason, rule.status, headers, mimetype="text/plain")

    # --- output helpers -----------------------------------------------------------------------

    @staticmethod
    def _out(method: str, result: int = 1, comment: str = "") -> Element:
        out = Element(f"{method}_OUT")
        _add(out, "SPRESULT", result)
        _add(out, "SPCOMMENT", comment)
        return out

    @staticmethod
    def _rows(env: _Envelope) -> tuple[int, int] | str:
        """(first, last) 1-based inclusive rows, or the reason they are invalid."""
        first_text, last_text = text_of(env.body, "FIRSTROW"), text_of(env.body, "LASTROW")
        for value in (first_text, last_text):
            if value and not _DIGITS.fullmatch(value):
                return "FIRSTROW/LASTROW must be positive integers"
        first = int(first_text) if first_text else 1
        last = int(last_text) if last_text else first + DEFAULT_ROWS - 1
        if first < 1 or last < first:
            return "FIRSTROW must be >= 1 and LASTROW >= FIRSTROW"
        if last - first + 1 > MAX_ROWS:
            return f"at most {MAX_ROWS} rows per request"
        return first, last

    def _paged(self, env: _Envelope, rows: list[Json], render: Callable[[Element, Json], None]) -> Element:
        bounds = self._rows(env)
        if isinstance(bounds, str):
            return self._out(env.method, -1, bounds)
        first, last = bounds
        out = self._out(env.method)
        _add(_add(out, "RECORDSDATA"), "ITEMSNUMBER", len(rows))
        for row in rows[first - 1 : last]:
            render(out, row)
        return out

    def _render_visit(self, parent: Element, visit: Json) -> None:
        rec = _add(parent, "SCHEDULEREC")
        start: datetime = visit["START"]
        end = start + timedelta(minutes=visit["DURATION"])
        client = self._clients.get(visit["PCODE"], {})
        doctor = self._doctors.get(visit["DCODE"], {})
        branch = self._branches.get(visit["FILIAL"], {})
        fields: list[tuple[str, object]] = [
            ("SCHEDID", visit["SCHEDID"]),
            ("WORKDATE", ic_date(start.date())),
            ("BHOUR", start.hour), ("BMIN", start.minute), ("FHOUR", end.hour), ("FMIN", end.minute),
            ("FILIAL", visit["FILIAL"]), ("FNAME", branch.get("FNAME", "")),
            ("DCODE", visit["DCODE"]), ("DNAME", doctor.get("DNAME", "")),
            ("DEPNUM", doctor.get("DEPNUM", "")), ("DEPNAME", doctor.get("DEPNAME", "")),
            ("PCODE", visit["PCODE"]), ("PNAME", _full_name(client)),
            ("PBIRTHDATE", ic_date(client["BDATE"]) if client.get("BDATE") else ""),
            ("PGENDER", client.get("GENDER", "")), ("PPHONE", client.get("PPHONE") or ""),
            ("ONLINETYPE", visit["ONLINETYPE"]), ("SCHEDSTATUS", visit["SCHEDSTATUS"]),
            ("PRICE", visit["PRICE"]), ("POLICYNUM", visit["POLICYNUM"] or ""),
            ("ANONYMOUS", int(visit["ANONYMOUS"])),
            ("CREATEDATE", ic_stamp(visit["CREATEDATE"])), ("MODIFYDATE", ic_stamp(visit["MODIFYDATE"])),
        ]  # fmt: skip
        for tag, value in fields:
            _add(rec, tag, value)

    @staticmethod
    def _render_change(parent: Element, tag: str, change: Json) -> None:
        el = _add(parent, tag)
        _add(el, "CHANGEID", change["CHANGEID"])
        if "SCHEDID" in change:
            _add(el, "SCHEDID", change["SCHEDID"])
            _add(el, "FILIAL", change["FILIAL"])
        _add(el, "PCODE", change["PCODE"])
        _add(el, "CHANGEOP", change["CHANGEOP"])
        _add(el, "CHANGEDATE", ic_stamp(change["CHANGEDATE"]))

    # --- handlers (called under the lock) -----------------------------------------------------

    def _filial_list(self, env: _Envelope) -> Element:
        out = self._out(env.method)
        for branch in self._branches.values():
            info = _add(out, "FILIAL_INFO")
            for key in ("FILIAL", "FNAME", "FADDR", "FCITY"):
                _add(info, key, branch[key])
        return out

    def _doctor_list(self, env: _Envelope) -> Element:
        rows = [d for d in self._doctors.values() if env.filial is None or env.filial in d["FILIALS"]]

        def render(parent: Element, doctor: Json) -> None:
            info = _add(parent, "DOCTOR_INFO")
            for key in ("DCODE", "DNAME", "DEPNUM", "DEPNAME"):
                _add(info, key, doctor[key])
            _add(info, "FILIALLIST", ",".join(str(f) for f in doctor["FILIALS"]))

        return self._paged(env, rows, render)

    def _schedule_list(self, env: _Envelope) -> Element:
        first, last = _parse_day(text_of(env.body, "BDATE")), _parse_day(text_of(env.body, "FDATE"))
        if first is None or last is None:
            return self._out(env.method, -1, "BDATE and FDATE (yyyymmdd) are required")
        if last < first:
            return self._out(env.method, -1, "FDATE is before BDATE")
        patient_text = text_of(env.body, "EXTPCODE")
        if patient_text and not _DIGITS.fullmatch(patient_text):
            return self._out(env.method, -1, "EXTPCODE must be a patient code")
        rows = [
            v for v in self._visits.values()
            if first <= v["START"].date() <= last
            and (env.filial is None or v["FILIAL"] == env.filial)
            and (not patient_text or v["PCODE"] == int(patient_text))
        ]  # fmt: skip
        rows.sort(key=lambda v: (v["START"], v["SCHEDID"]))
        return self._paged(env, rows, self._render_visit)

    def _schedule_info(self, env: _Envelope) -> Element:
        sched_text = text_of(env.body, "SCHEDID") or ""
        visit = self._visits.get(int(sched_text)) if _DIGITS.fullmatch(sched_text) else None
        if visit is None:
            return self._out(env.method, 0, "Запись не найдена")
        out = self._out(env.method)
        self._render_visit(out, visit)
        return out

    def _client_info(self, env: _Envelope) -> Element:
        code_text = text_of(env.body, "PCODE") or ""
        client = self._clients.get(int(code_text)) if _DIGITS.fullmatch(code_text) else None
        if client is None:
            return self._out(env.method, 0, "Пациент не найден")
        out = self._out(env.method)
        info = _add(out, "CLIENT_MAININFO")
        for key in ("PCODE", "LASTNAME", "FIRSTNAME", "MIDNAME"):
            _add(info, key, client[key] or "")
        _add(info, "PNAME", _full_name(client))
        _add(info, "BDATE", ic_date(client["BDATE"]) if client["BDATE"] else "")
        _add(info, "GENDER", client["GENDER"])
        _add(info, "PPHONE", client["PPHONE"] or "")
        _add(info, "PMAIL", client["PMAIL"] or "")
        _add(info, "PADDR", client.get("PADDR") or "")
        for flag in (*REFUSAL_FLAGS, "ARCHIVED"):
            _add(info, flag, int(bool(client[flag])))
        _add(info, "MODIFYDATE", ic_stamp(client["MODIFYDATE"]))
        return out

    def _change_list(self, env: _Envelope, queue: dict[int, Json], tag: str) -> Element:
        pending = [
            c for c in queue.values()
            if not c["ACCEPTED"] and (env.filial is None or c.get("FILIAL", env.filial) == env.filial)
        ]  # fmt: skip
        out = self._out(env.method)
        _add(_add(out, "RECORDSDATA"), "ITEMSNUMBER", len(pending))
        for change in pending[: self.change_batch]:
            self._render_change(out, tag, change)
        return out

    def _change_accept(self, env: _Envelope, queue: dict[int, Json], tag: str) -> Element:
        blocks = [el for el in env.body if local_name(el.tag) == tag]
        if not blocks:
            return self._out(env.method, -99, f"{tag} block is required")
        ids: list[int] = []
        for block in blocks:
            value = text_of(block, "CHANGEID") or ""
            if not _DIGITS.fullmatch(value):
                return self._out(env.method, -1, "CHANGEID must be a change number")
            ids.append(int(value))
        accepted = 0
        for change_id in ids:
            change = queue.get(change_id)
            if change is not None and not change["ACCEPTED"]:
                change["ACCEPTED"] = True
                accepted += 1
        out = self._out(env.method, 1, f"accepted: {accepted}")
        _add(out, "ACCEPTED", accepted)
        return out

    def _schedule_change_list(self, env: _Envelope) -> Element:
        return self._change_list(env, self._schedule_changes, "CHANGE_INFO")

    def _schedule_change_accept(self, env: _Envelope) -> Element:
        return self._change_accept(env, self._schedule_changes, "CHANGE_INFO")

    def _clients_change_list(self, env: _Envelope) -> Element:
        return self._change_list(env, self._client_changes, "CLIENT_CHANGE_INFO")

    def _clients_change_accept(self, env: _Envelope) -> Element:
        return self._change_accept(env, self._client_changes, "CLIENT_CHANGE_INFO")

    # --- queues -------------------------------------------------------------------------------

    def _enqueue_visit(self, visit: Json, op: int, at: datetime) -> None:
        change_id = self._next_change
        self._next_change += 1
        self._schedule_changes[change_id] = {
            "CHANGEID": change_id, "SCHEDID": visit["SCHEDID"], "FILIAL": visit["FILIAL"],
            "PCODE": visit["PCODE"], "CHANGEOP": op, "CHANGEDATE": at, "ACCEPTED": False,
        }  # fmt: skip

    def _enqueue_client(self, client: Json, op: int, at: datetime) -> None:
        change_id = self._next_change
        self._next_change += 1
        self._client_changes[change_id] = {
            "CHANGEID": change_id, "PCODE": client["PCODE"], "CHANGEOP": op, "CHANGEDATE": at, "ACCEPTED": False,
        }  # fmt: skip

    def pending_changes(self, queue: str = "schedule") -> list[Json]:
        """Unacknowledged entries of the ``schedule`` or ``clients`` queue, oldest first."""
        with self._lock:
            source = self._schedule_changes if queue == "schedule" else self._client_changes
            return [dict(c) for c in source.values() if not c["ACCEPTED"]]

    def accept_all(self) -> None:
        """Acknowledge everything (a fresh integration that only wants changes from now on)."""
        with self._lock:
            for change in (*self._schedule_changes.values(), *self._client_changes.values()):
                change["ACCEPTED"] = True

    # --- state inspection and mutation (tests and demos) --------------------------------------

    def visit(self, sched_id: int) -> Json:
        with self._lock:
            return dict(self._visits[sched_id])

    def client(self, pcode: int) -> Json:
        with self._lock:
            return dict(self._clients[pcode])

    def all_visits(self) -> list[Json]:
        with self._lock:
            return [dict(v) for v in self._visits.values()]

    def _touch(self, row: Json) -> datetime:
        now = datetime.fromtimestamp(int(self.clock.now()), CLINIC_TZ)
        row["MODIFYDATE"] = max(now, row["MODIFYDATE"] + timedelta(seconds=1))
        return row["MODIFYDATE"]

    def book(
        self,
        patient_id: int,
        doctor_id: int,
        branch_id: int,
        start: datetime,
        *,
        duration: int = 30,
        status: str = "booked",
        price: str = "2500.00",
        insurance_policy: str | None = None,
        anonymous: bool = False,
        online: bool = False,
    ) -> int:
        """Create a booking as the front desk (or the online form, ``online=True``) would; returns SCHEDID."""
        self._check_status(status)
        with self._lock:
            if patient_id not in self._clients:
                raise KeyError(f"unknown patient {patient_id}")
            if doctor_id not in self._doctors:
                raise KeyError(f"unknown doctor {doctor_id}")
            if branch_id not in self._branches:
                raise KeyError(f"unknown branch {branch_id}")
            sched_id = self._next_visit
            self._next_visit += 1
            now = datetime.fromtimestamp(int(self.clock.now()), CLINIC_TZ)
            visit = {
                "SCHEDID": sched_id, "PCODE": patient_id, "DCODE": doctor_id, "FILIAL": branch_id,
                "START": _local(start), "DURATION": duration, "SCHEDSTATUS": status,
                "PRICE": "0.00" if insurance_policy else price, "POLICYNUM": insurance_policy,
                "ANONYMOUS": anonymous, "ONLINETYPE": int(online), "CREATEDATE": now, "MODIFYDATE": now,
            }  # fmt: skip
            self._visits[sched_id] = visit
            self._enqueue_visit(visit, CHANGE_NEW, now)
            return sched_id

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown InfoClinica status {status!r}")

    def set_status(self, sched_id: int, status: str, *, unchecked: bool = False) -> None:
        """Change SCHEDSTATUS; ``unchecked=True`` allows words outside the vocabulary (a clinic's own)."""
        if not unchecked:
            self._check_status(status)
        with self._lock:
            visit = self._visits[sched_id]
            visit["SCHEDSTATUS"] = status
            at = self._touch(visit)
            self._enqueue_visit(visit, CHANGE_REMOVED if status == "removed" else CHANGE_MODIFIED, at)

    def confirm(self, sched_id: int) -> None:
        self.set_status(sched_id, "confirmed")

    def arrive(self, sched_id: int) -> None:
        self.set_status(sched_id, "arrived")

    def complete(self, sched_id: int) -> None:
        self.set_status(sched_id, "visited")

    def pay(self, sched_id: int) -> None:
        self.set_status(sched_id, "paid")

    def cancel(self, sched_id: int) -> None:
        self.set_status(sched_id, "cancelled")

    def remove(self, sched_id: int) -> None:
        """SCHEDULE_REC_REMOVE: the change queue reports CHANGEOP 3; SCHEDULE_INFO still shows the record."""
        self.set_status(sched_id, "removed")

    def no_show(self, sched_id: int) -> None:
        self.set_status(sched_id, "noshow")

    def reschedule(self, sched_id: int, new_start: datetime, duration: int | None = None) -> None:
        """Same SCHEDID, new WORKDATE/BHOUR/BMIN; the booking goes back to ``booked``."""
        with self._lock:
            visit = self._visits[sched_id]
            visit["START"] = _local(new_start)
            if duration is not None:
                visit["DURATION"] = duration
            visit["SCHEDSTATUS"] = "booked"
            self._enqueue_visit(visit, CHANGE_MODIFIED, self._touch(visit))

    def update_client(self, pcode: int, **fields: Any) -> None:
        """Change card fields, named as CLIENT_INFO returns them (``PPHONE``, ``REFUSESMS``, ...)."""
        if unknown := set(fields) - CLIENT_FIELDS:
            raise TypeError(f"unknown client fields: {sorted(unknown)}")
        with self._lock:
            client = self._clients[pcode]
            client.update(fields)
            self._enqueue_client(client, CHANGE_MODIFIED, self._touch(client))

    def add_client(
        self,
        lastname: str,
        firstname: str,
        *,
        midname: str | None = None,
        gender: int = 2,
        bdate: date | None = None,
        phone: str | None = None,
        email: str | None = None,
        **flags: bool,
    ) -> int:
        """Register a card; ``flags`` are REFUSECALL/REFUSESMS/REFUSEPD/ARCHIVED."""
        if unknown := set(flags) - {*REFUSAL_FLAGS, "ARCHIVED"}:
            raise TypeError(f"unknown client flags: {sorted(unknown)}")
        with self._lock:
            pcode = self._next_client
            self._next_client += 1
            now = datetime.fromtimestamp(int(self.clock.now()), CLINIC_TZ)
            client = {
                "PCODE": pcode, "LASTNAME": lastname, "FIRSTNAME": firstname, "MIDNAME": midname,
                "BDATE": bdate or date(1990, 1, 1), "GENDER": gender, "PPHONE": phone, "PMAIL": email,
                **{flag: bool(flags.get(flag, False)) for flag in (*REFUSAL_FLAGS, "ARCHIVED")},
                "MODIFYDATE": now,
            }  # fmt: skip
            self._clients[pcode] = client
            self._enqueue_client(client, CHANGE_NEW, now)
            return pcode

    def at(self, day_offset: int, hh_mm: str) -> datetime:
        """Convenience: a clinic-local datetime ``day_offset`` days from the clock's today."""
        hours, minutes = (int(x) for x in hh_mm.split(":"))
        today = datetime.fromtimestamp(self.clock.now(), CLINIC_TZ).date()
        return datetime.combine(today + timedelta(days=day_offset), time(hours, minutes), CLINIC_TZ)


_STREETS = ("ул. Ленина", "пр-т Мира", "ул. Гагарина", "ул. Садовая", "Лесной пер.", "ул. Чехова", "наб. Реки")


def _home_address(pcode: int, city: str) -> str:
    """A home address derived from the card number (the seed's random stream stays as it is)."""
    return f"г. {city}, {_STREETS[pcode % len(_STREETS)]}, д. {pcode % 97 + 1}, кв. {pcode % 211 + 1}"


def _full_name(client: Json) -> str:
    return " ".join(str(client[k]) for k in ("LASTNAME", "FIRSTNAME", "MIDNAME") if client.get(k))


def _client_subject(pem: str | None) -> str | None:
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


# --- HTTPS with client certificates -----------------------------------------------------------


class TlsServedApp:
    """Runs a WSGI app behind TLS on 127.0.0.1 in a daemon thread.

    Give it a server context with ``verify_mode=CERT_REQUIRED`` and the clinic CA loaded: the TLS
    handshake then refuses any client without a certificate signed by that CA, before HTTP starts.
    """

    def __init__(self, app: WsgiApp, context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True, ssl_context=context)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"https://{self._server.host}:{self._server.port}"

    def start(self) -> TlsServedApp:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> TlsServedApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_tls(app: WsgiApp, context: ssl.SSLContext) -> TlsServedApp:
    return TlsServedApp(app, context).start()
