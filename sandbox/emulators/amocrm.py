"""amoCRM (Kommo) API v4 emulator: a WSGI app faithful to the public behaviour the sync depends on.

What it covers (see /work/shared/reference/amocrm.md for the vendor behaviour it follows):

* OAuth 2.0 at ``/oauth2/access_token`` (JSON or form body): ``authorization_code`` and ``refresh_token``
  grants, JWT access tokens living 24 h (``exp`` claim, read by clients such as ``amocrm-api``), **single-use**
  refresh tokens living 90 days (reuse → 400 ``OAuthProblemJson`` with ``hint: "Token has been revoked"``), and
  long-lived tokens of private integrations (1 day … 5 years, no refresh token). ``Authorization: Bearer`` on
  every ``/api/v4`` call, 401 problem+json otherwise.
* ``/api/v4/leads`` and ``/api/v4/contacts``: list (``page``, ``limit`` ≤ 250, ``query``, ``filter[...]``,
  ``order[...]``, ``with=contacts|leads``), get by id, bulk POST (JSON array, ``request_id`` echo), bulk PATCH,
  PATCH by id; ``/api/v4/leads/complex``; link/unlink; pipelines and statuses (system 142/143 in every pipeline);
  custom field definitions; ``/api/v4/webhooks``; ``/api/v4/account``; ``/api/v4/users``.
* HAL envelopes (``application/hal+json``), **204 with an empty body** for an empty list or a missing entity,
  RFC 7807 ``application/problem+json`` errors with ``validation-errors`` for bad items.
* Rate limits driven by a controllable :class:`~sandbox.emulators.base.Clock`: sliding 1 s window, 7 requests
  per integration and 50 per account → 429 with an nginx HTML body and no ``Retry-After``; repeated violations
  → the integration is blocked (403, nginx HTML) for a cool-down.
* Webhooks: form-encoded POSTs in the legacy v2 field naming (``leads[status][0][old_status_id]``,
  ``account[subdomain]``), several events in one POST, queued on every change (API writes echo back) and sent
  when the test calls :meth:`AmoCrmEmulator.deliver_webhooks`; amoCRM's retry schedule and auto-disable run on
  the clock.
* Fault injection (problem+json or HTML bodies, "lost response" after the write was applied, latency),
  counters, and manager actions that change records the way a person in the UI would.

Emulator assumptions where amoCRM is undocumented or only observed (also listed in the module report):

* ``query`` is a case-insensitive substring match over the **raw stored strings** of the entity's name fields
  (name, first/last name) and all its custom field values; a lead also matches through its linked contacts'
  names and field values. No phone normalisation: ``+79991234567`` is not found by ``89991234567``, and
  ``8 (916) 111 22 33`` by neither ``9161112233`` nor ``111-22-33``. How amoCRM tokenises phones is
  undocumented; this is the worst case the gateway is designed for (it never relies on ``query``).
* A list without ``limit`` is a page of 50, whatever ``filter[id][]`` asks for (amocrm-api-php #210);
  ``limit`` above 250 (or below 1) answers 400 problem+json (``limit_over_max="clamp"`` clamps instead).
  :meth:`AmoCrmEmulator.list_reads` records every list read's query for tests.
  Lists are ordered by ``id`` ascending unless ``order[...]`` says otherwise. ``filter[custom_fields_values]``
  is ignored (like on accounts outside the filter alpha) unless ``cf_filter_enabled`` is set.
* A GET of a missing lead/contact is 204; PATCH ``/{entity}/{id}`` of a missing one is 404 problem+json; a
  bulk PATCH item with an unknown id is a validation error (``NotFound``, path ``id``). Unknown routes → 404,
  a known route with the wrong method → 405.
* Validation codes: ``FieldNotExpected`` (unknown key), ``NotSupportedChoice`` (unknown field/enum/status/
  pipeline/user/contact), ``InvalidType`` (wrong JSON type), ``FieldMissing`` (bulk PATCH item without ``id``),
  ``NotFound``. Any invalid item fails the whole request; nothing is written.
* PATCH replaces the values of every custom field that is sent and leaves the others alone; ``values: null``
  and ``values: []`` both clear the field. A PATCH that changes nothing does not bump ``updated_at`` and fires
  no webhook (it still counts as a write request in the stats).
* Multitext values without ``enum_id``/``enum_code`` get the field's first enum (``WORK``). Select values
  resolve by ``enum_id``, ``enum_code`` or the value text. Dates are stored as Unix ints (RFC 3339 accepted).
* A new lead without status goes to the first non-"unsorted" stage of its pipeline (main pipeline by default);
  API writes cannot put a lead into the unsorted stage (only ``/leads/complex`` with ``_embedded.metadata``).
  Moving to 142/143 sets ``closed_at``; leaving them clears it. ``pipeline_id`` without ``status_id`` on PATCH
  moves the lead to the first stage of that pipeline.
* Status changes fire ``status_lead`` and ``update_lead``; responsible changes fire ``responsible_*`` and
  ``update_*``; (un)linking a contact fires ``update_lead``. Webhook date custom fields are rendered as
  ``[values][0]=<ts>`` without ``[value]`` (the observed quirk); deletes carry only the id.
* Webhook retries: a failed POST (timeout/exception counts as 499) is retried after 5 min and 15 min; for 499
  and 5xx also after a further 15 min and 1 h. A retry re-sends the same body. A webhook is disabled when it
  has more than ``webhook_disable_after`` (100) failures within ``webhook_disable_window`` (2 h) and the latest
  attempt failed; its queue and retries are dropped and it receives no new events until re-subscribed.
* OAuth follows league/oauth2-server (which amoCRM runs): a refresh revokes the old refresh **and** access
  token; a wrong client id/secret or redirect URI is 401 ``Client authentication failed``; other grant errors
  are 400 with a ``hint``. The OAuth endpoint is not rate limited.
* Rate limiting: rejected (429/403) requests do not consume the window. The ``block_after``-th 429 within
  ``block_window`` seconds blocks that integration; every later API call with its tokens is 403 until
  ``block_seconds`` pass. Requests with unknown tokens are 401 before any limit is applied.
* A blocked integration gets the same 403 (nginx HTML) on ``/oauth2/access_token`` too (amocrm-api-php
  #563), before its grant is looked at, so a refresh token sent meanwhile is not spent.
  :meth:`AmoCrmEmulator.block` blocks by hand, even with rate limiting switched off.
* 504 for a bulk request above ``bulk_max_items`` (default 250) is an nginx HTML page and writes nothing.
  ``/leads/complex`` above 50 leads is a 400 problem+json; a lead there takes at most one contact/company.
* ``duplicate_control=True`` (off by default) makes ``/leads/complex`` reuse an existing contact whose PHONE
  matches on the last 10 digits, and merge into that contact's most recently updated open lead in the same
  pipeline (``merged: true``, existing ids); otherwise a new lead is linked to the existing contact.
* A reused refresh token answers 400 (``revoked_refresh_status`` = 401 reproduces the other captures).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import http
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, FaultQueue, webhook_sender
from sandbox.emulators.bitrix24 import PhpQueryError, parse_php_query

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]
WebhookPoster = Callable[[str, bytes, dict[str, str]], Any]

WON_STATUS_ID = 142
LOST_STATUS_ID = 143
UNSORTED_TYPE = 1
DEFAULT_PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 250
COMPLEX_MAX_LEADS = 50
BULK_MAX_ITEMS = 250
ACCESS_TOKEN_TTL = 86400
REFRESH_TOKEN_TTL = 90 * 86400
AUTH_CODE_TTL = 20 * 60
LONG_LIVED_MIN_DAYS = 1
LONG_LIVED_MAX_DAYS = 5 * 365 + 1
ENTITIES = ("leads", "contacts")
SINGULAR = {"leads": "lead", "contacts": "contact", "companies": "company"}
PHONE_ENUM_CODES = ("WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER")
EMAIL_ENUM_CODES = ("WORK", "PRIV", "OTHER")
CF_TYPES = frozenset(
    {
        "text",
        "textarea",
        "numeric",
        "checkbox",
        "select",
        "multiselect",
        "radiobutton",
        "date",
        "date_time",
        "birthday",
        "url",
        "multitext",
        "streetaddress",
    }
)
_ENUM_TYPES = frozenset({"select", "multiselect", "radiobutton"})
_DATE_TYPES = frozenset({"date", "date_time", "birthday"})
WEBHOOK_SETTINGS = frozenset(
    f"{action}_{entity}"
    for entity in ("lead", "contact", "company", "customer")
    for action in ("add", "update", "delete", "restore", "responsible", "note")
) | frozenset(
    {
        "status_lead",
        "add_task",
        "update_task",
        "delete_task",
        "responsible_task",
        "add_unsorted",
        "delete_unsorted",
        "add_talk",
        "update_talk",
        "add_message",
        "add_catalog",
        "update_catalog",
        "delete_catalog",
    }
)
WEBHOOK_RETRY_DELAYS: tuple[float, ...] = (300.0, 900.0, 900.0, 3600.0)
WEBHOOK_SHORT_RETRIES = 2  # codes 0-99 and 300+ (except 499/5xx) get only the first two retries

# ----- seeded account: ids look like a real account's ----------------------------------------------------

MAIN_PIPELINE_ID = 7845123
STATUS_UNSORTED = 63504801
STATUS_NEW_REQUEST = 63504804  # «Новая заявка»
STATUS_IN_WORK = 63504807  # «Взяли в работу»
STATUS_BOOKED = 63504810  # «Записан на прием»
STATUS_VISITED = 63504813  # «Посетил»

CONTACT_FIELD_PHONE = 871001
CONTACT_FIELD_EMAIL = 871003
CONTACT_FIELD_POSITION = 871005
CONTACT_FIELD_MIS_PATIENT_ID = 871007
CONTACT_FIELD_BIRTHDAY = 871009
CONTACT_FIELD_MAILING_CONSENT = 871011
LEAD_FIELD_MIS_APPOINTMENT_ID = 872001
LEAD_FIELD_APPOINTMENT_AT = 872003
LEAD_FIELD_DOCTOR = 872005
LEAD_FIELD_SOURCE = 872007
PHONE_ENUM_IDS = {code: 1801001 + 2 * i for i, code in enumerate(PHONE_ENUM_CODES)}
EMAIL_ENUM_IDS = {code: 1801021 + 2 * i for i, code in enumerate(EMAIL_ENUM_CODES)}
SOURCE_ENUM_IDS = {"Сайт": 1802001, "Звонок": 1802003, "МИС": 1802005}

_CLINIC_STAGES: tuple[tuple[int, str, str], ...] = (
    (STATUS_NEW_REQUEST, "Новая заявка", "#99ccff"),
    (STATUS_IN_WORK, "Взяли в работу", "#ffff99"),
    (STATUS_BOOKED, "Записан на прием", "#ffcc66"),
    (STATUS_VISITED, "Посетил", "#deff81"),
)
_STAGE_COLORS = ("#99ccff", "#ffff99", "#ffcc66", "#deff81", "#87f2c0", "#f9deff", "#fffeb2")

_LEAD_KEYS = frozenset(
    {
        "id",
        "name",
        "price",
        "status_id",
        "pipeline_id",
        "responsible_user_id",
        "created_by",
        "updated_by",
        "created_at",
        "updated_at",
        "closed_at",
        "loss_reason_id",
        "custom_fields_values",
        "_embedded",
        "request_id",
        "tags_to_add",
        "tags_to_delete",
    }
)
_CONTACT_KEYS = frozenset(
    {
        "id",
        "name",
        "first_name",
        "last_name",
        "responsible_user_id",
        "created_by",
        "updated_by",
        "created_at",
        "updated_at",
        "custom_fields_values",
        "_embedded",
        "request_id",
        "tags_to_add",
        "tags_to_delete",
    }
)
_CF_ITEM_KEYS = frozenset({"field_id", "field_code", "field_name", "field_type", "values"})
_SORTABLE = {"leads": ("id", "created_at", "updated_at"), "contacts": ("id", "updated_at")}
_NOT_VALID_CHOICE = "The value you selected is not a valid choice."

_NGINX_HTML = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _VErr:
    code: str
    path: str
    detail: str

    def as_dict(self) -> JsonDict:
        return {"code": self.code, "path": self.path, "detail": self.detail}


class ValidationFailed(Exception):
    """400 with ``validation-errors``: one element per failing item, keyed by its request_id."""

    def __init__(self, items: list[tuple[str, list[_VErr]]]) -> None:
        super().__init__("Request validation failed")
        self.items = items

    def body(self) -> JsonDict:
        return {
            "validation-errors": [
                {"request_id": rid, "errors": [e.as_dict() for e in errs]} for rid, errs in self.items
            ],
            "title": "Bad Request",
            "type": "https://httpstatus.es/400",
            "status": 400,
            "detail": "Request validation failed",
        }


class ApiProblem(Exception):
    """Any other problem+json answer (or an nginx HTML page when ``html``)."""

    def __init__(
        self, status: int, detail: str, *, title: str | None = None, extra: JsonDict | None = None, html: bool = False
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.extra = extra or {}
        self.html = html

    def response(self) -> Response:
        if self.html:
            return _html_response(self.status)
        body = _problem_body(self.status, self.detail, self.title)
        body.update(self.extra)
        return _json_response(self.status, body, problem=True)


class _OAuthError(Exception):
    def __init__(self, status: int, hint: str) -> None:
        super().__init__(hint)
        self.status = status
        self.hint = hint


# ---------------------------------------------------------------------------------------------------------
# Configuration, faults, webhooks, stats
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RateLimits:
    """Sliding-window limits; ``enabled=False`` switches limiting and blocking off."""

    enabled: bool = True
    integration_rps: int = 7
    account_rps: int = 50
    window: float = 1.0
    block_after: int = 5  # this many 429s within block_window block the integration
    block_window: float = 60.0
    block_seconds: float = 900.0
    block_html: bool = True  # nginx HTML 403 (observed); False → problem+json 403


@dataclass
class Fault:
    path_prefix: str | None
    method: str | None
    status: int
    html: bool
    times: int | None  # None = until cleared
    after_apply: bool
    detail: str | None = None
    body: str | None = None
    delay: float = 0.0
    hits: int = 0


class FaultInjector(FaultQueue[Fault]):
    """Deterministic, test-controlled failures, consumed in the order they were added."""

    def add(
        self,
        path_prefix: str | None = None,
        method: str | None = None,
        status: int = 500,
        *,
        html: bool = False,
        times: int | None = 1,
        after_apply: bool = False,
        detail: str | None = None,
        body: str | None = None,
        delay: float = 0.0,
    ) -> Fault:
        """Fail the next ``times`` requests whose path starts with ``path_prefix`` (``/api/v4/leads``,
        ``/oauth2``; None = any) and whose HTTP method is ``method`` (None = any).

        ``html=True`` answers an nginx HTML page; otherwise problem+json (``body`` replaces it verbatim).
        ``after_apply=True`` runs the request first (the write happens, webhooks queue) and then replaces the
        response: the "lost response" case. ``status=0`` with ``delay`` only adds latency (real seconds).
        """
        return self.push(
            Fault(
                path_prefix=path_prefix,
                method=method.upper() if method else None,
                status=status,
                html=html,
                times=times,
                after_apply=after_apply,
                detail=detail,
                body=body,
                delay=delay,
            )
        )

    def take(self, method: str, path: str, *, after_apply: bool) -> Fault | None:
        verb = method.upper()

        def matches(fault: Fault) -> bool:
            return (fault.method is None or fault.method == verb) and (
                fault.path_prefix is None or path.startswith(fault.path_prefix)
            )

        return self.take_matching(matches, after_apply=after_apply)


@dataclass
class Webhook:
    id: int
    destination: str
    settings: list[str]
    created_at: int
    updated_at: int
    created_by: int
    sort: int
    disabled: bool = False
    disabled_at: float | None = None
    failures: deque[float] = field(default_factory=deque)

    def render(self, account_id: int) -> JsonDict:
        return {
            "id": self.id,
            "destination": self.destination,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "account_id": account_id,
            "created_by": self.created_by,
            "sort": self.sort,
            "disabled": self.disabled,
            "settings": list(self.settings),
        }


@dataclass
class WebhookEvent:
    setting: str  # "status_lead"
    entity: str  # "leads"
    action: str  # "status"
    entity_id: int
    fields: list[tuple[str, str]]
    queued_at: float


@dataclass
class WebhookDelivery:
    webhook_id: int
    url: str
    body: bytes
    events: list[WebhookEvent]
    attempt: int  # 1 = first try
    at: float
    status: int | None = None
    error: str | None = None
    next_retry_at: float | None = None
    webhook_disabled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 100 <= self.status < 300


@dataclass
class _Retry:
    webhook_id: int
    url: str
    body: bytes
    events: list[WebhookEvent]
    attempts_done: int
    next_at: float


@dataclass
class _EventRule:
    count: int
    setting: str | None


@dataclass
class _Stats:
    requests: int = 0
    endpoints: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    integrations: dict[str, int] = field(default_factory=dict)
    rate_limited_429: int = 0
    blocked_403: int = 0
    unauthorized_401: int = 0
    writes: int = 0
    entities_created: int = 0
    entities_updated: int = 0
    faults: int = 0
    oauth_requests: int = 0
    token_refreshes: int = 0
    webhook_events_queued: int = 0
    webhook_events_dropped: int = 0
    webhook_posts: int = 0
    webhook_deliveries: int = 0
    webhook_failures: int = 0
    webhook_retries: int = 0
    webhooks_disabled: int = 0


def _bump(counter: dict[str, int], key: str, by: int = 1) -> None:
    counter[key] = counter.get(key, 0) + by


@dataclass
class CustomField:
    id: int
    entity: str
    name: str
    type: str
    code: str | None
    sort: int
    enums: list[JsonDict]  # {"id", "value", "sort"}; for multitext the value is the enum code
    is_api_only: bool = False

    def enum_by_id(self, enum_id: Any) -> JsonDict | None:
        return next((e for e in self.enums if e["id"] == enum_id), None)

    def enum_by_code(self, code: Any) -> JsonDict | None:
        if self.type == "multitext":
            return next((e for e in self.enums if e["value"] == code), None)
        return next((e for e in self.enums if e.get("code") == code), None)

    def render(self, base: str, account_id: int) -> JsonDict:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "account_id": account_id,
            "code": self.code,
            "sort": self.sort,
            "is_api_only": self.is_api_only,
            "enums": copy.deepcopy(self.enums) or None,
            "group_id": None,
            "required_statuses": [],
            "is_deletable": self.code not in {"PHONE", "EMAIL", "POSITION"},
            "is_predefined": self.code in {"PHONE", "EMAIL", "POSITION"},
            "entity_type": self.entity,
            "remind": None,
            "_links": {"self": {"href": f"{base}/api/v4/{self.entity}/custom_fields/{self.id}"}},
        }


@dataclass
class _Integration:
    client_id: str
    client_secret: str
    redirect_uri: str


@dataclass
class _AccessToken:
    token: str
    client_id: str
    user_id: int
    expires_at: float
    long_lived: bool = False
    revoked: bool = False


@dataclass
class _RefreshToken:
    token: str
    client_id: str
    user_id: int
    expires_at: float
    access_token: str
    used: bool = False


@dataclass
class _AuthCode:
    client_id: str
    user_id: int
    expires_at: float
    used: bool = False


@dataclass
class _Ctx:
    base: str
    user_id: int
    client_id: str
    args: JsonDict
    raw_query: str


@dataclass
class _Write:
    """One validated item of a write request."""

    request_id: str
    fields: JsonDict = field(default_factory=dict)
    cf: list[tuple[CustomField, list[JsonDict] | None]] = field(default_factory=list)
    contacts: list[tuple[int, bool]] = field(default_factory=list)
    tags: list[str] | None = None
    tags_add: list[str] = field(default_factory=list)
    tags_del: list[str] = field(default_factory=list)
    target_id: int | None = None
    # /leads/complex only
    new_contact: _Write | None = None
    contact_ref: int | None = None
    company_name: str | None = None
    company_ref: int | None = None


@dataclass
class _Route:
    pattern: re.Pattern[str]
    template: str
    methods: dict[str, str]  # HTTP method → handler attribute name


_ROUTES: tuple[_Route, ...] = tuple(
    _Route(re.compile(pattern), template, methods)
    for pattern, template, methods in (
        (r"^/api/v4/leads/complex$", "/api/v4/leads/complex", {"POST": "_h_complex"}),
        (r"^/api/v4/leads/pipelines$", "/api/v4/leads/pipelines", {"GET": "_h_pipelines"}),
        (r"^/api/v4/leads/pipelines/(\d+)$", "/api/v4/leads/pipelines/{id}", {"GET": "_h_pipeline"}),
        (
            r"^/api/v4/leads/pipelines/(\d+)/statuses$",
            "/api/v4/leads/pipelines/{id}/statuses",
            {"GET": "_h_statuses"},
        ),
        (
            r"^/api/v4/leads/pipelines/(\d+)/statuses/(\d+)$",
            "/api/v4/leads/pipelines/{id}/statuses/{id}",
            {"GET": "_h_status"},
        ),
        (r"^/api/v4/(leads|contacts)/custom_fields$", "/api/v4/{entity}/custom_fields", {"GET": "_h_fields"}),
        (r"^/api/v4/(leads|contacts)/custom_fields/(\d+)$", "/api/v4/{entity}/custom_fields/{id}", {"GET": "_h_field"}),
        (r"^/api/v4/(leads|contacts)/(\d+)/link$", "/api/v4/{entity}/{id}/link", {"POST": "_h_link"}),
        (r"^/api/v4/(leads|contacts)/(\d+)/unlink$", "/api/v4/{entity}/{id}/unlink", {"POST": "_h_unlink"}),
        (r"^/api/v4/(leads|contacts)/(\d+)/links$", "/api/v4/{entity}/{id}/links", {"GET": "_h_links"}),
        (
            r"^/api/v4/(leads|contacts)$",
            "/api/v4/{entity}",
            {"GET": "_h_list", "POST": "_h_create", "PATCH": "_h_update_bulk"},
        ),
        (r"^/api/v4/(leads|contacts)/(\d+)$", "/api/v4/{entity}/{id}", {"GET": "_h_get", "PATCH": "_h_update_one"}),
        (
            r"^/api/v4/webhooks$",
            "/api/v4/webhooks",
            {"GET": "_h_webhooks", "POST": "_h_webhook_add", "DELETE": "_h_webhook_delete"},
        ),
        (r"^/api/v4/account$", "/api/v4/account", {"GET": "_h_account"}),
        (r"^/api/v4/users$", "/api/v4/users", {"GET": "_h_users"}),
        (r"^/api/v4/users/(\d+)$", "/api/v4/users/{id}", {"GET": "_h_user"}),
    )
)


# ---------------------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------------------


class AmoCrmEmulator:
    """In-memory amoCRM account exposed as a WSGI app. All state sits behind one re-entrant lock."""

    def __init__(
        self,
        clock: Clock | None = None,
        subdomain: str = "clinic",
        account_id: int = 29085955,
        client_id: str = "5b2c7f4e-8d1a-4c3b-9e6f-0a1b2c3d4e5f",
        client_secret: str = "emuAmoSecret0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ",
        redirect_uri: str = "https://sync.clinic.example/oauth/amocrm",
        rate_limit: bool = True,
        *,
        base_url: str | None = None,
        api_user_id: int = 10923457,
        manager_user_id: int = 10923460,
        access_token_ttl: float = ACCESS_TOKEN_TTL,
        refresh_token_ttl: float = REFRESH_TOKEN_TTL,
        bulk_max_items: int = BULK_MAX_ITEMS,
        complex_max_leads: int = COMPLEX_MAX_LEADS,
        limit_over_max: str = "error",
        cf_filter_enabled: bool = False,
        duplicate_control: bool = False,
        webhook_timeout: float = 2.0,
        webhook_disable_after: int = 100,
        webhook_disable_window: float = 7200.0,
    ) -> None:
        self.clock = clock or Clock()
        self.subdomain = subdomain
        self.account_id = account_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.base_url = base_url  # hrefs in responses; None → the request's own scheme and host
        self.public_url = f"https://{subdomain}.amocrm.ru"  # account[_links][self] in webhooks
        self.api_user_id = api_user_id
        self.manager_user_id = manager_user_id
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.bulk_max_items = bulk_max_items
        self.complex_max_leads = complex_max_leads
        if limit_over_max not in {"error", "clamp"}:
            raise ValueError("limit_over_max must be 'error' or 'clamp'")
        self.limit_over_max = limit_over_max
        self.cf_filter_enabled = cf_filter_enabled
        self.duplicate_control = duplicate_control
        self.webhook_timeout = webhook_timeout
        self.webhook_disable_after = webhook_disable_after
        self.webhook_disable_window = webhook_disable_window
        self.webhook_retry_delays: tuple[float, ...] = WEBHOOK_RETRY_DELAYS
        self.webhook_short_retries = WEBHOOK_SHORT_RETRIES
        self.revoked_refresh_status = 400  # some captures show 401 for a spent refresh token
        self.limits = RateLimits(enabled=rate_limit)
        self.faults = FaultInjector()

        self._lock = threading.RLock()
        self._jwt_key = secrets.token_bytes(32)
        self._records: dict[str, dict[int, JsonDict]] = {e: {} for e in ENTITIES}
        self.companies: dict[int, JsonDict] = {}
        self._next_id = {"leads": 25400001, "contacts": 33100001, "companies": 33900001}
        self._lead_contacts: dict[int, dict[int, bool]] = {}  # lead id → {contact id: is_main}
        # contact id → its lead ids in _lead_contacts' order, rebuilt after a link changes: rendering a
        # contact's leads scanned every lead's links (quadratic over a 50k import's contact reads).
        self._links_version = 0
        self._leads_by_contact: tuple[int, dict[int, list[int]]] = (-1, {})
        self._lead_company: dict[int, int] = {}
        self._tags: dict[int, JsonDict] = {}
        self._tag_index: dict[tuple[str, str], int] = {}
        self._entity_tags: dict[tuple[str, int], list[int]] = {}
        self._next_tag_id = 412001
        self._users: dict[int, JsonDict] = {}
        self._pipelines: dict[int, JsonDict] = {}
        self._next_status_id = STATUS_VISITED + 3
        self._fields: dict[str, dict[int, CustomField]] = {e: {} for e in ENTITIES}
        self._next_field_id = 872101
        self._next_enum_id = 1803001
        self._integrations: dict[str, _Integration] = {client_id: _Integration(client_id, client_secret, redirect_uri)}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._auth_codes: dict[str, _AuthCode] = {}
        self._hits: dict[str, deque[float]] = {}
        self._account_hits: deque[float] = deque()
        self._violations: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._webhooks: dict[int, Webhook] = {}
        self._next_webhook_id = 839656
        self._hook_pending: dict[int, list[WebhookEvent]] = {}
        self._hook_retries: list[_Retry] = []
        self._drop_rules: list[_EventRule] = []
        self._duplicate_rules: list[_EventRule] = []
        self.events_log: list[tuple[str, int, float]] = []  # (setting, entity id, ts) for every change
        self._list_reads: list[tuple[str, JsonDict]] = []  # (path, parsed query) of every authorised list GET
        self.delivery_log: list[WebhookDelivery] = []
        self.dropped_events: list[WebhookEvent] = []
        self._cf_history: dict[tuple[str, int], dict[int, list[Any]]] = {}
        self._stats = _Stats()
        self._seed()

    # ----- public helpers: state and setup ------------------------------------------------------------

    @property
    def leads(self) -> dict[int, JsonDict]:
        """Live id → lead map (read shape without ``_links``/``_embedded``)."""
        return self._records["leads"]

    @property
    def contacts(self) -> dict[int, JsonDict]:
        return self._records["contacts"]

    def lead(self, lead_id: int, *, with_contacts: bool = True) -> JsonDict | None:
        """A deep copy of a lead as ``GET /api/v4/leads/{id}?with=contacts`` would return it."""
        with self._lock:
            rec = self.leads.get(lead_id)
            with_ = {"contacts"} if with_contacts else set()
            return None if rec is None else self._render("leads", rec, self._default_base(), with_)

    def contact(self, contact_id: int, *, with_leads: bool = True) -> JsonDict | None:
        with self._lock:
            rec = self.contacts.get(contact_id)
            with_ = {"leads"} if with_leads else set()
            return None if rec is None else self._render("contacts", rec, self._default_base(), with_)

    def field_history(self, entity: str, record_id: int, field_id: int) -> list[Any]:
        """Every value a record's custom field held, oldest first (None: empty). amoCRM keeps this as
        ``custom_field_value_changed`` events; this inspection helper reads it without the events API."""
        with self._lock:
            return list(self._cf_history.get((entity, record_id), {}).get(field_id, []))

    def _note_cf_history(self, entity: str, record_id: int, rec: JsonDict) -> None:
        history = self._cf_history.setdefault((entity, record_id), {})
        now = {
            item["field_id"]: (item.get("values") or [{}])[0].get("value")
            for item in rec.get("custom_fields_values") or []
        }
        for field_id in {*history, *now}:
            values = history.setdefault(field_id, [])
            if not values or values[-1] != now.get(field_id):
                values.append(copy.deepcopy(now.get(field_id)))

    def lead_contact_ids(self, lead_id: int) -> list[int]:
        with self._lock:
            return list(self._lead_contacts.get(lead_id, {}))

    def contact_lead_ids(self, contact_id: int) -> list[int]:
        with self._lock:
            return self._leads_of(contact_id)

    def _leads_of(self, contact_id: int) -> list[int]:
        """The leads linked to a contact, in the order a scan of ``_lead_contacts`` finds them."""
        version, by_contact = self._leads_by_contact
        if version != self._links_version:
            by_contact = {}
            for lid, links in self._lead_contacts.items():
                for cid in links:
                    by_contact.setdefault(cid, []).append(lid)
            self._leads_by_contact = (self._links_version, by_contact)
        return list(by_contact.get(contact_id, ()))

    def cf_value(self, entity: str, record_id: int, field: int | str) -> list[JsonDict] | None:
        """The stored values of one custom field (by id or code), or None when the field is empty."""
        with self._lock:
            rec = self._records[entity][record_id]
            for item in rec.get("custom_fields_values") or []:
                if field in (item["field_id"], item["field_code"]):
                    values: list[JsonDict] = copy.deepcopy(item["values"])
                    return values
            return None

    def add_custom_field(
        self,
        entity: str,
        name: str,
        type: str = "text",
        *,
        code: str | None = None,
        enums: Sequence[str] = (),
        field_id: int | None = None,
        sort: int | None = None,
    ) -> int:
        """Register a custom field on ``leads``/``contacts``; returns its id. Select enums get generated ids."""
        with self._lock:
            if entity not in ENTITIES:
                raise KeyError(entity)
            if type not in CF_TYPES:
                raise ValueError(f"unsupported field type {type}")
            fid = field_id if field_id is not None else self._next_field_id
            self._next_field_id = max(self._next_field_id, fid) + 2
            if fid in self._fields[entity]:
                raise ValueError(f"field {fid} exists")
            enum_rows = []
            for i, value in enumerate(enums):
                enum_rows.append({"id": self._next_enum_id, "value": value, "sort": (i + 1) * 10})
                self._next_enum_id += 2
            self._fields[entity][fid] = CustomField(
                fid, entity, name, type, code, sort if sort is not None else 500 + len(self._fields[entity]), enum_rows
            )
            return fid

    def custom_field(self, entity: str, field: int | str) -> CustomField:
        with self._lock:
            found = self._find_field(entity, field)
            if found is None:
                raise KeyError(field)
            return found

    def enum_id(self, entity: str, field: int | str, value: str) -> int:
        """Enum id of a select option (by text) or a multitext enum code."""
        cf = self.custom_field(entity, field)
        for enum in cf.enums:
            if enum["value"] == value or enum.get("code") == value:
                return int(enum["id"])
        raise KeyError(value)

    def add_pipeline(
        self,
        name: str,
        statuses: Sequence[str] = (),
        *,
        is_main: bool = False,
        sort: int | None = None,
        pipeline_id: int | None = None,
    ) -> int:
        """Create a pipeline with an unsorted stage, the given stages and the system 142/143 stages."""
        with self._lock:
            pid = pipeline_id if pipeline_id is not None else max(self._pipelines, default=MAIN_PIPELINE_ID) + 3
            if pid in self._pipelines:
                raise ValueError(f"pipeline {pid} exists")
            if len(self._pipelines) >= 50:
                raise ValueError("an account has at most 50 pipelines")
            if is_main:
                for other in self._pipelines.values():
                    other["is_main"] = False
            self._pipelines[pid] = {
                "id": pid,
                "name": name,
                "sort": sort if sort is not None else 1 + len(self._pipelines),
                "is_main": is_main or not self._pipelines,
                "is_unsorted_on": True,
                "is_archive": False,
                "statuses": [],
            }
            self._add_status(pid, "Неразобранное", 10, "#c1c1c1", UNSORTED_TYPE, False, self._new_status_id())
            for i, stage in enumerate(statuses):
                self._add_status(pid, stage, 20 + 10 * i, _STAGE_COLORS[i % len(_STAGE_COLORS)], 0, True, None)
            self._add_status(pid, "Успешно реализовано", 10000, "#CCFF66", 0, False, WON_STATUS_ID)
            self._add_status(pid, "Закрыто и не реализовано", 11000, "#D5D8DB", 0, False, LOST_STATUS_ID)
            return pid

    def add_status(
        self,
        pipeline_id: int,
        name: str,
        *,
        sort: int | None = None,
        status_id: int | None = None,
        color: str | None = None,
    ) -> int:
        """Add a stage to a pipeline (before 142/143 unless ``sort`` says otherwise); returns its id."""
        with self._lock:
            pipeline = self._pipelines[pipeline_id]
            if len(pipeline["statuses"]) >= 100:
                raise ValueError("a pipeline has at most 100 statuses")
            if sort is None:
                open_sorts = [s["sort"] for s in pipeline["statuses"] if s["id"] not in {WON_STATUS_ID, LOST_STATUS_ID}]
                sort = max(open_sorts, default=0) + 10
            n = len(pipeline["statuses"])
            return self._add_status(
                pipeline_id, name, sort, color or _STAGE_COLORS[n % len(_STAGE_COLORS)], 0, True, status_id
            )

    def statuses(self, pipeline_id: int = MAIN_PIPELINE_ID) -> list[JsonDict]:
        with self._lock:
            return copy.deepcopy(self._sorted_statuses(pipeline_id))

    def status_id(self, name: str, pipeline_id: int = MAIN_PIPELINE_ID) -> int:
        with self._lock:
            for status in self._pipelines[pipeline_id]["statuses"]:
                if status["name"] == name:
                    return int(status["id"])
            raise KeyError(name)

    def add_user(self, name: str, *, user_id: int | None = None, email: str | None = None) -> int:
        with self._lock:
            uid = user_id if user_id is not None else max(self._users) + 3
            self._users[uid] = {
                "id": uid,
                "name": name,
                "email": email or f"user{uid}@{self.subdomain}.example",
                "lang": "ru",
                "rights": {"leads": {"view": "A", "edit": "A", "add": "A", "delete": "A", "export": "A"}},
            }
            return uid

    def register_integration(
        self, client_id: str, client_secret: str | None = None, redirect_uri: str | None = None
    ) -> str:
        """Install another integration on the account (it gets its own 7 rps budget)."""
        with self._lock:
            self._integrations[client_id] = _Integration(
                client_id, client_secret or secrets.token_urlsafe(48), redirect_uri or self.redirect_uri
            )
            return client_id

    # ----- OAuth helpers ----------------------------------------------------------------------------------

    def issue_tokens(self, user_id: int | None = None, *, client_id: str | None = None) -> JsonDict:
        """A fresh pair, as the code exchange would return it."""
        with self._lock:
            cid = client_id or self.client_id
            self._integration(cid)
            return self._new_pair(cid, user_id or self.api_user_id)

    def issue_auth_code(self, user_id: int | None = None, *, client_id: str | None = None) -> str:
        """An authorization code for ``grant_type=authorization_code`` (lives 20 minutes, single use)."""
        with self._lock:
            code = "def50200" + secrets.token_hex(96)
            cid = client_id or self.client_id
            self._integration(cid)
            self._auth_codes[code] = _AuthCode(cid, user_id or self.api_user_id, self.clock.now() + AUTH_CODE_TTL)
            return code

    def issue_long_lived_token(
        self, days: float = 365, *, user_id: int | None = None, client_id: str | None = None
    ) -> str:
        """A private integration's long-lived token (1 day … 5 years, no refresh token)."""
        if not LONG_LIVED_MIN_DAYS <= days <= LONG_LIVED_MAX_DAYS:
            raise ValueError("a long-lived token lives between 1 day and 5 years")
        with self._lock:
            cid = client_id or self.client_id
            self._integration(cid)
            token = self._new_access_token(cid, user_id or self.api_user_id, days * 86400.0, long_lived=True)
            return token.token

    def expire_access_tokens(self) -> None:
        """Every access token (long-lived ones included) is past its ``exp`` now."""
        with self._lock:
            now = self.clock.now()
            for token in self._access_tokens.values():
                token.expires_at = min(token.expires_at, now - 1)

    def revoke_tokens(self, client_id: str | None = None) -> None:
        """The admin disabled the integration: all its tokens stop working."""
        with self._lock:
            cid = client_id or self.client_id
            for token in self._access_tokens.values():
                if token.client_id == cid:
                    token.revoked = True
            for refresh in self._refresh_tokens.values():
                if refresh.client_id == cid:
                    refresh.used = True

    def token_valid(self, access_token: str) -> bool:
        with self._lock:
            token = self._access_tokens.get(access_token)
            return token is not None and not token.revoked and token.expires_at > self.clock.now()

    # ----- manager actions (UI edits by a person: fire webhooks, not counted in stats) ------------------

    def manager_create_lead(
        self, name: str | None = None, *, contact_ids: Sequence[int] = (), user_id: int | None = None, **fields: Any
    ) -> int:
        """Create a lead as a manager would. ``fields`` are API write fields (``status_id``, ``price``,
        ``custom_fields_values`` in write shape, …); ``contact_ids`` are linked, the first as main."""
        item: JsonDict = dict(fields)
        if name is not None:
            item["name"] = name
        if contact_ids:
            embedded = dict(item.get("_embedded") or {})
            embedded["contacts"] = [{"id": cid, "is_main": i == 0} for i, cid in enumerate(contact_ids)]
            item["_embedded"] = embedded
        with self._lock:
            return self._manager_create("leads", item, user_id)

    def manager_create_contact(self, *, user_id: int | None = None, **fields: Any) -> int:
        with self._lock:
            return self._manager_create("contacts", dict(fields), user_id)

    def manager_update_lead(self, lead_id: int, *, user_id: int | None = None, **fields: Any) -> None:
        with self._lock:
            self._manager_update("leads", lead_id, dict(fields), user_id)

    def manager_move_lead(
        self,
        lead_id: int,
        status_id: int,
        pipeline_id: int | None = None,
        *,
        loss_reason_id: int | None = None,
        user_id: int | None = None,
    ) -> None:
        """Drag the lead to another stage (fires ``status_lead`` and ``update_lead``)."""
        fields: JsonDict = {"status_id": status_id}
        if pipeline_id is not None:
            fields["pipeline_id"] = pipeline_id
        if loss_reason_id is not None:
            fields["loss_reason_id"] = loss_reason_id
        with self._lock:
            self._manager_update("leads", lead_id, fields, user_id)

    def manager_update_contact(self, contact_id: int, *, user_id: int | None = None, **fields: Any) -> None:
        with self._lock:
            self._manager_update("contacts", contact_id, dict(fields), user_id)

    def manager_link(self, lead_id: int, contact_id: int, *, is_main: bool = False) -> None:
        with self._lock:
            if lead_id not in self.leads or contact_id not in self.contacts:
                raise KeyError((lead_id, contact_id))
            if self._link(lead_id, contact_id, is_main):
                self._touch("leads", lead_id, user_id=self.manager_user_id)

    def manager_delete_lead(self, lead_id: int) -> None:
        with self._lock:
            self._delete("leads", lead_id)

    def manager_delete_contact(self, contact_id: int) -> None:
        with self._lock:
            self._delete("contacts", contact_id)

    def _manager_create(self, entity: str, item: JsonDict, user_id: int | None) -> int:
        write, errs = self._check_item(entity, item, 0, mode="create")
        if errs:
            raise ValueError([e.as_dict() for e in errs])
        return self._apply_create(entity, write, user_id or self.manager_user_id)

    def _manager_update(self, entity: str, record_id: int, item: JsonDict, user_id: int | None) -> None:
        if record_id not in self._records[entity]:
            raise KeyError(record_id)
        item = {**item, "id": record_id}
        write, errs = self._check_item(entity, item, 0, mode="update")
        if errs:
            raise ValueError([e.as_dict() for e in errs])
        self._apply_update(entity, record_id, write, user_id or self.manager_user_id)

    # ----- webhooks ---------------------------------------------------------------------------------------

    def add_webhook(self, url: str, events: Iterable[str] = ("add_lead", "update_lead", "status_lead")) -> int:
        """Subscribe ``url`` to ``events`` (amoCRM ``settings`` names); re-subscribing a URL re-enables it."""
        with self._lock:
            settings = list(dict.fromkeys(events))
            unknown = [s for s in settings if s not in WEBHOOK_SETTINGS]
            if unknown or not settings:
                raise ValueError(f"unknown webhook events: {unknown}")
            return self._subscribe(url, settings, self.api_user_id).id

    def remove_webhook(self, url: str) -> bool:
        with self._lock:
            return self._unsubscribe(url)

    @property
    def webhooks(self) -> list[Webhook]:
        with self._lock:
            return [copy.deepcopy(w) for w in self._webhooks.values()]

    def disabled_webhooks(self) -> list[Webhook]:
        with self._lock:
            return [copy.deepcopy(w) for w in self._webhooks.values() if w.disabled]

    def enable_webhook(self, webhook_id: int) -> None:
        with self._lock:
            hook = self._webhooks[webhook_id]
            hook.disabled = False
            hook.disabled_at = None
            hook.failures.clear()

    def pending_webhook_events(self, webhook_id: int | None = None) -> list[WebhookEvent]:
        with self._lock:
            out: list[WebhookEvent] = []
            for hid, events in self._hook_pending.items():
                if webhook_id is None or hid == webhook_id:
                    out.extend(copy.deepcopy(events))
            return out

    def scheduled_retries(self) -> list[tuple[int, int, float]]:
        """(webhook id, next attempt number, due time) for every queued retry."""
        with self._lock:
            return [(r.webhook_id, r.attempts_done + 1, r.next_at) for r in self._hook_retries]

    def drop_next_events(self, count: int = 1, event: str | None = None) -> None:
        """The next ``count`` webhook events (optionally only ``event``, e.g. ``status_lead``) are lost."""
        with self._lock:
            self._drop_rules.append(_EventRule(count, event))

    def duplicate_next_events(self, count: int = 1, event: str | None = None) -> None:
        """The next ``count`` webhook events are queued twice (at-least-once delivery)."""
        with self._lock:
            self._duplicate_rules.append(_EventRule(count, event))

    def clear_pending_webhooks(self) -> int:
        with self._lock:
            n = sum(len(v) for v in self._hook_pending.values())
            self._hook_pending.clear()
            self._hook_retries.clear()
            return n

    def deliver_webhooks(
        self, post: WebhookPoster | None = None, *, max_events_per_post: int | None = None
    ) -> list[WebhookDelivery]:
        """Send every webhook's queued events as one form-encoded POST each, and re-send retries now due.

        ``post(url, body, headers)`` returns the HTTP status (None counts as 200) or raises (a timeout or
        connection error, treated like amoCRM's 499). The default posts with httpx and a 2 s timeout. A
        failure schedules a retry of the same body on the clock (:data:`WEBHOOK_RETRY_DELAYS`); too many
        failures disable the webhook. Delivery runs outside the state lock so a receiver may call back in.
        """
        now = self.clock.now()
        jobs: list[tuple[_Retry | None, WebhookDelivery]] = []
        with self._lock:
            due = [r for r in self._hook_retries if r.next_at <= now]
            self._hook_retries = [r for r in self._hook_retries if r.next_at > now]
            for retry in due:
                hook = self._webhooks.get(retry.webhook_id)
                if hook is None or hook.disabled:
                    continue
                delivery = WebhookDelivery(
                    retry.webhook_id, retry.url, retry.body, retry.events, retry.attempts_done + 1, now
                )
                jobs.append((retry, delivery))
            for hook in self._webhooks.values():
                events = self._hook_pending.pop(hook.id, [])
                if hook.disabled or not events:
                    continue
                size = max_events_per_post or len(events)
                for start in range(0, len(events), size):
                    chunk = events[start : start + size]
                    jobs.append(
                        (None, WebhookDelivery(hook.id, hook.destination, self._hook_body(chunk), chunk, 1, now))
                    )
        sender = post or self._httpx_post
        headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "amoCRM-Webhooks/3.0"}
        for _, delivery in jobs:
            try:
                returned = sender(delivery.url, delivery.body, dict(headers))
                delivery.status = 200 if returned is None else int(returned)
                if not delivery.ok:
                    delivery.error = f"HTTP {delivery.status}"
            except Exception as exc:  # a timeout or a dead receiver is a failed attempt, never a crash
                delivery.error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            for source, delivery in jobs:
                self._record_delivery(source, delivery, now)
        return [d for _, d in jobs]

    def _record_delivery(self, retry: _Retry | None, delivery: WebhookDelivery, now: float) -> None:
        self.delivery_log.append(delivery)
        self._stats.webhook_posts += 1
        if retry is not None:
            self._stats.webhook_retries += 1
        if delivery.ok:
            self._stats.webhook_deliveries += 1
            return
        self._stats.webhook_failures += 1
        hook = self._webhooks.get(delivery.webhook_id)
        if hook is None or hook.disabled:
            return
        hook.failures.append(now)
        while hook.failures and hook.failures[0] <= now - self.webhook_disable_window:
            hook.failures.popleft()
        if len(hook.failures) > self.webhook_disable_after:
            hook.disabled = True
            hook.disabled_at = now
            delivery.webhook_disabled = True
            self._stats.webhooks_disabled += 1
            self._hook_pending.pop(hook.id, None)
            self._hook_retries = [r for r in self._hook_retries if r.webhook_id != hook.id]
            return
        status = delivery.status
        full = status is None or status == 499 or 500 <= status <= 599
        allowed = (
            len(self.webhook_retry_delays) if full else min(self.webhook_short_retries, len(self.webhook_retry_delays))
        )
        done = delivery.attempt
        if done - 1 < allowed:
            next_at = now + self.webhook_retry_delays[done - 1]
            delivery.next_retry_at = next_at
            self._hook_retries.append(
                _Retry(delivery.webhook_id, delivery.url, delivery.body, delivery.events, done, next_at)
            )

    @property
    def delivery_failures(self) -> list[WebhookDelivery]:
        with self._lock:
            return [d for d in self.delivery_log if not d.ok]

    def _httpx_post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        return webhook_sender().post(url, content=body, headers=headers, timeout=self.webhook_timeout).status_code

    # ----- stats and limits -------------------------------------------------------------------------------

    def stats(self) -> JsonDict:
        """Counters: ``requests`` (API calls, OAuth excluded), ``endpoints`` ("GET /api/v4/leads/{id}" → n),
        ``statuses`` (HTTP status → n), ``integrations`` (client id → n), ``rate_limited_429``,
        ``blocked_403``, ``unauthorized_401``, ``writes`` (applied POST/PATCH/DELETE API requests),
        ``entities_created``/``entities_updated`` (records that actually changed), ``faults``,
        ``oauth_requests``, ``token_refreshes`` and the webhook counters ``webhook_events_queued``,
        ``webhook_events_dropped``, ``webhook_posts`` (attempts), ``webhook_deliveries`` (2xx),
        ``webhook_failures``, ``webhook_retries`` (attempts that were retries), ``webhooks_disabled``."""
        with self._lock:
            s = self._stats
            return {
                "requests": s.requests,
                "endpoints": dict(s.endpoints),
                "statuses": dict(s.statuses),
                "integrations": dict(s.integrations),
                "rate_limited_429": s.rate_limited_429,
                "blocked_403": s.blocked_403,
                "unauthorized_401": s.unauthorized_401,
                "writes": s.writes,
                "entities_created": s.entities_created,
                "entities_updated": s.entities_updated,
                "faults": s.faults,
                "oauth_requests": s.oauth_requests,
                "token_refreshes": s.token_refreshes,
                "webhook_events_queued": s.webhook_events_queued,
                "webhook_events_dropped": s.webhook_events_dropped,
                "webhook_posts": s.webhook_posts,
                "webhook_deliveries": s.webhook_deliveries,
                "webhook_failures": s.webhook_failures,
                "webhook_retries": s.webhook_retries,
                "webhooks_disabled": s.webhooks_disabled,
            }

    def list_reads(self) -> list[tuple[str, JsonDict]]:
        """``(path, parsed query)`` of every authorised ``GET /api/v4/leads|contacts`` list read, in order
        (tests assert that every one sends ``limit``: without it amoCRM answers 50 rows)."""
        with self._lock:
            return [(path, copy.deepcopy(args)) for path, args in self._list_reads]

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = _Stats()
            self._list_reads.clear()

    def reset_limits(self) -> None:
        """Forget request windows, violations and blocks."""
        with self._lock:
            self._hits.clear()
            self._account_hits.clear()
            self._violations.clear()
            self._blocked_until.clear()

    def block(self, seconds: float = 3600.0, client_id: str | None = None) -> None:
        """Block an integration (ours by default) as repeated violations do: API and token endpoint 403."""
        with self._lock:
            self._blocked_until[client_id or self.client_id] = self.clock.now() + seconds

    def blocked_until(self, client_id: str | None = None) -> float | None:
        with self._lock:
            until = self._blocked_until.get(client_id or self.client_id)
            return until if until is not None and until > self.clock.now() else None

    # ----- WSGI -------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        request.max_content_length = 16 * 1024 * 1024
        delay = 0.0
        try:
            response, delay = self._dispatch(request)
        except Exception:  # a bug must look like a vendor 500, not kill the server thread
            log.exception("amocrm emulator crashed")
            response = _json_response(500, _problem_body(500, "Internal Server Error"), problem=True)
        if delay > 0:
            time.sleep(delay)  # latency injection, outside the state lock
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> tuple[Response, float]:
        path = request.path.rstrip("/") or "/"
        method = request.method.upper()
        with self._lock:
            if path == "/oauth2/access_token":
                self._stats.oauth_requests += 1
                response, delay = self._with_faults(method, path, lambda: self._handle_oauth(request))
                _bump(self._stats.statuses, str(response.status_code))
                return response, delay
            route, groups = _match_route(path)
            if route is None:
                return ApiProblem(404, "Not Found").response(), 0.0
            self._stats.requests += 1
            template = route.template.replace("{entity}", groups[0]) if "{entity}" in route.template else route.template
            _bump(self._stats.endpoints, f"{method} {template}")
            handler_name = route.methods.get(method)
            if handler_name is None:
                response = ApiProblem(405, "Method Not Allowed").response()
                delay = 0.0
            else:
                response, delay = self._handle_api(request, method, path, handler_name, groups)
            _bump(self._stats.statuses, str(response.status_code))
            response.headers["X-Request-Id"] = uuid.uuid4().hex
            return response, delay

    def _with_faults(self, method: str, path: str, run: Callable[[], Response]) -> tuple[Response, float]:
        fault = self.faults.take(method, path, after_apply=False)
        if fault is not None and fault.status:
            self._stats.faults += 1
            return _fault_response(fault), fault.delay
        delay = fault.delay if fault is not None else 0.0
        response = run()
        after = self.faults.take(method, path, after_apply=True)
        if after is not None:
            delay += after.delay
            if after.status:
                self._stats.faults += 1
                return _fault_response(after), delay
        return response, delay

    def _handle_api(
        self, request: Request, method: str, path: str, handler_name: str, groups: tuple[str, ...]
    ) -> tuple[Response, float]:
        now = self.clock.now()
        header = request.headers.get("Authorization", "")
        scheme, _, raw_token = header.partition(" ")
        token = self._access_tokens.get(raw_token.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            self._stats.unauthorized_401 += 1
            return _unauthorized(), 0.0
        _bump(self._stats.integrations, token.client_id)
        limited = self._admit(token.client_id, now)
        if limited is not None:
            return limited, 0.0
        if token.revoked or token.expires_at <= now:
            self._stats.unauthorized_401 += 1
            return _unauthorized(), 0.0
        try:
            args = parse_php_query(request.query_string.decode("utf-8", "replace"))
        except PhpQueryError as exc:
            return ApiProblem(400, str(exc)).response(), 0.0
        ctx = _Ctx(
            base=self.base_url.rstrip("/") if self.base_url else request.host_url.rstrip("/"),
            user_id=token.user_id,
            client_id=token.client_id,
            args=args,
            raw_query=request.query_string.decode("utf-8", "replace"),
        )
        handler = getattr(self, handler_name)

        def run() -> Response:
            try:
                response: Response = handler(ctx, request, *groups)
            except ValidationFailed as exc:
                return _json_response(400, exc.body(), problem=True)
            except ApiProblem as exc:
                return exc.response()
            if method in {"POST", "PATCH", "DELETE"} and response.status_code < 300:
                self._stats.writes += 1
            return response

        return self._with_faults(method, path, run)

    def _blocked(self, client_id: str, now: float) -> Response | None:
        until = self._blocked_until.get(client_id)
        if until is None or until <= now:
            return None
        self._stats.blocked_403 += 1
        if self.limits.block_html:
            return _html_response(403)
        return ApiProblem(403, "Account is blocked").response()

    def _admit(self, client_id: str, now: float) -> Response | None:
        lim = self.limits
        blocked = self._blocked(client_id, now)
        if blocked is not None or not lim.enabled:
            return blocked
        hits = self._hits.setdefault(client_id, deque())
        for window in (hits, self._account_hits):
            while window and window[0] <= now - lim.window:
                window.popleft()
        if len(hits) >= lim.integration_rps or len(self._account_hits) >= lim.account_rps:
            self._stats.rate_limited_429 += 1
            violations = self._violations.setdefault(client_id, deque())
            violations.append(now)
            while violations and violations[0] <= now - lim.block_window:
                violations.popleft()
            if len(violations) >= lim.block_after:
                self._blocked_until[client_id] = now + lim.block_seconds
                violations.clear()
            return _html_response(429)
        hits.append(now)
        self._account_hits.append(now)
        return None

    # ----- OAuth ------------------------------------------------------------------------------------------

    def _handle_oauth(self, request: Request) -> Response:
        if request.method.upper() != "POST":
            return ApiProblem(405, "Method Not Allowed").response()
        params: JsonDict = {}
        text = request.get_data(as_text=True)
        if (request.mimetype or "") == "application/x-www-form-urlencoded":
            params = dict(parse_qsl(text, keep_blank_values=True))
        elif text.strip():
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None
            if not isinstance(data, dict):
                return _oauth_problem(400, "Check the `grant_type` parameter")
            params = data
        blocked = self._blocked(str(params.get("client_id") or ""), self.clock.now())
        if blocked is not None:
            return blocked
        try:
            return _json_response(200, self._oauth_grant(params))
        except _OAuthError as exc:
            return _oauth_problem(exc.status, exc.hint)

    def _oauth_grant(self, params: Mapping[str, Any]) -> JsonDict:
        grant = params.get("grant_type")
        if not grant:
            raise _OAuthError(400, "Check the `grant_type` parameter")
        if grant not in {"authorization_code", "refresh_token"}:
            raise _OAuthError(400, "The authorization grant type is not supported by the authorization server.")
        integration = self._integrations.get(str(params.get("client_id") or ""))
        if (
            integration is None
            or not hmac.compare_digest(str(params.get("client_secret") or ""), integration.client_secret)
            or str(params.get("redirect_uri") or "") != integration.redirect_uri
        ):
            raise _OAuthError(401, "Client authentication failed")
        now = self.clock.now()
        if grant == "authorization_code":
            code = str(params.get("code") or "")
            if not code:
                raise _OAuthError(400, "Check the `code` parameter")
            auth = self._auth_codes.get(code)
            if auth is None:
                raise _OAuthError(400, "Cannot decrypt the authorization code")
            if auth.client_id != integration.client_id:
                raise _OAuthError(400, "Authorization code was not issued to this client")
            if auth.used:
                raise _OAuthError(400, "Authorization code has been revoked")
            if auth.expires_at <= now:
                raise _OAuthError(400, "Authorization code has expired")
            auth.used = True
            return self._new_pair(integration.client_id, auth.user_id)
        raw = str(params.get("refresh_token") or "")
        if not raw:
            raise _OAuthError(400, "Check the `refresh_token` parameter")
        refresh = self._refresh_tokens.get(raw)
        if refresh is None:
            raise _OAuthError(400, "Invalid refresh token")
        if refresh.client_id != integration.client_id:
            raise _OAuthError(400, "Token is not linked to client")
        if refresh.used:
            raise _OAuthError(self.revoked_refresh_status, "Token has been revoked")
        if refresh.expires_at <= now:
            raise _OAuthError(400, "Token has expired")
        refresh.used = True
        old_access = self._access_tokens.get(refresh.access_token)
        if old_access is not None:
            old_access.revoked = True
        self._stats.token_refreshes += 1
        return self._new_pair(integration.client_id, refresh.user_id)

    def _integration(self, client_id: str) -> _Integration:
        integration = self._integrations.get(client_id)
        if integration is None:
            raise KeyError(f"unknown integration {client_id}")
        return integration

    def _new_access_token(self, client_id: str, user_id: int, ttl: float, *, long_lived: bool) -> _AccessToken:
        now = self.clock.now()
        claims = {
            "aud": client_id,
            "jti": uuid.uuid4().hex,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "sub": str(user_id),
            "grant_type": "",
            "account_id": self.account_id,
            "base_domain": "amocrm.ru",
            "version": 2,
            "scopes": ["crm", "files", "files_delete", "notifications", "push_notifications"],
            "api_domain": "api-b.amocrm.ru",
        }
        jwt = _make_jwt(claims, self._jwt_key)
        token = _AccessToken(jwt, client_id, user_id, float(int(now + ttl)), long_lived=long_lived)
        self._access_tokens[jwt] = token
        return token

    def _new_pair(self, client_id: str, user_id: int) -> JsonDict:
        access = self._new_access_token(client_id, user_id, self.access_token_ttl, long_lived=False)
        refresh = "def50200" + secrets.token_hex(128)
        self._refresh_tokens[refresh] = _RefreshToken(
            refresh, client_id, user_id, self.clock.now() + self.refresh_token_ttl, access.token
        )
        return {
            "token_type": "Bearer",
            "expires_in": int(self.access_token_ttl),
            "server_time": int(self.clock.now()),
            "access_token": access.token,
            "refresh_token": refresh,
        }

    # ----- handlers: entities -----------------------------------------------------------------------------

    def _h_list(self, ctx: _Ctx, request: Request, entity: str) -> Response:
        args = ctx.args
        self._list_reads.append((f"/api/v4/{entity}", copy.deepcopy(args)))
        # No ``limit`` means amoCRM's default page of 50, even when ``filter[id][]`` names 250 ids.
        page = _int_arg(args.get("page"), 1, "page")
        limit = _int_arg(args.get("limit"), DEFAULT_PAGE_LIMIT, "limit")
        if page < 1:
            raise ApiProblem(400, "Invalid page: must be a positive integer")
        if limit < 1 or limit > MAX_PAGE_LIMIT:
            if self.limit_over_max == "clamp":
                limit = min(max(limit, 1), MAX_PAGE_LIMIT)
            else:
                raise ApiProblem(400, f"Invalid limit: must be between 1 and {MAX_PAGE_LIMIT}")
        rows = [r for r in self._candidates(entity, args.get("filter")) if self._matches(entity, r, args.get("filter"))]
        query = args.get("query")
        if isinstance(query, (str, int)) and str(query) != "":
            needle = str(query).lower()
            rows = [r for r in rows if any(needle in s.lower() for s in self._search_strings(entity, r))]
        rows = self._ordered(entity, rows, args.get("order"))
        chunk = rows[(page - 1) * limit : page * limit]
        if not chunk:
            return _no_content()
        with_ = _with_set(args)
        links: JsonDict = {"self": {"href": _page_href(ctx, entity, page, limit)}}
        if page * limit < len(rows):
            links["next"] = {"href": _page_href(ctx, entity, page + 1, limit)}
        if page > 1:
            links["first"] = {"href": _page_href(ctx, entity, 1, limit)}
            links["prev"] = {"href": _page_href(ctx, entity, page - 1, limit)}
        return _json_response(
            200,
            {
                "_page": page,
                "_links": links,
                "_embedded": {entity: [self._render(entity, r, ctx.base, with_) for r in chunk]},
            },
        )

    def _h_get(self, ctx: _Ctx, request: Request, entity: str, rid: str) -> Response:
        rec = self._records[entity].get(int(rid))
        if rec is None:
            return _no_content()
        return _json_response(200, self._render(entity, rec, ctx.base, _with_set(ctx.args)))

    def _h_create(self, ctx: _Ctx, request: Request, entity: str) -> Response:
        items = self._body_array(request)
        writes = self._validate_all(entity, items, mode="create")
        out = []
        for w in writes:
            new_id = self._apply_create(entity, w, ctx.user_id)
            out.append({"id": new_id, "request_id": w.request_id, "_links": _self_link(ctx.base, entity, new_id)})
        return _json_response(
            200, {"_links": {"self": {"href": f"{ctx.base}/api/v4/{entity}"}}, "_embedded": {entity: out}}
        )

    def _h_update_bulk(self, ctx: _Ctx, request: Request, entity: str) -> Response:
        items = self._body_array(request)
        writes = self._validate_all(entity, items, mode="update")
        out = []
        for w in writes:
            assert w.target_id is not None
            self._apply_update(entity, w.target_id, w, ctx.user_id)
            rec = self._records[entity][w.target_id]
            out.append(
                {
                    "id": w.target_id,
                    "updated_at": rec["updated_at"],
                    "request_id": w.request_id,
                    "_links": _self_link(ctx.base, entity, w.target_id),
                }
            )
        return _json_response(
            200, {"_links": {"self": {"href": f"{ctx.base}/api/v4/{entity}"}}, "_embedded": {entity: out}}
        )

    def _h_update_one(self, ctx: _Ctx, request: Request, entity: str, rid: str) -> Response:
        record_id = int(rid)
        if record_id not in self._records[entity]:
            raise ApiProblem(404, "Entity not found")
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ApiProblem(400, "Request body must be an object")
        item = {**body, "id": record_id}
        write, errs = self._check_item(entity, item, 0, mode="update")
        if errs:
            raise ValidationFailed([(write.request_id, errs)])
        self._apply_update(entity, record_id, write, ctx.user_id)
        rec = self._records[entity][record_id]
        return _json_response(
            200, {"id": record_id, "updated_at": rec["updated_at"], "_links": _self_link(ctx.base, entity, record_id)}
        )

    def _h_complex(self, ctx: _Ctx, request: Request) -> Response:
        items = self._body_array(request, limit=None)
        if len(items) > self.complex_max_leads:
            raise ApiProblem(400, f"Too many leads in one request: at most {self.complex_max_leads}")
        writes = self._validate_all("leads", items, mode="complex")
        out = []
        for w in writes:
            out.append(self._apply_complex(w, ctx.user_id))
        return _json_response(200, out)

    def _h_link(self, ctx: _Ctx, request: Request, entity: str, rid: str) -> Response:
        record_id = int(rid)
        if record_id not in self._records[entity]:
            raise ApiProblem(404, "Entity not found")
        items = self._body_array(request, limit=None)
        pairs, rendered = self._link_items(entity, record_id, items)
        touched: set[int] = set()
        for (lead_id, contact_id), item in zip(pairs, items, strict=True):
            metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
            if self._link(lead_id, contact_id, bool(metadata.get("is_main"))):
                touched.add(lead_id)
        for lead_id in touched:
            self._touch("leads", lead_id, user_id=ctx.user_id)
        return _json_response(
            200,
            {
                "_total_items": len(rendered),
                "_links": {"self": {"href": f"{ctx.base}/api/v4/{entity}/{record_id}/link"}},
                "_embedded": {"links": rendered},
            },
        )

    def _h_unlink(self, ctx: _Ctx, request: Request, entity: str, rid: str) -> Response:
        record_id = int(rid)
        if record_id not in self._records[entity]:
            raise ApiProblem(404, "Entity not found")
        items = self._body_array(request, limit=None)
        pairs, _ = self._link_items(entity, record_id, items)
        for lead_id, contact_id in pairs:
            links = self._lead_contacts.get(lead_id, {})
            if contact_id in links:
                self._links_version += 1
                was_main = links.pop(contact_id)
                if was_main and links:
                    links[next(iter(links))] = True
                self._touch("leads", lead_id, user_id=ctx.user_id)
        return _no_content()

    def _h_links(self, ctx: _Ctx, request: Request, entity: str, rid: str) -> Response:
        record_id = int(rid)
        if record_id not in self._records[entity]:
            raise ApiProblem(404, "Entity not found")
        rendered = []
        if entity == "leads":
            for contact_id, is_main in self._lead_contacts.get(record_id, {}).items():
                rendered.append(_link_row("leads", record_id, "contacts", contact_id, {"is_main": is_main}))
        else:
            for lead_id in self._leads_of(record_id):
                rendered.append(_link_row("contacts", record_id, "leads", lead_id, None))
        if not rendered:
            return _no_content()
        return _json_response(
            200,
            {
                "_total_items": len(rendered),
                "_links": {"self": {"href": f"{ctx.base}/api/v4/{entity}/{record_id}/links"}},
                "_embedded": {"links": rendered},
            },
        )

    def _link_items(
        self, entity: str, record_id: int, items: list[Any]
    ) -> tuple[list[tuple[int, int]], list[JsonDict]]:
        other = "contacts" if entity == "leads" else "leads"
        failures: list[tuple[str, list[_VErr]]] = []
        pairs: list[tuple[int, int]] = []
        rendered: list[JsonDict] = []
        for i, item in enumerate(items):
            errs: list[_VErr] = []
            if not isinstance(item, dict):
                failures.append((str(i), [_VErr("InvalidType", "", "This value should be of type object.")]))
                continue
            to_type = item.get("to_entity_type")
            to_id = item.get("to_entity_id")
            if to_type != other:
                errs.append(_VErr("NotSupportedChoice", "to_entity_type", _NOT_VALID_CHOICE))
            elif not _is_int(to_id) or to_id not in self._records[other]:
                errs.append(_VErr("NotSupportedChoice", "to_entity_id", _NOT_VALID_CHOICE))
            if errs:
                failures.append((str(item.get("request_id", i)), errs))
                continue
            assert isinstance(to_id, int)
            target = to_id
            lead_id, contact_id = (record_id, target) if entity == "leads" else (target, record_id)
            pairs.append((lead_id, contact_id))
            metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else None
            rendered.append(_link_row(entity, record_id, other, target, metadata))
        if failures:
            raise ValidationFailed(failures)
        return pairs, rendered

    # ----- handlers: pipelines, fields, account, users ----------------------------------------------------

    def _h_pipelines(self, ctx: _Ctx, request: Request) -> Response:
        rows = sorted(self._pipelines.values(), key=lambda p: (p["sort"], p["id"]))
        return _json_response(
            200,
            {
                "_total_items": len(rows),
                "_links": {"self": {"href": f"{ctx.base}/api/v4/leads/pipelines"}},
                "_embedded": {"pipelines": [self._render_pipeline(p, ctx.base) for p in rows]},
            },
        )

    def _h_pipeline(self, ctx: _Ctx, request: Request, pid: str) -> Response:
        pipeline = self._pipelines.get(int(pid))
        if pipeline is None:
            raise ApiProblem(404, "Pipeline not found")
        return _json_response(200, self._render_pipeline(pipeline, ctx.base))

    def _h_statuses(self, ctx: _Ctx, request: Request, pid: str) -> Response:
        if int(pid) not in self._pipelines:
            raise ApiProblem(404, "Pipeline not found")
        statuses = [self._render_status(s, ctx.base) for s in self._sorted_statuses(int(pid))]
        return _json_response(
            200,
            {
                "_total_items": len(statuses),
                "_links": {"self": {"href": f"{ctx.base}/api/v4/leads/pipelines/{pid}/statuses"}},
                "_embedded": {"statuses": statuses},
            },
        )

    def _h_status(self, ctx: _Ctx, request: Request, pid: str, sid: str) -> Response:
        if int(pid) not in self._pipelines:
            raise ApiProblem(404, "Pipeline not found")
        status = self._status_in(int(pid), int(sid))
        if status is None:
            raise ApiProblem(404, "Status not found")
        return _json_response(200, self._render_status(status, ctx.base))

    def _h_fields(self, ctx: _Ctx, request: Request, entity: str) -> Response:
        page = _int_arg(ctx.args.get("page"), 1, "page")
        limit = min(_int_arg(ctx.args.get("limit"), 50, "limit"), MAX_PAGE_LIMIT)
        rows = sorted(self._fields[entity].values(), key=lambda f: (f.sort, f.id))
        chunk = rows[(page - 1) * limit : page * limit] if page >= 1 and limit >= 1 else []
        if not chunk:
            return _no_content()
        links: JsonDict = {"self": {"href": f"{ctx.base}/api/v4/{entity}/custom_fields?page={page}&limit={limit}"}}
        if page * limit < len(rows):
            links["next"] = {"href": f"{ctx.base}/api/v4/{entity}/custom_fields?page={page + 1}&limit={limit}"}
        return _json_response(
            200,
            {
                "_total_items": len(rows),
                "_page": page,
                "_page_count": -(-len(rows) // limit),
                "_links": links,
                "_embedded": {"custom_fields": [f.render(ctx.base, self.account_id) for f in chunk]},
            },
        )

    def _h_field(self, ctx: _Ctx, request: Request, entity: str, fid: str) -> Response:
        cf = self._fields[entity].get(int(fid))
        if cf is None:
            return _no_content()
        return _json_response(200, cf.render(ctx.base, self.account_id))

    def _h_account(self, ctx: _Ctx, request: Request) -> Response:
        return _json_response(
            200,
            {
                "id": self.account_id,
                "name": "Клиника",
                "subdomain": self.subdomain,
                "created_at": 1_600_000_000,
                "created_by": self.api_user_id,
                "updated_at": 1_600_000_000,
                "updated_by": self.api_user_id,
                "current_user_id": ctx.user_id,
                "country": "RU",
                "currency": "RUB",
                "currency_symbol": "₽",
                "customers_mode": "disabled",
                "is_unsorted_on": True,
                "is_loss_reason_enabled": True,
                "is_helpbot_enabled": False,
                "is_technical_account": False,
                "contact_name_display_order": 1,
                "_links": {"self": {"href": f"{ctx.base}/api/v4/account"}},
            },
        )

    def _h_users(self, ctx: _Ctx, request: Request) -> Response:
        rows = [self._render_user(u, ctx.base) for _, u in sorted(self._users.items())]
        return _json_response(
            200,
            {
                "_total_items": len(rows),
                "_page": 1,
                "_page_count": 1,
                "_links": {"self": {"href": f"{ctx.base}/api/v4/users"}},
                "_embedded": {"users": rows},
            },
        )

    def _h_user(self, ctx: _Ctx, request: Request, uid: str) -> Response:
        user = self._users.get(int(uid))
        if user is None:
            raise ApiProblem(404, "User not found")
        return _json_response(200, self._render_user(user, ctx.base))

    # ----- handlers: webhooks -----------------------------------------------------------------------------

    def _h_webhooks(self, ctx: _Ctx, request: Request) -> Response:
        filt = ctx.args.get("filter")
        destination = filt.get("destination") if isinstance(filt, dict) else None
        rows = [
            w.render(self.account_id)
            for w in self._webhooks.values()
            if destination is None or w.destination == destination
        ]
        if not rows:
            return _no_content()
        return _json_response(200, {"_total_items": len(rows), "_embedded": {"webhooks": rows}})

    def _h_webhook_add(self, ctx: _Ctx, request: Request) -> Response:
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ApiProblem(400, "Request body must be an object")
        errs: list[_VErr] = []
        destination = body.get("destination")
        if not isinstance(destination, str) or not re.match(r"^https?://[^\s/]+", destination):
            errs.append(_VErr("InvalidUrl", "destination", "This value is not a valid URL."))
        settings = body.get("settings")
        if not isinstance(settings, list) or not settings:
            errs.append(_VErr("InvalidType", "settings", "This value should be of type array."))
        else:
            for i, setting in enumerate(settings):
                if setting not in WEBHOOK_SETTINGS:
                    errs.append(_VErr("NotSupportedChoice", f"settings.{i}", _NOT_VALID_CHOICE))
        extra = set(body) - {"destination", "settings", "sort"}
        errs.extend(_VErr("FieldNotExpected", key, "This field was not expected.") for key in sorted(extra))
        if errs:
            raise ValidationFailed([("0", errs)])
        assert isinstance(destination, str) and isinstance(settings, list)
        hook = self._subscribe(destination, [str(s) for s in dict.fromkeys(settings)], ctx.user_id)
        return _json_response(200, hook.render(self.account_id))

    def _h_webhook_delete(self, ctx: _Ctx, request: Request) -> Response:
        body = _json_body(request)
        destination = body.get("destination") if isinstance(body, dict) else None
        if not isinstance(destination, str):
            raise ValidationFailed([("0", [_VErr("InvalidUrl", "destination", "This value is not a valid URL.")])])
        if not self._unsubscribe(destination):
            raise ApiProblem(404, "Webhook not found")
        return _no_content()

    def _subscribe(self, destination: str, settings: list[str], user_id: int) -> Webhook:
        now = int(self.clock.now())
        for hook in self._webhooks.values():
            if hook.destination == destination:
                hook.settings = settings
                hook.updated_at = now
                hook.disabled = False
                hook.disabled_at = None
                hook.failures.clear()
                return hook
        if len(self._webhooks) >= 100:
            raise ApiProblem(400, "An account can have at most 100 webhooks")
        hook = Webhook(self._next_webhook_id, destination, settings, now, now, user_id, len(self._webhooks) + 1)
        self._next_webhook_id += 1
        self._webhooks[hook.id] = hook
        return hook

    def _unsubscribe(self, destination: str) -> bool:
        for hook in list(self._webhooks.values()):
            if hook.destination == destination:
                del self._webhooks[hook.id]
                self._hook_pending.pop(hook.id, None)
                self._hook_retries = [r for r in self._hook_retries if r.webhook_id != hook.id]
                return True
        return False

    # ----- request bodies and validation ------------------------------------------------------------------

    def _body_array(self, request: Request, *, limit: int | None = -1) -> list[Any]:
        body = _json_body(request)
        if not isinstance(body, list):
            raise ApiProblem(400, "Request body must be an array")
        if not body:
            raise ApiProblem(400, "Request body is empty")
        cap = self.bulk_max_items if limit == -1 else limit
        if cap is not None and len(body) > cap:
            raise ApiProblem(504, "Gateway Timeout", html=True)
        return body

    def _validate_all(self, entity: str, items: list[Any], *, mode: str) -> list[_Write]:
        writes: list[_Write] = []
        failures: list[tuple[str, list[_VErr]]] = []
        seen_ids: set[int] = set()
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                failures.append((str(i), [_VErr("InvalidType", "", "This value should be of type object.")]))
                continue
            write, errs = self._check_item(entity, item, i, mode=mode)
            if mode == "update" and write.target_id is not None:
                if write.target_id in seen_ids:
                    errs.append(_VErr("NotUnique", "id", "This entity is already in the request."))
                seen_ids.add(write.target_id)
            if errs:
                failures.append((write.request_id, errs))
            writes.append(write)
        if failures:
            raise ValidationFailed(failures)
        if entity == "leads":
            self._check_loss_reasons(writes)
        return writes

    def _check_loss_reasons(self, writes: list[_Write]) -> None:
        bad: JsonDict = {}
        for w in writes:
            if w.fields.get("loss_reason_id") is None:
                continue
            status = w.fields.get("status_id")
            if status is None and w.target_id is not None:
                status = self.leads[w.target_id]["status_id"]
            if status != LOST_STATUS_ID:
                bad[str(w.target_id or w.request_id)] = "Loss reason can be specified only for lost lead"
        if bad:
            raise ApiProblem(400, "Invalid request body", extra={"errors": bad})

    def _check_item(
        self, entity: str, item: JsonDict, index: int, *, mode: str, prefix: str = ""
    ) -> tuple[_Write, list[_VErr]]:
        """Validate one write item (``mode``: create, update, complex, complex_contact)."""
        rid_raw = item.get("request_id", str(index))
        w = _Write(request_id=str(rid_raw))
        errs: list[_VErr] = []
        allowed = _LEAD_KEYS if entity == "leads" else _CONTACT_KEYS
        for key in item:
            if key not in allowed:
                errs.append(_VErr("FieldNotExpected", prefix + key, "This field was not expected."))
        existing: JsonDict | None = None
        if mode == "update":
            raw_id = item.get("id")
            if raw_id is None:
                errs.append(_VErr("FieldMissing", prefix + "id", "This field is missing."))
            elif not _is_int(raw_id):
                errs.append(_VErr("InvalidType", prefix + "id", "This value should be of type int."))
            elif raw_id not in self._records[entity]:
                errs.append(_VErr("NotFound", prefix + "id", "Entity not found"))
            else:
                w.target_id = raw_id
                existing = self._records[entity][raw_id]
        elif "id" in item:
            errs.append(_VErr("FieldNotExpected", prefix + "id", "This field was not expected."))
        strings = ("name",) if entity == "leads" else ("name", "first_name", "last_name")
        for key in strings:
            if key in item:
                if not isinstance(item[key], str):
                    errs.append(_VErr("InvalidType", prefix + key, "This value should be of type string."))
                else:
                    w.fields[key] = item[key]
        ints = ["responsible_user_id", "created_by", "updated_by", "created_at", "updated_at"]
        if entity == "leads":
            ints += ["price", "status_id", "pipeline_id", "closed_at", "loss_reason_id"]
        for key in ints:
            if key not in item:
                continue
            value = item[key]
            if value is None and key in {"closed_at", "loss_reason_id"}:
                w.fields[key] = None
            elif not _is_int(value) or value < 0:
                errs.append(_VErr("InvalidType", prefix + key, "This value should be of type int."))
            else:
                w.fields[key] = value
        if "responsible_user_id" in w.fields and w.fields["responsible_user_id"] not in self._users:
            errs.append(_VErr("NotSupportedChoice", prefix + "responsible_user_id", _NOT_VALID_CHOICE))
            w.fields.pop("responsible_user_id")
        if entity == "leads":
            self._check_status(w, existing, mode, errs, prefix, metadata=_has_metadata(item))
        if "custom_fields_values" in item:
            self._check_cf(entity, item["custom_fields_values"], w, errs, prefix)
        self._check_tags(item, w, errs, prefix)
        embedded = item.get("_embedded")
        if embedded is not None:
            self._check_embedded(entity, embedded, w, errs, prefix, mode)
        return w, errs

    def _check_status(
        self, w: _Write, existing: JsonDict | None, mode: str, errs: list[_VErr], prefix: str, *, metadata: bool
    ) -> None:
        status_id = w.fields.get("status_id")
        pipeline_id = w.fields.get("pipeline_id")
        if pipeline_id is not None and pipeline_id not in self._pipelines:
            errs.append(_VErr("NotSupportedChoice", prefix + "pipeline_id", _NOT_VALID_CHOICE))
            return
        if mode == "complex" and metadata:
            pid = pipeline_id or self._main_pipeline_id()
            w.fields["pipeline_id"] = pid
            w.fields["status_id"] = self._unsorted_status(pid)
            return
        if existing is None:
            if pipeline_id is None:
                pipeline_id = self._pipeline_of_status(status_id) if status_id is not None else None
                pipeline_id = pipeline_id or self._main_pipeline_id()
            if status_id is None:
                status_id = self._first_stage(pipeline_id)
        else:
            if status_id is None and pipeline_id is None:
                return
            if pipeline_id is None:
                pipeline_id = existing["pipeline_id"]
            if status_id is None:
                status_id = (
                    existing["status_id"] if pipeline_id == existing["pipeline_id"] else self._first_stage(pipeline_id)
                )
        status = self._status_in(pipeline_id, status_id)
        if status is None or status["type"] == UNSORTED_TYPE:
            # Writes re-validate status_id: the unsorted stage is never a valid choice, not even the current one.
            errs.append(_VErr("NotSupportedChoice", prefix + "status_id", _NOT_VALID_CHOICE))
            return
        w.fields["status_id"] = status_id
        w.fields["pipeline_id"] = pipeline_id

    def _check_cf(self, entity: str, raw: Any, w: _Write, errs: list[_VErr], prefix: str) -> None:
        base = prefix + "custom_fields_values"
        if raw is None:
            return
        if not isinstance(raw, list):
            errs.append(_VErr("InvalidType", base, "This value should be of type array."))
            return
        for i, item in enumerate(raw):
            path = f"{base}.{i}"
            if not isinstance(item, dict):
                errs.append(_VErr("InvalidType", path, "This value should be of type object."))
                continue
            bad_keys = [k for k in item if k not in _CF_ITEM_KEYS]
            for key in bad_keys:
                errs.append(_VErr("FieldNotExpected", f"{path}.{key}", "This field was not expected."))
            cf: CustomField | None = None
            if "field_id" in item and item["field_id"] is not None:
                cf = self._fields[entity].get(item["field_id"]) if _is_int(item["field_id"]) else None
                if cf is None:
                    errs.append(_VErr("NotSupportedChoice", f"{path}.field_id", _NOT_VALID_CHOICE))
                    continue
            elif "field_code" in item and item["field_code"] is not None:
                cf = self._find_field(entity, str(item["field_code"]))
                if cf is None:
                    errs.append(_VErr("NotSupportedChoice", f"{path}.field_code", _NOT_VALID_CHOICE))
                    continue
            else:
                errs.append(_VErr("FieldMissing", f"{path}.field_id", "This field is missing."))
                continue
            values = item.get("values")
            if values is None or values == []:
                w.cf.append((cf, None))
                continue
            if not isinstance(values, list):
                errs.append(_VErr("InvalidType", f"{path}.values", "This value should be of type array."))
                continue
            normalized = []
            for j, value in enumerate(values):
                result = _normalize_cf_value(cf, value, f"{path}.values.{j}", errs)
                if result is not None:
                    normalized.append(result)
            w.cf.append((cf, normalized))

    def _check_tags(self, item: JsonDict, w: _Write, errs: list[_VErr], prefix: str) -> None:
        for key, target in (("tags_to_add", w.tags_add), ("tags_to_delete", w.tags_del)):
            if key in item:
                names = self._tag_names(item[key], prefix + key, errs)
                target.extend(names)

    def _tag_names(self, raw: Any, path: str, errs: list[_VErr]) -> list[str]:
        if not isinstance(raw, list):
            errs.append(_VErr("InvalidType", path, "This value should be of type array."))
            return []
        names: list[str] = []
        for i, tag in enumerate(raw):
            if isinstance(tag, dict) and isinstance(tag.get("name"), str) and tag["name"]:
                names.append(tag["name"])
            elif isinstance(tag, dict) and _is_int(tag.get("id")) and tag["id"] in self._tags:
                names.append(self._tags[tag["id"]]["name"])
            else:
                errs.append(_VErr("NotSupportedChoice", f"{path}.{i}", _NOT_VALID_CHOICE))
        return names

    def _check_embedded(self, entity: str, embedded: Any, w: _Write, errs: list[_VErr], prefix: str, mode: str) -> None:
        base = prefix + "_embedded"
        if not isinstance(embedded, dict):
            errs.append(_VErr("InvalidType", base, "This value should be of type object."))
            return
        allowed = (
            {"tags", "contacts", "companies", "source", "metadata"} if entity == "leads" else {"tags", "companies"}
        )
        for key in embedded:
            if key not in allowed or (key == "metadata" and mode != "complex"):
                errs.append(_VErr("FieldNotExpected", f"{base}.{key}", "This field was not expected."))
        if "tags" in embedded:
            w.tags = self._tag_names(embedded["tags"], f"{base}.tags", errs)
        if entity != "leads":
            return
        contacts = embedded.get("contacts")
        if contacts is not None:
            if not isinstance(contacts, list):
                errs.append(_VErr("InvalidType", f"{base}.contacts", "This value should be of type array."))
            elif mode == "complex":
                if len(contacts) > 1:
                    errs.append(_VErr("CountOutOfRange", f"{base}.contacts", "A lead can have one contact here."))
                elif contacts:
                    self._check_complex_contact(contacts[0], w, errs, f"{base}.contacts.0.")
            else:
                for i, ref in enumerate(contacts):
                    if not isinstance(ref, dict) or not _is_int(ref.get("id")) or ref["id"] not in self.contacts:
                        errs.append(_VErr("NotSupportedChoice", f"{base}.contacts.{i}.id", _NOT_VALID_CHOICE))
                    else:
                        w.contacts.append((ref["id"], bool(ref.get("is_main"))))
        companies = embedded.get("companies")
        if companies is not None and mode == "complex":
            if not isinstance(companies, list) or len(companies) > 1:
                errs.append(_VErr("CountOutOfRange", f"{base}.companies", "A lead can have one company here."))
            elif companies:
                company = companies[0]
                if isinstance(company, dict) and _is_int(company.get("id")):
                    if company["id"] not in self.companies:
                        errs.append(_VErr("NotSupportedChoice", f"{base}.companies.0.id", _NOT_VALID_CHOICE))
                    else:
                        w.company_ref = company["id"]
                elif isinstance(company, dict) and isinstance(company.get("name"), str):
                    w.company_name = company["name"]
                else:
                    errs.append(_VErr("InvalidType", f"{base}.companies.0", "This value should be of type object."))

    def _check_complex_contact(self, raw: Any, w: _Write, errs: list[_VErr], prefix: str) -> None:
        if not isinstance(raw, dict):
            errs.append(_VErr("InvalidType", prefix.rstrip("."), "This value should be of type object."))
            return
        if set(raw) <= {"id", "is_main"} and "id" in raw:
            if not _is_int(raw["id"]) or raw["id"] not in self.contacts:
                errs.append(_VErr("NotSupportedChoice", prefix + "id", _NOT_VALID_CHOICE))
            else:
                w.contact_ref = raw["id"]
            return
        sub = {k: v for k, v in raw.items() if k != "is_main"}
        contact_write, contact_errs = self._check_item("contacts", sub, 0, mode="create", prefix=prefix)
        errs.extend(contact_errs)
        w.new_contact = contact_write

    # ----- applying writes --------------------------------------------------------------------------------

    def _apply_create(self, entity: str, w: _Write, user_id: int, *, fire: bool = True) -> int:
        now = int(self.clock.now())
        new_id = self._next_id[entity]
        self._next_id[entity] += 1
        f = w.fields
        rec: JsonDict
        if entity == "leads":
            status_id = f["status_id"]
            rec = {
                "id": new_id,
                "name": f.get("name") or f"Сделка #{new_id}",
                "price": f.get("price", 0),
                "responsible_user_id": f.get("responsible_user_id", user_id),
                "group_id": 0,
                "status_id": status_id,
                "pipeline_id": f["pipeline_id"],
                "loss_reason_id": f.get("loss_reason_id"),
                "created_by": f.get("created_by", user_id),
                "updated_by": f.get("updated_by", user_id),
                "created_at": f.get("created_at", now),
                "updated_at": f.get("updated_at", now),
                "closed_at": f.get("closed_at", now if status_id in {WON_STATUS_ID, LOST_STATUS_ID} else None),
                "closest_task_at": None,
                "is_deleted": False,
                "custom_fields_values": None,
                "score": None,
                "account_id": self.account_id,
                "labor_cost": None,
            }
        else:
            first, last = f.get("first_name", ""), f.get("last_name", "")
            rec = {
                "id": new_id,
                "name": f.get("name") or " ".join(p for p in (first, last) if p),
                "first_name": first,
                "last_name": last,
                "responsible_user_id": f.get("responsible_user_id", user_id),
                "group_id": 0,
                "created_by": f.get("created_by", user_id),
                "updated_by": f.get("updated_by", user_id),
                "created_at": f.get("created_at", now),
                "updated_at": f.get("updated_at", now),
                "closest_task_at": None,
                "is_deleted": False,
                "is_unsorted": False,
                "custom_fields_values": None,
                "account_id": self.account_id,
            }
        rec["custom_fields_values"] = _apply_cf(None, w.cf)
        self._records[entity][new_id] = rec
        self._note_cf_history(entity, new_id, rec)
        tags = list(dict.fromkeys([*(w.tags or []), *w.tags_add]))
        if tags:
            self._entity_tags[(entity, new_id)] = [self._tag_id(entity, name) for name in tags]
        for i, (contact_id, is_main) in enumerate(w.contacts):
            self._link(new_id, contact_id, is_main or (i == 0 and not any(m for _, m in w.contacts)))
        self._stats.entities_created += 1
        if fire:
            self._emit(entity, "add", rec)
        return new_id

    def _apply_update(self, entity: str, record_id: int, w: _Write, user_id: int) -> bool:
        rec = self._records[entity][record_id]
        before = copy.deepcopy(rec)
        before_tags = list(self._entity_tags.get((entity, record_id), []))
        before_links = dict(self._lead_contacts.get(record_id, {})) if entity == "leads" else {}
        f = dict(w.fields)
        explicit_updated_at = f.pop("updated_at", None)
        explicit_updated_by = f.pop("updated_by", None)
        f.pop("created_by", None)
        for key, value in f.items():
            rec[key] = value
        if entity == "leads" and ("status_id" in f or "pipeline_id" in f):
            closed = rec["status_id"] in {WON_STATUS_ID, LOST_STATUS_ID}
            was_closed = before["status_id"] in {WON_STATUS_ID, LOST_STATUS_ID}
            if closed and (not was_closed or rec["status_id"] != before["status_id"]) and "closed_at" not in f:
                rec["closed_at"] = int(self.clock.now())
            elif not closed:
                rec["closed_at"] = None
                rec["loss_reason_id"] = None
        if entity == "contacts" and ("first_name" in f or "last_name" in f) and "name" not in f:
            rec["name"] = " ".join(p for p in (rec["first_name"], rec["last_name"]) if p)
        if w.cf:
            rec["custom_fields_values"] = _apply_cf(rec["custom_fields_values"], w.cf)
            self._note_cf_history(entity, record_id, rec)
        if w.tags is not None or w.tags_add or w.tags_del:
            names = [self._tags[t]["name"] for t in before_tags] if w.tags is None else list(w.tags)
            names = [n for n in dict.fromkeys([*names, *w.tags_add]) if n not in w.tags_del]
            self._entity_tags[(entity, record_id)] = [self._tag_id(entity, n) for n in names]
        for contact_id, is_main in w.contacts:
            self._link(record_id, contact_id, is_main)
        changed = (
            rec != before
            or self._entity_tags.get((entity, record_id), []) != before_tags
            or (entity == "leads" and self._lead_contacts.get(record_id, {}) != before_links)
        )
        if not changed:
            return False
        rec["updated_at"] = explicit_updated_at if explicit_updated_at is not None else int(self.clock.now())
        rec["updated_by"] = explicit_updated_by if explicit_updated_by is not None else user_id
        self._stats.entities_updated += 1
        if entity == "leads" and (
            rec["status_id"] != before["status_id"] or rec["pipeline_id"] != before["pipeline_id"]
        ):
            self._emit(entity, "status", rec, old_status_id=before["status_id"], old_pipeline_id=before["pipeline_id"])
        if rec["responsible_user_id"] != before["responsible_user_id"]:
            self._emit(entity, "responsible", rec, old_responsible=before["responsible_user_id"])
        self._emit(entity, "update", rec)
        return True

    def _apply_complex(self, w: _Write, user_id: int) -> JsonDict:
        contact_id = w.contact_ref
        merged = False
        lead_id: int | None = None
        if w.new_contact is not None:
            duplicate = self._find_duplicate_contact(w.new_contact) if self.duplicate_control else None
            if duplicate is not None:
                contact_id = duplicate
                open_lead = self._open_lead_of(duplicate, w.fields["pipeline_id"])
                if open_lead is not None:
                    lead_id, merged = open_lead, True
            else:
                contact_id = self._apply_create("contacts", w.new_contact, user_id)
        company_id = w.company_ref
        if w.company_name is not None:
            company_id = self._next_id["companies"]
            self._next_id["companies"] += 1
            self.companies[company_id] = {"id": company_id, "name": w.company_name, "account_id": self.account_id}
        if lead_id is None:
            if contact_id is not None:
                w.contacts = [(contact_id, True)]
            lead_id = self._apply_create("leads", w, user_id)
        if company_id is not None:
            self._lead_company[lead_id] = company_id
        return {
            "id": lead_id,
            "contact_id": contact_id,
            "company_id": company_id,
            "request_id": [w.request_id],
            "merged": merged,
        }

    def _find_duplicate_contact(self, w: _Write) -> int | None:
        phones = {
            _phone_key(v["value"])
            for cf, values in w.cf
            if cf.code == "PHONE"
            for v in values or []
            if _phone_key(v["value"])
        }
        if not phones:
            return None
        for contact_id, rec in self.contacts.items():
            for item in rec.get("custom_fields_values") or []:
                if item["field_code"] == "PHONE" and any(_phone_key(v["value"]) in phones for v in item["values"]):
                    return contact_id
        return None

    def _open_lead_of(self, contact_id: int, pipeline_id: int) -> int | None:
        candidates = [
            self.leads[lid]
            for lid, links in self._lead_contacts.items()
            if contact_id in links
            and lid in self.leads
            and self.leads[lid]["pipeline_id"] == pipeline_id
            and self.leads[lid]["status_id"] not in {WON_STATUS_ID, LOST_STATUS_ID}
        ]
        if not candidates:
            return None
        return int(max(candidates, key=lambda r: (r["updated_at"], r["id"]))["id"])

    def _link(self, lead_id: int, contact_id: int, is_main: bool) -> bool:
        self._links_version += 1
        links = self._lead_contacts.setdefault(lead_id, {})
        before = dict(links)
        if is_main or not links:
            for key in links:
                links[key] = False
            links[contact_id] = True
        elif contact_id not in links:
            links[contact_id] = False
        return links != before

    def _touch(self, entity: str, record_id: int, *, user_id: int) -> None:
        rec = self._records[entity][record_id]
        rec["updated_at"] = int(self.clock.now())
        rec["updated_by"] = user_id
        self._stats.entities_updated += 1
        self._emit(entity, "update", rec)

    def _delete(self, entity: str, record_id: int) -> None:
        rec = self._records[entity].pop(record_id)
        self._entity_tags.pop((entity, record_id), None)
        self._links_version += 1
        if entity == "leads":
            self._lead_contacts.pop(record_id, None)
            self._lead_company.pop(record_id, None)
        else:
            for links in self._lead_contacts.values():
                links.pop(record_id, None)
        self._emit(entity, "delete", rec)

    def _tag_id(self, entity: str, name: str) -> int:
        key = (entity, name)
        if key not in self._tag_index:
            tid = self._next_tag_id
            self._next_tag_id += 2
            self._tags[tid] = {"id": tid, "name": name, "color": None}
            self._tag_index[key] = tid
        return self._tag_index[key]

    # ----- reading ----------------------------------------------------------------------------------------

    def _render(self, entity: str, rec: JsonDict, base: str, with_: set[str]) -> JsonDict:
        out = copy.deepcopy(rec)
        out["_links"] = _self_link(base, entity, rec["id"])
        tags = [copy.deepcopy(self._tags[t]) for t in self._entity_tags.get((entity, rec["id"]), [])]
        embedded: JsonDict = {"tags": tags}
        if entity == "leads":
            company = self._lead_company.get(rec["id"])
            embedded["companies"] = (
                [{"id": company, "_links": _self_link(base, "companies", company)}] if company else []
            )
            if "contacts" in with_:
                embedded["contacts"] = [
                    {"id": cid, "is_main": main, "_links": _self_link(base, "contacts", cid)}
                    for cid, main in self._lead_contacts.get(rec["id"], {}).items()
                ]
            if "loss_reason" in with_:
                embedded["loss_reason"] = []
        else:
            company_ids = sorted(
                {c for lid, c in self._lead_company.items() if rec["id"] in self._lead_contacts.get(lid, {})}
            )
            embedded["companies"] = [{"id": c, "_links": _self_link(base, "companies", c)} for c in company_ids]
            if "leads" in with_:
                leads = self._leads_of(rec["id"])
                embedded["leads"] = [{"id": lid, "_links": _self_link(base, "leads", lid)} for lid in leads]
        out["_embedded"] = embedded
        return out

    def _render_pipeline(self, pipeline: JsonDict, base: str) -> JsonDict:
        out = {k: v for k, v in pipeline.items() if k != "statuses"}
        out["account_id"] = self.account_id
        out["_links"] = {"self": {"href": f"{base}/api/v4/leads/pipelines/{pipeline['id']}"}}
        out["_embedded"] = {"statuses": [self._render_status(s, base) for s in self._sorted_statuses(pipeline["id"])]}
        return out

    def _render_status(self, status: JsonDict, base: str) -> JsonDict:
        out = copy.deepcopy(status)
        out["account_id"] = self.account_id
        out["_links"] = {
            "self": {"href": f"{base}/api/v4/leads/pipelines/{status['pipeline_id']}/statuses/{status['id']}"}
        }
        return out

    def _render_user(self, user: JsonDict, base: str) -> JsonDict:
        out = copy.deepcopy(user)
        out["_links"] = {"self": {"href": f"{base}/api/v4/users/{user['id']}"}}
        return out

    def _search_strings(self, entity: str, rec: JsonDict) -> list[str]:
        keys = ("name",) if entity == "leads" else ("name", "first_name", "last_name")
        out = [str(rec.get(k) or "") for k in keys]
        out += [str(v.get("value", "")) for item in rec.get("custom_fields_values") or [] for v in item["values"]]
        if entity == "leads":
            for contact_id in self._lead_contacts.get(rec["id"], {}):
                contact = self.contacts.get(contact_id)
                if contact is not None:
                    out += self._search_strings("contacts", contact)
        return out

    def _candidates(self, entity: str, filt: Any) -> list[JsonDict]:
        """The records a filter naming ids can match (looked up, not scanned), else every record; the
        caller applies the whole filter, and orders the rows itself."""
        records = self._records[entity]
        wanted = _int_set(filt["id"]) if isinstance(filt, dict) and "id" in filt else None
        if wanted is None:
            return list(records.values())
        return [records[i] for i in sorted(wanted) if i in records]

    def _matches(self, entity: str, rec: JsonDict, filt: Any) -> bool:
        if not isinstance(filt, dict):
            return True
        for key, cond in filt.items():
            if key == "id" or key == "responsible_user_id" or (key == "pipeline_id" and entity == "leads"):
                wanted = _int_set(cond)
                if wanted is not None and rec.get(key) not in wanted:
                    return False
            elif key == "name":
                names = {str(v).lower() for v in _as_list(cond)}
                if names and str(rec.get("name", "")).lower() not in names:
                    return False
            elif key in {"created_at", "updated_at", "closed_at"}:
                if not _in_range(rec.get(key), cond):
                    return False
            elif key == "statuses" and entity == "leads":
                pairs = [c for c in _as_list(cond) if isinstance(c, dict)]
                if pairs and not any(_status_pair_matches(rec, c) for c in pairs):
                    return False
            elif (
                key == "custom_fields_values"
                and self.cf_filter_enabled
                and isinstance(cond, dict)
                and not _cf_filter_matches(rec, cond)
            ):
                return False
        return True

    def _ordered(self, entity: str, rows: list[JsonDict], order: Any) -> list[JsonDict]:
        rows = sorted(rows, key=lambda r: r["id"])
        if isinstance(order, dict):
            for key, direction in order.items():
                if key in _SORTABLE[entity] and str(direction).lower() in {"asc", "desc"}:
                    reverse = str(direction).lower() == "desc"
                    return sorted(rows, key=lambda r: (r[key] or 0, r["id"]), reverse=reverse)
        return rows

    # ----- pipelines and fields internals ------------------------------------------------------------------

    def _seed(self) -> None:
        self._users = {}
        self.add_user("Интеграция clinicsync", user_id=self.api_user_id)
        self.add_user("Анна Менеджер", user_id=self.manager_user_id)
        self._pipelines[MAIN_PIPELINE_ID] = {
            "id": MAIN_PIPELINE_ID,
            "name": "Записи клиники",
            "sort": 1,
            "is_main": True,
            "is_unsorted_on": True,
            "is_archive": False,
            "statuses": [],
        }
        self._add_status(MAIN_PIPELINE_ID, "Неразобранное", 10, "#c1c1c1", UNSORTED_TYPE, False, STATUS_UNSORTED)
        for i, (sid, name, color) in enumerate(_CLINIC_STAGES):
            self._add_status(MAIN_PIPELINE_ID, name, 20 + 10 * i, color, 0, True, sid)
        self._add_status(MAIN_PIPELINE_ID, "Успешно реализовано", 10000, "#CCFF66", 0, False, WON_STATUS_ID)
        self._add_status(MAIN_PIPELINE_ID, "Закрыто и не реализовано", 11000, "#D5D8DB", 0, False, LOST_STATUS_ID)
        contacts = self._fields["contacts"]
        contacts[CONTACT_FIELD_PHONE] = CustomField(
            CONTACT_FIELD_PHONE,
            "contacts",
            "Телефон",
            "multitext",
            "PHONE",
            4,
            [{"id": PHONE_ENUM_IDS[c], "value": c, "sort": 2 * (i + 1)} for i, c in enumerate(PHONE_ENUM_CODES)],
        )
        contacts[CONTACT_FIELD_EMAIL] = CustomField(
            CONTACT_FIELD_EMAIL,
            "contacts",
            "Email",
            "multitext",
            "EMAIL",
            6,
            [{"id": EMAIL_ENUM_IDS[c], "value": c, "sort": 2 * (i + 1)} for i, c in enumerate(EMAIL_ENUM_CODES)],
        )
        contacts[CONTACT_FIELD_POSITION] = CustomField(
            CONTACT_FIELD_POSITION, "contacts", "Должность", "text", "POSITION", 2, []
        )
        contacts[CONTACT_FIELD_MIS_PATIENT_ID] = CustomField(
            CONTACT_FIELD_MIS_PATIENT_ID, "contacts", "ID пациента в МИС", "text", None, 500, [], is_api_only=True
        )
        contacts[CONTACT_FIELD_BIRTHDAY] = CustomField(
            CONTACT_FIELD_BIRTHDAY, "contacts", "Дата рождения", "birthday", None, 502, []
        )
        contacts[CONTACT_FIELD_MAILING_CONSENT] = CustomField(
            CONTACT_FIELD_MAILING_CONSENT, "contacts", "Согласие на рассылку", "checkbox", None, 504, []
        )
        leads = self._fields["leads"]
        leads[LEAD_FIELD_MIS_APPOINTMENT_ID] = CustomField(
            LEAD_FIELD_MIS_APPOINTMENT_ID, "leads", "ID записи в МИС", "text", None, 500, [], is_api_only=True
        )
        leads[LEAD_FIELD_APPOINTMENT_AT] = CustomField(
            LEAD_FIELD_APPOINTMENT_AT, "leads", "Дата и время приема", "date_time", None, 502, []
        )
        leads[LEAD_FIELD_DOCTOR] = CustomField(LEAD_FIELD_DOCTOR, "leads", "Врач", "text", None, 504, [])
        leads[LEAD_FIELD_SOURCE] = CustomField(
            LEAD_FIELD_SOURCE,
            "leads",
            "Источник записи",
            "select",
            None,
            506,
            [
                {"id": eid, "value": value, "sort": 10 * (i + 1)}
                for i, (value, eid) in enumerate(SOURCE_ENUM_IDS.items())
            ],
        )

    def _new_status_id(self) -> int:
        sid = self._next_status_id
        self._next_status_id += 3
        return sid

    def _add_status(
        self, pid: int, name: str, sort: int, color: str, type_: int, editable: bool, status_id: int | None
    ) -> int:
        sid = status_id if status_id is not None else self._new_status_id()
        if self._status_in(pid, sid) is not None:
            raise ValueError(f"status {sid} exists in pipeline {pid}")
        if status_id is not None and status_id not in {WON_STATUS_ID, LOST_STATUS_ID}:
            self._next_status_id = max(self._next_status_id, status_id + 3)
        self._pipelines[pid]["statuses"].append(
            {
                "id": sid,
                "name": name,
                "sort": sort,
                "is_editable": editable,
                "pipeline_id": pid,
                "color": color,
                "type": type_,
            }
        )
        return sid

    def _sorted_statuses(self, pid: int) -> list[JsonDict]:
        return sorted(self._pipelines[pid]["statuses"], key=lambda s: (s["sort"], s["id"]))

    def _status_in(self, pid: int | None, sid: int | None) -> JsonDict | None:
        if pid not in self._pipelines:
            return None
        return next((s for s in self._pipelines[pid]["statuses"] if s["id"] == sid), None)

    def _main_pipeline_id(self) -> int:
        return next(pid for pid, p in self._pipelines.items() if p["is_main"])

    def _first_stage(self, pid: int) -> int:
        stages = [s for s in self._sorted_statuses(pid) if s["type"] != UNSORTED_TYPE]
        return int(stages[0]["id"])

    def _unsorted_status(self, pid: int) -> int:
        return int(next(s["id"] for s in self._sorted_statuses(pid) if s["type"] == UNSORTED_TYPE))

    def _pipeline_of_status(self, sid: int) -> int | None:
        if sid in {WON_STATUS_ID, LOST_STATUS_ID}:
            return None
        for pid, pipeline in self._pipelines.items():
            if any(s["id"] == sid for s in pipeline["statuses"]):
                return pid
        return None

    def _find_field(self, entity: str, key: int | str) -> CustomField | None:
        if isinstance(key, int):
            return self._fields[entity].get(key)
        return next((f for f in self._fields[entity].values() if f.code == key), None)

    def _default_base(self) -> str:
        return self.base_url.rstrip("/") if self.base_url else self.public_url

    # ----- webhook events ---------------------------------------------------------------------------------

    def _emit(self, entity: str, action: str, rec: JsonDict, **extra: Any) -> None:
        setting = f"{action}_{SINGULAR[entity]}"
        now = self.clock.now()
        self.events_log.append((setting, rec["id"], now))
        subscribers = [h for h in self._webhooks.values() if not h.disabled and setting in h.settings]
        if not subscribers:
            return
        fields = self._hook_fields(entity, action, rec, extra)
        for hook in subscribers:
            event = WebhookEvent(setting, entity, action, rec["id"], list(fields), now)
            if _consume_rule(self._drop_rules, setting):
                self.dropped_events.append(event)
                self._stats.webhook_events_dropped += 1
                continue
            copies = 2 if _consume_rule(self._duplicate_rules, setting) else 1
            for _ in range(copies):
                self._hook_pending.setdefault(hook.id, []).append(copy.deepcopy(event))
                self._stats.webhook_events_queued += 1

    def _hook_fields(self, entity: str, action: str, rec: JsonDict, extra: Mapping[str, Any]) -> list[tuple[str, str]]:
        if action == "delete":
            return [("id", str(rec["id"]))]
        pairs: list[tuple[str, str]] = [("id", str(rec["id"])), ("name", rec.get("name") or "")]
        if entity == "leads":
            pairs.append(("status_id", str(rec["status_id"])))
            if action == "status":
                pairs.append(("old_status_id", str(extra["old_status_id"])))
            pairs += [("price", str(rec.get("price") or 0)), ("responsible_user_id", str(rec["responsible_user_id"]))]
        else:
            pairs += [
                ("first_name", rec.get("first_name") or ""),
                ("last_name", rec.get("last_name") or ""),
                ("responsible_user_id", str(rec["responsible_user_id"])),
            ]
        if action == "responsible":
            pairs.append(("old_responsible_user_id", str(extra["old_responsible"])))
        pairs += [
            ("date_create", str(rec["created_at"])),
            ("last_modified", str(rec["updated_at"])),
            ("created_user_id", str(rec["created_by"])),
            ("modified_user_id", str(rec["updated_by"])),
        ]
        if entity == "leads":
            pairs.append(("pipeline_id", str(rec["pipeline_id"])))
            if action == "status":
                pairs.append(("old_pipeline_id", str(extra["old_pipeline_id"])))
        pairs += [
            ("account_id", str(self.account_id)),
            ("created_at", str(rec["created_at"])),
            ("updated_at", str(rec["updated_at"])),
        ]
        for i, item in enumerate(rec.get("custom_fields_values") or []):
            cf = self._fields[entity].get(item["field_id"])
            prefix = f"custom_fields[{i}]"
            pairs += [(f"{prefix}[id]", str(item["field_id"])), (f"{prefix}[name]", item["field_name"])]
            if item.get("field_code"):
                pairs.append((f"{prefix}[code]", item["field_code"]))
            for j, value in enumerate(item["values"]):
                if cf is not None and cf.type in _DATE_TYPES:
                    pairs.append((f"{prefix}[values][{j}]", str(value["value"])))
                    continue
                raw = value["value"]
                text = ("1" if raw else "0") if isinstance(raw, bool) else str(raw)
                pairs.append((f"{prefix}[values][{j}][value]", text))
                if value.get("enum_id") is not None:
                    pairs.append((f"{prefix}[values][{j}][enum]", str(value["enum_id"])))
        tags = self._entity_tags.get((entity, rec["id"]), [])
        for i, tag_id in enumerate(tags):
            pairs += [(f"tags[{i}][id]", str(tag_id)), (f"tags[{i}][name]", self._tags[tag_id]["name"])]
        if entity == "contacts":
            for lead_id, links in self._lead_contacts.items():
                if rec["id"] in links:
                    pairs.append((f"linked_leads_id[{lead_id}][ID]", str(lead_id)))
            pairs.append(("type", "contact"))
        return pairs

    def _hook_body(self, events: list[WebhookEvent]) -> bytes:
        groups: dict[tuple[str, str], list[WebhookEvent]] = {}
        for event in events:
            groups.setdefault((event.entity, event.action), []).append(event)
        pairs: list[tuple[str, str]] = []
        for (entity, action), group in groups.items():
            for i, event in enumerate(group):
                pairs += [(f"{entity}[{action}][{i}]{_bracket(key)}", value) for key, value in event.fields]
        pairs += [
            ("account[subdomain]", self.subdomain),
            ("account[id]", str(self.account_id)),
            ("account[_links][self]", self.public_url),
        ]
        return urlencode(pairs).encode()


# ---------------------------------------------------------------------------------------------------------
# Module helpers
# ---------------------------------------------------------------------------------------------------------


def _match_route(path: str) -> tuple[_Route | None, tuple[str, ...]]:
    for route in _ROUTES:
        match = route.pattern.match(path)
        if match is not None:
            return route, match.groups()
    return None, ()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def _int_set(cond: Any) -> set[int] | None:
    out = set()
    for value in _as_list(cond):
        try:
            out.add(int(str(value)))
        except ValueError:
            continue
    return out or None


def _in_range(value: Any, cond: Any) -> bool:
    if value is None:
        return False
    if isinstance(cond, dict):
        try:
            if "from" in cond and value < int(str(cond["from"])):
                return False
            if "to" in cond and value > int(str(cond["to"])):
                return False
        except ValueError:
            return True  # an unparseable bound drops the condition
        return True
    try:
        return bool(value == int(str(cond)))
    except ValueError:
        return True


def _status_pair_matches(rec: JsonDict, cond: JsonDict) -> bool:
    try:
        if "pipeline_id" in cond and rec["pipeline_id"] != int(str(cond["pipeline_id"])):
            return False
        return not ("status_id" in cond and rec["status_id"] != int(str(cond["status_id"])))
    except ValueError:
        return False


def _cf_filter_matches(rec: JsonDict, cond: JsonDict) -> bool:
    for raw_field_id, wanted in cond.items():
        try:
            field_id = int(str(raw_field_id))
        except ValueError:
            continue
        values = [
            v.get("value")
            for item in rec.get("custom_fields_values") or []
            if item["field_id"] == field_id
            for v in item["values"]
        ]
        if isinstance(wanted, dict) and ("from" in wanted or "to" in wanted):
            if not any(_in_range(v, wanted) for v in values if isinstance(v, int)):
                return False
        elif not {str(w) for w in _as_list(wanted)} & {str(v) for v in values}:
            return False
    return True


def _consume_rule(rules: list[_EventRule], setting: str) -> bool:
    for rule in rules:
        if rule.setting is None or rule.setting == setting:
            rule.count -= 1
            if rule.count <= 0:
                rules.remove(rule)
            return True
    return False


def _digits(value: Any) -> str:
    return re.sub(r"\D", "", str(value))


def _phone_key(value: Any) -> str:
    """Duplicate control compares the last 10 digits, so +7 999… and 8 999… are the same number."""
    digits = _digits(value)
    return digits[-10:] if len(digits) >= 10 else digits


def _bracket(key: str) -> str:
    """``custom_fields[0][id]`` → ``[custom_fields][0][id]`` (PHP-style nesting under the event index)."""
    head, sep, rest = key.partition("[")
    return f"[{head}]" + (sep + rest if sep else "")


def _has_metadata(item: JsonDict) -> bool:
    embedded = item.get("_embedded")
    return isinstance(embedded, dict) and embedded.get("metadata") is not None


def _with_set(args: Mapping[str, Any]) -> set[str]:
    raw = args.get("with")
    if not isinstance(raw, str):
        return set()
    return {part.strip() for part in raw.split(",") if part.strip()}


def _int_arg(raw: Any, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(str(raw))
    except ValueError:
        raise ApiProblem(400, f"Invalid {name}: must be an integer") from None


def _page_href(ctx: _Ctx, entity: str, page: int, limit: int) -> str:
    pairs = [(k, v) for k, v in parse_qsl(ctx.raw_query, keep_blank_values=True) if k not in {"page", "limit"}]
    pairs = [("page", str(page)), ("limit", str(limit)), *pairs]
    return f"{ctx.base}/api/v4/{entity}?{urlencode(pairs)}"


def _self_link(base: str, entity: str, record_id: int) -> JsonDict:
    return {"self": {"href": f"{base}/api/v4/{entity}/{record_id}"}}


def _link_row(entity: str, entity_id: int, to_type: str, to_id: int, metadata: JsonDict | None) -> JsonDict:
    return {
        "entity_id": entity_id,
        "entity_type": entity,
        "to_entity_id": to_id,
        "to_entity_type": to_type,
        "metadata": metadata,
    }


def _apply_cf(
    current: list[JsonDict] | None, updates: list[tuple[CustomField, list[JsonDict] | None]]
) -> list[JsonDict] | None:
    """Per-field replacement: a sent field's values replace the stored ones; null/[] clears; others stay."""
    rows = [copy.deepcopy(item) for item in current or []]
    for cf, values in updates:
        index = next((i for i, item in enumerate(rows) if item["field_id"] == cf.id), None)
        if not values:
            if index is not None:
                rows.pop(index)
            continue
        row = {
            "field_id": cf.id,
            "field_name": cf.name,
            "field_code": cf.code,
            "field_type": cf.type,
            "values": copy.deepcopy(values),
        }
        if index is None:
            rows.append(row)
        else:
            rows[index] = row
    return rows or None


def _normalize_cf_value(cf: CustomField, raw: Any, path: str, errs: list[_VErr]) -> JsonDict | None:
    if not isinstance(raw, dict):
        errs.append(_VErr("InvalidType", path, "This value should be of type object."))
        return None
    allowed = {"value", "enum_id", "enum_code"} if cf.type == "multitext" or cf.type in _ENUM_TYPES else {"value"}
    bad = [k for k in raw if k not in allowed]
    for key in bad:
        errs.append(_VErr("FieldNotExpected", f"{path}.{key}", "This field was not expected."))
    if bad:
        return None
    value = raw.get("value")
    if cf.type == "multitext":
        if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
            errs.append(_VErr("InvalidType", f"{path}.value", "This value should be of type string."))
            return None
        enum: JsonDict | None
        if raw.get("enum_id") is not None:
            enum = cf.enum_by_id(raw["enum_id"])
            if enum is None:
                errs.append(_VErr("NotSupportedChoice", f"{path}.enum_id", _NOT_VALID_CHOICE))
                return None
        elif raw.get("enum_code") is not None:
            enum = cf.enum_by_code(raw["enum_code"])
            if enum is None:
                errs.append(_VErr("NotSupportedChoice", f"{path}.enum_code", _NOT_VALID_CHOICE))
                return None
        else:
            enum = cf.enums[0] if cf.enums else None
        return {
            "value": str(value),
            "enum_id": enum["id"] if enum else None,
            "enum_code": enum["value"] if enum else None,
        }
    if cf.type in _ENUM_TYPES:
        enum = None
        if raw.get("enum_id") is not None:
            enum = cf.enum_by_id(raw["enum_id"])
            bad_path = f"{path}.enum_id"
        elif raw.get("enum_code") is not None:
            enum = cf.enum_by_code(raw["enum_code"])
            bad_path = f"{path}.enum_code"
        else:
            enum = next((e for e in cf.enums if e["value"] == value), None)
            bad_path = f"{path}.value"
        if enum is None:
            errs.append(_VErr("NotSupportedChoice", bad_path, _NOT_VALID_CHOICE))
            return None
        return {"value": enum["value"], "enum_id": enum["id"], "enum_code": enum.get("code")}
    if cf.type == "checkbox":
        if isinstance(value, bool):
            return {"value": value}
        if value in (0, 1, "0", "1", "true", "false"):
            return {"value": value in (1, "1", "true")}
        errs.append(_VErr("InvalidType", f"{path}.value", "This value should be of type bool."))
        return None
    if cf.type in _DATE_TYPES:
        ts = _parse_ts(value)
        if ts is None:
            errs.append(_VErr("InvalidType", f"{path}.value", "This value should be a timestamp or RFC 3339."))
            return None
        return {"value": ts}
    if cf.type == "numeric":
        try:
            float(str(value))
        except ValueError:
            errs.append(_VErr("InvalidType", f"{path}.value", "This value should be numeric."))
            return None
        if isinstance(value, bool) or value is None:
            errs.append(_VErr("InvalidType", f"{path}.value", "This value should be numeric."))
            return None
        return {"value": str(value)}
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        errs.append(_VErr("InvalidType", f"{path}.value", "This value should be of type string."))
        return None
    return {"value": str(value)}


def _parse_ts(value: Any) -> int | None:
    if _is_int(value):
        return int(value)
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return int(parsed.timestamp())
    return None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _make_jwt(claims: JsonDict, key: bytes) -> str:
    header = _b64url(json.dumps({"typ": "JWT", "alg": "HS256"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def _json_body(request: Request) -> Any:
    text = request.get_data(as_text=True)
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ApiProblem(400, "Request body is not valid JSON") from None


def _problem_body(status: int, detail: str, title: str | None = None) -> JsonDict:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return {"title": title or phrase, "type": f"https://httpstatus.es/{status}", "status": status, "detail": detail}


def _json_response(status: int, payload: Any, *, problem: bool = False) -> Response:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    content_type = "application/problem+json" if problem else "application/hal+json"
    return Response(text, status=status, content_type=f"{content_type}; charset=utf-8")


def _no_content() -> Response:
    response = Response(b"", status=204)
    response.headers.pop("Content-Type", None)
    return response


def _html_response(status: int) -> Response:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return Response(_NGINX_HTML.format(code=status, reason=reason), status=status, content_type="text/html")


def _unauthorized() -> Response:
    return _json_response(401, _problem_body(401, "Invalid user name or password"), problem=True)


def _oauth_problem(status: int, hint: str) -> Response:
    body = {
        "hint": hint,
        "title": "Некорректный запрос",
        "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
        "status": status,
        "detail": "В запросе отсутствует ряд параметров или параметры невалидны",
    }
    return _json_response(status, body, problem=True)


def _fault_response(fault: Fault) -> Response:
    if fault.html:
        if fault.body is not None:
            return Response(fault.body, status=fault.status, content_type="text/html")
        return _html_response(fault.status)
    if fault.body is not None:
        return Response(fault.body, status=fault.status, content_type="application/problem+json")
    try:
        phrase = http.HTTPStatus(fault.status).phrase
    except ValueError:
        phrase = "Error"
    return _json_response(fault.status, _problem_body(fault.status, fault.detail or phrase), problem=True)
