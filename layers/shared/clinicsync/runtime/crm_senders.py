"""The CRMs' webhook senders (the webhook receiver's routes), checked as Powertools middlewares: the events
to queue go to ``app.context["crm_events"]``. Apart from ``middlewares`` so that the unsubscribe handler,
which shares those, loads neither CRM's webhook format."""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from pydantic import ValidationError

from clinicsync.adapters.amocrm import webhook as amocrm_webhook
from clinicsync.adapters.bitrix24 import webhook as bitrix24_webhook
from clinicsync.adapters.http.forms import FormError, parse_php_form
from clinicsync.domain.crypto import credential_matches
from clinicsync.domain.models import CrmEvent, build_now
from clinicsync.runtime import wiring
from clinicsync.runtime.middlewares import WEBHOOKS_REFUSED, Refused, invalid, malformed, raw_body

build_now(CrmEvent)  # every CRM webhook is queued as CRM events: built with the import (Lambda's init)


def bitrix24_sender(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """Bitrix24 sends the portal's application token and member id inside the form."""
    body = raw_body(app)
    try:
        event = bitrix24_webhook.parse_event(body)
    except FormError as exc:
        raise malformed(exc) from None
    except ValidationError as exc:
        raise invalid(exc) from None
    expected = wiring.container().crm_credentials()
    if not credential_matches(event.auth.application_token, expected.get("application_token")):
        raise Refused(401, {"error": "bad_application_token"}, WEBHOOKS_REFUSED)
    if not credential_matches(event.auth.member_id, expected.get("member_id")):
        raise Refused(403, {"error": "unknown_portal"}, WEBHOOKS_REFUSED)
    app.context["crm_events"] = event.crm_events(int(time.time()))
    return next_middleware(app)


def amocrm_sender(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """amoCRM signs nothing: the unguessable path secret and the account id are the whole check."""
    expected = wiring.container().crm_credentials()
    if not credential_matches(app.context["_route_args"].get("secret"), expected.get("webhook_secret")):
        raise Refused(401, {"error": "bad_secret"}, WEBHOOKS_REFUSED)
    try:
        form = parse_php_form(raw_body(app))
    except FormError as exc:
        raise malformed(exc) from None
    if not credential_matches(amocrm_webhook.account_id(form), expected.get("account_id")):
        raise Refused(403, {"error": "unknown_account"}, WEBHOOKS_REFUSED)
    try:
        app.context["crm_events"] = amocrm_webhook.crm_events(form, int(time.time()))
    except ValueError as exc:
        raise Refused(400, {"error": "invalid_event", "detail": str(exc)}) from None
    return next_middleware(app)
