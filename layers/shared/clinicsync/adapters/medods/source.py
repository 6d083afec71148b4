"""MEDODS API v2 as a ``MisSource``: an updated-since cursor feed with offset paging and HS512 JWTs.

Offset paging over a set that changes while we read it can skip or repeat rows, so every poll
re-reads ``overlap_seconds`` of history and drops the rows it has already sent. A row counts as sent
when its id, ``updatedAt`` and content all match: ``updatedAt`` has one-second resolution, and two
edits in the same second must not look like one. With no stored cursor (a new stack) the feed reads every
record, unless ``mis.first_poll_days`` bounds it (as IDENT's connector's ``first_sync_days`` does).

A visit whose client did not change needs the client's card, read one at a time (``GET /clients/{id}``);
a warm container reuses the cards it has read while the clients feed vouches for them (``cards.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import httpx
import jwt
from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints, ValidationError

from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.adapters.medods.cards import MedodsCards
from clinicsync.adapters.row_digest import row_digest
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.dates import parse_mis_datetime
from clinicsync.domain.emails import normalise_email
from clinicsync.domain.models import Appointment, Consent, Patient, PatientChanges
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync.domain.statuses import UnknownStatus, canonical_status
from clinicsync.observability import logger
from clinicsync.retrying import exponential

JWT_LIFETIME = 60
JWT_BACKDATE = 10  # MIS clocks drift; an iat slightly in the past is accepted, one in the future is not


def _sent_marker(updated_at: int, row: Any) -> str:
    """``updatedAt`` plus the row's digest (``row_digest``)."""
    return f"{updated_at}:{row_digest(row)}"


def _marker_time(marker: str) -> int:
    head = marker.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def _already_sent(row: Any, seen: dict[str, str]) -> bool:
    """An appointment row an earlier read sent, unchanged (same id, ``updatedAt`` and digest): it parsed
    then and is the same row now, so the overlap's re-read skips it before validating it again."""
    if not isinstance(row, dict):
        return False
    row_id, updated = row.get("id"), row.get("updatedAt")
    if type(updated) is not int or type(row_id) not in (int, str):
        return False  # the model coerces these: the full path decides
    marker = seen.get(f"a{row_id}")
    return marker is not None and _marker_time(marker) == updated and marker == _sent_marker(updated, row)


def _still_rereadable(seen: dict[str, str], marks: dict[str, int], overlap: int) -> dict[str, str]:
    """The rows the next read of their own feed can return again: each feed re-reads from its own mark
    minus the overlap. A floor shared by both feeds kept every appointment of a first import while the
    clients' mark waited at the window's start, until the cursor outgrew DynamoDB's 400 KB item."""
    floors = {kind[0]: mark - overlap for kind, mark in marks.items()}
    return {k: marker for k, marker in seen.items() if k[:1] in floors and _marker_time(marker) >= floors[k[:1]]}


def _id_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Ids become our MIS ids and URL path segments (/clients/{id}): only the MisId alphabet gets through.
MedodsId = Annotated[
    str, BeforeValidator(_id_text), StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]


class MedodsClient(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: MedodsId
    name: str | None = None
    surname: str | None = None
    secondName: str | None = None
    sex: str | int | None = None
    birthdate: str | None = None
    phone: str | None = None
    email: str | None = None
    denyCalls: bool = False
    denyEmail: bool = False
    denySmsNotifications: bool = False
    denySmsDispatches: bool = False
    denyWhatsappMessages: bool = False
    denyDataProcessing: bool = False
    archived: bool = False
    updatedAt: int = 0


class MedodsAppointment(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: MedodsId
    clientId: MedodsId
    userId: int | str | None = None
    clinicId: int | str | None = None
    date: str
    time: str
    duration: int = 30
    status: str
    price: str | None = None
    insurancePolicyNumber: str | None = None
    anonymous: bool = False
    updatedAt: int
    deletedAt: int | str | None = None


class MedodsError(Exception):
    pass


class MedodsApi:
    """HTTP access with a fresh short-lived JWT per request and retries on 429, 5xx and transport errors."""

    def __init__(
        self,
        base_url: str,
        identity_key: str,
        secret: str,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._iss = identity_key
        self._secret = secret
        self._http = http or httpx.Client(timeout=httpx.Timeout(20.0, connect=5.0))
        self._clock = clock
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.requests = 0

    def _token(self) -> str:
        now = int(self._clock())
        payload = {"iss": self._iss, "iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME}
        return jwt.encode(payload, self._secret, algorithm="HS512")

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = self._send("GET", path, params=params)
        if response.status_code != 200:
            raise MedodsError(f"GET {path}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:  # an HTML error page, a cut-off body, not UTF-8
            raise MedodsError(f"GET {path}: the answer is not JSON") from None

    def put(self, path: str, body: dict[str, Any]) -> Any:
        """An idempotent update (the same flags written twice change nothing), so it is retried too."""
        response = self._send("PUT", path, json=body)
        if response.status_code != 200:
            raise MedodsError(f"PUT {path}: HTTP {response.status_code}")
        return response.json()

    def _send(self, method: str, path: str, **request: Any) -> httpx.Response:
        """The first answer that is not 429 or 5xx; retried after those and transport errors (reads,
        idempotent writes)."""

        def send() -> httpx.Response:
            self.requests += 1
            headers = {"Authorization": f"Bearer {self._token()}"}  # a fresh JWT per attempt
            by_method = self._http.get if method == "GET" else self._http.put
            return by_method(self._base + path, headers=headers, **request)

        return send_with_retries(
            send,
            lambda response: response,
            vendor="medods",
            context={"path": path},
            attempts=self._max_attempts,
            wait=exponential(0.5, cap=8.0),
            sleep=self._sleep,
            exhausted=lambda _: MedodsError(f"{method} {path}: retries exhausted"),
            wait_after_last=True,
        )

    def pages(self, path: str, params: dict[str, Any], limit: int) -> Iterator[list[dict[str, Any]]]:
        offset = 0
        while True:
            body = self.get(path, {**params, "limit": limit, "offset": offset})
            rows = body.get("data", []) if isinstance(body, dict) else None
            if not isinstance(rows, list):
                raise MedodsError(f"GET {path}: the answer is not a page of records")
            yield rows
            if len(rows) < limit:
                return
            offset += limit


class MedodsSource:
    kind = "medods"

    def __init__(
        self,
        api: MedodsApi,
        config: ClinicConfig,
        max_records: int | None = None,
        cards: MedodsCards[MedodsClient] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._config = config
        self._max_records = max_records or config.mis.poll_page_records
        self._cards = cards  # None: every card a visit needs is read (GET) again
        self._clock = clock

    def acknowledge(self, page: ChangePage) -> None:
        """A cursor feed has nothing to confirm: the stored cursor is the acknowledgement."""

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        start = int(now) - window_seconds + self._config.mis.overlap_seconds
        return {"appointments": start, "clients": start, "seen": {}}

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        # Each feed keeps its own watermark, so a capped read of one never skips rows of the other.
        if not cursor and (days := self._config.mis.first_poll_days):
            # A clinic with years of history bounds its first poll: the rest is the backfill's window.
            cursor = self.resync_cursor(days * 86400, self._clock())
        state = dict(cursor or {})
        seen: dict[str, str] = {k: str(v) for k, v in dict(state.get("seen", {})).items()}
        marks: dict[str, int] = {kind: int(state.get(kind, 0)) for kind in ("appointments", "clients")}
        overlap = self._config.mis.overlap_seconds
        limit = self._config.mis.page_size

        appointments: list[MedodsAppointment] = []
        clients: dict[str, MedodsClient] = {}
        read: dict[str, MedodsClient] = {}  # every client row of this read, sent before or not
        unparsed = False  # a client row that did not parse: nobody can say whose card it was
        clients_since: int | None = None  # the whole clients feed was read from here, every row parsed
        rejected = 0
        more = False
        for kind in ("appointments", "clients"):
            if more:
                break  # the other feed resumes from its own watermark next time
            model: type[MedodsAppointment] | type[MedodsClient] = (
                MedodsAppointment if kind == "appointments" else MedodsClient
            )
            since = max(0, marks[kind] - overlap)
            for rows in self._api.pages(f"/{kind}", {"updatedAtAfter": since}, limit):
                for row in rows:
                    if kind == "appointments" and _already_sent(row, seen):
                        continue
                    try:
                        record = model.model_validate(row)
                    except ValidationError:
                        rejected += 1
                        unparsed = unparsed or kind == "clients"
                        continue
                    if isinstance(record, MedodsClient):
                        read[str(record.id)] = record
                    key = f"{kind[0]}{record.id}"
                    marker = _sent_marker(record.updatedAt, row)
                    if seen.get(key) == marker:
                        continue  # already sent by an earlier, overlapping read
                    seen[key] = marker
                    marks[kind] = max(marks[kind], record.updatedAt)
                    if isinstance(record, MedodsAppointment):
                        appointments.append(record)
                    else:
                        clients[str(record.id)] = record
                if len(appointments) + len(clients) >= self._max_records:
                    more = True
                    break
            else:
                clients_since = since if kind == "clients" and not unparsed else None

        unreadable = self._add_cards(appointments, clients, read, clients_since, marks["clients"])
        changes, more_rejected = self._changes(appointments, clients, unreadable)
        new_cursor = {**marks, "seen": _still_rereadable(seen, marks, overlap)}
        return ChangePage(changes=changes, cursor=new_cursor, more=more, rejected=rejected + more_rejected)

    def _add_cards(
        self,
        appointments: list[MedodsAppointment],
        clients: dict[str, MedodsClient],
        read: dict[str, MedodsClient],
        clients_since: int | None,
        mark: int,
    ) -> set[str]:
        """Into ``clients``, the cards of visits whose client did not change: the row this read returned
        (sent before), else a card the read vouches for, else ``GET /clients/{id}``; returns the unreadable."""
        wanted = {str(a.clientId) for a in appointments} - clients.keys()
        clients.update({client_id: read[client_id] for client_id in wanted & read.keys()})
        wanted -= read.keys()
        if self._cards is not None:
            if clients_since is None:
                self._cards.forget()
            else:
                clients.update(self._cards.vouched(clients_since, read, mark, wanted))
                wanted -= clients.keys()
        fetched, unreadable = self._fetch_cards(sorted(wanted))
        clients.update(fetched)
        if self._cards is not None:
            self._cards.keep(fetched, mark)
        return unreadable

    def _fetch_cards(self, client_ids: Sequence[str]) -> tuple[dict[str, MedodsClient], set[str]]:
        """Each card read (the API has no batch read); the ids of cards that cannot be read."""
        fetched: dict[str, MedodsClient] = {}
        unreadable: set[str] = set()
        for client_id in client_ids:
            body = self._api.get(f"/clients/{client_id}")
            try:
                fetched[client_id] = MedodsClient.model_validate(
                    body.get("data", body) if isinstance(body, dict) else {}
                )
            except ValidationError:
                unreadable.add(client_id)  # its visits are rejected; one bad card never blocks the feed
        return fetched, unreadable

    def _changes(
        self, appointments: list[MedodsAppointment], clients: dict[str, MedodsClient], unreadable: set[str]
    ) -> tuple[list[PatientChanges], int]:
        rejected = 0
        by_patient: dict[str, list[Appointment]] = {}
        for raw in appointments:
            try:
                appointment = self._appointment(raw)
            except (UnknownStatus, ValueError) as exc:
                rejected += 1
                logger.warning("appointment rejected", extra={"appointment_id": str(raw.id), "reason": str(exc)})
                continue
            by_patient.setdefault(appointment.patient_id, []).append(appointment)
        changes = []
        for pid, client in clients.items():
            visits = tuple(by_patient.get(pid, ()))
            try:
                patient = self._patient(client)
            except ValidationError as exc:
                rejected += 1 + len(visits)
                fields = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
                logger.warning("patient rejected", extra={"patient_id": pid, "fields": fields})
                continue
            if patient.mis_id != pid:
                rejected += 1 + len(visits)  # the card answered for another id than was asked
                continue
            changes.append(PatientChanges(patient=patient, appointments=visits))
        rejected += sum(len(by_patient.get(pid, ())) for pid in unreadable)
        return changes, rejected

    def _patient(self, raw: MedodsClient) -> Patient:
        sex = {"male": "m", "female": "f", "m": "m", "f": "f", "1": "m", "2": "f"}.get(str(raw.sex).lower())
        return Patient(
            mis_id=str(raw.id),
            last_name=raw.surname or "",
            first_name=raw.name or "",
            middle_name=raw.secondName or "",
            phone=normalise_phone(raw.phone, self._config.matching.default_region),
            email=normalise_email(raw.email),
            birth_date=raw.birthdate or None,
            sex=sex,
            consent=Consent(
                email_opt_out=raw.denyEmail,
                sms_opt_out=raw.denySmsNotifications or raw.denySmsDispatches,
                call_opt_out=raw.denyCalls,
                marketing_opt_out=raw.denySmsDispatches or raw.denyWhatsappMessages,
            ),
            refused_data_processing=raw.denyDataProcessing,
            archived=raw.archived,
            version=raw.updatedAt,
        )

    def _appointment(self, raw: MedodsAppointment) -> Appointment:
        status = canonical_status(self.kind, raw.status, self._config.mis.statuses)
        starts_at = parse_mis_datetime(f"{raw.date}T{raw.time}", self._config.tz)
        try:
            price = Decimal(raw.price) if raw.price not in (None, "") else None
        except InvalidOperation:
            price = None
        return Appointment(
            mis_id=str(raw.id),
            patient_id=str(raw.clientId),
            status=status,
            starts_at=starts_at,
            duration_min=raw.duration,
            doctor_id=str(raw.userId) if raw.userId is not None else None,
            branch_id=str(raw.clinicId) if raw.clinicId is not None else None,
            price=price,
            insurance_policy=raw.insurancePolicyNumber or None,
            anonymous=raw.anonymous,
            version=raw.updatedAt,
        )
