"""Renovatio (МИС Реновацио, rnova.org) public API emulator (WSGI), loaded from the MIS-neutral sample clinic.

Modelled on the vendor's help pages and integrators' public code (docs reference §1.3): one endpoint per
method, ``/api/public/{method}``, parameters as form data (``application/x-www-form-urlencoded`` POST;
some clients send a GET query string, which works too), ``api_key`` in every call, and the envelope
``{"error": 0, "data": …}`` (``data`` an object or an array) or ``{"error": 1, "data": {"code": …,
"desc": "…"}}``. Dates are ``dd.mm.yyyy`` and times ``dd.mm.yyyy hh:mm``, clinic-local (Moscow).

Methods: ``getClinics``, ``getUsers`` (doctors), ``getAppointments`` (``date_from``/``date_to`` or
``time_start``/``time_end``; ``clinic_id``, ``doctor_id``, ``patient_id``, ``status`` filters;
``show_patient_data=1`` adds ``patient_name``, ``patient_phone``, ``patient_email``,
``patient_birth_date``), ``getAppointment`` (``appointment_id``) and ``getPatient`` (``patient_id``).

Assumptions (the vendor does not publish these; keep them in one place so they are easy to fix):

* **No change feed.** Rows have no modification time and there is no updated-since filter (none was
  found in public code), so a poller must re-read a window and diff. There is no server paging either;
  a window longer than 31 days is refused (integrators' code walks history in 31-day steps), so clients
  batch long windows into chunks themselves.
* **Statuses** (``status``): ``upcoming``, ``completed`` and ``refused`` are seen in public code (an
  importer maps ``refused`` to its no-show stages); ``confirmed``, ``arrived`` and ``canceled`` are
  inferred from the ``confirmAppointment``/``cancelAppointment`` methods. A reschedule keeps the id,
  changes ``time_start``/``time_end`` and goes back to ``upcoming``.
* **Rows** carry ``id``, ``clinic_id``, ``doctor_id``, ``doctor``, ``patient_id``, ``time_start``,
  ``time_end``, ``status``, ``is_first``, ``type`` ("Первичный прием"/"Повторный прием"),
  ``services[{title, price, count}]`` (seen) and ``date_created``, ``policy_number`` (DMS; price 0.00) and
  ``is_anonymous`` (assumed).
* **Patients** (``getPatient``): ``id``, ``last_name``, ``first_name``, ``third_name``, ``birth_date``,
  ``gender`` (1 male, 2 female), ``mobile`` (as typed), ``email`` and the refusal flags ``refuse_sms``,
  ``refuse_call``, ``refuse_email``, ``refuse_adv`` (advertising), ``refuse_pd`` (personal data
  processing) plus ``is_archive``, all 0/1 (all assumed).
* Errors are HTTP 200 with ``error: 1``; codes: 401 bad or missing ``api_key``, 400 bad parameter,
  404 unknown method or record. Injected 502/503/504 faults answer with an nginx HTML page.
"""

from __future__ import annotations

import json
import re
import threading
import time as _time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from typing import Any

from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, FaultRule, RuleFaults
from sandbox.seed import CLINIC_TZ, SampleClinic, VisitStatus

STATUSES: tuple[str, ...] = ("upcoming", "confirmed", "arrived", "completed", "canceled", "refused")
STATUS_FROM_VISIT: dict[VisitStatus, str] = {
    VisitStatus.PENDING: "upcoming",
    VisitStatus.BOOKED: "upcoming",
    VisitStatus.CONFIRMED: "confirmed",
    VisitStatus.ARRIVED: "arrived",
    VisitStatus.COMPLETED: "completed",
    VisitStatus.BILLED: "completed",
    VisitStatus.PAID: "completed",
    VisitStatus.CANCELLED: "canceled",
    VisitStatus.NO_SHOW: "refused",
}
MAX_WINDOW_DAYS = 31
PATIENT_FLAGS = ("refuse_sms", "refuse_call", "refuse_email", "refuse_adv", "refuse_pd", "is_archive")
PATIENT_FIELDS = frozenset({"last_name", "first_name", "third_name", "birth_date", "gender", "mobile", "email",
                            *PATIENT_FLAGS})  # fmt: skip
VISIT_TYPES = {"primary": "Первичный прием", "repeat": "Повторный прием"}

Json = dict[str, Any]
_INT = re.compile(r"[0-9]{1,12}")


def rn_date(day: date) -> str:
    return day.strftime("%d.%m.%Y")


def rn_time(moment: datetime) -> str:
    return _local(moment).strftime("%d.%m.%Y %H:%M")


def _local(moment: datetime) -> datetime:
    return moment.replace(tzinfo=CLINIC_TZ) if moment.tzinfo is None else moment.astimezone(CLINIC_TZ)


class _ApiError(Exception):
    def __init__(self, code: int, desc: str) -> None:
        super().__init__(desc)
        self.code = code
        self.desc = desc


# --- fault injection --------------------------------------------------------------------------


class Faults(RuleFaults):
    """Deterministic fault queue per API method: HTTP failures, ``error: 1`` answers and delays."""

    def fail_next(self, n: int = 1, status: int = 503, method: str | None = None) -> None:
        """Answer the next ``n`` matching requests with HTTP ``status`` instead of serving them."""
        self._add_failure(FaultRule(n, method, status=status))

    def error_next(
        self, n: int = 1, code: int = 500, desc: str = "Внутренняя ошибка", method: str | None = None
    ) -> None:
        """Answer the next ``n`` matching requests with ``{"error": 1, "data": {code, desc}}``."""
        self._add_failure(FaultRule(n, method, error=(code, desc)))

    def timeout_next(self, n: int = 1, seconds: float = 5.0, method: str | None = None) -> None:
        self._add_delay(FaultRule(n, method, seconds=seconds))


_NGINX_PAGE = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
            504: "Gateway Time-out", 429: "Too Many Requests"}  # fmt: skip


def _envelope(data: Any) -> Response:
    return Response(json.dumps({"error": 0, "data": data}, ensure_ascii=False), 200, mimetype="application/json")


def _error(code: int, desc: str) -> Response:
    body = {"error": 1, "data": {"code": code, "desc": desc}}
    return Response(json.dumps(body, ensure_ascii=False), 200, mimetype="application/json")


# --- the emulator -----------------------------------------------------------------------------


class RenovatioEmulator:
    """In-memory Renovatio public API. Tests drive state through the mutation helpers below."""

    def __init__(self, clinic: SampleClinic, api_key: str, clock: Clock | None = None) -> None:
        self.api_key = api_key
        self.clock = clock or Clock()
        self.faults = Faults()
        self.request_count = 0
        self.calls: Counter[str] = Counter()
        # (method, error flag or HTTP failure, HTTP status); never parameters: they hold the key and PII.
        self.request_log: list[tuple[str, int, int]] = []
        self.windows: list[tuple[str, str]] = []  # (date_from, date_to) of every getAppointments call
        self._lock = threading.RLock()
        self._clinics: list[Json] = [
            {"id": b.id, "title": b.title, "address": b.address, "city": b.city} for b in clinic.branches
        ]
        self._doctors: dict[int, Json] = {
            d.id: {"id": d.id, "name": " ".join((d.surname, d.name, d.patronymic)), "profession": d.specialty,
                   "clinic": list(d.branch_ids)}
            for d in clinic.doctors
        }  # fmt: skip
        self._patients: dict[int, Json] = {}
        for p in clinic.patients:
            self._patients[p.id] = {
                "id": p.id,
                "last_name": p.surname,
                "first_name": p.name,
                "third_name": p.patronymic or "",
                "birth_date": rn_date(p.birthdate),
                "gender": 1 if p.sex == "male" else 2,
                "mobile": p.phone or "",
                "email": p.email or "",
                "refuse_sms": int(p.deny_sms_notifications or p.deny_sms_dispatches),
                "refuse_call": int(p.deny_calls),
                "refuse_email": int(p.deny_email),
                "refuse_adv": int(p.deny_sms_dispatches or p.deny_whatsapp),
                "refuse_pd": int(p.deny_data_processing),
                "is_archive": int(p.archived),
            }
        self._visits: dict[int, Json] = {}
        for a in clinic.appointments:
            self._visits[a.id] = {
                "id": a.id,
                "clinic_id": a.branch_id,
                "doctor_id": a.doctor_id,
                "patient_id": a.patient_id,
                "start": _local(a.start),
                "duration": a.duration_min,
                "status": STATUS_FROM_VISIT[a.status],
                "is_first": int(a.kind == "primary"),
                "type": VISIT_TYPES[a.kind],
                "price": f"{a.price:.2f}",
                "policy_number": a.insurance_policy or "",
                "is_anonymous": int(a.anonymous),
                "date_created": rn_time(a.created_at),
            }
        self._next_patient = max(self._patients, default=10000) + 1
        self._next_visit = max(self._visits, default=500000) + 1
        self._routes: dict[str, Callable[[dict[str, str]], Any]] = {
            "getClinics": self._get_clinics,
            "getUsers": self._get_users,
            "getAppointments": self._get_appointments,
            "getAppointment": self._get_appointment,
            "getPatient": self._get_patient,
        }

    # --- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        method, flag, response = self._handle(request)
        with self._lock:
            self.request_log.append((method, flag, response.status_code))
        return response(environ, start_response)

    def _handle(self, request: Request) -> tuple[str, int, Response]:
        with self._lock:
            self.request_count += 1
        match = re.fullmatch(r"/api/public/([A-Za-z]+)/?", request.path)
        if match is None:
            return "?", 1, _error(404, "Not found")
        method = match.group(1)
        if request.method not in ("GET", "POST"):
            return method, 1, Response("method not allowed", 405, {"Allow": "GET, POST"}, mimetype="text/plain")
        with self._lock:
            self.calls[method] += 1
        failure, delay = self.faults.take(method)
        if delay:
            _time.sleep(delay)
        if failure is not None:
            if failure.error is not None:
                return method, 1, _error(*failure.error)
            reason = _REASONS.get(failure.status, "Error")
            page = _NGINX_PAGE.format(code=failure.status, reason=reason)
            return method, 1, Response(page, failure.status, mimetype="text/html")
        params = {key: request.values.get(key, "") for key in request.values}
        if params.get("api_key") != self.api_key:
            return method, 1, _error(401, "Неверный ключ API" if params.get("api_key") else "Не передан ключ API")
        route = self._routes.get(method)
        if route is None:
            return method, 1, _error(404, f"Метод {method} не найден")
        try:
            with self._lock:
                return method, 0, _envelope(route(params))
        except _ApiError as exc:
            return method, 1, _error(exc.code, exc.desc)

    # --- parameters ---------------------------------------------------------------------------

    @staticmethod
    def _int(params: dict[str, str], name: str, required: bool = False) -> int | None:
        raw = params.get(name, "").strip()
        if not raw:
            if required:
                raise _ApiError(400, f"Не передан параметр {name}")
            return None
        if not _INT.fullmatch(raw):
            raise _ApiError(400, f"Параметр {name} должен быть числом")
        return int(raw)

    @staticmethod
    def _day(params: dict[str, str], name: str) -> date:
        raw = params.get(name, "").strip()
        try:
            return datetime.strptime(raw, "%d.%m.%Y").date()
        except ValueError:
            raise _ApiError(400, f"Параметр {name} должен быть датой дд.мм.гггг") from None

    @staticmethod
    def _moment(params: dict[str, str], name: str) -> datetime:
        raw = params.get(name, "").strip()
        try:
            return datetime.strptime(raw, "%d.%m.%Y %H:%M").replace(tzinfo=CLINIC_TZ)
        except ValueError:
            raise _ApiError(400, f"Параметр {name} должен быть временем дд.мм.гггг чч:мм") from None

    # --- handlers (called under the lock) -----------------------------------------------------

    def _get_clinics(self, params: dict[str, str]) -> list[Json]:
        return [dict(c) for c in self._clinics]

    def _get_users(self, params: dict[str, str]) -> list[Json]:
        clinic_id = self._int(params, "clinic_id")
        return [dict(d) for d in self._doctors.values() if clinic_id is None or clinic_id in d["clinic"]]

    def _render(self, visit: Json, with_patient: bool) -> Json:
        start: datetime = visit["start"]
        doctor = self._doctors.get(visit["doctor_id"], {})
        row: Json = {
            "id": visit["id"],
            "clinic_id": visit["clinic_id"],
            "doctor_id": visit["doctor_id"],
            "doctor": doctor.get("name", ""),
            "patient_id": visit["patient_id"],
            "time_start": rn_time(start),
            "time_end": rn_time(start + timedelta(minutes=visit["duration"])),
            "status": visit["status"],
            "is_first": visit["is_first"],
            "type": visit["type"],
            "services": [{"title": f"Приём: {doctor.get('profession', 'врач')}", "price": visit["price"],
                          "count": 1}],
            "policy_number": visit["policy_number"],
            "is_anonymous": visit["is_anonymous"],
            "date_created": visit["date_created"],
        }  # fmt: skip
        if with_patient:
            patient = self._patients.get(visit["patient_id"], {})
            name = " ".join(patient[k] for k in ("last_name", "first_name", "third_name") if patient.get(k))
            row.update(
                patient_name=name,
                patient_phone=patient.get("mobile", ""),
                patient_email=patient.get("email", ""),
                patient_birth_date=patient.get("birth_date", ""),
            )
        return row

    def _get_appointments(self, params: dict[str, str]) -> list[Json]:
        if params.get("date_from") or params.get("date_to"):
            first, last = self._day(params, "date_from"), self._day(params, "date_to")
            begin = datetime.combine(first, time(0, 0), CLINIC_TZ)
            end = datetime.combine(last + timedelta(days=1), time(0, 0), CLINIC_TZ)
        elif params.get("time_start") or params.get("time_end"):
            begin, end = self._moment(params, "time_start"), self._moment(params, "time_end")
        else:
            raise _ApiError(400, "Не передан период: date_from и date_to")
        if end <= begin:
            raise _ApiError(400, "Конец периода раньше начала")
        if end - begin > timedelta(days=MAX_WINDOW_DAYS):
            raise _ApiError(400, f"Период не может превышать {MAX_WINDOW_DAYS} день")
        self.windows.append((params.get("date_from") or params.get("time_start", ""),
                             params.get("date_to") or params.get("time_end", "")))  # fmt: skip
        filters = {name: self._int(params, name) for name in ("clinic_id", "doctor_id", "patient_id")}
        status = params.get("status", "").strip()
        if status and status not in STATUSES:
            raise _ApiError(400, f"Неизвестный статус {status}")
        rows = [
            v for v in self._visits.values()
            if begin <= v["start"] < end
            and all(value is None or v[name] == value for name, value in filters.items())
            and (not status or v["status"] == status)
        ]  # fmt: skip
        rows.sort(key=lambda v: (v["start"], v["id"]))
        with_patient = params.get("show_patient_data", "0") == "1"
        return [self._render(v, with_patient) for v in rows]

    def _get_appointment(self, params: dict[str, str]) -> Json:
        visit = self._visits.get(self._int(params, "appointment_id", required=True) or 0)
        if visit is None:
            raise _ApiError(404, "Визит не найден")
        return self._render(visit, params.get("show_patient_data", "0") == "1")

    def _get_patient(self, params: dict[str, str]) -> Json:
        patient = self._patients.get(self._int(params, "patient_id", required=True) or 0)
        if patient is None:
            raise _ApiError(404, "Пациент не найден")
        return dict(patient)

    # --- state inspection and mutation (tests and demos) --------------------------------------

    def visit(self, appointment_id: int) -> Json:
        with self._lock:
            return dict(self._visits[appointment_id])

    def patient(self, patient_id: int) -> Json:
        with self._lock:
            return dict(self._patients[patient_id])

    def book(
        self,
        patient_id: int,
        doctor_id: int,
        branch_id: int,
        start: datetime,
        *,
        duration: int = 30,
        status: str = "upcoming",
        price: str = "2500.00",
        insurance_policy: str | None = None,
        anonymous: bool = False,
    ) -> int:
        """Create an appointment as the front desk would; returns its id."""
        self._check_status(status)
        with self._lock:
            if patient_id not in self._patients:
                raise KeyError(f"unknown patient {patient_id}")
            if doctor_id not in self._doctors:
                raise KeyError(f"unknown doctor {doctor_id}")
            if branch_id not in {c["id"] for c in self._clinics}:
                raise KeyError(f"unknown branch {branch_id}")
            visit_id = self._next_visit
            self._next_visit += 1
            first = not any(v["patient_id"] == patient_id for v in self._visits.values())
            self._visits[visit_id] = {
                "id": visit_id, "clinic_id": branch_id, "doctor_id": doctor_id, "patient_id": patient_id,
                "start": _local(start), "duration": duration, "status": status, "is_first": int(first),
                "type": VISIT_TYPES["primary" if first else "repeat"],
                "price": "0.00" if insurance_policy else price, "policy_number": insurance_policy or "",
                "is_anonymous": int(anonymous),
                "date_created": rn_time(datetime.fromtimestamp(self.clock.now(), CLINIC_TZ)),
            }  # fmt: skip
            return visit_id

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown Renovatio status {status!r}")

    def set_status(self, appointment_id: int, status: str, *, unchecked: bool = False) -> None:
        """Change ``status``; ``unchecked=True`` allows words outside the vocabulary (a clinic's own)."""
        if not unchecked:
            self._check_status(status)
        with self._lock:
            self._visits[appointment_id]["status"] = status

    def confirm(self, appointment_id: int) -> None:
        self.set_status(appointment_id, "confirmed")

    def arrive(self, appointment_id: int) -> None:
        self.set_status(appointment_id, "arrived")

    def complete(self, appointment_id: int) -> None:
        self.set_status(appointment_id, "completed")

    def cancel(self, appointment_id: int) -> None:
        self.set_status(appointment_id, "canceled")

    def no_show(self, appointment_id: int) -> None:
        self.set_status(appointment_id, "refused")

    def reschedule(self, appointment_id: int, new_start: datetime, duration: int | None = None) -> None:
        """Same id, new ``time_start``/``time_end``; the appointment goes back to ``upcoming``."""
        with self._lock:
            visit = self._visits[appointment_id]
            visit["start"] = _local(new_start)
            if duration is not None:
                visit["duration"] = duration
            visit["status"] = "upcoming"

    def update_client(self, patient_id: int, **fields: Any) -> None:
        """Change patient fields, named as ``getPatient`` returns them (``mobile``, ``refuse_sms``, ...)."""
        if unknown := set(fields) - PATIENT_FIELDS:
            raise TypeError(f"unknown patient fields: {sorted(unknown)}")
        if isinstance(fields.get("birth_date"), date):
            fields["birth_date"] = rn_date(fields["birth_date"])
        with self._lock:
            patient = self._patients[patient_id]
            patient.update({k: int(v) if k in PATIENT_FLAGS else v for k, v in fields.items()})

    def add_client(
        self,
        last_name: str,
        first_name: str,
        *,
        third_name: str = "",
        gender: int = 2,
        birth_date: date | None = None,
        mobile: str = "",
        email: str = "",
        **flags: bool,
    ) -> int:
        """Register a patient; ``flags`` are ``refuse_*``/``is_archive`` in API spelling."""
        if unknown := set(flags) - set(PATIENT_FLAGS):
            raise TypeError(f"unknown patient flags: {sorted(unknown)}")
        with self._lock:
            patient_id = self._next_patient
            self._next_patient += 1
            self._patients[patient_id] = {
                "id": patient_id, "last_name": last_name, "first_name": first_name, "third_name": third_name,
                "birth_date": rn_date(birth_date or date(1990, 1, 1)), "gender": gender, "mobile": mobile,
                "email": email, **{flag: int(flags.get(flag, False)) for flag in PATIENT_FLAGS},
            }  # fmt: skip
            return patient_id

    def at(self, day_offset: int, hh_mm: str) -> datetime:
        """Convenience: a clinic-local datetime ``day_offset`` days from the clock's today."""
        hours, minutes = (int(x) for x in hh_mm.split(":"))
        today = datetime.fromtimestamp(self.clock.now(), CLINIC_TZ).date()
        return datetime.combine(today + timedelta(days=day_offset), time(hours, minutes), CLINIC_TZ)
