"""HTTP routes' sender checks as Powertools middlewares, and the one way a request is refused.

A middleware checks who sent the request (and, where the credential travels in the body, reads the body
for it), then puts what it read in ``app.context`` for the route (the CRMs' senders: ``crm_senders``). A
refusal is a ``Refused`` raised from anywhere; one exception handler answers it exactly as that sender's
protocol expects (JSON for the CRMs and Mailchimp, plain text for IDENT, whose exchange log shows the
body) and counts it.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from pydantic import ValidationError

from clinicsync.adapters.http.forms import FormError, http_body
from clinicsync.domain.crypto import constant_time_equals
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


def malformed(exc: FormError) -> Refused:
    return Refused(400, {"error": "malformed_body", "detail": str(exc)})


def invalid(exc: ValidationError) -> Refused:
    return Refused(
        400, {"error": "invalid_event", "fields": sorted({".".join(map(str, e["loc"])) for e in exc.errors()})}
    )


WEBHOOKS_REFUSED = "WebhooksRefused"  # the CRMs' and Mailchimp's webhooks (the CRMs': ``crm_senders``)


def mailchimp_sender(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """Mailchimp signs nothing either: the path secret is the check. The event goes to app.context["event"]."""
    from clinicsync.adapters.mailchimp import webhook as mailchimp_webhook  # the unsubscribe handler's only

    configured = str(wiring.container().clinic_secret().get("mailchimp_webhook_secret") or "\x00")
    if not constant_time_equals(app.context["_route_args"].get("secret"), configured):
        raise Refused(401, {"error": "bad_secret"}, WEBHOOKS_REFUSED)
    try:
        app.context["event"] = mailchimp_webhook.parse_event(http_body(app.current_event))
    except FormError as exc:
        raise malformed(exc) from None
    except ValidationError as exc:
        raise invalid(exc) from None
    return next_middleware(app)
