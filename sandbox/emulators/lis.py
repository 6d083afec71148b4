"""A lab's LIS (laboratory information system) emulator: the registers of referring doctors and of
funds/clinics that case A syncs (clinic_cases.md §A), as a small JSON API.

Shapes (the LIS-style contract clinicsync's adapter reads; a real LIS vendor's export is mapped onto it):

* ``GET /api/v1/{doctors|organisations}?updated_since=<unix>&limit=<1..200>&offset=<n>`` → ``{"items": [...],
  "total": n}``, ordered by ``(updated_at, id)``; ``updated_since`` is inclusive.
* ``GET /api/v1/{kind}/{id}`` → the record; ``PATCH /api/v1/{kind}/{id}`` with a JSON object of the writable
  fields (contact fields and ``do_not_send_marketing``) → the record; bumps ``updated_at``.
* ``X-Api-Key`` header; errors are ``{"error": code, "message": text}`` with 400/401/404.

Seeded deterministically with Bulgarian referring doctors (the lab case's setting): phones in national
formats, some without e-mail, a few already flagged "do not send marketing".
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock

Json = dict[str, Any]
KINDS = {"doctors": "doctor", "organisations": "organisation"}
WRITABLE = {
    "doctor": ("first_name", "last_name", "specialty", "region", "city", "phone", "email", "do_not_send_marketing"),
    "organisation": ("name", "type", "region", "city", "phone", "email", "do_not_send_marketing"),
}
_PLACES = (("София-град", "София"), ("Пловдив", "Пловдив"), ("Варна", "Варна"), ("Бургас", "Бургас"))
_SPECIALTIES = ("Акушер-гинеколог", "Общопрактикуващ лекар", "Кардиолог", "Ендокринолог", "Педиатър")
_FIRST = ("Иван", "Георги", "Мария", "Елена", "Димитър", "Петя", "Николай", "Анна", "Стефан", "Десислава")
_LAST = ("Димитров", "Иванов", "Георгиева", "Петрова", "Николов", "Стоянова", "Костов", "Тодорова")
_ORGS = (
    ("ЗОФ Медико-21", "fund"),
    ("ЗК Лев Инс", "fund"),
    ("МЦ Здраве", "clinic"),
    ("ДКЦ Света Анна", "clinic"),
    ("МБАЛ Св. Марина", "clinic"),
    ("ЗОК ДаллБогг", "fund"),
)
_LATIN = ("a", "b", "v", "g", "d", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p", "r", "s", "t", "u")
_LATIN += ("f", "h", "ts", "ch", "sh", "sht", "a", "y", "yu", "ya")
_TRANSLIT = dict(zip("абвгдежзийклмнопрстуфхцчшщъьюя", _LATIN, strict=True))


def _latin(text: str) -> str:
    return "".join(_TRANSLIT.get(c, c) for c in text.lower() if c.isalpha() or c in _TRANSLIT)


class _Fail(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class LisEmulator:
    def __init__(
        self, api_key: str | None = None, doctors: int = 24, seed: int = 11, clock: Clock | None = None
    ) -> None:
        self.api_key = api_key or secrets.token_hex(16)
        self.clock = clock or Clock()
        self._lock = threading.RLock()
        self._rows: dict[str, dict[str, Json]] = {"doctor": {}, "organisation": {}}
        self._seq = {"doctor": 1001, "organisation": 201}
        self.requests = 0
        self.writes = 0
        self._seed(random.Random(seed), doctors)

    # --- seed ---------------------------------------------------------------------------------------

    def _phone(self, rng: random.Random) -> str:
        digits = f"08{rng.choice('789')}{rng.randrange(10**7):07d}"
        style = rng.randrange(3)
        return (
            digits
            if style == 0
            else f"+359 {digits[1:3]} {digits[3:6]} {digits[6:]}"
            if style == 1
            else f"{digits[:4]} {digits[4:7]} {digits[7:]}"
        )

    def _seed(self, rng: random.Random, doctors: int) -> None:
        now = int(self.clock.now()) - 86400
        for i, (name, kind) in enumerate(_ORGS):
            region, city = _PLACES[i % len(_PLACES)]
            self.add_organisation(
                name=name, type=kind, region=region, city=city, phone=self._phone(rng),
                email=f"office{i}@{_latin(name.split()[-1]) or 'org'}.bg", updated_at=now,
            )  # fmt: skip
        org_ids = list(self._rows["organisation"])
        for i in range(doctors):
            region, city = rng.choice(_PLACES)
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            if first.endswith("а") and not last.endswith("а"):
                last += "а"
            email = f"{_latin(first)}.{_latin(last)}{i}@example.bg" if rng.random() < 0.8 else ""
            self.add_doctor(
                first_name=first, last_name=last, specialty=rng.choice(_SPECIALTIES), region=region, city=city,
                phone=self._phone(rng), email=email, organisation_id=rng.choice(org_ids),
                do_not_send_marketing=rng.random() < 0.1, updated_at=now,
            )  # fmt: skip

    # --- admin / test helpers -------------------------------------------------------------------------

    def _add(self, kind: str, fields: Json) -> str:
        with self._lock:
            prefix = "D" if kind == "doctor" else "O"
            lis_id = f"{prefix}{self._seq[kind]}"
            self._seq[kind] += 1
            row = {"id": lis_id, "email": "", "phone": "", "do_not_send_marketing": False, **fields}
            row.setdefault("updated_at", int(self.clock.now()))
            self._rows[kind][lis_id] = row
            return lis_id

    def add_doctor(self, **fields: Any) -> str:
        return self._add("doctor", {"organisation_id": None, **fields})

    def add_organisation(self, **fields: Any) -> str:
        return self._add("organisation", fields)

    def edit(self, kind: str, lis_id: str, **fields: Any) -> None:
        """A lab clerk edits a record in the LIS."""
        with self._lock:
            self._rows[kind][lis_id].update(fields)
            self._rows[kind][lis_id]["updated_at"] = int(self.clock.now())

    def get(self, kind: str, lis_id: str) -> Json:
        with self._lock:
            return dict(self._rows[kind][lis_id])

    def all(self, kind: str) -> list[Json]:
        with self._lock:
            return [dict(r) for r in self._rows[kind].values()]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "writes": self.writes}

    # --- WSGI -----------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        with self._lock:
            self.requests += 1
            try:
                status, body = self._dispatch(request)
            except _Fail as exc:
                status, body = exc.status, {"error": exc.code, "message": exc.message}
        response = Response(json.dumps(body, ensure_ascii=False), status=status, content_type="application/json")
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> tuple[int, Any]:
        if not secrets.compare_digest(request.headers.get("X-Api-Key", ""), self.api_key):
            raise _Fail(401, "unauthorized", "missing or wrong X-Api-Key")
        match = re.fullmatch(r"/api/v1/(doctors|organisations)(?:/([A-Za-z0-9]{1,16}))?", request.path)
        if not match:
            raise _Fail(404, "not_found", "no such resource")
        kind, lis_id = KINDS[match[1]], match[2]
        if lis_id is None and request.method == "GET":
            return 200, self._list(kind, request.args)
        if lis_id is None:
            raise _Fail(405, "method_not_allowed", "records are created in the LIS only")
        row = self._rows[kind].get(lis_id)
        if row is None:
            raise _Fail(404, "not_found", "no such record")
        if request.method == "GET":
            return 200, dict(row)
        if request.method == "PATCH":
            self._patch(kind, row, request.get_data())
            return 200, dict(row)
        raise _Fail(405, "method_not_allowed", "GET or PATCH")

    def _list(self, kind: str, args: Any) -> Json:
        try:
            since = int(args.get("updated_since", "0"))
            limit = int(args.get("limit", "100"))
            offset = int(args.get("offset", "0"))
        except ValueError as exc:
            raise _Fail(400, "bad_parameter", "updated_since, limit and offset are integers") from exc
        if not 1 <= limit <= 200 or offset < 0:
            raise _Fail(400, "bad_parameter", "limit is 1..200, offset >= 0")
        rows = sorted(
            (r for r in self._rows[kind].values() if r["updated_at"] >= since), key=lambda r: (r["updated_at"], r["id"])
        )
        return {"items": [dict(r) for r in rows[offset : offset + limit]], "total": len(rows)}

    def _patch(self, kind: str, row: Json, raw: bytes) -> None:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise _Fail(400, "bad_json", "body is not JSON") from exc
        if not isinstance(body, dict) or not body:
            raise _Fail(400, "bad_body", "a JSON object of fields")
        unknown = sorted(set(body) - set(WRITABLE[kind]))
        if unknown:
            raise _Fail(400, "not_writable", f"fields not writable: {', '.join(unknown)}")
        for name, value in body.items():
            if name == "do_not_send_marketing":
                if not isinstance(value, bool):
                    raise _Fail(400, "bad_value", "do_not_send_marketing is a boolean")
            elif value is not None and not isinstance(value, str):
                raise _Fail(400, "bad_value", f"{name} is a string")
            elif name == "phone" and value and not re.fullmatch(r"\+?[0-9 ()-]{6,20}", value):
                raise _Fail(400, "bad_value", "phone is not a number")
            elif name == "email" and value and "@" not in value:
                raise _Fail(400, "bad_value", "email is not an address")
        row.update({k: "" if v is None else v for k, v in body.items()})
        row["updated_at"] = int(self.clock.now())
        self.writes += 1
