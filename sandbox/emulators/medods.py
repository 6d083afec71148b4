"""MEDODS REST API v2 emulator (WSGI), loaded from the MIS-neutral sample clinic.

Modelled on what public MEDODS clients show (see docs reference §1.4): base path ``/api/v2``, a
self-minted HS512 JWT (``iss`` = identity key, signed with the integration secret) sent as
``Authorization: Bearer <jwt>`` (or raw, as one WordPress client does), ``limit``/``offset`` paging,
``{"data": [...]}`` responses, 422 for validation errors and 403 for auth errors.

Assumptions (the vendor does not publish these; keep them in one place so they are easy to fix):

* **Status vocabulary.** The real enum is not public. We use ``need_approval``, ``approved``,
  ``confirmed_by_administrator``, ``arrived``, ``serviced``, ``billed``, ``paid``, ``canceled`` and
  ``failed`` (no-show). A reschedule keeps the appointment id, changes date/time and sets the
  status back to ``approved``.
* **Paging.** Lists are ordered by ``(updatedAt, id)`` ascending and paged with ``offset``. Offset
  paging over a set that changes between page reads can skip or repeat rows (a record updated
  mid-scan moves to the end; a new row shifts the window), so a poller must re-read an overlap
  (``updatedAtAfter`` = cursor minus a margin) and dedupe by ``(id, updatedAt)``.
  ``updatedAtAfter`` is strictly greater-than, in unix seconds. ``total`` counts the whole
  filtered set. ``limit`` defaults to 25, maximum 100.
* **Timestamps** are integer unix seconds, so several changes can share one second; per record
  ``updatedAt`` strictly increases on every change (the emulator bumps it by one second if the
  clock has not moved). ``date``/``time`` are the clinic's local (Moscow) wall time.
* **Deletions** stay in the feed with ``deletedAt`` set, so pollers can notice them.
* **Auth**: 30 s clock-skew leeway on ``exp`` and ``iat``; tokens living longer than 300 s are
  refused. Every auth failure is 403 with ``{"error": "..."}``.
* ``sex`` is ``"male"``/``"female"``; ``phone`` is returned exactly as the front desk typed it.
* Injected 502/503/504 faults answer with an nginx-style HTML page (that is what a proxy in front of
  a real MIS returns); other injected statuses answer with JSON.
"""

from __future__ import annotations

import json
import re
import threading
import time as _time
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from typing import Any

import jwt
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, FaultRule, RuleFaults
from sandbox.seed import CLINIC_TZ, SampleClinic, VisitStatus

STATUSES: tuple[str, ...] = (
    "need_approval",
    "approved",
    "confirmed_by_administrator",
    "arrived",
    "serviced",
    "billed",
    "paid",
    "canceled",
    "failed",
)
STATUS_FROM_VISIT: dict[VisitStatus, str] = {
    VisitStatus.PENDING: "need_approval",
    VisitStatus.BOOKED: "approved",
    VisitStatus.CONFIRMED: "confirmed_by_administrator",
    VisitStatus.ARRIVED: "arrived",
    VisitStatus.COMPLETED: "serviced",
    VisitStatus.BILLED: "billed",
    VisitStatus.PAID: "paid",
    VisitStatus.CANCELLED: "canceled",
    VisitStatus.NO_SHOW: "failed",
}
APPOINTMENT_TYPE_IDS = {"primary": 1, "repeat": 2}
APPOINTMENT_SOURCE_IDS = {"phone": 1, "website": 2, "front_desk": 3, "aggregator": 4}

DEFAULT_LIMIT = 25
MAX_LIMIT = 100
LEEWAY_SECONDS = 30
MAX_TOKEN_LIFETIME = 300

DENY_FLAGS = (
    "denyCalls",
    "denyEmail",
    "denySmsNotifications",
    "denySmsDispatches",
    "denyWhatsappMessages",
    "denyDataProcessing",
)
CLIENT_FIELDS = frozenset(
    {"name", "surname", "secondName", "sex", "birthdate", "phone", "email", "archived", *DENY_FLAGS}
)

Json = dict[str, Any]
_INT = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII only: int() would also accept "١" or "1_000"


def mint_token(identity_key: str, secret: str, now: float, lifetime: int = 60, backdate: int = 10) -> str:
    """A token the way real MEDODS clients build one (iat back-dated a little, exp ~60 s ahead)."""
    iat = int(now) - backdate
    payload = {"iss": identity_key, "iat": iat, "exp": iat + backdate + lifetime}
    return jwt.encode(payload, secret, algorithm="HS512", headers={"typ": "JWT"})


def phone_digits(phone: str) -> str:
    """Digits of a phone with the Russian trunk/country prefix dropped, so 8916…, +7916… and 916… match."""
    digits = re.sub(r"\D", "", phone)
    if len(digits) == 11 and digits[0] in "78":
        return digits[1:]
    return digits


_PAGING = frozenset({"limit", "offset"})


def _in_feed_order(rows: Iterable[Json]) -> list[Json]:
    return sorted(rows, key=lambda r: (r.get("updatedAt", 0), r["id"]))


# --- fault injection --------------------------------------------------------------------------


class Faults(RuleFaults):
    """Deterministic fault queue: rules are consumed in the order they were added, per matching request."""

    def fail_next(
        self, n: int = 1, status: int = 503, path_prefix: str | None = None, retry_after: int | None = None
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` instead of serving them."""
        self._add_failure(FaultRule(n, path_prefix, status=status, retry_after=retry_after))

    def timeout_next(self, n: int = 1, seconds: float = 5.0, path_prefix: str | None = None) -> None:
        """Sleep ``seconds`` (real time) before answering the next ``n`` matching requests."""
        self._add_delay(FaultRule(n, path_prefix, seconds=seconds))

    def matches(self, rule: FaultRule, key: str | None) -> bool:
        # MEDODS is REST, so a rule targets a path prefix (``/api/v2/appointments``), not one method.
        return rule.target is None or (key is not None and key.startswith(rule.target))


# --- the emulator -----------------------------------------------------------------------------


class _ValidationError(Exception):
    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("validation failed")
        self.errors = errors


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status, headers, mimetype="application/json")


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def _local(start: datetime) -> datetime:
    return start.replace(tzinfo=CLINIC_TZ) if start.tzinfo is None else start.astimezone(CLINIC_TZ)


_NGINX_PAGE = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
            504: "Gateway Time-out", 429: "Too Many Requests"}  # fmt: skip


class MedodsEmulator:
    """In-memory MEDODS v2 API. Tests drive state through the mutation helpers below."""

    def __init__(self, clinic: SampleClinic, identity_key: str, secret: str, clock: Clock | None = None) -> None:
        self.identity_key = identity_key
        self.secret = secret
        self.clock = clock or Clock()
        self.faults = Faults()
        self.request_count = 0
        self.request_log: list[tuple[str, str, int]] = []  # (method, path, status); no query: it may hold PII
        self._lock = threading.RLock()
        self._clinics: list[Json] = [
            {"id": b.id, "title": b.title, "city": b.city, "address": b.address} for b in clinic.branches
        ]
        self._users: list[Json] = [
            {"id": d.id, "name": d.name, "surname": d.surname, "secondName": d.patronymic,
             "specialty": d.specialty, "userGroup": "medical_staff", "clinicIds": list(d.branch_ids)}
            for d in clinic.doctors
        ]  # fmt: skip
        self._clients: dict[int, Json] = {}
        for p in clinic.patients:
            self._clients[p.id] = {
                "id": p.id,
                "name": p.name,
                "surname": p.surname,
                "secondName": p.patronymic,
                "sex": p.sex,
                "birthdate": p.birthdate.isoformat(),
                "phone": p.phone,
                "email": p.email,
                "denyCalls": p.deny_calls,
                "denyEmail": p.deny_email,
                "denySmsNotifications": p.deny_sms_notifications,
                "denySmsDispatches": p.deny_sms_dispatches,
                "denyWhatsappMessages": p.deny_whatsapp,
                "denyDataProcessing": p.deny_data_processing,
                "archived": p.archived,
                "createdAt": _unix(p.created_at),
                "updatedAt": _unix(p.updated_at),
            }
        self._appointments: dict[int, Json] = {}
        for a in clinic.appointments:
            start = _local(a.start)
            self._appointments[a.id] = {
                "id": a.id,
                "clientId": a.patient_id,
                "userId": a.doctor_id,
                "clinicId": a.branch_id,
                "date": start.date().isoformat(),
                "time": start.strftime("%H:%M"),
                "duration": a.duration_min,
                "status": STATUS_FROM_VISIT[a.status],
                "appointmentTypeId": APPOINTMENT_TYPE_IDS[a.kind],
                "appointmentSourceId": APPOINTMENT_SOURCE_IDS[a.source],
                "price": f"{a.price:.2f}",
                "insurancePolicyNumber": a.insurance_policy,
                "anonymous": a.anonymous,
                "createdAt": _unix(a.created_at),
                "updatedAt": _unix(a.updated_at),
                "deletedAt": None,
            }
        # Bumped by every change of a row; a list's filtered, sorted rows are kept for the pages that
        # follow at the same version (sorting the whole set per page of <=100 made a 50k read quadratic).
        self._version = 0
        self._ordered: dict[tuple[Any, ...], tuple[int, list[Json]]] = {}
        self._next_client_id = max(self._clients, default=10000) + 1
        self._next_appointment_id = max(self._appointments, default=500000) + 1
        self._routes: dict[str, Callable[..., Response]] = {
            "appointments": self._list_appointments,
            "appointment": self._get_appointment,
            "clients": self._list_clients,
            "client": self._get_client,
            "client_update": self._update_client,
            "users": self._list_users,
            "clinics": self._list_clinics,
        }
        self._url_map = Map(
            [
                Rule("/api/v2/appointments", endpoint="appointments", methods=["GET"]),
                Rule("/api/v2/appointments/<int:item_id>", endpoint="appointment", methods=["GET"]),
                Rule("/api/v2/clients", endpoint="clients", methods=["GET"]),
                Rule("/api/v2/clients/<int:item_id>", endpoint="client", methods=["GET"]),
                Rule("/api/v2/clients/<int:item_id>", endpoint="client_update", methods=["PUT", "PATCH"]),
                Rule("/api/v2/users", endpoint="users", methods=["GET"]),
                Rule("/api/v2/clinics", endpoint="clinics", methods=["GET"]),
            ],
            strict_slashes=False,
        )

    # --- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        response = self._handle(request)
        with self._lock:
            self.request_log.append((request.method, request.path, response.status_code))
        return response(environ, start_response)

    def _handle(self, request: Request) -> Response:
        with self._lock:
            self.request_count += 1
        failure, delay = self.faults.take(request.path)
        if delay:
            _time.sleep(delay)
        if failure is not None:
            return self._fault_response(failure)
        try:
            endpoint, args = self._url_map.bind_to_environ(request.environ).match()
        except NotFound:
            return _json({"error": "not found"}, 404)
        except MethodNotAllowed as exc:
            return _json({"error": "method not allowed"}, 405, {"Allow": ", ".join(exc.valid_methods or [])})
        except HTTPException as exc:
            return _json({"error": exc.name}, exc.code or 400)
        denial = self._authenticate(request)
        if denial is not None:
            return _json({"error": denial}, 403)
        try:
            with self._lock:
                return self._routes[str(endpoint)](request, **args)
        except _ValidationError as exc:
            return _json({"errors": exc.errors}, 422)

    def _fault_response(self, rule: FaultRule) -> Response:
        reason = _REASONS.get(rule.status, "Error")
        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
        if rule.status in (502, 503, 504):
            page = _NGINX_PAGE.format(code=rule.status, reason=reason)
            return Response(page, rule.status, headers, mimetype="text/html")
        return _json({"error": reason}, rule.status, headers)

    def _authenticate(self, request: Request) -> str | None:
        """Return why the request is refused, or None. Never echoes the token back."""
        raw = request.headers.get("Authorization", "").strip()
        if not raw:
            return "authorization header is missing"
        token = raw[7:].strip() if raw[:7].lower() == "bearer " else raw
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != "HS512":
                return "token must be signed with HS512"
            # Time claims are checked below against the emulator's clock, not PyJWT's wall clock.
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=["HS512"],
                issuer=self.identity_key,
                options={"require": ["iss", "iat", "exp"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidIssuerError:
            return "unknown identity key"
        except jwt.InvalidSignatureError:
            return "token signature is invalid"
        except jwt.PyJWTError:
            return "token is malformed"
        iat, exp = claims["iat"], claims["exp"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp)):
            return "iat and exp must be numbers"
        now = self.clock.now()
        if exp < now - LEEWAY_SECONDS:
            return "token has expired"
        if iat > now + LEEWAY_SECONDS:
            return "token is issued in the future"
        if exp <= iat or exp - iat > MAX_TOKEN_LIFETIME:
            return f"token lifetime must be between 1 and {MAX_TOKEN_LIFETIME} seconds"
        return None

    # --- query parsing ------------------------------------------------------------------------

    @staticmethod
    def _int_arg(
        request: Request, name: str, errors: dict[str, list[str]], default: int | None = None,
        minimum: int = 0, maximum: int | None = None,
    ) -> int | None:  # fmt: skip
        raw = request.args.get(name)
        if raw is None or raw == "":
            return default
        if not _INT.fullmatch(raw.strip()):
            errors[name] = ["must be an integer"]
            return default
        value = int(raw)
        if value < minimum:
            errors[name] = [f"must be greater than or equal to {minimum}"]
        elif maximum is not None and value > maximum:
            errors[name] = [f"must be less than or equal to {maximum}"]
        return value

    def _page(
        self, request: Request, rows: list[Json], errors: dict[str, list[str]], ordered: bool = False
    ) -> Response:
        limit = self._int_arg(request, "limit", errors, DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = self._int_arg(request, "offset", errors, 0)
        if errors:
            raise _ValidationError(errors)
        assert limit is not None and offset is not None
        if not ordered:
            rows = _in_feed_order(rows)
        return _json({"data": [dict(r) for r in rows[offset : offset + limit]], "total": len(rows)})

    def _filtered(
        self, request: Request, select: Callable[[dict[str, list[str]]], list[Json]]
    ) -> tuple[list[Json], dict[str, list[str]]]:
        """``select``'s rows in feed order, and its validation errors; the same filter at the same
        version (an offset scan's next page) reuses the rows it found and ordered."""
        key = (request.path, *sorted((k, tuple(request.args.getlist(k))) for k in request.args if k not in _PAGING))
        kept = self._ordered.get(key)
        if kept is not None and kept[0] == self._version:
            return kept[1], {}
        errors: dict[str, list[str]] = {}
        rows = _in_feed_order(select(errors))
        if not errors:
            self._ordered = {k: v for k, v in self._ordered.items() if v[0] == self._version} | {
                key: (self._version, rows)
            }
        return rows, errors

    def _changed_since(self, request: Request, rows: Iterable[Json], errors: dict[str, list[str]]) -> list[Json]:
        after = self._int_arg(request, "updatedAtAfter", errors)
        return [r for r in rows if after is None or r["updatedAt"] > after]

    # --- handlers (called under the lock) -----------------------------------------------------

    def _list_appointments(self, request: Request) -> Response:
        def select(errors: dict[str, list[str]]) -> list[Json]:
            rows = self._changed_since(request, self._appointments.values(), errors)
            if status := request.args.get("status"):
                wanted = {s.strip() for s in status.split(",") if s.strip()}
                if unknown := sorted(wanted - set(STATUSES)):
                    errors["status"] = [f"unknown status: {', '.join(unknown)}"]
                rows = [r for r in rows if r["status"] in wanted]
            for param in ("clientId", "userId", "clinicId"):
                value = self._int_arg(request, param, errors)
                if value is not None:
                    rows = [r for r in rows if r[param] == value]
            return rows

        rows, errors = self._filtered(request, select)
        return self._page(request, rows, errors, ordered=True)

    def _get_appointment(self, request: Request, item_id: int) -> Response:
        row = self._appointments.get(item_id)
        return _json(dict(row)) if row else _json({"error": "appointment not found"}, 404)

    def _list_clients(self, request: Request) -> Response:
        def select(errors: dict[str, list[str]]) -> list[Json]:
            rows = self._changed_since(request, self._clients.values(), errors)
            phone = request.args.get("phone")
            if phone is not None:
                wanted = phone_digits(phone)
                if not wanted:
                    errors["phone"] = ["must contain digits"]
                rows = [r for r in rows if r["phone"] and phone_digits(r["phone"]) == wanted]
            return rows

        rows, errors = self._filtered(request, select)
        return self._page(request, rows, errors, ordered=True)

    def _get_client(self, request: Request, item_id: int) -> Response:
        row = self._clients.get(item_id)
        return _json(dict(row)) if row else _json({"error": "client not found"}, 404)

    def _update_client(self, request: Request, item_id: int) -> Response:
        """Update a client's fields (public clients send partial bodies with deny* flags); the answer
        is ``{"data": [client]}`` like the create call's. The HTTP verb is inferred (PUT and PATCH)."""
        row = self._clients.get(item_id)
        if row is None:
            return _json({"error": "client not found"}, 404)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not body:
            raise _ValidationError({"base": ["body must be a JSON object"]})
        errors = {k: ["is not a client field"] for k in body if k not in CLIENT_FIELDS - {"archived"}}
        errors |= {k: ["must be true or false"] for k in body if k in DENY_FLAGS and not isinstance(body[k], bool)}
        if errors:
            raise _ValidationError(errors)
        row.update(body)
        self._touch(row)
        return _json({"data": [dict(row)]})

    def _list_users(self, request: Request) -> Response:
        group = request.args.get("userGroup")
        rows = [u for u in self._users if group is None or u["userGroup"] == group]
        return self._page(request, rows, {})

    def _list_clinics(self, request: Request) -> Response:
        return self._page(request, list(self._clinics), {})

    # --- state inspection and mutation (tests and demos) --------------------------------------

    def appointment(self, appt_id: int) -> Json:
        with self._lock:
            return dict(self._appointments[appt_id])

    def client(self, client_id: int) -> Json:
        with self._lock:
            return dict(self._clients[client_id])

    def all_appointments(self) -> list[Json]:
        with self._lock:
            return [dict(row) for row in self._appointments.values()]

    def all_clients(self) -> list[Json]:
        with self._lock:
            return [dict(row) for row in self._clients.values()]

    def _touch(self, row: Json) -> None:
        # Whole seconds like the real API, yet strictly increasing per record even on a frozen clock.
        row["updatedAt"] = max(int(self.clock.now()), row["updatedAt"] + 1)
        self._version += 1

    def book(
        self,
        client_id: int,
        doctor_id: int,
        branch_id: int,
        start: datetime,
        *,
        duration: int = 30,
        status: str = "approved",
        price: str = "2500.00",
        insurance_policy: str | None = None,
        anonymous: bool = False,
        appointment_type_id: int = 1,
        appointment_source_id: int = 1,
    ) -> int:
        """Create an appointment as the front desk would; returns its id."""
        self._check_status(status)
        with self._lock:
            if client_id not in self._clients:
                raise KeyError(f"unknown client {client_id}")
            if doctor_id not in {u["id"] for u in self._users}:
                raise KeyError(f"unknown doctor {doctor_id}")
            if branch_id not in {c["id"] for c in self._clinics}:
                raise KeyError(f"unknown branch {branch_id}")
            appt_id = self._next_appointment_id
            self._next_appointment_id += 1
            self._version += 1
            local = _local(start)
            now = int(self.clock.now())
            self._appointments[appt_id] = {
                "id": appt_id,
                "clientId": client_id,
                "userId": doctor_id,
                "clinicId": branch_id,
                "date": local.date().isoformat(),
                "time": local.strftime("%H:%M"),
                "duration": duration,
                "status": status,
                "appointmentTypeId": appointment_type_id,
                "appointmentSourceId": appointment_source_id,
                "price": "0.00" if insurance_policy else price,
                "insurancePolicyNumber": insurance_policy,
                "anonymous": anonymous,
                "createdAt": now,
                "updatedAt": now,
                "deletedAt": None,
            }
            return appt_id

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown MEDODS status {status!r}")

    def set_status(self, appt_id: int, status: str) -> None:
        self._check_status(status)
        with self._lock:
            row = self._appointments[appt_id]
            row["status"] = status
            self._touch(row)

    def confirm(self, appt_id: int) -> None:
        self.set_status(appt_id, "confirmed_by_administrator")

    def arrive(self, appt_id: int) -> None:
        self.set_status(appt_id, "arrived")

    def complete(self, appt_id: int) -> None:
        self.set_status(appt_id, "serviced")

    def bill(self, appt_id: int) -> None:
        self.set_status(appt_id, "billed")

    def pay(self, appt_id: int) -> None:
        self.set_status(appt_id, "paid")

    def cancel(self, appt_id: int) -> None:
        self.set_status(appt_id, "canceled")

    def no_show(self, appt_id: int) -> None:
        self.set_status(appt_id, "failed")

    def reschedule(self, appt_id: int, new_start: datetime, duration: int | None = None) -> None:
        """Same id, new date/time; the booking goes back to plain ``approved``."""
        with self._lock:
            row = self._appointments[appt_id]
            local = _local(new_start)
            row["date"], row["time"] = local.date().isoformat(), local.strftime("%H:%M")
            if duration is not None:
                row["duration"] = duration
            row["status"] = "approved"
            self._touch(row)

    def delete_appointment(self, appt_id: int) -> None:
        """Soft delete: the row stays in the feed with ``deletedAt`` set."""
        with self._lock:
            row = self._appointments[appt_id]
            row["deletedAt"] = int(self.clock.now())
            self._touch(row)

    def update_client(self, client_id: int, **fields: Any) -> None:
        """Change client fields, named as in the API JSON (``phone``, ``denyCalls``, ...)."""
        if unknown := set(fields) - CLIENT_FIELDS:
            raise TypeError(f"unknown client fields: {sorted(unknown)}")
        if isinstance(fields.get("birthdate"), date):
            fields["birthdate"] = fields["birthdate"].isoformat()
        with self._lock:
            row = self._clients[client_id]
            row.update(fields)
            self._touch(row)

    def archive_client(self, client_id: int) -> None:
        self.update_client(client_id, archived=True)

    def add_client(
        self,
        surname: str,
        name: str,
        *,
        second_name: str | None = None,
        sex: str = "female",
        birthdate: date | None = None,
        phone: str | None = None,
        email: str | None = None,
        **flags: bool,
    ) -> int:
        """Register a new client; ``flags`` are deny* fields in API spelling (``denyCalls=True``)."""
        if unknown := set(flags) - set(DENY_FLAGS):
            raise TypeError(f"unknown client flags: {sorted(unknown)}")
        with self._lock:
            client_id = self._next_client_id
            self._next_client_id += 1
            self._version += 1
            now = int(self.clock.now())
            self._clients[client_id] = {
                "id": client_id,
                "name": name,
                "surname": surname,
                "secondName": second_name,
                "sex": sex,
                "birthdate": (birthdate or date(1990, 1, 1)).isoformat(),
                "phone": phone,
                "email": email,
                **{flag: bool(flags.get(flag, False)) for flag in DENY_FLAGS},
                "archived": False,
                "createdAt": now,
                "updatedAt": now,
            }
            return client_id

    def at(self, day_offset: int, hh_mm: str) -> datetime:
        """Convenience: a clinic-local datetime ``day_offset`` days from the clock's today."""
        hours, minutes = (int(x) for x in hh_mm.split(":"))
        today = datetime.fromtimestamp(self.clock.now(), CLINIC_TZ).date()
        return datetime.combine(today + timedelta(days=day_offset), time(hours, minutes), CLINIC_TZ)
