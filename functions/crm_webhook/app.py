"""Inbound receiver: HTTP API v2 -> verify the sender -> enqueue -> answer within milliseconds.

- CRM webhooks (Bitrix24, amoCRM): Bitrix24 never retries an event and slows down handlers that answer
  slowly, so nothing here calls the CRM: the event is checked, queued, and re-fetched later in batches.
- IDENT's calls (``/ident/GetTickets``, ``/ident/PostTimeTable``), checked by ``IDENT-Integration-Key``,
  and the IDENT connector's signed change batches (``/ident/connector/*``). Refusals are plain text,
  because IDENT writes the body into its exchange log.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinicsync import ident, wiring
from clinicsync.adapters.ident import KEY_HEADER, TicketQuery, TimeTable, weak_integration_key
from clinicsync.crm_events import ENTITY_OF_EVENT
from clinicsync.crypto import credential_matches
from clinicsync.forms import FormError, http_body, parse_php_form
from clinicsync.models import CrmEvent
from clinicsync.observability import logger, metrics, tracer
from clinicsync.signing import verify_request

app = APIGatewayHttpResolver()


class Bitrix24Auth(BaseModel):
    model_config = ConfigDict(extra="ignore")
    application_token: str = Field(min_length=1, max_length=256)
    member_id: str = Field(min_length=1, max_length=256)


class Bitrix24Fields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ID: str = Field(pattern=r"^[0-9]{1,18}$")


class Bitrix24Data(BaseModel):
    model_config = ConfigDict(extra="ignore")
    FIELDS: Bitrix24Fields


class Bitrix24Event(BaseModel):
    """An outbound Bitrix24 event: the event name, the changed entity's ID, and the portal's auth."""

    model_config = ConfigDict(extra="ignore")
    event: str = Field(min_length=1, max_length=64)
    data: Bitrix24Data
    auth: Bitrix24Auth


def _reply(status: int, body: dict[str, Any]) -> Response[Any]:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)


class MalformedBody(ValueError):
    """The body cannot even be read as bytes (bad base64, unencodable text): a 400 on every route."""


@app.exception_handler(MalformedBody)
def _malformed(exc: MalformedBody) -> Response[Any]:
    return Response(status_code=400, content_type=content_types.TEXT_PLAIN, body=str(exc))


def _raw_body() -> bytes:
    """The body exactly as sent (signatures are over bytes, not over a re-decoded string)."""
    try:
        return http_body(app.current_event)
    except FormError as exc:
        raise MalformedBody(str(exc)) from None


@app.post("/webhooks/bitrix24")
def bitrix24() -> Response[Any]:
    try:
        form = parse_php_form(_raw_body())
        parsed = Bitrix24Event.model_validate(form)
    except FormError as exc:
        return _reply(400, {"error": "malformed_body", "detail": str(exc)})
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return _reply(400, {"error": "invalid_event", "fields": fields})
    expected = wiring.crm_credentials()
    if not credential_matches(parsed.auth.application_token, expected.get("application_token")):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
        return _reply(401, {"error": "bad_application_token"})
    if not credential_matches(parsed.auth.member_id, expected.get("member_id")):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
        return _reply(403, {"error": "unknown_portal"})
    entity = ENTITY_OF_EVENT.get(parsed.event.upper())
    if entity is None:
        return _reply(200, {"status": "ignored"})  # an event we do not sync; 200 so Bitrix24 is not slowed
    crm_event = CrmEvent(
        crm="bitrix24",
        event=parsed.event.upper(),
        entity=entity,  # type: ignore[arg-type]
        crm_id=parsed.data.FIELDS.ID,
        received_at=int(time.time()),
    )
    wiring.event_queue().send([crm_event])
    metrics.add_metric(name="WebhooksQueued", unit=MetricUnit.Count, value=1)
    logger.info("webhook queued", extra={"crm_event": crm_event.event, "crm_id": crm_event.crm_id})
    return _reply(200, {"status": "queued"})


# amoCRM actions we sync, by entity; a new lead may belong to a known patient (adoption by phone).
AMOCRM_ACTIONS = {
    ("leads", "add"): "lead",
    ("leads", "update"): "deal",
    ("leads", "status"): "deal",
    ("contacts", "add"): "contact",
    ("contacts", "update"): "contact",
}


@app.post("/webhooks/amocrm/<secret>")
def amocrm(secret: str) -> Response[Any]:
    """amoCRM signs nothing: the unguessable path secret and the account id are the whole check."""
    expected = wiring.crm_credentials()
    if not credential_matches(secret, expected.get("webhook_secret")):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
        return _reply(401, {"error": "bad_secret"})
    try:
        form = parse_php_form(_raw_body())
    except FormError as exc:
        return _reply(400, {"error": "malformed_body", "detail": str(exc)})
    account = form.get("account")
    account_id = account.get("id") if isinstance(account, dict) else None
    if not credential_matches(str(account_id or ""), expected.get("account_id")):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
        return _reply(403, {"error": "unknown_account"})
    try:
        events = _amocrm_events(form)
    except ValueError as exc:
        return _reply(400, {"error": "invalid_event", "detail": str(exc)})
    if events:
        wiring.event_queue().send(events)  # every event of the POST; amoCRM batches several
    metrics.add_metric(name="WebhooksQueued", unit=MetricUnit.Count, value=len(events))
    return _reply(200, {"status": "queued", "events": len(events)})


def _amocrm_events(form: dict[str, Any]) -> list[CrmEvent]:
    now = int(time.time())
    events: list[CrmEvent] = []
    for (group, action), entity in AMOCRM_ACTIONS.items():
        items = form.get(group, {}).get(action, {}) if isinstance(form.get(group), dict) else {}
        if not isinstance(items, dict):
            raise ValueError(f"{group}[{action}] is not a list of entities")
        for item in items.values():
            crm_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(crm_id, str) or not (crm_id.isascii() and crm_id.isdigit()):
                raise ValueError(f"{group}[{action}] item without a numeric id")
            events.append(
                CrmEvent(
                    crm="amocrm",
                    event=f"{action}_{group.rstrip('s')}",
                    entity=entity,  # type: ignore[arg-type]
                    crm_id=crm_id,
                    received_at=now,
                )
            )
    return events


# --- IDENT ---------------------------------------------------------------------------------------


def _text(status: int, reason: str) -> Response[Any]:
    return Response(status_code=status, content_type=content_types.TEXT_PLAIN, body=reason)


def _ident_refusal() -> Response[Any] | None:
    """IDENT authenticates with a shared key header; a refusal is plain text for IDENT's log."""
    if wiring.clinic_config().mis.kind != "ident":
        return _text(404, "IDENT is not this clinic's MIS")
    given = app.current_event.headers.get(KEY_HEADER.lower()) or app.current_event.headers.get(KEY_HEADER)
    if not given:
        metrics.add_metric(name="IdentCallsRefused", unit=MetricUnit.Count, value=1)
        return _text(401, f"missing {KEY_HEADER} header")
    mis = wiring.mis_credentials()
    if weak_integration_key(mis.get("integration_key")):  # fail closed: a guessable key would serve patients' leads
        metrics.add_metric(name="IdentCallsRefused", unit=MetricUnit.Count, value=1)
        return _text(503, "the clinic's integration_key is too weak; the operator must set a new one")
    if not credential_matches(given, mis.get("integration_key")):
        metrics.add_metric(name="IdentCallsRefused", unit=MetricUnit.Count, value=1)
        return _text(403, f"{KEY_HEADER} is not valid for this clinic")
    return None


@app.get("/ident/GetTickets")
def ident_get_tickets() -> Response[Any]:
    refusal = _ident_refusal()
    if refusal is not None:
        return refusal
    try:
        query = TicketQuery.model_validate(app.current_event.query_string_parameters or {})
    except ValidationError as exc:
        fields = ", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))
        return _text(400, f"invalid query parameters: {fields} (dates are ISO 8601 with a UTC offset)")
    found = ident.tickets(wiring.crm_gateway(wiring.clinic_config()), query)
    metrics.add_metric(name="IdentTicketsServed", unit=MetricUnit.Count, value=len(found))
    body = json.dumps([t.model_dump(mode="json", exclude_none=True) for t in found], ensure_ascii=False)
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=body)


@app.post("/ident/PostTimeTable")
def ident_post_timetable() -> Response[Any]:
    refusal = _ident_refusal()
    if refusal is not None:
        return refusal
    try:
        timetable = TimeTable.model_validate_json(_raw_body() or b"{}")
    except ValidationError as exc:
        where = sorted({".".join(str(p) for p in e["loc"][:2]) for e in exc.errors()})[:5]
        return _text(400, f"timetable is not valid JSON of Doctors, Branches and Intervals: {', '.join(where)}")
    counts = wiring.ident_directory().save(timetable, int(time.time()))
    logger.info("IDENT timetable stored", extra=counts)
    return _text(200, "OK")


def _connector_refusal(body: bytes) -> Response[Any] | None:
    if wiring.clinic_config().mis.kind != "ident":
        return _text(404, "IDENT is not this clinic's MIS")
    key = str(wiring.mis_credentials().get("connector_key", "")).encode()
    event = app.current_event
    refusal = verify_request(key, dict(event.headers), event.http_method, event.path, body, time.time())
    if refusal is None and len(key) >= 32:
        return None
    metrics.add_metric(name="ConnectorCallsRefused", unit=MetricUnit.Count, value=1)
    return _text(401, refusal.reason if refusal else "connector key is not configured for this clinic")


@app.get("/ident/connector/settings")
def ident_connector_settings() -> Response[Any]:
    refusal = _connector_refusal(b"")
    if refusal is not None:
        return refusal
    return _reply(200, ident.connector_settings(wiring.clinic_config()))


@app.post("/ident/connector/batches")
def ident_connector_batch() -> Response[Any]:
    body = _raw_body()
    refusal = _connector_refusal(body)
    if refusal is not None:
        return refusal
    try:
        batch = wiring.ident_inbox().accept(body)
    except ident.BatchTooLarge as exc:
        return _text(413, str(exc))
    except ValidationError as exc:
        where = sorted({".".join(str(p) for p in e["loc"][:3]) for e in exc.errors()})[:5]
        return _text(400, f"not a valid change batch: {', '.join(where)}")
    metrics.add_metric(name="ConnectorBatchesQueued", unit=MetricUnit.Count, value=1)
    logger.info("connector batch queued", extra={"batch_id": batch.batch_id, "patients": len(batch.changes)})
    return _reply(202, {"status": "queued", "batch_id": batch.batch_id, "patients": len(batch.changes)})


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
