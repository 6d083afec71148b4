"""vTiger CRM webservice (``/webservice.php``) for the lab's directory: Contacts (doctors) and Accounts
(funds/clinics). It only translates; the rule is in ``clinicsync.application.directory``.

Facts relied on (looked up; confidence in docs/lis-vtiger.md):

* login is ``GET operation=getchallenge&username=`` then ``POST operation=login`` with
  ``accessKey = md5(token + access key)``; the answer's ``sessionName`` goes with every later call and
  ``userId`` (``19xN``) is the user our writes are stamped with (``modifiedby``);
* answers are ``{"success": true, "result": ...}`` or ``{"success": false, "error": {"code", "message"}}``;
  an expired session answers ``INVALID_SESSIONID``: we log in again, once, and repeat the call;
* ``query`` takes VTQL ending in ``;`` and returns at most 100 rows: we page with ``LIMIT offset,100``;
* ``update`` replaces the whole record (fields left out are emptied), so we ``retrieve`` then ``update``;
* ids are ``NxM`` (Accounts ``11x``, Contacts ``12x``); custom fields are ``cf_NNN`` (names in the config).

vTiger has no webhooks: changes are read by polling ``modifiedtime`` (at or after the cursor; re-reading
the cursor's second is harmless), and rows last modified by our own user are dropped (echoes).
Requests are paced (the config's budget, 5/s by default) and one at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from clinicsync.adapters.aws.budget import RequestPacer
from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.domain.config import DirectorySettings
from clinicsync.domain.directory_records import CrmRecord, CrmWriteSpec, Kind, normalise
from clinicsync.observability import logger
from clinicsync.retrying import exponential

MODULES: dict[Kind, str] = {"doctor": "Contacts", "organisation": "Accounts"}
PAGE_ROWS = 100  # vTiger's ceiling per query
SESSION_ERRORS = frozenset({"INVALID_SESSIONID", "SESSION_EXPIRED", "AUTHENTICATION_REQUIRED"})
_MODIFIED = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")  # only such stamps become the cursor
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.: -]{0,64}$")


class VtigerError(Exception):
    """vTiger's error envelope (code and message) or a transport failure; never carries record content."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"vTiger {code}: {message[:120]}")
        self.code = code


def _read(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError as exc:
        raise VtigerError("NOT_JSON", f"HTTP {response.status_code}") from exc
    if not isinstance(body, dict) or "success" not in body:
        raise VtigerError("BAD_ENVELOPE", f"HTTP {response.status_code}")
    if body["success"] is True:
        return body.get("result")
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    raise VtigerError(str(error.get("code", "UNKNOWN"))[:64], str(error.get("message", "")))


def quote(value: str) -> str:
    """A VTQL string literal for our own values (ids, timestamps): anything else is refused, not escaped."""
    if not _SAFE_VALUE.fullmatch(value):
        raise ValueError("value not allowed in a VTQL literal")
    return f"'{value}'"


class VtigerClient:
    def __init__(
        self,
        base_url: str,
        username: str,
        access_key: str,
        http: httpx.Client,
        pacer: RequestPacer | None = None,
        sleep: Callable[[float], None] = time.sleep,
        attempts: int = 3,
    ) -> None:
        self._url = base_url.rstrip("/") + "/webservice.php"
        self._username = username
        self._access_key = access_key
        self._http = http
        self._pacer = pacer
        self._sleep = sleep
        self._attempts = attempts
        self._session: str | None = None
        self._user_id: str | None = None
        self.requests = 0
        self.logins = 0

    @property
    def user_id(self) -> str:
        if self._user_id is None:
            self.login()
        return str(self._user_id)

    def _send(self, method: str, params: Mapping[str, str], retry_transport: bool) -> Any:
        attempts = self._attempts if retry_transport else 1

        def send() -> httpx.Response:
            if self._pacer is not None:
                self._pacer.wait()
            self.requests += 1
            if method == "GET":
                return self._http.get(self._url, params=dict(params))
            return self._http.post(self._url, data=dict(params))

        return send_with_retries(
            send,
            _read,
            vendor="vtiger",
            attempts=attempts,
            wait=exponential(0.5, cap=4.0),
            sleep=self._sleep,
            # The last failure (the only one for a write) says what failed: a transport error or a status.
            exhausted=lambda reason: VtigerError("UNAVAILABLE", reason),
        )

    def login(self) -> None:
        challenge = self._send("GET", {"operation": "getchallenge", "username": self._username}, True)
        if not isinstance(challenge, dict) or not isinstance(challenge.get("token"), str):
            raise VtigerError("BAD_RESULT", "getchallenge gave no token")
        key = hashlib.md5((challenge["token"] + self._access_key).encode(), usedforsecurity=False).hexdigest()
        result = self._send("POST", {"operation": "login", "username": self._username, "accessKey": key}, True)
        # Some forks name the session ``sessionId``.
        session = result.get("sessionName") or result.get("sessionId") if isinstance(result, dict) else None
        if not isinstance(session, str) or not session or not isinstance(result.get("userId"), str):
            raise VtigerError("BAD_RESULT", "login gave no session")
        self._session = session
        self._user_id = str(result["userId"])
        self.logins += 1

    def call(self, method: str, operation: str, params: Mapping[str, str], retry_transport: bool = True) -> Any:
        """One operation under our session; an expired session is renewed once and the call repeated."""
        if self._session is None:
            self.login()
        for renewed in (False, True):
            try:
                return self._send(
                    method, {"operation": operation, "sessionName": str(self._session), **params}, retry_transport
                )
            except VtigerError as exc:
                if exc.code not in SESSION_ERRORS or renewed:
                    raise
                logger.info("vtiger session expired; logging in again")
                self.login()
        raise AssertionError("unreachable")

    def query_all(self, select: str, max_pages: int = 50) -> list[dict[str, Any]]:
        """``select`` without LIMIT and ``;``: every page of 100 rows (at most ``max_pages``)."""
        rows: list[dict[str, Any]] = []
        for page in range(max_pages):
            batch = self.call("GET", "query", {"query": f"{select} LIMIT {page * PAGE_ROWS},{PAGE_ROWS};"})
            if not isinstance(batch, list):
                raise VtigerError("BAD_RESULT", "query result is not a list")
            rows.extend(r for r in batch if isinstance(r, dict))
            if len(batch) < PAGE_ROWS:
                break
        return rows

    def retrieve(self, crm_id: str) -> dict[str, Any]:
        result = self.call("GET", "retrieve", {"id": crm_id})
        if not isinstance(result, dict):
            raise VtigerError("BAD_RESULT", "retrieve result is not an object")
        return result

    def create(self, module: str, element: Mapping[str, Any]) -> dict[str, Any]:
        # Not repeated on a transport error: the directory sync looks the record up by LIS id next run.
        params = {"elementType": module, "element": json.dumps(dict(element), ensure_ascii=False)}
        result = self.call("POST", "create", params, retry_transport=False)
        if not isinstance(result, dict) or "id" not in result:
            raise VtigerError("BAD_RESULT", "create result has no id")
        return result

    def update(self, element: Mapping[str, Any]) -> dict[str, Any]:
        result = self.call("POST", "update", {"element": json.dumps(dict(element), ensure_ascii=False)})
        if not isinstance(result, dict):
            raise VtigerError("BAD_RESULT", "update result is not an object")
        return result


class VtigerDirectory:
    """``DirectoryCrm`` over vTiger: canonical directory fields <-> Contacts/Accounts fields."""

    def __init__(self, client: VtigerClient, settings: DirectorySettings, region: str, max_pages: int = 50) -> None:
        self._client = client
        self._region = region
        self._max_pages = max_pages
        cf = settings.vtiger_fields
        self._lis_field = cf.get("lis_id", "cf_lis_id")
        self._fields: dict[Kind, dict[str, str]] = {
            "doctor": {
                "first_name": "firstname",
                "last_name": "lastname",
                "specialty": cf.get("specialty", "cf_specialty"),
                "region": "mailingstate",
                "city": "mailingcity",
                "phone": "mobile",
                "email": "email",
            },
            "organisation": {
                "name": "accountname",
                "org_type": cf.get("org_type", "cf_org_type"),
                "region": "bill_state",
                "city": "bill_city",
                "phone": "phone",
                "email": "email1",
            },
        }

    def _record(self, kind: Kind, row: Mapping[str, Any]) -> CrmRecord:
        fields: dict[str, str | None] = {}
        invalid: set[str] = set()
        for name, vt in self._fields[kind].items():
            raw = row.get(vt)
            value = normalise(name, raw, self._region)
            if value is None and raw is not None and str(raw).strip():
                invalid.add(name)  # e.g. a phone that is not a number: never taken into the LIS
            fields[name] = value
        lis_id = str(row.get(self._lis_field) or "").strip() or None
        return CrmRecord(
            kind=kind,
            crm_id=str(row["id"]),
            lis_id=lis_id,
            fields=fields,
            do_not_mail=str(row.get("emailoptout", "0")) in ("1", "true", "on"),
            account_id=str(row.get("account_id") or "") or None,
            modified=str(row.get("modifiedtime") or ""),
            invalid=frozenset(invalid),
        )

    def changed_since(self, kind: Kind, since: str | None) -> tuple[list[CrmRecord], str | None]:
        where = f" WHERE modifiedtime >= {quote(since)}" if since else ""
        select = f"SELECT * FROM {MODULES[kind]}{where} ORDER BY modifiedtime"  # noqa: S608 - quote() checks values
        rows = self._client.query_all(select, self._max_pages)
        stamps = (str(r.get("modifiedtime") or "") for r in rows)
        newest = max((t for t in stamps if _MODIFIED.fullmatch(t)), default="") or since
        # Every row, ours too: the directory sync tells our echoes by content (``is_echo``), because a manager
        # may work in vTiger under the integration's own user.
        return [self._record(kind, r) for r in rows if r.get("id")], newest

    def find(self, kind: Kind, lis_ids: Sequence[str]) -> dict[str, CrmRecord]:
        found: dict[str, CrmRecord] = {}
        ids = [i for i in dict.fromkeys(lis_ids) if _SAFE_VALUE.fullmatch(i)]
        for start in range(0, len(ids), PAGE_ROWS):
            chunk = ", ".join(quote(i) for i in ids[start : start + PAGE_ROWS])
            select = f"SELECT * FROM {MODULES[kind]} WHERE {self._lis_field} IN ({chunk})"  # noqa: S608 - quoted
            for row in self._client.query_all(select, self._max_pages):
                if not row.get("id"):
                    continue
                record = self._record(kind, row)
                if record.lis_id and record.lis_id not in found:
                    found[record.lis_id] = record
        return found

    def write(self, spec: CrmWriteSpec) -> str:
        mapped = {vt: spec.fields.get(name) or "" for name, vt in self._fields[spec.kind].items()}
        mapped[self._lis_field] = spec.lis_id
        mapped["emailoptout"] = "1" if spec.do_not_mail else "0"
        if spec.kind == "doctor":
            mapped["account_id"] = spec.account_id or ""
            if not mapped["lastname"]:
                mapped["lastname"] = "-"  # vTiger requires it; the LIS may lack it
        elif not mapped["accountname"]:
            mapped["accountname"] = spec.lis_id
        if spec.crm_id is None:
            created = self._client.create(MODULES[spec.kind], {**mapped, "assigned_user_id": self._client.user_id})
            return str(created["id"])
        current = self._client.retrieve(spec.crm_id)  # update replaces the whole record: start from it
        self._client.update({**current, **mapped, "id": spec.crm_id})
        return spec.crm_id
