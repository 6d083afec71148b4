"""Unsubscribe handler: one-click links (RFC 8058) and Mailchimp audience webhooks into the consent ledger.

Nothing here calls the CRM, the MIS or Mailchimp: the opt-out is recorded and a consent job queued, so
every answer is fast (Mailchimp retries slow or failing webhooks; mailbox providers time out).
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync.application.consent import our_audiences
from clinicsync.observability import logger, metrics, tracer
from clinicsync.runtime import middlewares as mw
from clinicsync.runtime import unsubscribe_pages as pages
from clinicsync.runtime.observe import Counted, observe
from clinicsync.runtime.wiring import container

app = APIGatewayHttpResolver()
mw.answer_refusals(app)
pages.answer_refused_links(app)  # a token that does not verify: the refusal page


@app.get("/unsubscribe/<token>")
def confirm_page(token: str) -> Response[Any]:
    container().unsubscribe_tokens().verify(token)  # a GET never unsubscribes: scanners and previews fetch links
    return pages.confirm()


@app.post("/unsubscribe/<token>", middlewares=[pages.one_click_form])
def one_click(token: str) -> Response[Any]:
    claim = container().unsubscribe_tokens().verify(token)
    changed = container().consent_ledger().unsubscribe_link(claim)
    observe(Counted({"UnsubscribeLinksHonoured": 1}))
    logger.info("one-click unsubscribe", extra={"channel": claim.channel.value, "changed": changed})
    return pages.done()


@app.get("/webhooks/mailchimp/<secret>")
def mailchimp_validate(secret: str) -> Response[Any]:  # noqa: ARG001 - the check carries no secret worth testing
    return mw.json_reply(200, {"status": "ok"})  # Mailchimp saves a webhook only after this GET answers 200


@app.post("/webhooks/mailchimp/<secret>", middlewares=[mw.mailchimp_sender])
def mailchimp_event(secret: str) -> Response[Any]:  # noqa: ARG001 - checked by the middleware
    event = app.context["event"]
    outcome = container().consent_ledger().audience_event(event, our_audiences(container().clinic_config()))
    observe(Counted({"MailchimpEvents": 1}))
    logger.info("mailchimp event", extra={"type": event.kind, "outcome": outcome})
    return mw.json_reply(200, {"status": outcome})  # also for unknown addresses: Mailchimp must not retry


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
