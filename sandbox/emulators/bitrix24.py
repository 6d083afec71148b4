"""Bitrix24 REST emulator: a WSGI app faithful to the public REST behaviour the sync depends on.

What it covers (see /work/shared/reference/bitrix24.md for the vendor behaviour it follows):

* Auth: incoming webhooks ``/rest/{user}/{secret}/{method}[.json]`` and OAuth ``/rest/{method}?auth=…``
  plus an ``/oauth/token/`` endpoint (refresh rotates the refresh token; the old one is dead).
* Request parsing: PHP-style query strings and form bodies (``filter[>ID]=5&select[]=ID``) and JSON bodies.
  Top-level names are resolved the way Bitrix's CCrmRestHelper does (``FIELDS``/``fields``/``Fields``).
* Legacy ``crm.contact|deal|lead.*`` with string-typed UPPER_SNAKE fields, PHONE/EMAIL multifields,
  filters, 50-row paging, ``crm.duplicate.findbycomm``, categories and stages, deal↔contact bindings.
* ``batch`` with ``$result[...]`` chaining, ``halt``, the 50-command cap and the PHP ``[]`` quirk.
* Limits driven by a controllable :class:`~sandbox.emulators.base.Clock`: leaky bucket (HTTP 503) and the
  per-method operating-time budget (HTTP 429).
* Fault injection (JSON or HTML error bodies, "lost response" after the write was applied).
* Outbound events, queued on every change and delivered only when the test says so, never retried.

Emulator assumptions where Bitrix is undocumented or only observed (also listed in the module report):

* ``crm.duplicate.findbycomm`` PHONE matching compares digits only (formatting and extensions after
  ``#``/``доб``/``ext`` ignored); an 11-digit number starting with 8 or 7 and a 10-digit number are all
  treated as the same +7 number. Only the first 20 distinct values are looked at (extra values are
  silently ignored, as the CRM REST proxy does); each entity type returns at most 20 ids.
* Filters compare strings case-insensitively (MySQL collation); multifield filters (PHONE/EMAIL) are exact
  string matches against the stored value. Unknown filter/select fields are ignored, as Bitrix drops them.
  Unparseable date filter values drop the condition. Without ``order`` lists are ordered by ID ascending.
* ``start`` is rounded down to a page boundary (Bitrix computes the page number as ``start / 50 + 1``).
* Any ``UF_CRM_*`` field is accepted and stored as a string (registered on first write); a portal would
  need the field to exist first. A field created as ``date`` keeps the date only (rendered like
  ``BEGINDATE``); one created as ``datetime`` keeps the time, rendered in the portal's offset.
* ``crm.deal.update`` silently ignores CATEGORY_ID (immutable). A STAGE_ID that is not a stage of the
  deal's category is rejected with a 400 (the emulator is strict here so sync bugs surface).
* ``crm.deal.contact.add/items.set/...`` fire ONCRMDEALUPDATE and bump DATE_MODIFY.
* ``$result[...]`` references resolve as the portal's rest module does (``CRestUtil::processBatchElement``):
  the path stops at its first missing key and keeps the deepest value reached; a parameter that is exactly
  a reference takes that value whole (a list too), a reference inside text only a string or number.
* Faults match the top-level REST method or, for ``batch``, any sub-command's method; a matching fault
  replaces the whole HTTP response.
* ``limits.operating_html`` (off by default): a ``batch`` with a sub-command whose method is over its
  operating-time budget is answered as a whole with a text/html page (HTTP 429) naming the limit, and
  none of its commands runs (fast_bitrix24 issue 216 saw /batch answer text/html under that limit; the
  page's exact text and status are not documented, so they are assumptions). Off, the portal answers the
  JSON ``OPERATION_TIME_LIMIT`` per command in ``result_error``.
* OAuth: unknown access token → 401 ``invalid_token``; all OAuth-server errors use HTTP 400.
"""

from __future__ import annotations

import copy
import http
import json
import logging
import math
import random
import re
import secrets
import string
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, FaultQueue, webhook_sender

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]
EventPoster = Callable[[str, bytes, dict[str, str]], Any]

PAGE_SIZE = 50
BATCH_MAX_COMMANDS = 50
MULTIFIELD_TYPES = ("PHONE", "EMAIL", "WEB", "IM")
ENTITIES = ("contact", "deal", "lead")
EVENT_NAMES = tuple(f"ONCRM{e.upper()}{a}" for e in ENTITIES for a in ("ADD", "UPDATE", "DELETE"))
WRITE_METHODS = frozenset(
    {f"crm.{e}.{a}" for e in ENTITIES for a in ("add", "update", "delete")}
    | {
        "crm.deal.contact.add",
        "crm.deal.contact.delete",
        "crm.deal.contact.items.set",
        "crm.deal.contact.items.delete",
    }
)

# ---------------------------------------------------------------------------------------------------------
# Errors and small PHP-compatibility helpers
# ---------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A REST error envelope: ``{"error": code, "error_description": description}`` with an HTTP status."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description

    def envelope(self) -> JsonDict:
        return {"error": self.code, "error_description": self.description}


def legacy_error(description: str) -> ApiError:
    # Legacy crm.* proxies throw RestException(message) → HTTP 400 with an empty error code.
    return ApiError(400, "", description)


class PhpQueryError(ValueError):
    """Raised for parameter names PHP-style parsing cannot make sense of."""


_PHP_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PHP_SEG_RE = re.compile(r"\[([^\[\]]*)\]")
PHP_MAX_DEPTH = 32
PHP_MAX_PAIRS = 10_000


def build_php_tree(pairs: Iterable[tuple[str, Any]]) -> JsonDict:
    """Turn ``("filter[>ID]", "5")``-style pairs into nested data the way PHP's parse_str does.

    ``[]`` appends, numeric keys stay map keys until the end, where maps keyed exactly ``0..n-1`` become
    lists. Malformed names (unbalanced brackets, text after a bracket, empty base) raise PhpQueryError.
    """
    root: JsonDict = {}
    for count, (raw_key, value) in enumerate(pairs, start=1):
        if count > PHP_MAX_PAIRS:
            raise PhpQueryError("Too many parameters")
        match = _PHP_KEY_RE.match(raw_key)
        if match is None:
            raise PhpQueryError(f"Malformed parameter name: {raw_key!r}")
        base, rest = match.groups()
        # PHP mangles spaces and dots in the top-level name into underscores.
        segments = [base.strip().replace(".", "_").replace(" ", "_"), *_PHP_SEG_RE.findall(rest)]
        if not segments[0]:
            raise PhpQueryError(f"Malformed parameter name: {raw_key!r}")
        if len(segments) > PHP_MAX_DEPTH:
            raise PhpQueryError("Parameter nesting is too deep")
        node: JsonDict = root
        for i, segment in enumerate(segments):
            key = _php_next_index(node) if segment == "" else segment
            if i == len(segments) - 1:
                node[key] = value
                break
            child = node.get(key)
            if not isinstance(child, dict):
                # Like PHP, a later array assignment overwrites an earlier scalar.
                child = {}
                node[key] = child
            node = child
    # The top level stays a map even when keyed 0..n-1: it is the parameter namespace.
    return {key: _listify(value) for key, value in root.items()}


def _php_next_index(node: Mapping[str, Any]) -> str:
    ints = [int(k) for k in node if _is_int_key(k)]
    return str(max(ints) + 1 if ints else 0)


def _is_int_key(key: str) -> bool:
    return key.isdigit() and (key == "0" or not key.startswith("0"))


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        converted = {k: _listify(v) for k, v in value.items()}
        if converted and list(converted) == [str(i) for i in range(len(converted))]:
            return list(converted.values())
        return converted
    return value


def parse_php_query(query: str) -> JsonDict:
    """Parse an application/x-www-form-urlencoded string with PHP bracket keys."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=PHP_MAX_PAIRS)
    except ValueError as exc:
        raise PhpQueryError(str(exc)) from exc
    return build_php_tree(pairs)


def php_intval(value: Any) -> int:
    """PHP intval(): leading integer of a string, 0 when there is none."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and abs(value) < 1e18 else 0
    if isinstance(value, str):
        match = re.match(r"\s*([+-]?\d+)", value)
        return int(match.group(1)) if match else 0
    if isinstance(value, (list, dict)):
        return 1 if value else 0
    return 0


def php_str(value: Any) -> str:
    """PHP string conversion for scalars (true → "1", false/null → "")."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return "Array"
    return str(value)


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def php_empty_to_list(value: Any) -> Any:
    """PHP json_encode writes an empty array as ``[]`` even where a map is meant."""
    if isinstance(value, dict):
        return {k: php_empty_to_list(v) for k, v in value.items()} if value else []
    if isinstance(value, list):
        return [php_empty_to_list(v) for v in value]
    return value


def php_map(mapping: Mapping[Any, Any]) -> Any:
    """A PHP array keyed by batch command keys: ``[]`` if empty, a list if keyed 0..n-1, else a map."""
    if not mapping:
        return []
    keys = list(mapping)
    if all(isinstance(k, int) for k in keys) and keys == list(range(len(keys))):
        return list(mapping.values())
    return {str(k): v for k, v in mapping.items()}


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "y", "true", "yes", "on"}
    return bool(value)


class Params:
    """Top-level parameter lookup with the name variants Bitrix's CCrmRestHelper accepts."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def _lookup(self, names: Iterable[str]) -> Any:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                return self.raw[name]
        return None

    def array(self, name: str) -> Any:
        cap = name.lower().capitalize()
        return self._lookup((name.upper(), name.lower(), cap, f"ar{cap}"))

    def scalar(self, name: str) -> Any:
        return self._lookup((name.lower(), name.upper(), name.lower().capitalize()))

    def camel(self, name: str) -> Any:
        return self._lookup((name, name.lower(), name.upper(), name[:1].upper() + name[1:]))

    def entity_id(self) -> int:
        # resolveEntityID(): only "ID" or "id", through intval().
        return php_intval(self.raw.get("ID", self.raw.get("id")))


# ---------------------------------------------------------------------------------------------------------
# Field model
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDef:
    type: str
    title: str
    read_only: bool = False
    immutable: bool = False
    multiple: bool = False
    status_type: str | None = None
    output: bool = True  # CONTACT_IDS is writable but never returned by get/list


def _fd(
    type_: str,
    title: str,
    *,
    ro: bool = False,
    imm: bool = False,
    mult: bool = False,
    status: str | None = None,
    output: bool = True,
) -> FieldDef:
    return FieldDef(type_, title, ro, imm, mult, status, output)


_UTM = {
    "UTM_SOURCE": _fd("string", "Рекламная система"),
    "UTM_MEDIUM": _fd("string", "Тип трафика"),
    "UTM_CAMPAIGN": _fd("string", "Обозначение рекламной кампании"),
    "UTM_CONTENT": _fd("string", "Содержание кампании"),
    "UTM_TERM": _fd("string", "Условие поиска кампании"),
}
_AUDIT = {
    "ASSIGNED_BY_ID": _fd("user", "Ответственный"),
    "CREATED_BY_ID": _fd("user", "Кем создан", ro=True),
    "MODIFY_BY_ID": _fd("user", "Кем изменен", ro=True),
    "DATE_CREATE": _fd("datetime", "Дата создания", ro=True),
    "DATE_MODIFY": _fd("datetime", "Дата изменения", ro=True),
}
_ORIGIN = {
    "ORIGINATOR_ID": _fd("string", "Внешний источник"),
    "ORIGIN_ID": _fd("string", "Идентификатор элемента во внешнем источнике"),
    "ORIGIN_VERSION": _fd("string", "Версия оригинала"),
}
_ACTIVITY = {
    "LAST_ACTIVITY_TIME": _fd("datetime", "Последняя активность", ro=True),
    "LAST_ACTIVITY_BY": _fd("user", "Автор последней активности", ro=True),
}
_MULTI = {
    "PHONE": _fd("crm_multifield", "Телефон", mult=True),
    "EMAIL": _fd("crm_multifield", "E-mail", mult=True),
    "WEB": _fd("crm_multifield", "Сайт", mult=True),
    "IM": _fd("crm_multifield", "Мессенджер", mult=True),
}

CONTACT_FIELDS: dict[str, FieldDef] = {
    "ID": _fd("integer", "ID", ro=True),
    "HONORIFIC": _fd("crm_status", "Обращение", status="HONORIFIC"),
    "NAME": _fd("string", "Имя"),
    "SECOND_NAME": _fd("string", "Отчество"),
    "LAST_NAME": _fd("string", "Фамилия"),
    "BIRTHDATE": _fd("date", "Дата рождения"),
    "TYPE_ID": _fd("crm_status", "Тип контакта", status="CONTACT_TYPE"),
    "SOURCE_ID": _fd("crm_status", "Источник", status="SOURCE"),
    "SOURCE_DESCRIPTION": _fd("string", "Дополнительно об источнике"),
    "POST": _fd("string", "Должность"),
    "COMMENTS": _fd("string", "Комментарий"),
    "OPENED": _fd("char", "Доступен для всех"),
    "EXPORT": _fd("char", "Участвует в экспорте контактов"),
    "HAS_PHONE": _fd("char", "Задан телефон", ro=True),
    "HAS_EMAIL": _fd("char", "Задан e-mail", ro=True),
    "HAS_IMOL": _fd("char", "Задана открытая линия", ro=True),
    **_AUDIT,
    "COMPANY_ID": _fd("crm_company", "Компания"),
    "LEAD_ID": _fd("crm_lead", "Лид", ro=True),
    **_ORIGIN,
    **_UTM,
    **_ACTIVITY,
    **_MULTI,
}

DEAL_FIELDS: dict[str, FieldDef] = {
    "ID": _fd("integer", "ID", ro=True),
    "TITLE": _fd("string", "Название"),
    "TYPE_ID": _fd("crm_status", "Тип", status="DEAL_TYPE"),
    "CATEGORY_ID": _fd("crm_category", "Воронка", imm=True),
    "STAGE_ID": _fd("crm_status", "Стадия сделки", status="DEAL_STAGE"),
    "STAGE_SEMANTIC_ID": _fd("string", "Группа стадии", ro=True),
    "IS_NEW": _fd("char", "Новая сделка", ro=True),
    "IS_RECURRING": _fd("char", "Регулярная сделка"),
    "IS_RETURN_CUSTOMER": _fd("char", "Повторная сделка", ro=True),
    "IS_REPEATED_APPROACH": _fd("char", "Повторное обращение", ro=True),
    "PROBABILITY": _fd("integer", "Вероятность"),
    "CURRENCY_ID": _fd("crm_currency", "Валюта"),
    "OPPORTUNITY": _fd("double", "Сумма"),
    "IS_MANUAL_OPPORTUNITY": _fd("char", "Ручной режим расчета суммы"),
    "TAX_VALUE": _fd("double", "Ставка налога"),
    "COMPANY_ID": _fd("crm_company", "Компания"),
    "CONTACT_ID": _fd("crm_contact", "Контакт"),
    "CONTACT_IDS": _fd("crm_contact", "Контакты", mult=True, output=False),
    "QUOTE_ID": _fd("crm_quote", "Предложение", ro=True),
    "BEGINDATE": _fd("date", "Дата начала"),
    "CLOSEDATE": _fd("date", "Предполагаемая дата закрытия"),
    "OPENED": _fd("char", "Доступна для всех"),
    "CLOSED": _fd("char", "Сделка закрыта"),
    "COMMENTS": _fd("string", "Комментарий"),
    **_AUDIT,
    "MOVED_BY_ID": _fd("user", "Кем перемещен", ro=True),
    "MOVED_TIME": _fd("datetime", "Дата перемещения", ro=True),
    "SOURCE_ID": _fd("crm_status", "Источник", status="SOURCE"),
    "SOURCE_DESCRIPTION": _fd("string", "Дополнительно об источнике"),
    "LEAD_ID": _fd("crm_lead", "Лид"),
    "ADDITIONAL_INFO": _fd("string", "Дополнительная информация"),
    "LOCATION_ID": _fd("location", "Местоположение"),
    **_ORIGIN,
    **_UTM,
    **_ACTIVITY,
}

LEAD_FIELDS: dict[str, FieldDef] = {
    "ID": _fd("integer", "ID", ro=True),
    "TITLE": _fd("string", "Название лида"),
    "HONORIFIC": _fd("crm_status", "Обращение", status="HONORIFIC"),
    "NAME": _fd("string", "Имя"),
    "SECOND_NAME": _fd("string", "Отчество"),
    "LAST_NAME": _fd("string", "Фамилия"),
    "BIRTHDATE": _fd("date", "Дата рождения"),
    "COMPANY_TITLE": _fd("string", "Название компании"),
    "SOURCE_ID": _fd("crm_status", "Источник", status="SOURCE"),
    "SOURCE_DESCRIPTION": _fd("string", "Дополнительно об источнике"),
    "STATUS_ID": _fd("crm_status", "Стадия", status="STATUS"),
    "STATUS_DESCRIPTION": _fd("string", "Дополнительно о стадии"),
    "STATUS_SEMANTIC_ID": _fd("string", "Состояние статуса", ro=True),
    "POST": _fd("string", "Должность"),
    "ADDRESS": _fd("string", "Адрес"),
    "CURRENCY_ID": _fd("crm_currency", "Валюта"),
    "OPPORTUNITY": _fd("double", "Сумма"),
    "IS_MANUAL_OPPORTUNITY": _fd("char", "Ручной режим расчета суммы"),
    "OPENED": _fd("char", "Доступен для всех"),
    "COMMENTS": _fd("string", "Комментарий"),
    "HAS_PHONE": _fd("char", "Задан телефон", ro=True),
    "HAS_EMAIL": _fd("char", "Задан e-mail", ro=True),
    "HAS_IMOL": _fd("char", "Задана открытая линия", ro=True),
    **_AUDIT,
    "MOVED_BY_ID": _fd("user", "Кем перемещен", ro=True),
    "MOVED_TIME": _fd("datetime", "Дата перемещения", ro=True),
    "COMPANY_ID": _fd("crm_company", "Компания"),
    "CONTACT_ID": _fd("crm_contact", "Контакт"),
    "IS_RETURN_CUSTOMER": _fd("char", "Повторный лид", ro=True),
    "DATE_CLOSED": _fd("datetime", "Дата закрытия", ro=True),
    **_ORIGIN,
    **_UTM,
    **_ACTIVITY,
    **_MULTI,
}

ENTITY_FIELDS: dict[str, dict[str, FieldDef]] = {
    "contact": CONTACT_FIELDS,
    "deal": DEAL_FIELDS,
    "lead": LEAD_FIELDS,
}
ENTITY_TYPE_IDS = {"lead": 1, "deal": 2, "contact": 3}
_NUMERIC_TYPES = frozenset(
    {"integer", "user", "crm_contact", "crm_company", "crm_lead", "crm_category", "crm_quote", "double"}
)
_REFERENCE_TYPES = frozenset({"user", "crm_contact", "crm_company", "crm_lead", "crm_quote", "location"})


@dataclass
class UserField:
    name: str
    user_type: str = "string"
    multiple: bool = False
    label: str = ""
    id: int = 0


# ---------------------------------------------------------------------------------------------------------
# Phone normalisation for the duplicate index
# ---------------------------------------------------------------------------------------------------------

_EXTENSION_RE = re.compile(r"(#|доб|ext|extension|\bx\b|,|;).*$", re.IGNORECASE)


def normalize_phone(value: str) -> str:
    """Digits-only phone key used by the emulated duplicate index (see module docstring)."""
    digits = re.sub(r"\D", "", _EXTENSION_RE.sub("", value))
    if len(digits) == 11 and digits[0] in "78":
        return "7" + digits[1:]
    if len(digits) == 10:
        return "7" + digits
    return digits


def normalize_email(value: str) -> str:
    return value.strip().lower()


# ---------------------------------------------------------------------------------------------------------
# Limits, faults, events, stats
# ---------------------------------------------------------------------------------------------------------


_IndexSpec = tuple[str, str]  # ("field", name) for list filters, ("comm", "PHONE"/"EMAIL") for findbycomm


class _ValueIndex:
    """Key → ids of the records holding it, and each record's keys (to drop them when it changes)."""

    __slots__ = ("by_key", "keys_of")

    def __init__(self) -> None:
        self.by_key: dict[Any, set[int]] = {}
        self.keys_of: dict[int, set[Any]] = {}

    def ids(self, key: Any) -> set[int]:
        return self.by_key.get(key, set())

    def put(self, record_id: int, keys: set[Any]) -> None:
        for key in self.keys_of.pop(record_id, set()) - keys:
            held = self.by_key[key]
            held.discard(record_id)
            if not held:
                del self.by_key[key]
        for key in keys:
            self.by_key.setdefault(key, set()).add(record_id)
        if keys:
            self.keys_of[record_id] = keys


class _OperatingWindow:
    """One method's operating time spent in the sliding window: its charges, oldest first, and their sum.

    The sum is kept as commands are charged instead of re-added per command (that was quadratic in the
    commands of a window: at 10k appointments the emulator spent most of its time there). It is the same
    number ``sum(cost for _, cost in records)`` gives: CPython sums floats with Neumaier's compensation,
    which this continues charge by charge; the window is summed afresh when charges leave it, and with
    ``sum`` itself while a cost is not a float."""

    __slots__ = ("_compensation", "_floats", "_sum", "records")

    def __init__(self) -> None:
        self.records: deque[tuple[float, float]] = deque()
        self._sum = self._compensation = 0.0
        self._floats = True

    def add(self, at: float, cost: float) -> None:
        self.records.append((at, cost))
        self._step(cost)

    def used(self, cutoff: float) -> float:
        if self.records and self.records[0][0] <= cutoff:
            while self.records and self.records[0][0] <= cutoff:
                self.records.popleft()
            self._sum = self._compensation = 0.0
            self._floats = True
            for _, cost in self.records:
                self._step(cost)
        if not self._floats or not self.records:
            return sum(cost for _, cost in self.records)
        if self._compensation and math.isfinite(self._compensation):
            return self._sum + self._compensation
        return self._sum

    def _step(self, cost: float) -> None:
        if type(cost) is not float:
            self._floats = False
            return
        total = self._sum + cost
        if abs(self._sum) >= abs(cost):
            self._compensation += (self._sum - total) + cost
        else:
            self._compensation += (cost - total) + self._sum
        self._sum = total


@dataclass
class RateLimits:
    """Configurable limits. ``enabled`` switches both mechanisms off at once."""

    enabled: bool = True
    bucket_size: float = 50.0
    drain_per_second: float = 2.0
    operating_enabled: bool = True
    operating_limit: float = 480.0
    operating_window: float = 600.0
    default_cost: float = 0.05
    method_costs: dict[str, float] = field(default_factory=dict)
    operating_html: bool = False  # a batch touching a blocked method gets an HTML 429 page (module doc)

    def cost(self, method: str) -> float:
        return self.method_costs.get(method, self.default_cost)


@dataclass
class Fault:
    method: str | None
    status: int
    html: bool
    times: int | None  # None = until cleared
    after_apply: bool
    error: str
    description: str
    body: str | None = None
    hits: int = 0


_DEFAULT_FAULT_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_REQUEST", "Bad request"),
    401: ("NO_AUTH_FOUND", "Wrong authorization data"),
    429: ("OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."),
    500: ("INTERNAL_SERVER_ERROR", "Internal server error"),
    502: ("ERROR_UNEXPECTED_ANSWER", "Server returned an unexpected response"),
    503: ("QUERY_LIMIT_EXCEEDED", "Too many requests"),
    504: ("ERROR_UNEXPECTED_ANSWER", "Server returned an unexpected response"),
}


class FaultInjector(FaultQueue[Fault]):
    """Deterministic, test-controlled failures. Faults are consumed in the order they were added."""

    def add(
        self,
        method: str | None = None,
        status: int = 500,
        *,
        html: bool = False,
        times: int | None = 1,
        after_apply: bool = False,
        error: str | None = None,
        description: str | None = None,
        body: str | None = None,
    ) -> Fault:
        """Fail the next ``times`` requests to ``method`` (None = any method).

        ``html=True`` answers ``<html><body>{status} {reason}</body></html>`` as text/html, like a proxy in
        front of the portal; otherwise a JSON error envelope. ``after_apply=True`` runs the request first
        (the write happens, events fire) and then replaces the response: the "lost response" case.
        """
        default_code, default_text = _DEFAULT_FAULT_ERRORS.get(status, ("INTERNAL_SERVER_ERROR", "Error"))
        return self.push(
            Fault(
                method=method.lower() if method else None,
                status=status,
                html=html,
                times=times,
                after_apply=after_apply,
                error=default_code if error is None else error,
                description=default_text if description is None else description,
                body=body,
            )
        )

    def take(self, methods: Iterable[str], *, after_apply: bool) -> Fault | None:
        # ``methods`` is the call's method plus, for ``batch``, every sub-command's method.
        names = set(methods)
        return self.take_matching(lambda f: f.method is None or f.method in names, after_apply=after_apply)


@dataclass
class EventBinding:
    id: int
    event: str
    handler: str
    user_id: int
    app: bool  # bound through OAuth event.bind (auth carries tokens) vs an outgoing webhook


@dataclass
class PendingEvent:
    binding_id: int
    event: str
    handler_url: str
    fields: dict[str, str]
    queued_at: float
    app: bool
    user_id: int


@dataclass
class DeliveryResult:
    event: PendingEvent
    url: str
    body: bytes
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300


@dataclass
class _EventRule:
    count: int
    event: str | None


@dataclass
class _Stats:
    requests: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    batch_commands: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    rate_limited_503: int = 0
    rate_limited_429: int = 0
    operation_limited_commands: int = 0
    writes: int = 0
    faults: int = 0
    oauth_requests: int = 0
    events_queued: int = 0
    events_delivered: int = 0
    events_failed: int = 0
    events_dropped: int = 0


def _bump(counter: dict[str, int], key: str, by: int = 1) -> None:
    counter[key] = counter.get(key, 0) + by


@dataclass
class _AccessToken:
    token: str
    user_id: int
    expires_at: float


@dataclass
class _RefreshToken:
    token: str
    user_id: int
    expires_at: float


@dataclass
class _Principal:
    kind: str  # "webhook" | "oauth"
    user_id: int
    key: str  # operating-time budgets are per app / per webhook


@dataclass
class _Page:
    items: Any
    total: int
    next: int | None


@dataclass
class _Outcome:
    ok: bool
    result: Any = None
    total: int | None = None
    next: int | None = None
    status: int = 200
    error: str = ""
    description: str = ""
    time: JsonDict | None = None

    def envelope(self) -> JsonDict:
        return {"error": self.error, "error_description": self.description}


# Default medical pipeline: real portals rename stages but keep the ids (fast_bitrix24 issue #210).
_DEAL_STAGES: tuple[tuple[str, str, str | None, str], ...] = (
    ("NEW", "Новое обращение", None, "#39A8EF"),
    ("PREPARATION", "Подбор врача и времени", None, "#2FC6F6"),
    ("PREPAYMENT_INVOICE", "Запись на прием", None, "#55D0E0"),
    ("EXECUTING", "Прием состоялся", None, "#47E4C2"),
    ("FINAL_INVOICE", "Оплата и документы", None, "#FFA900"),
    ("WON", "Лечение завершено", "S", "#7BD500"),
    ("LOSE", "Отказ", "F", "#FF5752"),
    ("APOLOGY", "Неявка", "F", "#FF5752"),
)
_SYSTEM_STAGES = frozenset({"NEW", "WON", "LOSE"})
_LEAD_STATUSES: tuple[tuple[str, str, str | None, str], ...] = (
    ("NEW", "Не обработан", None, "#2FC6F6"),
    ("IN_PROCESS", "В работе", None, "#55D0E0"),
    ("PROCESSED", "Обработан", None, "#47E4C2"),
    ("CONVERTED", "Качественный лид", "S", "#7BD500"),
    ("JUNK", "Некачественный лид", "F", "#FF5752"),
)
_PLAIN_STATUSES: dict[str, tuple[tuple[str, str], ...]] = {
    "SOURCE": (
        ("CALL", "Звонок"),
        ("EMAIL", "E-Mail"),
        ("WEB", "Веб-сайт"),
        ("ADVERTISING", "Реклама"),
        ("PARTNER", "Существующий клиент"),
        ("RECOMMENDATION", "По рекомендации"),
        ("WEBFORM", "CRM-форма"),
        ("CALLBACK", "Обратный звонок"),
        ("OTHER", "Другое"),
    ),
    "DEAL_TYPE": (("SALE", "Продажа"), ("SERVICES", "Услуги"), ("SERVICE", "Сервисное обслуживание")),
    "CONTACT_TYPE": (("CLIENT", "Клиенты"), ("SUPPLIER", "Поставщики"), ("PARTNER", "Партнеры")),
}
_SEMANTIC_NAMES = {None: "process", "S": "success", "F": "failure"}

_WEBHOOK_RE = re.compile(r"^/rest/(\d+)/([^/]+)(?:/([^/]*))?/?$")
_OAUTH_RE = re.compile(r"^/rest/([^/]+)/?$")
_REF_RE = re.compile(r"\$(result|result_error|result_total|result_next|result_time)\[([^\[\]]+)\]((?:\[[^\[\]]*\])*)")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_UF_NAME_RE = re.compile(r"^UF_CRM_[A-Z0-9_]+$")
_FILTER_OPS = ("!><", "><", "!@", ">=", "<=", "!=", "!%", "=%", "%=", "@", ">", "<", "%", "!", "=")


class _FilterSkip(Exception):
    """A filter value that cannot be interpreted: Bitrix drops such conditions."""


# ---------------------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------------------


class Bitrix24Emulator:
    """In-memory Bitrix24 portal exposed as a WSGI app. All state sits behind one re-entrant lock."""

    def __init__(
        self,
        clock: Clock | None = None,
        user_id: int = 1,
        webhook_secret: str = "t0ps3cr3tw3bh00k",
        application_token: str = "jvh9y1ulvt2m6k5or90v9mg8nn32ozas",
        member_id: str = "d897063e1ce7c5eb9f04b9751eef5915",
        tz_offset: str = "+03:00",
        rate_limit: bool = True,
        *,
        domain: str = "clinic.bitrix24.ru",
        client_id: str = "local.6650a1b2c3d4e5.12345678",
        client_secret: str = "emuClientSecret0123456789abcdefghijklmnopqrstuvwx",
        base_url: str | None = None,
        server_endpoint: str = "https://oauth.bitrix.info/rest/",
        access_token_ttl: float = 3600.0,
        refresh_token_ttl: float = 180 * 86400.0,
        require_https: bool = False,
        manager_user_id: int = 7,
    ) -> None:
        self.clock = clock or Clock()
        self.user_id = user_id
        self.webhook_secret = webhook_secret
        self.application_token = application_token
        self.member_id = member_id
        self.domain = domain
        self.client_id = client_id
        self.client_secret = client_secret
        self.base_url = base_url  # public URL for client_endpoint in events; defaults to https://domain
        self.server_endpoint = server_endpoint
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.require_https = require_https
        self.manager_user_id = manager_user_id
        self.tz = _parse_offset(tz_offset)
        self.limits = RateLimits(enabled=rate_limit)
        self.faults = FaultInjector()
        self.event_timeout = 5.0

        self._lock = threading.RLock()
        self._rng = random.Random(24)  # deterministic generated stage ids / tokens in tests
        self._records: dict[str, dict[int, JsonDict]] = {e: {} for e in ENTITIES}
        self._next_id: dict[str, int] = dict.fromkeys(ENTITIES, 1)
        self._next_fm_id = 1
        self._deal_contacts: dict[int, list[JsonDict]] = {}
        self._uf: dict[str, dict[str, UserField]] = {e: {} for e in ENTITIES}
        self._next_uf_id = 101
        self._categories: dict[int, JsonDict] = {}
        self._statuses: list[JsonDict] = []
        self._next_status_id = 1
        self._bucket = 0.0
        self._bucket_ts: float | None = None
        self._operating: dict[tuple[str, str], _OperatingWindow] = {}
        self._indexes: dict[str, dict[_IndexSpec, _ValueIndex]] = {e: {} for e in ENTITIES}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._auth_codes: dict[str, tuple[int, float]] = {}
        self._bindings: list[EventBinding] = []
        self._next_binding_id = 1
        self._pending: list[PendingEvent] = []
        self._drop_rules: list[_EventRule] = []
        self._duplicate_rules: list[_EventRule] = []
        self.events_log: list[tuple[str, int, float]] = []  # every change, bound or not
        self.delivery_log: list[DeliveryResult] = []
        self.dropped_events: list[PendingEvent] = []
        self._history: dict[tuple[str, int], dict[str, list[Any]]] = {}  # the records' history tab
        self._stats = _Stats()
        self._seed_statuses()
        self._methods: dict[str, Callable[[_Principal, Params], Any]] = self._build_method_table()

    # ----- public helpers: URLs, state, setup -------------------------------------------------------------

    @property
    def webhook_path(self) -> str:
        return f"/rest/{self.user_id}/{self.webhook_secret}/"

    def webhook_url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}{self.webhook_path}"

    def oauth_endpoint(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/rest/"

    @property
    def contacts(self) -> dict[int, JsonDict]:
        """Live id → record map (internal shape: UPPER fields as strings, multifields as entry lists)."""
        return self._records["contact"]

    @property
    def deals(self) -> dict[int, JsonDict]:
        return self._records["deal"]

    @property
    def leads(self) -> dict[int, JsonDict]:
        return self._records["lead"]

    def record(self, entity: str, record_id: int) -> JsonDict | None:
        """A deep copy of a record as ``crm.{entity}.get`` would return it."""
        with self._lock:
            rec = self._records[entity].get(record_id)
            return None if rec is None else self._render(entity, rec, None)

    def deal_contact_ids(self, deal_id: int) -> list[int]:
        with self._lock:
            return [b["CONTACT_ID"] for b in self._deal_contacts.get(deal_id, [])]

    def field_history(self, entity: str, record_id: int, field_name: str) -> list[Any]:
        """Every value a record's field held, oldest first: the record's history tab in the portal (REST
        has no reader for it, so this is an inspection helper, like ``events_log``)."""
        with self._lock:
            return list(self._history.get((entity, record_id), {}).get(field_name, []))

    def _note_history(self, entity: str, record_id: int, rec: JsonDict, names: Iterable[str]) -> None:
        history = self._history.setdefault((entity, record_id), {})
        for name in names:
            values = history.setdefault(name, [])
            if not values or values[-1] != rec.get(name):
                values.append(copy.deepcopy(rec.get(name)))

    def add_user_field(
        self, entity: str, name: str, user_type: str = "string", *, multiple: bool = False, label: str = ""
    ) -> str:
        with self._lock:
            return self._register_uf(entity, name, user_type, multiple, label).name

    def add_category(self, name: str, *, sort: int | None = None, category_id: int | None = None) -> int:
        """Create a deal pipeline with the default stage ids prefixed ``C{id}:``."""
        with self._lock:
            cid = category_id if category_id is not None else max(self._categories) + 1
            if cid in self._categories:
                raise ValueError(f"category {cid} exists")
            self._categories[cid] = {
                "id": cid,
                "name": name,
                "sort": sort if sort is not None else 100 * (cid + 1),
                "entityTypeId": 2,
                "isDefault": "N",
                "originId": "",
                "originatorId": "",
            }
            for i, (sid, sname, sem, color) in enumerate(_DEAL_STAGES):
                self._add_status(
                    _stage_entity(cid),
                    f"C{cid}:{sid}",
                    sname,
                    (i + 1) * 10,
                    sem,
                    color,
                    system=sid in _SYSTEM_STAGES,
                    category=cid,
                )
            return cid

    def add_stage(
        self,
        category_id: int,
        name: str,
        *,
        status_id: str | None = None,
        semantics: str | None = None,
        sort: int | None = None,
    ) -> str:
        """Add a user stage (generated ids look like ``C9:UC_NYL06U``); returns its STATUS_ID."""
        with self._lock:
            if category_id not in self._categories:
                raise KeyError(category_id)
            entity_id = _stage_entity(category_id)
            if status_id is None:
                suffix = "".join(self._rng.choice(string.ascii_uppercase + string.digits) for _ in range(6))
                status_id = f"UC_{suffix}"
            if category_id and not status_id.startswith(f"C{category_id}:"):
                status_id = f"C{category_id}:{status_id}"
            stages = self._stages(category_id)
            if sort is None:
                # User stages go before the final (success/failure) stages, like the kanban editor does.
                in_progress = [int(s["SORT"]) for s in stages if s["SEMANTICS"] is None]
                sort = (max(in_progress) if in_progress else 0) + 5
            color = {"S": "#7BD500", "F": "#FF5752"}.get(semantics or "", "#ACE9FB")
            self._add_status(entity_id, status_id, name, sort, semantics, color, system=False, category=category_id)
            return status_id

    def rename_stage(self, status_id: str, name: str) -> None:
        """Rename a deal stage (``"EXECUTING"`` or ``"C1:EXECUTING"``); the id never changes."""
        with self._lock:
            for status in self._statuses:
                if status["ENTITY_ID"].startswith("DEAL_STAGE") and status["STATUS_ID"] == status_id:
                    status["NAME"] = name
                    return
            raise KeyError(status_id)

    def rename_status(self, entity_id: str, status_id: str, name: str) -> None:
        with self._lock:
            for status in self._statuses:
                if status["ENTITY_ID"] == entity_id and status["STATUS_ID"] == status_id:
                    status["NAME"] = name
                    return
            raise KeyError((entity_id, status_id))

    # ----- manager actions (UI edits: fire events, not counted in stats) ----------------------------------

    def manager_create(self, entity: str, fields: Mapping[str, Any], *, user_id: int | None = None) -> int:
        with self._lock:
            return self._add(entity, dict(fields), user_id or self.manager_user_id)

    def manager_update(
        self, entity: str, record_id: int, fields: Mapping[str, Any], *, user_id: int | None = None
    ) -> None:
        with self._lock:
            self._update(entity, record_id, dict(fields), user_id or self.manager_user_id)

    def manager_delete(self, entity: str, record_id: int) -> None:
        with self._lock:
            self._delete(entity, record_id)

    def manager_create_contact(self, **fields: Any) -> int:
        return self.manager_create("contact", fields)

    def manager_create_deal(self, **fields: Any) -> int:
        return self.manager_create("deal", fields)

    def manager_create_lead(self, **fields: Any) -> int:
        return self.manager_create("lead", fields)

    def manager_update_contact(self, record_id: int, **fields: Any) -> None:
        self.manager_update("contact", record_id, fields)

    def manager_update_deal(self, record_id: int, **fields: Any) -> None:
        self.manager_update("deal", record_id, fields)

    def manager_update_lead(self, record_id: int, **fields: Any) -> None:
        self.manager_update("lead", record_id, fields)

    # ----- OAuth helpers ------------------------------------------------------------------------------------

    def issue_tokens(self, user_id: int | None = None) -> JsonDict:
        """Install-time token pair (what ONAPPINSTALL / the code exchange would give the app)."""
        with self._lock:
            return self._new_token_pair(user_id or self.user_id, None)

    def issue_auth_code(self, user_id: int | None = None) -> str:
        """An authorization code for ``grant_type=authorization_code`` (lives 30 s)."""
        with self._lock:
            code = secrets.token_hex(16)
            self._auth_codes[code] = (user_id or self.user_id, self.clock.now() + 30)
            return code

    def expire_access_tokens(self) -> None:
        with self._lock:
            now = self.clock.now()
            for token in self._access_tokens.values():
                token.expires_at = min(token.expires_at, now - 1)

    # ----- events -------------------------------------------------------------------------------------------

    def bind_event(self, event: str, handler_url: str, *, user_id: int | None = None, app: bool = False) -> int:
        """Register an outgoing-webhook style handler (``app=True`` mimics an OAuth event.bind)."""
        with self._lock:
            return self._bind(event.upper(), handler_url, user_id or self.user_id, app)

    def unbind_all_events(self) -> None:
        with self._lock:
            self._bindings.clear()

    @property
    def bindings(self) -> list[EventBinding]:
        with self._lock:
            return list(self._bindings)

    def pending_events(self) -> list[PendingEvent]:
        with self._lock:
            return copy.deepcopy(self._pending)

    def drop_next_events(self, count: int = 1, event: str | None = None) -> None:
        """The next ``count`` queued events (optionally only ``event``) are silently lost."""
        with self._lock:
            self._drop_rules.append(_EventRule(count, event.upper() if event else None))

    def duplicate_next_events(self, count: int = 1, event: str | None = None) -> None:
        """The next ``count`` queued events are queued twice (the queue server may re-send)."""
        with self._lock:
            self._duplicate_rules.append(_EventRule(count, event.upper() if event else None))

    def clear_pending_events(self) -> int:
        with self._lock:
            n = len(self._pending)
            self._pending.clear()
            return n

    def deliver_events(self, post: EventPoster | None = None, *, limit: int | None = None) -> list[DeliveryResult]:
        """POST queued events (form-encoded) to their handlers; failures are logged, never retried.

        ``post(url, body, headers)`` may return an HTTP status (None counts as 200) or raise; the default
        posts with httpx. Delivery runs outside the state lock so a handler may call back into the portal.
        """
        with self._lock:
            batch = self._pending if limit is None else self._pending[:limit]
            self._pending = [] if limit is None else self._pending[limit:]
            prepared = [(ev, self._event_body(ev)) for ev in batch]
        sender = post or self._httpx_post
        headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Bitrix24 Webhook Engine"}
        results: list[DeliveryResult] = []
        for ev, body in prepared:
            try:
                returned = sender(ev.handler_url, body, dict(headers))
                status = 200 if returned is None else int(returned)
                result = DeliveryResult(ev, ev.handler_url, body, status, None)
                if not result.ok:
                    result.error = f"HTTP {status}"
            except Exception as exc:  # a dead handler is logged, like the queue server does
                result = DeliveryResult(ev, ev.handler_url, body, None, f"{type(exc).__name__}: {exc}")
            results.append(result)
        with self._lock:
            self.delivery_log.extend(results)
            for r in results:
                if r.ok:
                    self._stats.events_delivered += 1
                else:
                    self._stats.events_failed += 1
        return results

    @property
    def delivery_failures(self) -> list[DeliveryResult]:
        with self._lock:
            return [r for r in self.delivery_log if not r.ok]

    def _httpx_post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        return webhook_sender().post(url, content=body, headers=headers, timeout=self.event_timeout).status_code

    # ----- stats and limits -----------------------------------------------------------------------------------

    def stats(self) -> JsonDict:
        """Counters: ``requests`` (HTTP REST requests, a batch is one), ``methods`` (per top-level method,
        batch as "batch"), ``batch_commands`` (sub-commands per method), ``calls`` (executed invocations,
        top-level and sub-commands), ``statuses`` (HTTP status → count), ``rate_limited_503``,
        ``rate_limited_429``, ``operation_limited_commands``, ``writes`` (successful write commands),
        ``faults``, ``oauth_requests`` and event counters."""
        with self._lock:
            s = self._stats
            return {
                "requests": s.requests,
                "methods": dict(s.methods),
                "batch_commands": dict(s.batch_commands),
                "calls": dict(s.calls),
                "statuses": dict(s.statuses),
                "rate_limited_503": s.rate_limited_503,
                "rate_limited_429": s.rate_limited_429,
                "operation_limited_commands": s.operation_limited_commands,
                "writes": s.writes,
                "faults": s.faults,
                "oauth_requests": s.oauth_requests,
                "events_queued": s.events_queued,
                "events_delivered": s.events_delivered,
                "events_failed": s.events_failed,
                "events_dropped": s.events_dropped,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = _Stats()

    def bucket_level(self) -> float:
        """Current leaky-bucket counter after draining to ``clock.now()``."""
        with self._lock:
            self._drain(self.clock.now())
            return self._bucket

    def operating_time(self, method: str, *, key: str | None = None) -> float:
        with self._lock:
            return self._operating_used((key or f"webhook:{self.user_id}", method.lower()), self.clock.now())

    def reset_limits(self) -> None:
        with self._lock:
            self._bucket = 0.0
            self._bucket_ts = None
            self._operating.clear()

    # ----- WSGI ------------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        request.max_content_length = 16 * 1024 * 1024
        try:
            response = self._dispatch(request)
        except HTTPException as exc:  # e.g. body too large
            response = _json_response(exc.code or 400, {"error": "INVALID_REQUEST", "error_description": str(exc)})
        except Exception:  # safety net: a bug must look like a vendor 500, not kill the server thread
            log.exception("bitrix24 emulator crashed")
            response = _json_response(
                500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"}
            )
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.rstrip("/") == "/oauth/token":
            return self._handle_oauth(request)
        match = _WEBHOOK_RE.match(path)
        oauth_match = None if match else _OAUTH_RE.match(path)
        if match is None and oauth_match is None:
            return _json_response(404, {"error": "NOT_FOUND", "error_description": "Not found"})
        raw_method = (match.group(3) if match else oauth_match.group(1) if oauth_match else "") or ""
        method = raw_method.strip().lower()
        if method.endswith(".json"):
            method = method[: -len(".json")]
        with self._lock:
            self._stats.requests += 1
            _bump(self._stats.methods, method or "<none>")
            response = self._handle_rest(request, method, match, oauth_match)
            _bump(self._stats.statuses, str(response.status_code))
            return response

    # ----- REST request pipeline ------------------------------------------------------------------------

    def _handle_rest(
        self, request: Request, method: str, webhook: re.Match[str] | None, oauth: re.Match[str] | None
    ) -> Response:
        now = self.clock.now()
        if self.require_https and request.scheme != "https":
            return _json_response(400, {"error": "INVALID_REQUEST", "error_description": "Https required."})
        if method.endswith(".xml"):
            return _json_response(400, {"error": "INVALID_REQUEST", "error_description": "XML format is not emulated"})
        try:
            params = _request_params(request)
        except PhpQueryError as exc:
            return _json_response(400, {"error": "INVALID_REQUEST", "error_description": str(exc)})
        auth_token = params.pop("auth", None)
        try:
            principal = self._authenticate(webhook, auth_token, now)
        except ApiError as exc:
            return _json_response(exc.status, exc.envelope())
        fault = self.faults.take(self._fault_names(method, params), after_apply=False)
        if fault is not None:
            self._stats.faults += 1
            return _fault_response(fault)
        if self.limits.enabled and not self._admit(now):
            self._stats.rate_limited_503 += 1
            return _json_response(503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
        if not method:
            status, body = 404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
        elif method == "batch" and self._batch_refused_as_html(principal, params, now):
            self._stats.rate_limited_429 += 1
            self._stats.operation_limited_commands += 1
            return Response(OPERATING_LIMIT_PAGE, status=429, content_type="text/html; charset=utf-8")
        elif method == "batch":
            status, body = self._run_batch(principal, Params(params), now)
        else:
            outcome = self._invoke(method, params, principal, in_batch=False)
            status, body = outcome.status, self._single_body(outcome)
        if status == 429:
            self._stats.rate_limited_429 += 1
        if status == 200:
            fault = self.faults.take(self._fault_names(method, params), after_apply=True)
            if fault is not None:
                self._stats.faults += 1
                return _fault_response(fault)
        return _json_response(status, body)

    def _batch_refused_as_html(self, principal: _Principal, params: Mapping[str, Any], now: float) -> bool:
        limits = self.limits
        if not (limits.enabled and limits.operating_enabled and limits.operating_html):
            return False
        methods = self._fault_names("batch", params)[1:]
        return any(self._operating_used((principal.key, m), now) > limits.operating_limit for m in methods)

    @staticmethod
    def _single_body(outcome: _Outcome) -> JsonDict:
        if not outcome.ok:
            return outcome.envelope()
        body: JsonDict = {"result": php_empty_to_list(outcome.result)}
        if outcome.next is not None:
            body["next"] = outcome.next
        if outcome.total is not None:
            body["total"] = outcome.total
        body["time"] = outcome.time
        return body

    @staticmethod
    def _fault_names(method: str, params: Mapping[str, Any]) -> list[str]:
        names = [method]
        if method == "batch":
            cmd = Params(params).array("cmd")
            for query in as_list(cmd) if isinstance(cmd, (list, dict)) else []:
                if isinstance(query, str):
                    sub = query.partition("?")[0].strip().lower()
                    names.append(sub.removesuffix(".json"))
        return names

    def _authenticate(self, webhook: re.Match[str] | None, auth_token: Any, now: float) -> _Principal:
        if webhook is not None:
            if int(webhook.group(1)) != self.user_id or webhook.group(2) != self.webhook_secret:
                raise ApiError(401, "NO_AUTH_FOUND", "Wrong authorization data")
            return _Principal("webhook", self.user_id, f"webhook:{self.user_id}")
        if not isinstance(auth_token, str) or not auth_token:
            raise ApiError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        token = self._access_tokens.get(auth_token)
        if token is None:
            raise ApiError(401, "invalid_token", "The access token provided is invalid.")
        if token.expires_at <= now:
            raise ApiError(401, "expired_token", "The access token provided has expired.")
        return _Principal("oauth", token.user_id, f"app:{self.client_id}")

    def _drain(self, now: float) -> None:
        if self._bucket_ts is not None:
            elapsed = max(0.0, now - self._bucket_ts)
            self._bucket = max(0.0, self._bucket - elapsed * self.limits.drain_per_second)
        self._bucket_ts = now if self._bucket_ts is None else max(now, self._bucket_ts)

    def _admit(self, now: float) -> bool:
        """Leaky bucket: +1 per HTTP request, drains at Y/s; a request that would overflow X is refused."""
        self._drain(now)
        if self._bucket + 1 > self.limits.bucket_size:
            return False
        self._bucket += 1
        return True

    def _operating_used(self, key: tuple[str, str], now: float) -> float:
        window = self._operating.get(key)
        if window is None or not window.records:
            return 0.0
        return window.used(now - self.limits.operating_window)

    def _operating_reset_at(self, key: tuple[str, str], now: float) -> int:
        window = self._operating.get(key)
        oldest = window.records[0][0] if window is not None and window.records else now
        return int(oldest + self.limits.operating_window)

    def _time_block(self, start: float, cost: float, operating: float, reset_at: int) -> JsonDict:
        finish = start + cost
        return {
            "start": start,
            "finish": finish,
            "duration": cost,
            "processing": cost,
            "date_start": self._iso(start),
            "date_finish": self._iso(finish),
            "operating_reset_at": reset_at,
            "operating": round(operating, 6),
        }

    def _invoke(self, method: str, params: JsonDict, principal: _Principal, *, in_batch: bool) -> _Outcome:
        """Run one REST method, charging its operating-time budget."""
        if in_batch and method == "batch":
            return _Outcome(
                False,
                status=405,
                error="ERROR_BATCH_METHOD_NOT_ALLOWED",
                description="Method is not allowed for batch usage",
            )
        handler = self._methods.get(method)
        if handler is None:
            return _Outcome(False, status=404, error="ERROR_METHOD_NOT_FOUND", description="Method not found!")
        now = self.clock.now()
        key = (principal.key, method)
        limited = self.limits.enabled and self.limits.operating_enabled
        if limited and self._operating_used(key, now) > self.limits.operating_limit:
            self._stats.operation_limited_commands += 1
            return _Outcome(
                False,
                status=429,
                error="OPERATION_TIME_LIMIT",
                description="Method is blocked due to operation time limit.",
            )
        _bump(self._stats.calls, method)
        try:
            result = handler(principal, Params(params))
            outcome = (
                _Outcome(True, result.items, result.total, result.next)
                if isinstance(result, _Page)
                else _Outcome(True, result)
            )
        except ApiError as exc:
            outcome = _Outcome(False, status=exc.status, error=exc.code, description=exc.description)
        cost = self.limits.cost(method)
        self._operating.setdefault(key, _OperatingWindow()).add(now, cost)
        outcome.time = self._time_block(now, cost, self._operating_used(key, now), self._operating_reset_at(key, now))
        if outcome.ok and method in WRITE_METHODS:
            self._stats.writes += 1
        return outcome

    # ----- batch ------------------------------------------------------------------------------------------

    def _run_batch(self, principal: _Principal, p: Params, start: float) -> tuple[int, JsonDict]:
        halt = truthy(p.scalar("halt"))
        cmd = p.array("cmd")
        if cmd is None:
            cmd = {}
        if not isinstance(cmd, (dict, list)):
            return 400, legacy_error("Parameter 'cmd' must be array.").envelope()
        items: list[tuple[Any, Any]] = list(enumerate(cmd)) if isinstance(cmd, list) else list(cmd.items())
        sections: dict[str, dict[Any, Any]] = {
            "result": {},
            "result_error": {},
            "result_total": {},
            "result_next": {},
            "result_time": {},
        }
        for index, (key, query) in enumerate(items):
            outcome = self._batch_command(index, query, sections, principal)
            if outcome.ok:
                sections["result"][key] = php_empty_to_list(outcome.result)
                if outcome.total is not None:
                    sections["result_total"][key] = outcome.total
                if outcome.next is not None:
                    sections["result_next"][key] = outcome.next
                sections["result_time"][key] = outcome.time
            else:
                sections["result_error"][key] = outcome.envelope()
                if halt:
                    break
        reset_at = int(start + self.limits.operating_window)
        body = {
            "result": {name: php_map(values) for name, values in sections.items()},
            # The outer batch call is not charged to any operating budget.
            "time": self._time_block(start, 0.0, 0.0, reset_at),
        }
        return 200, body

    def _batch_command(
        self, index: int, query: Any, sections: Mapping[str, Mapping[Any, Any]], principal: _Principal
    ) -> _Outcome:
        if index >= BATCH_MAX_COMMANDS:
            return _Outcome(
                False, status=400, error="ERROR_BATCH_LENGTH_EXCEEDED", description="Max batch length exceeded"
            )
        if not isinstance(query, str):
            return _Outcome(False, status=400, error="INVALID_REQUEST", description="Command must be a string")
        method_part, _, query_string = query.partition("?")
        method = method_part.strip().lower().removesuffix(".json")
        _bump(self._stats.batch_commands, method or "<none>")
        try:
            sub_params = parse_php_query(query_string)
        except PhpQueryError as exc:
            return _Outcome(False, status=400, error="INVALID_REQUEST", description=str(exc))
        sub_params = _substitute(sub_params, sections)
        sub_params.pop("auth", None)
        return self._invoke(method, sub_params, principal, in_batch=True)

    # ----- OAuth server -----------------------------------------------------------------------------------

    def _handle_oauth(self, request: Request) -> Response:
        with self._lock:
            self._stats.oauth_requests += 1
            try:
                params = _request_params(request)
            except PhpQueryError as exc:
                return _json_response(400, {"error": "invalid_request", "error_description": str(exc)})
            try:
                return _json_response(200, self._oauth_grant(params, request))
            except ApiError as exc:
                return _json_response(exc.status, exc.envelope())

    def _oauth_grant(self, params: Mapping[str, Any], request: Request) -> JsonDict:
        now = self.clock.now()
        grant = params.get("grant_type")
        if params.get("client_id") != self.client_id or params.get("client_secret") != self.client_secret:
            raise ApiError(400, "invalid_client", "Invalid client credentials")
        if grant == "refresh_token":
            old = params.get("refresh_token")
            entry = self._refresh_tokens.pop(old, None) if isinstance(old, str) else None
            if entry is None or entry.expires_at <= now:
                raise ApiError(400, "invalid_grant", "Invalid refresh token")
            return self._new_token_pair(entry.user_id, request)
        if grant == "authorization_code":
            code = params.get("code")
            entry_code = self._auth_codes.pop(code, None) if isinstance(code, str) else None
            if entry_code is None or entry_code[1] <= now:
                raise ApiError(400, "invalid_grant", "Invalid authorization code")
            return self._new_token_pair(entry_code[0], request)
        raise ApiError(400, "invalid_request", "Unsupported grant_type")

    def _new_token_pair(self, user_id: int, request: Request | None) -> JsonDict:
        now = self.clock.now()
        access = secrets.token_hex(24)
        refresh = secrets.token_hex(24)
        self._access_tokens[access] = _AccessToken(access, user_id, now + self.access_token_ttl)
        self._refresh_tokens[refresh] = _RefreshToken(refresh, user_id, now + self.refresh_token_ttl)
        base = self.base_url or (request.host_url.rstrip("/") if request is not None else f"https://{self.domain}")
        return {
            "access_token": access,
            "expires": int(now + self.access_token_ttl),
            "expires_in": int(self.access_token_ttl),
            "scope": "crm",
            "domain": self.server_endpoint.split("//", 1)[-1].split("/", 1)[0],
            "server_endpoint": self.server_endpoint,
            "status": "L",
            "client_endpoint": f"{base}/rest/",
            "member_id": self.member_id,
            "user_id": user_id,
            "refresh_token": refresh,
        }

    # ----- method table ----------------------------------------------------------------------------------------

    def _build_method_table(self) -> dict[str, Callable[[_Principal, Params], Any]]:
        table: dict[str, Callable[[_Principal, Params], Any]] = {}
        for entity in ENTITIES:
            table[f"crm.{entity}.fields"] = self._m_fields(entity)
            table[f"crm.{entity}.add"] = self._m_add(entity)
            table[f"crm.{entity}.get"] = self._m_get(entity)
            table[f"crm.{entity}.list"] = self._m_list(entity)
            table[f"crm.{entity}.update"] = self._m_update(entity)
            table[f"crm.{entity}.delete"] = self._m_delete(entity)
            table[f"crm.{entity}.userfield.add"] = self._m_uf_add(entity)
            table[f"crm.{entity}.userfield.list"] = self._m_uf_list(entity)
        table.update(
            {
                "crm.deal.contact.add": self._m_deal_contact_add,
                "crm.deal.contact.delete": self._m_deal_contact_delete,
                "crm.deal.contact.items.get": self._m_deal_contact_items_get,
                "crm.deal.contact.items.set": self._m_deal_contact_items_set,
                "crm.deal.contact.items.delete": self._m_deal_contact_items_delete,
                "crm.duplicate.findbycomm": self._m_findbycomm,
                "crm.category.list": self._m_category_list,
                "crm.category.get": self._m_category_get,
                "crm.dealcategory.stage.list": self._m_dealcategory_stage_list,
                "crm.status.list": self._m_status_list,
                "crm.multifield.fields": self._m_multifield_fields,
                "event.bind": self._m_event_bind,
                "event.unbind": self._m_event_unbind,
                "event.get": self._m_event_get,
                "events": self._m_events,
                "profile": self._m_profile,
                "user.current": self._m_profile,
                "server.time": self._m_server_time,
            }
        )
        return table

    # ----- generic CRM entity methods -----------------------------------------------------------------------

    def _m_fields(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            result: JsonDict = {}
            for name, fd in ENTITY_FIELDS[entity].items():
                info: JsonDict = {
                    "type": fd.type,
                    "isRequired": False,
                    "isReadOnly": fd.read_only,
                    "isImmutable": fd.immutable,
                    "isMultiple": fd.multiple,
                    "isDynamic": False,
                    "title": fd.title,
                }
                if fd.status_type:
                    info["statusType"] = fd.status_type
                if name == "CONTACT_ID" and entity == "deal":
                    info["isDeprecated"] = True
                result[name] = info
            for uf in self._uf[entity].values():
                label = uf.label or uf.name
                result[uf.name] = {
                    "type": uf.user_type,
                    "isRequired": False,
                    "isReadOnly": False,
                    "isImmutable": False,
                    "isMultiple": uf.multiple,
                    "isDynamic": True,
                    "title": uf.name,
                    "listLabel": label,
                    "formLabel": label,
                    "filterLabel": label,
                }
            return result

        return handler

    def _m_add(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            return self._add(entity, _fields_param(p), principal.user_id)

        return handler

    def _m_get(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            record_id = p.entity_id()
            if record_id <= 0:
                raise legacy_error("ID is not defined or invalid.")
            rec = self._records[entity].get(record_id)
            if rec is None:
                raise legacy_error("Not found")
            return self._render(entity, rec, None)

        return handler

    def _m_update(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            record_id = p.entity_id()
            if record_id <= 0:
                raise legacy_error("ID is not defined or invalid.")
            fields = _fields_param(p)
            if record_id not in self._records[entity]:
                raise legacy_error("Not found")
            self._update(entity, record_id, fields, principal.user_id)
            return True

        return handler

    def _m_delete(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            record_id = p.entity_id()
            if record_id <= 0:
                raise legacy_error("ID is not defined or invalid.")
            if record_id not in self._records[entity]:
                raise legacy_error("Not found")
            self._delete(entity, record_id)
            return True

        return handler

    def _m_list(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            order = p.array("order")
            if order is not None and not isinstance(order, (dict, list)):
                raise legacy_error("Parameter 'order' must be array.")
            filt = p.array("filter")
            if filt is not None and not isinstance(filt, (dict, list)):
                raise legacy_error("Parameter 'filter' must be array.")
            select = p.array("select")
            start = php_intval(p.scalar("start"))
            rows = [rec for rec in self._candidates(entity, filt) if self._matches(entity, rec, filt)]
            rows = self._sorted(entity, rows, order)
            chosen = _select_set(select)
            if start == -1:
                page = rows[:PAGE_SIZE]
                return _Page([self._render(entity, r, chosen) for r in page], 0, None)
            offset = max(0, start) // PAGE_SIZE * PAGE_SIZE
            page = rows[offset : offset + PAGE_SIZE]
            nxt = offset + PAGE_SIZE if offset + PAGE_SIZE < len(rows) else None
            return _Page([self._render(entity, r, chosen) for r in page], len(rows), nxt)

        return handler

    def _m_uf_add(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            fields = p.array("fields")
            if not isinstance(fields, dict):
                fields = dict(p.raw)
            name = str(fields.get("FIELD_NAME", "")).upper()
            if not name:
                raise ApiError(400, "ERROR_CORE", "FIELD_NAME is required")
            if not name.startswith("UF_CRM_"):
                name = "UF_CRM_" + name.removeprefix("UF_")
            if name in self._uf[entity]:
                raise ApiError(400, "ERROR_CORE", f"Field {name} already exists")
            uf = self._register_uf(
                entity,
                name,
                str(fields.get("USER_TYPE_ID") or "string"),
                truthy(fields.get("MULTIPLE", "N")),
                php_str(fields.get("LABEL") or fields.get("EDIT_FORM_LABEL") or ""),
            )
            return uf.id

        return handler

    def _m_uf_list(self, entity: str) -> Callable[[_Principal, Params], Any]:
        def handler(principal: _Principal, p: Params) -> Any:
            return [
                {
                    "ID": str(uf.id),
                    "ENTITY_ID": f"CRM_{entity.upper()}",
                    "FIELD_NAME": uf.name,
                    "USER_TYPE_ID": uf.user_type,
                    "XML_ID": None,
                    "SORT": "100",
                    "MULTIPLE": "Y" if uf.multiple else "N",
                    "MANDATORY": "N",
                    "SHOW_FILTER": "N",
                    "SHOW_IN_LIST": "Y",
                    "EDIT_IN_LIST": "Y",
                    "IS_SEARCHABLE": "N",
                    "SETTINGS": {},
                }
                for uf in self._uf[entity].values()
            ]

        return handler

    # ----- deal ↔ contact bindings ----------------------------------------------------------------------

    def _deal_for_binding(self, p: Params) -> int:
        deal_id = p.entity_id()
        if deal_id <= 0:
            raise legacy_error("The parameter ownerEntityID is invalid or not defined.")
        if deal_id not in self.deals:
            raise legacy_error("Not found.")
        return deal_id

    def _m_deal_contact_add(self, principal: _Principal, p: Params) -> Any:
        deal_id = self._deal_for_binding(p)
        fields = p.array("fields")
        if not isinstance(fields, dict):
            raise legacy_error("The parameter fields must be array.")
        contact_id = php_intval(fields.get("CONTACT_ID"))
        if contact_id <= 0:
            raise legacy_error("The parameter fields is not valid.")
        links = self._deal_contacts.setdefault(deal_id, [])
        if any(b["CONTACT_ID"] == contact_id for b in links):
            return True
        primary = str(fields.get("IS_PRIMARY", "N")).upper() == "Y" or not links
        sort = php_intval(fields.get("SORT")) or (max((b["SORT"] for b in links), default=0) + 10)
        if primary:
            for b in links:
                b["IS_PRIMARY"] = "N"
        links.append({"CONTACT_ID": contact_id, "SORT": sort, "ROLE_ID": 0, "IS_PRIMARY": "Y" if primary else "N"})
        links.sort(key=lambda b: b["SORT"])
        self._touch_deal_links(deal_id, principal.user_id)
        return True

    def _m_deal_contact_delete(self, principal: _Principal, p: Params) -> Any:
        deal_id = self._deal_for_binding(p)
        fields = p.array("fields")
        contact_id = php_intval(fields.get("CONTACT_ID")) if isinstance(fields, dict) else 0
        links = self._deal_contacts.get(deal_id, [])
        self._deal_contacts[deal_id] = [b for b in links if b["CONTACT_ID"] != contact_id]
        self._fix_primary(deal_id)
        self._touch_deal_links(deal_id, principal.user_id)
        return True

    def _m_deal_contact_items_get(self, principal: _Principal, p: Params) -> Any:
        deal_id = self._deal_for_binding(p)
        return copy.deepcopy(self._deal_contacts.get(deal_id, []))

    def _m_deal_contact_items_set(self, principal: _Principal, p: Params) -> Any:
        deal_id = self._deal_for_binding(p)
        items = p.array("items")
        links: list[JsonDict] = []
        for i, item in enumerate(as_list(items)):
            if not isinstance(item, dict) or php_intval(item.get("CONTACT_ID")) <= 0:
                continue
            links.append(
                {
                    "CONTACT_ID": php_intval(item.get("CONTACT_ID")),
                    "SORT": php_intval(item.get("SORT")) or (i + 1) * 10,
                    "ROLE_ID": 0,
                    "IS_PRIMARY": "Y" if str(item.get("IS_PRIMARY", "N")).upper() == "Y" else "N",
                }
            )
        self._deal_contacts[deal_id] = sorted(links, key=lambda b: b["SORT"])
        self._fix_primary(deal_id)
        self._touch_deal_links(deal_id, principal.user_id)
        return True

    def _m_deal_contact_items_delete(self, principal: _Principal, p: Params) -> Any:
        deal_id = self._deal_for_binding(p)
        self._deal_contacts[deal_id] = []
        self._touch_deal_links(deal_id, principal.user_id)
        return True

    def _fix_primary(self, deal_id: int) -> None:
        links = self._deal_contacts.get(deal_id, [])
        primaries = [b for b in links if b["IS_PRIMARY"] == "Y"]
        for b in primaries[1:]:
            b["IS_PRIMARY"] = "N"
        if links and not primaries:
            links[0]["IS_PRIMARY"] = "Y"

    def _primary_contact(self, deal_id: int) -> str | None:
        for b in self._deal_contacts.get(deal_id, []):
            if b["IS_PRIMARY"] == "Y":
                return str(b["CONTACT_ID"])
        return None

    def _touch_deal_links(self, deal_id: int, user_id: int) -> None:
        rec = self.deals[deal_id]
        rec["CONTACT_ID"] = self._primary_contact(deal_id)
        rec["DATE_MODIFY"] = self._iso(self.clock.now())
        rec["MODIFY_BY_ID"] = str(user_id)
        self._fire("deal", "UPDATE", deal_id)

    # ----- duplicates, categories, statuses ----------------------------------------------------------------

    def _m_findbycomm(self, principal: _Principal, p: Params) -> Any:
        comm_type = php_str(p.scalar("type")).upper()
        if comm_type not in {"PHONE", "EMAIL"}:
            if comm_type == "":
                raise legacy_error("Communication type is not defined.")
            raise legacy_error(f"Communication type '{comm_type}' is not supported in current context.")
        values = p.array("values")
        if not isinstance(values, (list, dict)) or not values:
            raise legacy_error("Communication values is not defined.")
        entity_type = php_str(p._lookup(("ENTITY_TYPE", "entity_type", "EntityType", "arEntityType")) or "").upper()
        if entity_type == "DEAL":
            raise legacy_error("Deal is not supported in current context.")
        normalize = normalize_phone if comm_type == "PHONE" else normalize_email
        keys: list[str] = []
        for value in as_list(values):
            if not isinstance(value, str) or value == "":
                continue
            key = normalize(value)
            if key and key not in keys:
                keys.append(key)
            if len(keys) >= 20:
                break
        wanted = {"LEAD": "lead", "CONTACT": "contact"}
        if entity_type in wanted:
            wanted = {entity_type: wanted[entity_type]}
        elif entity_type:
            wanted = {}
        found: dict[str, list[int]] = {}
        for type_name, entity in wanted.items():
            index = self._index(entity, ("comm", comm_type))
            ids = sorted({rid for key in keys for rid in index.ids(key)})[:20]
            if ids:
                found[type_name] = ids
        return found

    def _m_category_list(self, principal: _Principal, p: Params) -> Any:
        entity_type = php_intval(p.camel("entityTypeId"))
        if entity_type != 2:
            raise ApiError(400, "NOT_SUPPORTED", f"Entity type {entity_type} does not support categories")
        cats = sorted(self._categories.values(), key=lambda c: (c["sort"], c["id"]))
        return _Page({"categories": [copy.deepcopy(c) for c in cats]}, len(cats), None)

    def _m_category_get(self, principal: _Principal, p: Params) -> Any:
        if php_intval(p.camel("entityTypeId")) != 2:
            raise ApiError(400, "NOT_SUPPORTED", "Entity type does not support categories")
        cid = php_intval(p.camel("id"))
        if cid not in self._categories:
            raise ApiError(400, "NOT_FOUND", "Element not found")
        return {"category": copy.deepcopy(self._categories[cid])}

    def _m_dealcategory_stage_list(self, principal: _Principal, p: Params) -> Any:
        cid = php_intval(p.scalar("id"))
        return [{"NAME": s["NAME"], "SORT": s["SORT"], "STATUS_ID": s["STATUS_ID"]} for s in self._stages(cid)]

    def _m_status_list(self, principal: _Principal, p: Params) -> Any:
        filt = p.array("filter")
        order = p.array("order")
        rows = [s for s in self._statuses if _match_plain(s, filt)]
        keys = [(k, str(v).upper() == "DESC") for k, v in order.items()] if isinstance(order, dict) else []
        keys = keys or [("SORT", False)]
        for name, desc in reversed(keys):
            kind = "num" if name in ("SORT", "ID") else "str"
            rows.sort(key=_field_sort_key(kind, name, None), reverse=desc)
        return _Page(copy.deepcopy(rows), len(rows), None)

    def _m_multifield_fields(self, principal: _Principal, p: Params) -> Any:
        def info(type_: str, title: str, ro: bool) -> JsonDict:
            return {
                "type": type_,
                "isRequired": False,
                "isReadOnly": ro,
                "isImmutable": False,
                "isMultiple": False,
                "isDynamic": False,
                "title": title,
            }

        return {
            "ID": info("int", "ID", True),
            "TYPE_ID": info("string", "TYPE_ID", True),
            "VALUE": info("string", "VALUE", False),
            "VALUE_TYPE": info("string", "VALUE_TYPE", False),
        }

    # ----- event.* (apps only) ----------------------------------------------------------------------------

    def _require_app(self, principal: _Principal) -> None:
        if principal.kind != "oauth":
            raise ApiError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    def _m_event_bind(self, principal: _Principal, p: Params) -> Any:
        self._require_app(principal)
        event = php_str(p.scalar("event")).upper()
        handler = php_str(p.scalar("handler"))
        if event not in EVENT_NAMES:
            raise ApiError(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        if php_str(p.camel("event_type") or "online").lower() != "online":
            raise ApiError(400, "ERROR_EVENT_NOT_FOUND", "Offline events are not emulated")
        if not handler.startswith(("http://", "https://")):
            raise ApiError(400, "ERROR_HANDLER_URL_MISMATCH", "Wrong handler URL")
        if any(b.event == event and b.handler == handler for b in self._bindings):
            raise legacy_error("Handler already binded")
        auth_type = php_intval(p.camel("auth_type")) or principal.user_id
        self._bind(event, handler, auth_type, True)
        return True

    def _m_event_unbind(self, principal: _Principal, p: Params) -> Any:
        self._require_app(principal)
        event = php_str(p.scalar("event")).upper()
        handler = php_str(p.scalar("handler"))
        before = len(self._bindings)
        self._bindings = [b for b in self._bindings if not (b.event == event and (not handler or b.handler == handler))]
        return {"count": before - len(self._bindings)}

    def _m_event_get(self, principal: _Principal, p: Params) -> Any:
        self._require_app(principal)
        return [
            {"event": b.event, "handler": b.handler, "auth_type": str(b.user_id), "offline": 0}
            for b in self._bindings
            if b.app
        ]

    def _m_events(self, principal: _Principal, p: Params) -> Any:
        return list(EVENT_NAMES)

    def _m_profile(self, principal: _Principal, p: Params) -> Any:
        return {"ID": str(principal.user_id), "ADMIN": True, "NAME": "Администратор", "LAST_NAME": "Клиники"}

    def _m_server_time(self, principal: _Principal, p: Params) -> Any:
        return self._iso(self.clock.now())

    # ----- record storage ---------------------------------------------------------------------------------

    def _add(self, entity: str, fields: JsonDict, user_id: int) -> int:
        now_iso = self._iso(self.clock.now())
        values, multi = self._internalize(entity, fields, is_update=False)
        record_id = self._next_id[entity]
        rec: JsonDict = dict.fromkeys(ENTITY_FIELDS[entity])
        for mf in MULTIFIELD_TYPES:
            rec.pop(mf, None)
        rec.pop("CONTACT_IDS", None)
        rec.update(
            {
                "ID": str(record_id),
                "OPENED": "Y",
                "ASSIGNED_BY_ID": str(user_id),
                "CREATED_BY_ID": str(user_id),
                "MODIFY_BY_ID": str(user_id),
                "DATE_CREATE": now_iso,
                "DATE_MODIFY": now_iso,
            }
        )
        if entity == "contact":
            rec.update({"TYPE_ID": "CLIENT", "EXPORT": "Y"})
        if entity in {"deal", "lead"}:
            rec.update({"CURRENCY_ID": "RUB", "OPPORTUNITY": "0.00", "IS_MANUAL_OPPORTUNITY": "N"})
        contact_ids = values.pop("CONTACT_IDS", None)
        for key, value in values.items():
            if value is not None or key.startswith("UF_"):
                rec[key] = value
        if entity == "deal":
            self._init_deal(rec, values, user_id, now_iso)
        elif entity == "lead":
            self._init_lead(rec, values, user_id, now_iso)
        for mf in MULTIFIELD_TYPES:
            if mf in ENTITY_FIELDS[entity]:
                rec[mf] = self._apply_multifield(mf, [], multi.get(mf, []))
        self._derive(entity, rec)
        self._next_id[entity] = record_id + 1
        self._records[entity][record_id] = rec
        self._note_history(entity, record_id, rec, values)
        if entity == "deal":
            self._deal_contacts[record_id] = []
            self._set_deal_contacts(
                record_id, contact_ids, values.get("CONTACT_ID"), contact_id_given="CONTACT_ID" in values
            )
        self._fire(entity, "ADD", record_id)
        return record_id

    def _init_deal(self, rec: JsonDict, values: JsonDict, user_id: int, now_iso: str) -> None:
        category = php_intval(values.get("CATEGORY_ID")) if values.get("CATEGORY_ID") is not None else None
        stage = values.get("STAGE_ID")
        if category is None and stage:
            # Without CATEGORY_ID Bitrix resolves the pipeline from the stage prefix (C1:…).
            owner = self._stage_owner(str(stage))
            category = owner if owner is not None else 0
        category = category or 0
        if category not in self._categories:
            raise legacy_error(f"Category with ID {category} is not found.")
        stages = self._stages(category)
        if stage:
            if str(stage) not in {s["STATUS_ID"] for s in stages}:
                raise legacy_error(f"Stage '{stage}' is not found in category {category}.")
        else:
            stage = stages[0]["STATUS_ID"]
        today = self._today()
        rec.update(
            {
                "CATEGORY_ID": str(category),
                "STAGE_ID": str(stage),
                "TYPE_ID": rec.get("TYPE_ID") or "SALE",
                "TAX_VALUE": rec.get("TAX_VALUE") or "0.00",
                "IS_RECURRING": rec.get("IS_RECURRING") or "N",
                "IS_RETURN_CUSTOMER": "N",
                "IS_REPEATED_APPROACH": "N",
                "BEGINDATE": rec.get("BEGINDATE") or self._date_out(today),
                "CLOSEDATE": rec.get("CLOSEDATE") or self._date_out(today + timedelta(days=7)),
                "MOVED_BY_ID": str(user_id),
                "MOVED_TIME": now_iso,
            }
        )
        if not rec.get("TITLE"):
            rec["TITLE"] = f"Сделка #{self._next_id['deal']}"

    def _init_lead(self, rec: JsonDict, values: JsonDict, user_id: int, now_iso: str) -> None:
        status = values.get("STATUS_ID") or "NEW"
        if status not in {s["STATUS_ID"] for s in self._statuses if s["ENTITY_ID"] == "STATUS"}:
            raise legacy_error(f"Status '{status}' is not found.")
        rec.update({"STATUS_ID": status, "MOVED_BY_ID": str(user_id), "MOVED_TIME": now_iso})
        if not rec.get("TITLE"):
            rec["TITLE"] = f"Лид #{self._next_id['lead']}"

    def _update(self, entity: str, record_id: int, fields: JsonDict, user_id: int) -> None:
        rec = self._records[entity].get(record_id)
        if rec is None:
            raise legacy_error("Not found")
        values, multi = self._internalize(entity, fields, is_update=True)
        now_iso = self._iso(self.clock.now())
        contact_ids = values.pop("CONTACT_IDS", None)
        if entity == "deal" and "STAGE_ID" in values:
            stage = values["STAGE_ID"]
            category = php_intval(rec["CATEGORY_ID"])
            if stage is None or stage not in {s["STATUS_ID"] for s in self._stages(category)}:
                raise legacy_error(f"Stage '{stage}' is not found in category {category}.")
        if entity == "lead" and "STATUS_ID" in values:
            lead_statuses = {s["STATUS_ID"] for s in self._statuses if s["ENTITY_ID"] == "STATUS"}
            if values["STATUS_ID"] not in lead_statuses:
                raise legacy_error(f"Status '{values['STATUS_ID']}' is not found.")
        # Validate multifields before touching the record, so a failed update changes nothing.
        new_multi = {mf: self._apply_multifield(mf, rec.get(mf, []), entries) for mf, entries in multi.items()}
        self._note_history(entity, record_id, rec, values)  # what they held before, if never noted
        moved_field = {"deal": "STAGE_ID", "lead": "STATUS_ID"}.get(entity)
        if moved_field and moved_field in values and values[moved_field] != rec.get(moved_field):
            rec["MOVED_BY_ID"] = str(user_id)
            rec["MOVED_TIME"] = now_iso
        for key, value in values.items():
            if entity == "deal" and key == "CONTACT_ID":
                continue
            rec[key] = value
        rec.update(new_multi)
        rec["MODIFY_BY_ID"] = str(user_id)
        rec["DATE_MODIFY"] = now_iso
        self._note_history(entity, record_id, rec, values)
        if entity == "deal" and (contact_ids is not None or "CONTACT_ID" in values):
            self._set_deal_contacts(
                record_id, contact_ids, values.get("CONTACT_ID"), contact_id_given="CONTACT_ID" in values
            )
        self._derive(entity, rec)
        self._fire(entity, "UPDATE", record_id)

    def _delete(self, entity: str, record_id: int) -> None:
        if self._records[entity].pop(record_id, None) is None:
            raise legacy_error("Not found")
        if entity == "deal":
            self._deal_contacts.pop(record_id, None)
        if entity == "contact":
            for deal_id, links in self._deal_contacts.items():
                if any(b["CONTACT_ID"] == record_id for b in links):
                    self._deal_contacts[deal_id] = [b for b in links if b["CONTACT_ID"] != record_id]
                    self._fix_primary(deal_id)
                    self.deals[deal_id]["CONTACT_ID"] = self._primary_contact(deal_id)
                    self._reindex("deal", deal_id)  # no event for the deal, yet its CONTACT_ID changed
        self._fire(entity, "DELETE", record_id)

    def _set_deal_contacts(self, deal_id: int, contact_ids: Any, contact_id: Any, *, contact_id_given: bool) -> None:
        """CONTACT_IDS replaces the whole set (first = primary); a bare CONTACT_ID makes that contact the
        primary binding and keeps the others, CONTACT_ID=0 drops the primary binding."""
        links = self._deal_contacts.get(deal_id, [])
        if contact_ids is not None:
            ids = [i for i in (php_intval(v) for v in as_list(contact_ids)) if i > 0]
            links = [
                {"CONTACT_ID": cid, "SORT": (n + 1) * 10, "ROLE_ID": 0, "IS_PRIMARY": "N"}
                for n, cid in enumerate(dict.fromkeys(ids))
            ]
        elif contact_id_given:
            cid = php_intval(contact_id)
            links = [b for b in links if b["IS_PRIMARY"] != "Y" and b["CONTACT_ID"] != cid]
            if cid > 0:
                first_sort = min((b["SORT"] for b in links), default=20) - 10
                links.insert(0, {"CONTACT_ID": cid, "SORT": max(first_sort, 0), "ROLE_ID": 0, "IS_PRIMARY": "Y"})
        self._deal_contacts[deal_id] = links
        self._fix_primary(deal_id)
        self.deals[deal_id]["CONTACT_ID"] = self._primary_contact(deal_id)

    def _internalize(self, entity: str, fields: JsonDict, *, is_update: bool) -> tuple[JsonDict, dict[str, list[Any]]]:
        """Keep only known, writable fields, converting values to the stored string form."""
        defs = ENTITY_FIELDS[entity]
        values: JsonDict = {}
        multi: dict[str, list[Any]] = {}
        for key, raw in fields.items():
            if not isinstance(key, str):
                continue
            if key.startswith("UF_"):
                if _UF_NAME_RE.match(key) and len(key) <= 50:
                    uf = self._uf[entity].get(key) or self._register_uf(entity, key, "string", False, "")
                    if uf.user_type in {"date", "datetime"} and not uf.multiple:
                        values[key] = self._coerce(key, FieldDef(uf.user_type, uf.label), raw)
                    else:
                        values[key] = _uf_value(raw, uf.multiple)
                continue
            fd = defs.get(key)
            if fd is None or fd.read_only or (is_update and fd.immutable):
                continue  # Bitrix silently drops unknown, read-only and (on update) immutable fields
            if fd.type == "crm_multifield":
                multi[key] = [e for e in as_list(raw) if isinstance(e, dict)]
                continue
            if key == "CONTACT_IDS":
                values[key] = as_list(raw)
                continue
            values[key] = self._coerce(key, fd, raw)
        return values, multi

    def _coerce(self, key: str, fd: FieldDef, raw: Any) -> Any:
        if fd.type in _REFERENCE_TYPES:
            number = php_intval(raw)
            return str(number) if number > 0 else None
        if fd.type in {"integer", "crm_category"}:
            return None if raw in (None, "") else str(php_intval(raw))
        if fd.type == "double":
            try:
                amount = float(str(raw).replace(",", ".")) if raw not in (None, "") else 0.0
            except ValueError:
                amount = 0.0
            return f"{amount:.2f}"
        if fd.type == "char":
            return "Y" if raw is True or php_str(raw).upper() in {"Y", "1", "TRUE"} else "N"
        if fd.type in {"date", "datetime"}:
            if raw in (None, ""):
                return None
            parsed = self._parse_dt(raw)
            if parsed is None:
                raise legacy_error(f'Incorrect date format in field "{key}".')
            if fd.type == "date":
                return self._date_out(parsed.date())
            return self._iso(parsed.timestamp())
        return None if raw is None else php_str(raw)

    def _apply_multifield(self, type_id: str, current: list[JsonDict], entries: list[Any]) -> list[JsonDict]:
        """Legacy multifield semantics: ID edits, ID + DELETE:Y or empty VALUE removes, no ID appends."""
        result = copy.deepcopy(current)
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            raw_value = entry.get("VALUE")
            value = "" if raw_value is None else php_str(raw_value).strip()
            deleting = php_str(entry.get("DELETE")).upper() == "Y" or value == ""
            value_type = php_str(entry.get("VALUE_TYPE")).upper() or None
            if type_id == "EMAIL" and not deleting and not _EMAIL_RE.match(value):
                raise ApiError(400, "ERROR_CORE", f"Invalid E-mail address: '{value}'.")
            entry_id = entry.get("ID")
            if entry_id not in (None, ""):
                target = str(php_intval(entry_id))
                index = next((i for i, e in enumerate(result) if e["ID"] == target), None)
                if index is None:
                    continue  # an ID that is not this record's entry is ignored
                if deleting:
                    result.pop(index)
                else:
                    result[index]["VALUE"] = value
                    if value_type:
                        result[index]["VALUE_TYPE"] = value_type
                continue
            if deleting:
                continue
            result.append(
                {"ID": str(self._next_fm_id), "VALUE_TYPE": value_type or "WORK", "VALUE": value, "TYPE_ID": type_id}
            )
            self._next_fm_id += 1
        return result

    def _derive(self, entity: str, rec: JsonDict) -> None:
        if entity in {"contact", "lead"}:
            rec["HAS_PHONE"] = "Y" if rec.get("PHONE") else "N"
            rec["HAS_EMAIL"] = "Y" if rec.get("EMAIL") else "N"
            rec["HAS_IMOL"] = "N"
        if entity == "deal":
            category = php_intval(rec["CATEGORY_ID"])
            stages = self._stages(category)
            stage = next((s for s in stages if s["STATUS_ID"] == rec["STAGE_ID"]), None)
            semantics = stage["SEMANTICS"] if stage else None
            rec["STAGE_SEMANTIC_ID"] = semantics or "P"
            rec["CLOSED"] = "Y" if semantics in {"S", "F"} else "N"
            rec["IS_NEW"] = "Y" if stages and rec["STAGE_ID"] == stages[0]["STATUS_ID"] else "N"
        if entity == "lead":
            semantics = {"CONVERTED": "S", "JUNK": "F"}.get(rec.get("STATUS_ID") or "")
            rec["STATUS_SEMANTIC_ID"] = semantics or "P"
            if semantics and not rec.get("DATE_CLOSED"):
                rec["DATE_CLOSED"] = rec["DATE_MODIFY"]
            if not semantics:
                rec["DATE_CLOSED"] = None
            rec["IS_RETURN_CUSTOMER"] = "Y" if rec.get("CONTACT_ID") or rec.get("COMPANY_ID") else "N"

    def _register_uf(self, entity: str, name: str, user_type: str, multiple: bool, label: str) -> UserField:
        if not name.startswith("UF_CRM_"):
            name = "UF_CRM_" + name.removeprefix("UF_")
        if not _UF_NAME_RE.match(name) or len(name) > 50:
            raise ApiError(400, "ERROR_CORE", f"Invalid user field name {name}")
        existing = self._uf[entity].get(name)
        if existing is not None:
            return existing
        uf = UserField(name, user_type, multiple, label, self._next_uf_id)
        self._next_uf_id += 1
        self._uf[entity][name] = uf
        for rec in self._records[entity].values():
            rec.setdefault(name, None)
        return uf

    def _render(self, entity: str, rec: JsonDict, chosen: set[str] | None) -> JsonDict:
        """External shape; ``chosen`` is a select set from _select_set (None = everything, as in get)."""
        out: JsonDict = {}
        names: set[str] = chosen if chosen is not None else set()
        wildcard = chosen is None or "*" in names
        for name, fd in ENTITY_FIELDS[entity].items():
            if not fd.output or fd.type == "crm_multifield":
                continue
            if wildcard or name in names or name == "ID":
                out[name] = rec.get(name)
        all_uf = chosen is None or "UF_*" in names
        for name in self._uf[entity]:
            if all_uf or name in names:
                out[name] = copy.deepcopy(rec.get(name))
        for mf in MULTIFIELD_TYPES:
            # "*" never brings multifields into a list; they must be selected by name.
            if mf in ENTITY_FIELDS[entity] and rec.get(mf) and (chosen is None or mf in names):
                out[mf] = copy.deepcopy(rec[mf])
        return out

    # ----- list filtering and ordering --------------------------------------------------------------------

    # ----- indexes: what a list filter or findbycomm would find by scanning every record ----------------

    def _index_keys(self, entity: str, spec: _IndexSpec, rec: JsonDict) -> set[Any]:
        """The keys ``rec`` is found under: a field's values as ``_match_condition`` compares them for
        ``=`` and ``@``, or a communication type's values as ``crm.duplicate.findbycomm`` normalises them."""
        what, name = spec
        if what == "comm":
            normalize = normalize_phone if name == "PHONE" else normalize_email
            return {normalize(e["VALUE"]) for e in rec.get(name, [])}
        kind = self._field_kind(entity, name)
        stored = [e["VALUE"] for e in rec.get(name) or []] if kind == "multi" else [rec.get(name)]
        norm_kind = "str" if kind == "multi" else str(kind)
        return {_norm(norm_kind, v, self._parse_dt) for v in stored if v not in (None, "")}

    def _index(self, entity: str, spec: _IndexSpec) -> _ValueIndex:
        """Built on first use, then kept by :meth:`_reindex` on every change of the entity's records."""
        index = self._indexes[entity].get(spec)
        if index is None:
            index = self._indexes[entity][spec] = _ValueIndex()
            for rid, rec in self._records[entity].items():
                index.put(rid, self._index_keys(entity, spec, rec))
        return index

    def _reindex(self, entity: str, record_id: int) -> None:
        rec = self._records[entity].get(record_id)
        for spec, index in self._indexes[entity].items():
            index.put(record_id, set() if rec is None else self._index_keys(entity, spec, rec))

    def _candidates(self, entity: str, filt: Any) -> list[JsonDict]:
        """The records a list filter can match: those its narrowest ``=``/``@`` condition on an indexable
        field finds in the index, or every record. The caller still applies the whole filter, so this
        only saves scanning records that one condition already rules out."""
        records = self._records[entity]
        best: set[int] | None = None
        for raw_key, fval in filt.items() if isinstance(filt, dict) else ():
            if not isinstance(raw_key, str):
                continue
            op, name = _split_filter_key(raw_key)
            kind = self._field_kind(entity, name)
            # Dates are left out: a stored date that cannot be read makes the condition skipped (a match).
            if op not in ("=", "@") or kind not in ("str", "num", "char", "multi"):
                continue
            if op == "=" and not isinstance(fval, (list, dict)):
                if fval is None or fval == "" or (fval is False and kind != "char"):
                    continue  # matches the empty values, which the index leaves out
                targets = [fval]
            else:
                targets = as_list(fval)
            norm_kind = "str" if kind == "multi" else str(kind)
            wanted = {_norm(norm_kind, t, self._parse_dt) for t in targets}
            if any(w is None or w != w for w in wanted):
                continue  # NaN or no value: left to the scan
            index = self._index(entity, ("field", name))
            ids = {rid for w in wanted for rid in index.ids(w)}
            if best is None or len(ids) < len(best):
                best = ids
        if best is None:
            return list(records.values())
        return [records[rid] for rid in sorted(best)]

    def _field_kind(self, entity: str, name: str) -> str | None:
        if name.startswith("UF_CRM_"):
            return "str"
        fd = ENTITY_FIELDS[entity].get(name)
        if fd is None or not fd.output:
            return None
        if fd.type == "crm_multifield":
            return "multi"
        if fd.type in _NUMERIC_TYPES:
            return "num"
        if fd.type in {"date", "datetime"}:
            return "date"
        if fd.type == "char":
            return "char"
        return "str"

    def _matches(self, entity: str, rec: JsonDict, filt: Any) -> bool:
        if not isinstance(filt, dict):
            return True
        for raw_key, fval in filt.items():
            if not isinstance(raw_key, str):
                continue
            op, name = _split_filter_key(raw_key)
            kind = self._field_kind(entity, name)
            if kind is None:
                continue  # unknown fields are dropped from the filter
            if kind == "multi":
                values = [e["VALUE"] for e in rec.get(name) or []] or [None]
                kind = "str"
            else:
                values = [rec.get(name)]
            try:
                if not _match_condition(kind, op, values, fval, self._parse_dt):
                    return False
            except _FilterSkip:
                continue
        return True

    def _sorted(self, entity: str, rows: list[JsonDict], order: Any) -> list[JsonDict]:
        keys: list[tuple[str, bool]] = []
        if isinstance(order, dict):
            for name, direction in order.items():
                if isinstance(name, str) and self._field_kind(entity, name) not in (None, "multi"):
                    keys.append((name, php_str(direction).strip().upper() == "DESC"))
        if not any(name == "ID" for name, _ in keys):
            keys.append(("ID", False))
        result = list(rows)
        for name, desc in reversed(keys):
            kind = self._field_kind(entity, name) or "str"
            result.sort(key=_field_sort_key(kind, name, self._parse_dt), reverse=desc)
        return result

    # ----- statuses -------------------------------------------------------------------------------------------

    def _seed_statuses(self) -> None:
        self._categories[0] = {"id": 0, "name": "Первичные", "sort": 100, "entityTypeId": 2, "isDefault": "Y"}
        for i, (sid, name, sem, color) in enumerate(_DEAL_STAGES):
            self._add_status(
                "DEAL_STAGE", sid, name, (i + 1) * 10, sem, color, system=sid in _SYSTEM_STAGES, category=0
            )
        for i, (sid, name, sem, color) in enumerate(_LEAD_STATUSES):
            system = sid in {"NEW", "CONVERTED", "JUNK"}
            self._add_status("STATUS", sid, name, (i + 1) * 10, sem, color, system=system, category=None)
        for entity_id, items in _PLAIN_STATUSES.items():
            for i, (sid, name) in enumerate(items):
                self._add_status(entity_id, sid, name, (i + 1) * 10, None, None, system=True, category=None)
        self.add_category("Повторные", sort=200, category_id=1)

    def _add_status(
        self,
        entity_id: str,
        status_id: str,
        name: str,
        sort: int,
        semantics: str | None,
        color: str | None,
        *,
        system: bool,
        category: int | None,
    ) -> None:
        item: JsonDict = {
            "ID": str(self._next_status_id),
            "ENTITY_ID": entity_id,
            "STATUS_ID": status_id,
            "NAME": name,
            "NAME_INIT": name if system else "",
            "SORT": str(sort),
            "SYSTEM": "Y" if system else "N",
            "CATEGORY_ID": None if not category else str(category),
            "COLOR": color,
            "SEMANTICS": semantics,
        }
        if color is not None:
            item["EXTRA"] = {"SEMANTICS": _SEMANTIC_NAMES[semantics], "COLOR": color}
        self._next_status_id += 1
        self._statuses.append(item)

    def _stages(self, category_id: int) -> list[JsonDict]:
        entity_id = _stage_entity(category_id)
        return sorted(
            (s for s in self._statuses if s["ENTITY_ID"] == entity_id), key=lambda s: (int(s["SORT"]), int(s["ID"]))
        )

    def _stage_owner(self, stage_id: str) -> int | None:
        for s in self._statuses:
            if s["ENTITY_ID"].startswith("DEAL_STAGE") and s["STATUS_ID"] == stage_id:
                return int(s["CATEGORY_ID"] or 0)
        return None

    # ----- events internals -------------------------------------------------------------------------------

    def _bind(self, event: str, handler: str, user_id: int, app: bool) -> int:
        if event not in EVENT_NAMES:
            raise ValueError(f"unsupported event {event}")
        binding = EventBinding(self._next_binding_id, event, handler, user_id, app)
        self._next_binding_id += 1
        self._bindings.append(binding)
        return binding.id

    def _fire(self, entity: str, action: str, record_id: int) -> None:
        self._reindex(entity, record_id)  # every change of a record comes through here
        event = f"ONCRM{entity.upper()}{action}"
        now = self.clock.now()
        self.events_log.append((event, record_id, now))
        for binding in self._bindings:
            if binding.event != event:
                continue
            pending = PendingEvent(
                binding.id, event, binding.handler, {"ID": str(record_id)}, now, binding.app, binding.user_id
            )
            if _consume_rule(self._drop_rules, event):
                self.dropped_events.append(pending)
                self._stats.events_dropped += 1
                continue
            copies = 2 if _consume_rule(self._duplicate_rules, event) else 1
            for _ in range(copies):
                self._pending.append(copy.deepcopy(pending))
                self._stats.events_queued += 1

    def _event_body(self, ev: PendingEvent) -> bytes:
        base = self.base_url or f"https://{self.domain}"
        pairs: list[tuple[str, str]] = [
            ("event", ev.event),
            ("event_handler_id", str(ev.binding_id)),
            *((f"data[FIELDS][{k}]", v) for k, v in ev.fields.items()),
            ("ts", str(int(self.clock.now()))),  # the dispatch moment, not the change moment
        ]
        if ev.app:
            token = self._new_token_pair(ev.user_id, None)
            pairs += [
                ("auth[access_token]", token["access_token"]),
                ("auth[expires]", str(token["expires"])),
                ("auth[expires_in]", str(token["expires_in"])),
                ("auth[scope]", "crm"),
            ]
        pairs += [
            ("auth[domain]", self.domain),
            ("auth[client_endpoint]", f"{base}/rest/"),
            ("auth[server_endpoint]", self.server_endpoint),
        ]
        if ev.app:
            pairs.append(("auth[status]", "L"))
        pairs += [("auth[member_id]", self.member_id), ("auth[application_token]", self.application_token)]
        return urlencode(pairs).encode()

    # ----- time helpers ---------------------------------------------------------------------------------

    def _iso(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self.tz).replace(microsecond=0).isoformat()

    def _today(self) -> date:
        return datetime.fromtimestamp(self.clock.now(), self.tz).date()

    def _date_out(self, day: date) -> str:
        # Legacy REST renders a date as UTC midnight seen in the portal zone: 2024-08-30T02:00:00+02:00.
        return datetime(day.year, day.month, day.day, tzinfo=UTC).astimezone(self.tz).isoformat()

    def _parse_dt(self, raw: Any) -> datetime | None:
        if not isinstance(raw, str):
            return None
        text = raw.strip()
        for fmt in ("%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%d.%m.%Y"):
            try:
                return datetime.strptime(text, fmt).replace(tzinfo=self.tz)
            except ValueError:
                pass
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=self.tz)


# ---------------------------------------------------------------------------------------------------------
# Module-level helpers
# ---------------------------------------------------------------------------------------------------------


def _parse_offset(text: str) -> timezone:
    match = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text)
    if match is None:
        raise ValueError(f"bad tz offset {text!r}")
    sign = 1 if match.group(1) == "+" else -1
    return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))


def _stage_entity(category_id: int) -> str:
    return "DEAL_STAGE" if category_id == 0 else f"DEAL_STAGE_{category_id}"


def _fields_param(p: Params) -> JsonDict:
    fields = p.array("fields")
    if isinstance(fields, list):  # a PHP array is an array, keyed or not
        return {str(i): v for i, v in enumerate(fields)}
    if not isinstance(fields, dict):
        raise legacy_error("Parameter 'fields' must be array.")
    return fields


def _uf_value(raw: Any, multiple: bool) -> Any:
    if multiple or isinstance(raw, (list, dict)):
        return [php_str(v) for v in as_list(raw)]
    return None if raw is None else php_str(raw)


def _select_set(select: Any) -> set[str]:
    names = {php_str(v) for v in as_list(select) if isinstance(v, (str, int))}
    return names or {"*"}


def _consume_rule(rules: list[_EventRule], event: str) -> bool:
    for rule in rules:
        if rule.event is None or rule.event == event:
            rule.count -= 1
            if rule.count <= 0:
                rules.remove(rule)
            return True
    return False


def _split_filter_key(key: str) -> tuple[str, str]:
    for op in _FILTER_OPS:
        if key.startswith(op):
            return op, key[len(op) :]
    return "=", key


def _norm(kind: str, value: Any, parse_dt: Callable[[Any], datetime | None]) -> Any:
    """Comparable form of a stored or filter value; raises _FilterSkip when it cannot be read."""
    if value is None:
        return None
    if kind == "num":
        if isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip().replace(",", "."))
        except ValueError:
            return float(php_intval(value))  # SQL casts garbage to 0 rather than ignoring it
    if kind == "date":
        parsed = parse_dt(value)
        if parsed is None:
            raise _FilterSkip
        return parsed.timestamp()
    if kind == "char":
        if isinstance(value, bool):
            return "Y" if value else "N"
        return php_str(value).upper()
    return php_str(value).casefold()


def _like(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _match_condition(
    kind: str, op: str, stored: list[Any], fval: Any, parse_dt: Callable[[Any], datetime | None]
) -> bool:
    """One filter condition against a field's stored values (several for multifields)."""
    negate = op in {"!", "!=", "!@", "!%", "!><"}
    base = {"!": "=", "!=": "=", "!@": "@", "!%": "%", "!><": "><"}.get(op, op)
    if base == "=" and isinstance(fval, (list, dict)):
        base = "@"
    if base == "=" and (fval is None or fval == "" or (fval is False and kind != "char")):
        hit = any(v in (None, "") for v in stored)
        return hit != negate
    values = [_norm(kind, v, parse_dt) if v not in (None, "") else None for v in stored]
    if base == "@":
        wanted = set()
        for item in as_list(fval):
            try:
                wanted.add(_norm(kind, item, parse_dt))
            except _FilterSkip:
                continue
        hit = any(v is not None and v in wanted for v in values)
    elif base in {"%", "=%", "%="}:
        needle = php_str(fval).casefold()
        texts = [php_str(v).casefold() for v in stored if v is not None]
        hit = any(needle in t for t in texts) if base == "%" else any(_like(needle, t) for t in texts)
    elif base == "><":
        bounds = as_list(fval)
        if len(bounds) != 2:
            raise _FilterSkip
        low, high = (_norm(kind, b, parse_dt) for b in bounds)
        hit = any(v is not None and low <= v <= high for v in values)
    else:
        target = _norm(kind, fval, parse_dt)
        hit = any(v is not None and _compare(base, v, target) for v in values)
    return hit != negate


def _compare(op: str, left: Any, right: Any) -> bool:
    if right is None:
        return False
    if isinstance(left, str) and isinstance(right, str) and op != "=":
        try:  # numeric-looking strings (UF fields) compare as numbers
            left_num, right_num = float(left), float(right)
        except ValueError:
            pass
        else:
            return _compare(op, left_num, right_num)
    if op == "=":
        return bool(left == right)
    if op == ">":
        return bool(left > right)
    if op == ">=":
        return bool(left >= right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    return False


def _sort_key(kind: str, value: Any, parse_dt: Callable[[Any], datetime | None] | None = None) -> tuple[Any, ...]:
    # MySQL puts NULLs first in ascending order; unreadable values sort as text after readable ones.
    if value in (None, ""):
        return (0,)
    try:
        normalized = _norm(kind, value, parse_dt or (lambda _: None))
    except _FilterSkip:
        return (2, php_str(value).casefold())
    return (1, normalized)


def _field_sort_key(
    kind: str, name: str, parse_dt: Callable[[Any], datetime | None] | None
) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    def key(row: Mapping[str, Any]) -> tuple[Any, ...]:
        return _sort_key(kind, row.get(name), parse_dt)

    return key


def _match_plain(item: Mapping[str, Any], filt: Any) -> bool:
    if not isinstance(filt, dict):
        return True
    for raw_key, fval in filt.items():
        if not isinstance(raw_key, str):
            continue
        op, name = _split_filter_key(raw_key.upper())
        if name not in item:
            continue
        kind = "num" if name in {"ID", "SORT"} else "str"
        try:
            if not _match_condition(kind, op, [item[name]], fval, lambda _: None):
                return False
        except _FilterSkip:
            continue
    return True


def _substitute(value: Any, sections: Mapping[str, Mapping[Any, Any]]) -> Any:
    """Replace ``$result[key][FIELD]…`` references in batch sub-command parameters, as the portal does
    (``CRestUtil::processBatchElement`` in the rest module): the path is walked while each key is set and
    stops at the first missing one, keeping the deepest value reached. A parameter that is exactly one
    reference becomes that value, whatever it is (a list of ids included); a reference inside longer text
    is replaced only by a string or number, and otherwise stays as written."""
    if isinstance(value, dict):
        return {k: _substitute(v, sections) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, sections) for v in value]
    if not isinstance(value, str) or "$result" not in value:
        return value
    whole = _REF_RE.fullmatch(value)
    if whole is not None:
        return copy.deepcopy(_resolve_ref(whole, sections))

    def replace(match: re.Match[str]) -> str:
        resolved = _resolve_ref(match, sections)
        if isinstance(resolved, bool) or not isinstance(resolved, str | int | float):
            return match.group(0)
        return php_str(resolved)

    return _REF_RE.sub(replace, value)


def _resolve_ref(match: re.Match[str], sections: Mapping[str, Mapping[Any, Any]]) -> Any:
    current: Any = sections.get(match.group(1), {})
    for segment in [match.group(2), *_PHP_SEG_RE.findall(match.group(3))]:
        if isinstance(current, dict):
            stored = next((v for k, v in current.items() if str(k) == segment), None)
        elif (
            isinstance(current, list) and segment.lstrip("-").isdigit() and -len(current) <= int(segment) < len(current)
        ):
            stored = current[int(segment)]
        else:
            stored = None
        if stored is None:  # PHP's isset(): a missing key or a null stops the walk
            break
        current = stored
    return current


def _request_params(request: Request) -> JsonDict:
    """Query string plus body (JSON, form or multipart); GET bodies are ignored like Bitrix does."""
    params = parse_php_query(request.query_string.decode("utf-8", "replace"))
    if request.method != "POST":
        return params
    body = request.get_data(cache=True)
    content_type = (request.mimetype or "").lower()
    if content_type == "multipart/form-data":
        params.update(build_php_tree(request.form.items(multi=True)))
        return params
    if not body.strip():
        return params
    text = body.decode("utf-8", "replace")
    if content_type == "application/json" or (
        content_type != "application/x-www-form-urlencoded" and text.lstrip().startswith("{")
    ):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PhpQueryError(f"Invalid JSON in request body: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise PhpQueryError("JSON request body must be an object")
        params.update(data)
        return params
    params.update(parse_php_query(text))
    return params


def _json_response(status: int, payload: Any) -> Response:
    # PHP's json_encode escapes "/" and non-ASCII; clients must cope with both.
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")
    return Response(text, status=status, content_type="application/json; charset=utf-8")


# What the portal's page says under the operating-time limit: the error code, its English description and
# the Russian text fast_bitrix24 issue 216 is titled with.
OPERATING_LIMIT_PAGE = (
    '<!DOCTYPE html><html><head><meta charset="utf-8"><title>429</title></head><body>'
    "429 | OPERATION_TIME_LIMIT<br>Method is blocked due to operation time limit.<br>"
    "Сумма времени всех запросов к методу превышает 480 секунд в рамках прошедших 10 минут<br></body></html>"
)


def _fault_response(fault: Fault) -> Response:
    if fault.html:
        try:
            reason = http.HTTPStatus(fault.status).phrase
        except ValueError:
            reason = "Error"
        body = fault.body or f"<html><body>{fault.status} {reason}</body></html>"
        return Response(body, status=fault.status, content_type="text/html; charset=utf-8")
    if fault.body is not None:
        return Response(fault.body, status=fault.status, content_type="application/json; charset=utf-8")
    return _json_response(fault.status, {"error": fault.error, "error_description": fault.description})
