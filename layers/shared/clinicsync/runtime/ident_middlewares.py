"""IDENT's routes: its callers' checks as Powertools middlewares, and its bodies read into models.

IDENT authenticates with a shared key header; the IDENT connector signs each request. Refusals are plain
text (``Refused`` with a str body), because IDENT writes the body into its exchange log. Kept apart from
``middlewares``, and IDENT's models (``contract``) imported only once a request is for this clinic's
IDENT: the webhook receiver of a clinic with another MIS never loads them at a cold start.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from pydantic import ValidationError

from clinicsync.adapters.http.signing import verify_request
from clinicsync.domain.crypto import credential_matches
from clinicsync.runtime import wiring
from clinicsync.runtime.middlewares import Refused, raw_body

if TYPE_CHECKING:
    from clinicsync.adapters.ident.contract import ConnectorBatch, TicketQuery, TimeTable


def _ident_clinic() -> None:
    if wiring.container().clinic_config().mis.kind != "ident":
        raise Refused(404, "IDENT is not this clinic's MIS")


def ident_caller(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """IDENT authenticates with a shared key header."""
    _ident_clinic()
    from clinicsync.adapters.ident.contract import KEY_HEADER, weak_integration_key

    headers = app.current_event.headers
    given = headers.get(KEY_HEADER.lower()) or headers.get(KEY_HEADER)
    if not given:
        raise Refused(401, f"missing {KEY_HEADER} header", "IdentCallsRefused")
    integration_key = wiring.container().mis_credentials().get("integration_key")
    if weak_integration_key(integration_key):  # fail closed: a guessable key would serve patients' leads
        raise Refused(
            503, "the clinic's integration_key is too weak; the operator must set a new one", "IdentCallsRefused"
        )
    if not credential_matches(given, integration_key):
        raise Refused(403, f"{KEY_HEADER} is not valid for this clinic", "IdentCallsRefused")
    return next_middleware(app)


def connector_caller(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """The IDENT connector signs each request (method, path, body, time). The body goes to app.context["body"]."""
    event = app.current_event
    body = raw_body(app) if event.http_method == "POST" else b""
    _ident_clinic()
    key = str(wiring.container().mis_credentials().get("connector_key", "")).encode()
    refusal = verify_request(key, dict(event.headers), event.http_method, event.path, body, time.time())
    if refusal is not None or len(key) < 32:
        reason = refusal.reason if refusal else "connector key is not configured for this clinic"
        raise Refused(401, reason, "ConnectorCallsRefused")
    app.context["body"] = body
    return next_middleware(app)


def _where(exc: ValidationError, depth: int) -> str:
    return ", ".join(sorted({".".join(map(str, e["loc"][:depth])) for e in exc.errors()})[:5])


def ticket_query(app: ApiGatewayResolver) -> TicketQuery:
    from clinicsync.adapters.ident.contract import TicketQuery

    try:
        return TicketQuery.model_validate(app.current_event.query_string_parameters or {})
    except ValidationError as exc:
        fields = ", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))
        raise Refused(400, f"invalid query parameters: {fields} (dates are ISO 8601 with a UTC offset)") from None


def timetable(app: ApiGatewayResolver) -> TimeTable:
    from clinicsync.adapters.ident.contract import TimeTable

    try:
        return TimeTable.model_validate_json(raw_body(app) or b"{}")
    except ValidationError as exc:
        raise Refused(
            400, f"timetable is not valid JSON of Doctors, Branches and Intervals: {_where(exc, 2)}"
        ) from None


def queue_connector_batch(app: ApiGatewayResolver) -> ConnectorBatch:
    from clinicsync.adapters.ident.contract import BatchTooLarge, parse_connector_batch

    try:
        batch = parse_connector_batch(app.context["body"])
    except BatchTooLarge as exc:
        raise Refused(413, str(exc)) from None
    except ValidationError as exc:
        raise Refused(400, f"not a valid change batch: {_where(exc, 3)}") from None
    wiring.container().ident_inbox().accept(app.context["body"].decode(), batch.batch_id)
    return batch
