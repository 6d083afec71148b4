"""vTiger CRM webservice emulator (``/webservice.php``): the parts the lab's directory sync uses.

Behaviour reproduced (vTiger 7 "Third Party App Integration (REST APIs)"; confidence notes in
docs/lis-vtiger.md):

* Every answer is HTTP 200 with ``{"success": true, "result": ...}`` or the error envelope
  ``{"success": false, "error": {"code": ..., "message": ...}}``.
* Login is two steps: ``GET operation=getchallenge&username=`` gives a token (single use here, expires),
  then ``POST operation=login`` with ``accessKey = md5(token + user's access key)`` gives ``sessionName``
  and ``userId``. Every other call carries ``sessionName``; an unknown or expired one answers
  ``INVALID_SESSIONID``.
* Ids are ``<module id>x<record id>``: Accounts ``11x``, Contacts ``12x``, Users ``19x``.
* ``query`` takes VTQL: ``SELECT * FROM <Module> [WHERE ...] [ORDER BY f] [LIMIT [offset,] n];`` and
  returns at most 100 rows, whatever the LIMIT asks; the trailing ``;`` is required.
* ``create`` (``elementType`` + JSON ``element``) checks mandatory fields; ``update`` takes the *full*
  record: fields left out are emptied, so a client must ``retrieve`` first. ``retrieve`` by id.
* The server stamps ``createdtime``/``modifiedtime`` (``YYYY-MM-DD HH:MM:SS``, UTC) and ``modifiedby``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock

Json = dict[str, Any]
MODULE_IDS = {"Accounts": "11", "Contacts": "12", "Users": "19"}
MANDATORY = {"Contacts": ("lastname", "assigned_user_id"), "Accounts": ("accountname", "assigned_user_id")}
SYSTEM_FIELDS = ("id", "createdtime", "modifiedtime", "modifiedby")
MAX_ROWS = 100
CHALLENGE_SECONDS = 300

_QUERY = re.compile(
    r"^\s*SELECT\s+(?P<cols>\*|[\w\s,]+?)\s+FROM\s+(?P<module>\w+)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?"
    r"(?:\s+ORDER\s+BY\s+(?P<order>\w+)(?:\s+(?P<dir>ASC|DESC))?)?"
    r"(?:\s+LIMIT\s+(?:(?P<offset>\d+)\s*,\s*)?(?P<limit>\d+))?\s*;\s*$",
    re.IGNORECASE | re.DOTALL,
)
_VALUE = r"'(?:[^'\\]|\\.)*'"
_COND = re.compile(
    rf"\s*(?P<field>\w+)\s*(?P<op>!=|>=|<=|=|>|<|\bLIKE\b|\bIN\b)\s*(?P<value>{_VALUE}|\(\s*{_VALUE}(?:\s*,\s*{_VALUE})*\s*\))\s*",
    re.IGNORECASE,
)


class _Fail(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def _parse_where(text: str) -> list[tuple[str, str, Any]]:
    conditions: list[tuple[str, str, Any]] = []
    rest = text
    while True:
        match = _COND.match(rest)
        if not match:
            raise _Fail("QUERY_SYNTAX_ERROR", "Syntax Error on line 1: token not expected")
        op = match["op"].upper()
        raw = match["value"]
        value: Any = [_unquote(v) for v in re.findall(_VALUE, raw)] if op == "IN" else _unquote(raw)
        conditions.append((match["field"], op, value))
        rest = rest[match.end() :]
        if not rest.strip():
            return conditions
        joiner = re.match(r"\s*AND\s+", rest, re.IGNORECASE)
        if not joiner:
            raise _Fail("QUERY_SYNTAX_ERROR", "Syntax Error on line 1: only AND is supported here")
        rest = rest[joiner.end() :]


def _matches(row: Json, conditions: list[tuple[str, str, Any]]) -> bool:
    for name, op, value in conditions:
        have = str(row.get(name) or "")
        ok = {
            "=": lambda h, v: h == v,
            "!=": lambda h, v: h != v,
            ">": lambda h, v: h > v,
            "<": lambda h, v: h < v,
            ">=": lambda h, v: h >= v,
            "<=": lambda h, v: h <= v,
            "LIKE": lambda h, v: re.fullmatch(re.escape(v).replace("%", ".*"), h, re.IGNORECASE) is not None,
            "IN": lambda h, v: h in v,
        }[op](have, value)
        if not ok:
            return False
    return True


class VtigerEmulator:
    def __init__(
        self,
        clock: Clock | None = None,
        session_seconds: float = 3600.0,
        custom_fields: Iterable[str] = ("cf_lis_id", "cf_specialty", "cf_org_type"),
    ) -> None:
        self.clock = clock or Clock()
        self.session_seconds = session_seconds
        self._lock = threading.RLock()
        self._users: dict[str, Json] = {}
        self._challenges: dict[str, tuple[str, float]] = {}
        self._sessions: dict[str, tuple[str, float]] = {}
        self._records: dict[str, Json] = {}
        self._seq = itertools.count(100)
        self._custom = tuple(custom_fields)
        self._lost_creates = 0
        self._lost_updates = 0
        self.requests = 0
        self.writes = 0
        self.logins = 0
        self.admin_id = self.add_user("admin")["id"]

    # --- admin / test helpers ------------------------------------------------------------------------

    def add_user(self, username: str) -> Json:
        with self._lock:
            user = {"id": f"19x{len(self._users) + 1}", "user_name": username, "access_key": secrets.token_hex(8)}
            self._users[username] = user
            return dict(user)

    def expire_sessions(self) -> None:
        with self._lock:
            self._sessions.clear()

    def lose_next_create_response(self) -> None:
        """The next create is applied, but its answer never arrives (the connection drops)."""
        with self._lock:
            self._lost_creates += 1

    def lose_update_responses(self, count: int) -> None:
        """The next ``count`` updates are applied, but their answers never arrive (a 502 after they ran)."""
        with self._lock:
            self._lost_updates += count

    def records(self, module: str) -> list[Json]:
        prefix = MODULE_IDS[module] + "x"
        with self._lock:
            return [dict(r) for r in self._records.values() if r["id"].startswith(prefix)]

    def record(self, crm_id: str) -> Json | None:
        with self._lock:
            row = self._records.get(crm_id)
            return dict(row) if row else None

    def manager_create(self, module: str, **fields: Any) -> str:
        """A person in the vTiger UI creates a record (as the admin user, not our integration user)."""
        with self._lock:
            return str(self._create(module, {"assigned_user_id": self.admin_id, **fields}, self.admin_id)["id"])

    def manager_update(self, crm_id: str, as_user: str | None = None, **fields: Any) -> None:
        """A person in the vTiger UI edits a record, as the admin user or ``as_user`` (a user id: a manager
        logged in with the integration's own account)."""
        with self._lock:
            row = self._records[crm_id]
            row.update({k: "" if v is None else str(v) for k, v in fields.items()})
            self._stamp(row, as_user or self.admin_id)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "writes": self.writes, "throttled": 0, "logins": self.logins}

    # --- WSGI ---------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        with self._lock:
            self.requests += 1
            if request.path != "/webservice.php":
                response = Response("not found", status=404)
            else:
                try:
                    result = self._dispatch(request)
                    body: Json = {"success": True, "result": result}
                except _Fail as exc:
                    body = {"success": False, "error": {"code": exc.code, "message": exc.message}}
                except _LostResponse:
                    response = Response(b"", status=502)
                    return response(environ, start_response)
                response = Response(json.dumps(body, ensure_ascii=False), content_type="application/json")
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Any:
        params = request.form if request.method == "POST" else request.args
        operation = params.get("operation", "")
        if operation == "getchallenge" and request.method == "GET":
            return self._challenge(params.get("username", ""))
        if operation == "login" and request.method == "POST":
            return self._login(params.get("username", ""), params.get("accessKey", ""))
        user_id = self._session(params.get("sessionName", ""))
        if operation == "query" and request.method == "GET":
            return self._query(params.get("query", ""))
        if operation == "retrieve" and request.method == "GET":
            return self._retrieve(params.get("id", ""))
        if operation in ("create", "update") and request.method == "POST":
            element = self._element(params.get("element", ""))
            if operation == "create":
                module = params.get("elementType", "")
                if module not in MANDATORY:
                    raise _Fail("ACCESS_DENIED", "Permission to perform the operation is denied")
                self.writes += 1
                row = self._create(module, element, user_id)
                if self._lost_creates:
                    self._lost_creates -= 1
                    raise _LostResponse
                return row
            self.writes += 1
            updated = self._update(element, user_id)
            if self._lost_updates:
                self._lost_updates -= 1
                raise _LostResponse
            return updated
        if operation == "logout" and request.method == "POST":
            self._sessions.pop(params.get("sessionName", ""), None)
            return {"message": "successfull"}
        raise _Fail("UNKNOWN_OPERATION", f"Unknown operation requested: {operation[:32]}")

    # --- operations ------------------------------------------------------------------------------------

    def _challenge(self, username: str) -> Json:
        if username not in self._users:
            raise _Fail("INVALID_USERNAME", "Invalid username")
        token = secrets.token_hex(7)
        now = self.clock.now()
        self._challenges[token] = (username, now + CHALLENGE_SECONDS)
        return {"token": token, "serverTime": int(now), "expireTime": int(now + CHALLENGE_SECONDS)}

    def _login(self, username: str, access_key: str) -> Json:
        user = self._users.get(username)
        if user is None:
            raise _Fail("INVALID_USERNAME", "Invalid username")
        for token, (who, expires) in list(self._challenges.items()):
            if who != username:
                continue
            expected = hashlib.md5((token + user["access_key"]).encode(), usedforsecurity=False).hexdigest()
            if secrets.compare_digest(expected, access_key):
                del self._challenges[token]  # single use
                if expires < self.clock.now():
                    raise _Fail("INVALID_AUTH_TOKEN", "Specified token is invalid or expired")
                session = secrets.token_hex(12)
                self._sessions[session] = (user["id"], self.clock.now() + self.session_seconds)
                self.logins += 1
                return {"sessionName": session, "userId": user["id"], "version": "0.22", "vtigerVersion": "7.5.0"}
        raise _Fail("INVALID_USER_CREDENTIALS", "Invalid username or password")

    def _session(self, session: str) -> str:
        found = self._sessions.get(session)
        if found is None or found[1] < self.clock.now():
            self._sessions.pop(session, None)
            raise _Fail("INVALID_SESSIONID", "Session Identifier provided is Invalid")
        return found[0]

    def _query(self, text: str) -> list[Json]:
        match = _QUERY.match(text)
        if not match:
            raise _Fail("QUERY_SYNTAX_ERROR", "Syntax Error on line 1: token not expected")
        module = match["module"]
        if module not in MANDATORY:
            raise _Fail("ACCESS_DENIED", "Permission to perform the operation is denied")
        conditions = _parse_where(match["where"]) if match["where"] else []
        prefix = MODULE_IDS[module] + "x"
        rows = [r for r in self._records.values() if r["id"].startswith(prefix) and _matches(r, conditions)]
        if match["order"]:
            rows.sort(
                key=lambda r: (str(r.get(match["order"]) or ""), r["id"]),
                reverse=(match["dir"] or "").upper() == "DESC",
            )
        offset = int(match["offset"] or 0)
        limit = min(int(match["limit"]) if match["limit"] else MAX_ROWS, MAX_ROWS)
        page = rows[offset : offset + limit]
        cols = match["cols"].strip()
        if cols != "*":
            wanted = [c.strip() for c in cols.split(",")]
            return [{c: r.get(c, "") for c in (*wanted, "id")} for r in page]
        return [dict(r) for r in page]

    def _retrieve(self, crm_id: str) -> Json:
        row = self._records.get(self._check_id(crm_id))
        if row is None:
            raise _Fail("RECORD_NOT_FOUND", "Record you are trying to access is not found")
        return dict(row)

    def _element(self, raw: str) -> Json:
        try:
            element = json.loads(raw)
        except ValueError as exc:
            raise _Fail("INVALID_PARAMETER", "element is not valid JSON") from exc
        if not isinstance(element, dict):
            raise _Fail("INVALID_PARAMETER", "element must be an object")
        return {str(k): "" if v is None else str(v) for k, v in element.items()}

    def _check_id(self, crm_id: str) -> str:
        if not re.fullmatch(r"\d+x\d+", crm_id):
            raise _Fail("INVALID_ID_ATTRIBUTE", "Id specified is incorrect")
        return crm_id

    def _fields(self, module: str) -> tuple[str, ...]:
        base = {
            "Contacts": ("firstname", "lastname", "email", "mobile", "mailingcity", "mailingstate", "account_id"),
            "Accounts": ("accountname", "email1", "phone", "bill_city", "bill_state"),
        }[module]
        return (*base, "emailoptout", "assigned_user_id", *self._custom)

    def _create(self, module: str, element: Json, user_id: str) -> Json:
        missing = [f for f in MANDATORY[module] if not element.get(f)]
        if missing:
            raise _Fail("MANDATORY_FIELDS_MISSING", f"{missing[0]} does not have a value")
        self._check_references(element)
        crm_id = f"{MODULE_IDS[module]}x{next(self._seq)}"
        row: Json = dict.fromkeys(self._fields(module), "")
        row.update({k: v for k, v in element.items() if k in row})
        row["id"] = crm_id
        row["createdtime"] = self._now()
        self._stamp(row, user_id)
        self._records[crm_id] = row
        return dict(row)

    def _update(self, element: Json, user_id: str) -> Json:
        crm_id = self._check_id(element.get("id", ""))
        old = self._records.get(crm_id)
        if old is None:
            raise _Fail("RECORD_NOT_FOUND", "Record you are trying to access is not found")
        module = next(m for m, p in MODULE_IDS.items() if crm_id.startswith(p + "x"))
        missing = [f for f in MANDATORY[module] if not element.get(f)]
        if missing:
            raise _Fail("MANDATORY_FIELDS_MISSING", f"{missing[0]} does not have a value")
        self._check_references(element)
        # The full record replaces the old one: a field left out is emptied (why clients retrieve first).
        row: Json = {f: element.get(f, "") for f in self._fields(module)}
        row.update({"id": crm_id, "createdtime": old["createdtime"]})
        self._stamp(row, user_id)
        self._records[crm_id] = row
        return dict(row)

    def _check_references(self, element: Json) -> None:
        account = element.get("account_id")
        if account and account not in self._records:
            raise _Fail("INVALID_ID_ATTRIBUTE", "account_id does not name a record")
        user = element.get("assigned_user_id")
        if user and user not in {u["id"] for u in self._users.values()}:
            raise _Fail("INVALID_ID_ATTRIBUTE", "assigned_user_id does not name a user")

    def _now(self) -> str:
        return datetime.fromtimestamp(self.clock.now(), UTC).strftime("%Y-%m-%d %H:%M:%S")

    def _stamp(self, row: Json, user_id: str) -> None:
        row["modifiedtime"] = self._now()
        row["modifiedby"] = user_id


class _LostResponse(Exception):
    pass
