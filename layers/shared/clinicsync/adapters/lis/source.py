"""A lab's LIS as a source: its registers of referring doctors and of funds/clinics (case A).

The LIS sits behind the ``MisSource`` port like every MIS (``kind = "lis"``), so the poller, the config and
the consent outputs treat it as the clinic's MIS. Its patient feed is empty: in the lab case nothing about
patients goes to the CRM; what syncs is the directory (``DirectorySource``), two-way with vTiger.

Contract (see sandbox/emulators/lis.py): ``GET /api/v1/{doctors|organisations}?updated_since=&limit=&offset=``
(inclusive, ordered by ``(updated_at, id)``, answering ``{items, total}``), ``GET``/``PATCH
/api/v1/{kind}/{id}``, ``X-Api-Key`` header. The MIS secret holds ``api_key``. Records are validated with
pydantic; one that cannot be read is counted in ``rejected`` (by id, never its content) and skipped, so one bad
row never blocks the register.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.adapters.lis.position import ReadPosition, whole_number
from clinicsync.domain.directory_records import DirectoryPage, DirectoryRecord, Kind, normalise, parse_directory_key
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync.observability import logger
from clinicsync.retrying import exponential

PATHS: dict[Kind, str] = {"doctor": "doctors", "organisation": "organisations"}
LIS_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")
OPT_OUT_CHANNELS = frozenset({"email", "marketing"})


class LisError(Exception):
    """A LIS call failed; carries the status and the LIS's error code, never a record's content."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"LIS HTTP {status}: {code}")
        self.status = status
        self.code = code


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=LIS_ID.pattern)
    region: str | None = Field(default=None, max_length=128)
    city: str | None = Field(default=None, max_length=128)
    phone: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=254)
    do_not_send_marketing: bool = False
    updated_at: int = Field(ge=0)


class DoctorRow(_Row):
    first_name: str | None = Field(default=None, max_length=128)
    last_name: str | None = Field(default=None, max_length=128)
    specialty: str | None = Field(default=None, max_length=128)
    organisation_id: str | None = Field(default=None, pattern=LIS_ID.pattern)


class OrganisationRow(_Row):
    name: str = Field(min_length=1, max_length=255)
    type: Literal["fund", "clinic"]


# Canonical directory field -> LIS field.
LIS_FIELDS: dict[Kind, dict[str, str]] = {
    "doctor": {n: n for n in ("first_name", "last_name", "specialty", "region", "city", "phone", "email")},
    "organisation": {
        "name": "name",
        "org_type": "type",
        "region": "region",
        "city": "city",
        "phone": "phone",
        "email": "email",
    },
}


class LisApi:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        http: httpx.Client,
        sleep: Callable[[float], None] = time.sleep,
        attempts: int = 3,
    ) -> None:
        self._root = base_url.rstrip("/")
        self._headers = {"X-Api-Key": api_key, "Accept": "application/json"}
        self._http = http
        self._sleep = sleep
        self._attempts = attempts
        self.requests = 0

    @classmethod
    def from_secret(cls, base_url: str, secret: Mapping[str, Any], http: httpx.Client) -> LisApi:
        return cls(base_url, str(secret["api_key"]), http)

    def call(self, method: str, path: str, params: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        """JSON answer; 429/5xx and transport errors retried (PATCH writes absolute values: safe to repeat)."""

        def send() -> httpx.Response:
            self.requests += 1
            return self._http.request(method, self._root + path, params=params, json=body, headers=self._headers)

        return send_with_retries(
            send,
            _read,
            vendor="lis",
            attempts=self._attempts,
            wait=exponential(0.5, cap=4.0),
            sleep=self._sleep,
            exhausted=lambda _: LisError(503, "retries_exhausted"),
            wait_after_last=True,
        )


def _read(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            code = str(response.json().get("error", "error"))[:64]
        except ValueError:
            code = "error"
        raise LisError(response.status_code, code)
    try:
        return response.json()
    except ValueError as exc:
        raise LisError(response.status_code, "not_json") from exc


def to_record(kind: Kind, raw: Any, region: str) -> DirectoryRecord:
    row: DoctorRow | OrganisationRow = (DoctorRow if kind == "doctor" else OrganisationRow).model_validate(raw)
    data = row.model_dump()
    fields = {name: normalise(name, data.get(lis_name), region) for name, lis_name in LIS_FIELDS[kind].items()}
    return DirectoryRecord(
        kind=kind,
        lis_id=row.id,
        fields=fields,
        organisation_id=row.organisation_id if isinstance(row, DoctorRow) else None,
        do_not_mail=row.do_not_send_marketing,
        version=row.updated_at,
    )


class LisSource:
    """``MisSource`` (empty patient feed), ``DirectorySource`` and ``MisConsentWriter`` for the LIS."""

    kind = "lis"
    writable_channels = OPT_OUT_CHANNELS

    def __init__(self, api: LisApi, region: str = "BG", page_size: int = 100, overlap_seconds: int = 0) -> None:
        self._api = api
        self._region = region
        self._page = max(2, page_size)  # each page after a pass's first asks for the last row read again
        self._overlap = overlap_seconds

    # --- MisSource: the lab case sends no patients to the CRM -----------------------------------------

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        return ChangePage(changes=(), cursor=dict(cursor or {}))

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:  # noqa: ARG002
        return {}

    def acknowledge(self, page: ChangePage) -> None:  # noqa: ARG002
        return None

    # --- DirectorySource ------------------------------------------------------------------------------

    def changed(self, kind: Kind, cursor: Cursor | None) -> DirectoryPage:
        """One page of the rows updated since the cursor, without the ones it has read unchanged (see
        ``position``: a same-second re-edit is news, and a page boundary never skips a row)."""
        position = ReadPosition.load(cursor)
        asked = position.request(self._overlap)
        items, total = self._list(kind, asked)
        if not position.continues(items, total):
            position.restart_group()  # rows left or joined the second being paged: read it again
            asked = position.request(self._overlap)
            items, total = self._list(kind, asked)
        records, rejected = [], 0
        for raw, news in zip(items, position.read(items, total, asked), strict=True):
            if not news:
                continue  # read unchanged already (a bad row is reported once per change, too)
            try:
                records.append(to_record(kind, raw, self._region))
            except ValidationError:
                rejected += 1
                rid = raw.get("id") if isinstance(raw, dict) else None
                logger.warning("lis record rejected", extra={"kind": kind, "lis_id": str(rid)[:16]})
        more = len(items) == self._page
        return DirectoryPage(records, position.dump(more), more, rejected)

    def _list(self, kind: Kind, asked: tuple[int, int]) -> tuple[list[Any], int | None]:
        """A page of the register and its ``total`` (None when the answer has none)."""
        since, offset = asked
        params = {"updated_since": since, "limit": self._page, "offset": offset}
        body = self._api.call("GET", f"/api/v1/{PATHS[kind]}", params=params)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise LisError(200, "bad_page")
        return items, whole_number(body.get("total"))

    def get(self, kind: Kind, lis_ids: Sequence[str]) -> dict[str, DirectoryRecord]:
        found: dict[str, DirectoryRecord] = {}
        for lis_id in dict.fromkeys(lis_ids):
            if not LIS_ID.fullmatch(lis_id):
                continue  # a CRM user typed something that cannot be a LIS id
            try:
                found[lis_id] = to_record(kind, self._api.call("GET", f"/api/v1/{PATHS[kind]}/{lis_id}"), self._region)
            except LisError as exc:
                if exc.status != 404:
                    raise
            except ValidationError:
                logger.warning("lis record rejected", extra={"kind": kind, "lis_id": lis_id})
        return found

    def update(self, kind: Kind, lis_id: str, fields: Mapping[str, str | None]) -> None:
        body = {LIS_FIELDS[kind][name]: value for name, value in fields.items()}
        self._api.call("PATCH", f"/api/v1/{PATHS[kind]}/{lis_id}", body=body)

    # --- MisConsentWriter: "do not send marketing letters" ---------------------------------------------

    def write_opt_outs(self, patient_id: str, channels: Sequence[str], cleared: Sequence[str] = ()) -> None:
        key = parse_directory_key(patient_id)
        refuses = bool(OPT_OUT_CHANNELS & set(channels))  # one flag for them all: cleared only if none is refused
        if key is None or not (refuses or OPT_OUT_CHANNELS & set(cleared)):
            return
        kind, lis_id = key
        self._api.call("PATCH", f"/api/v1/{PATHS[kind]}/{lis_id}", body={"do_not_send_marketing": refuses})
