"""HTTP routes' sender checks as Powertools middlewares, and the one way a request is refused.

A middleware checks who sent the request (and, where the credential travels in the body, reads the body
for it), then puts what it read in ``app.context`` for the route. A refusal is a ``Refused`` raised from
anywhere; one exception handler answers it exactly as that sender's protocol expects (JSON for the CRMs
and Mailchimp, plain text for IDENT, whose exchange log shows the body) and counts it.
"""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from pydantic import ValidationError

from clinicsync.adapters.amocrm import webhook as amocrm_webhook
from clinicsync.adapters.bitrix24 import webhook as bitrix24_webhook
from clinicsync.adapters.http.forms import FormError, http_body, parse_php_form
from clinicsync.domain.crypto import constant_time_equals, credential_matches
from clinicsync.runtime import wiring
from clinicsync.runtime.observe import Counted, observe


class Refused(ServiceError):
    """A request turned away: the body as the sender's protocol wants it, and the metric that counts it."""

    def __init__(self, status: int, body: str | dict[str, Any], metric: str | None = None) -> None:
        super().__init__(status, body if isinstance(body, str) else str(body.get("error", "")))
        self.body = body
        self.metric = metric


def json_reply(status: int, body: dict[str, Any] | str) -> Response[Any]:
    """A JSON reply; a str body is sent as it is (already JSON)."""
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)


def text_reply(status: int, body: str) -> Response[Any]:
    return Response(status_code=status, content_type=content_types.TEXT_PLAIN, body=body)


def _answer(exc: Refused) -> Response[Any]:
    if exc.metric:
        observe(Counted({exc.metric: 1}))
    return text_reply(exc.status_code, exc.body) if isinstance(exc.body, str) else json_reply(exc.status_code, exc.body)


def answer_refusals(app: ApiGatewayResolver) -> None:
    app.exception_handler(Refused)(_answer)


def raw_body(app: ApiGatewayResolver) -> bytes:
    """The body exactly as sent (signatures are over bytes); one that is not even bytes is a plain 400."""
    try:
        return http_body(app.current_event)
    except FormError as exc:
        raise Refused(400, str(exc)) from None


def _malformed(exc: FormError) -> Refused:
    return Refused(400, {"error": "malformed_body", "detail": str(exc)})


def _invalid(exc: ValidationError) -> Refused:
    return Refused(
        400, {"error": "invalid_event", "fields": sorted({".".join(map(str, e["loc"])) for e in exc.errors()})}
    )


# --- the CRMs' webhooks: the events to queue go to app.context["crm_events"] ---------------------------------

WEBHOOKS_REFUSED = "WebhooksRefused"


def bitrix24_sender(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """Bitrix24 sends the portal's application token and member id inside the form."""
    body = raw_body(app)
    try:
        event = bitrix24_webhook.parse_event(body)
    except FormError as exc:
        raise _malformed(exc) from None
    except ValidationError as exc:
        raise _invalid(exc) from None
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
        raise _malformed(exc) from None
    if not credential_matches(amocrm_webhook.account_id(form), expected.get("account_id")):
        raise Refused(403, {"error": "unknown_account"}, WEBHOOKS_REFUSED)
    try:
        app.context["crm_events"] = amocrm_webhook.crm_events(form, int(time.time()))
    except ValueError as exc:
        raise Refused(400, {"error": "invalid_event", "detail": str(exc)}) from None
    return next_middleware(app)


def mailchimp_sender(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """Mailchimp signs nothing either: the path secret is the check. The event goes to app.context["event"]."""
    from clinicsync.adapters.mailchimp import webhook as mailchimp_webhook  # the unsubscribe handler's only

    configured = str(wiring.container().clinic_secret().get("mailchimp_webhook_secret") or "\x00")
    if not constant_time_equals(app.context["_route_args"].get("secret"), configured):
        raise Refused(401, {"error": "bad_secret"}, WEBHOOKS_REFUSED)
    try:
        app.context["event"] = mailchimp_webhook.parse_event(http_body(app.current_event))
    except FormError as exc:
        raise _malformed(exc) from None
    except ValidationError as exc:
        raise _invalid(exc) from None
    return next_middleware(app)
