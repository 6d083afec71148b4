"""Unsubscribe handler: one-click links (RFC 8058) and Mailchimp audience webhooks into the consent ledger.

Nothing here calls the CRM, the MIS or Mailchimp: the opt-out is recorded and a consent job queued, so
every answer is fast (Mailchimp retries slow or failing webhooks; mailbox providers time out).
"""

from __future__ import annotations

import html
from typing import Any, Literal

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinicsync import wiring
from clinicsync.consent import EMAIL_UNSUBSCRIBE, TokenError
from clinicsync.crypto import constant_time_equals
from clinicsync.forms import FormError, http_body, parse_form, parse_php_form
from clinicsync.keys import patient_subject, subject_patient
from clinicsync.observability import logger, metrics, tracer

app = APIGatewayHttpResolver()

# No scripts, images, fonts or third-party anything: the page must not track who opened it.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
ONE_CLICK = "List-Unsubscribe=One-Click"


def _json(status: int, body: dict[str, Any]) -> Response[Any]:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)


def _page(status: int, ru: str, en: str, form: bool = False) -> Response[Any]:
    button = (
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<button>Отписаться / Unsubscribe</button></form>"
        if form
        else ""
    )
    body = (
        '<!doctype html><html lang="ru"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1"><title>Отписка / Unsubscribe</title>'
        "<style>body{font:16px sans-serif;max-width:32em;margin:3em auto;padding:0 1em}</style></head><body>"
        f'<p lang="ru">{html.escape(ru)}</p><p lang="en">{html.escape(en)}</p>{button}</body></html>'
    )
    return Response(status_code=status, content_type="text/html; charset=utf-8", body=body, headers=PAGE_HEADERS)


_REFUSALS_RU = {
    400: "Ссылка повреждена.",
    403: "Эта ссылка выдана не нами или была изменена.",
    410: "Срок действия ссылки истёк.",
}


def _refused(exc: TokenError) -> Response[Any]:
    metrics.add_metric(name="UnsubscribeLinksRefused", unit=MetricUnit.Count, value=1)
    ru = _REFUSALS_RU.get(exc.status, "Ссылка не принята.")
    return _page(exc.status, f"{ru} Ничего не изменено.", f"{exc.reason[:1].upper()}{exc.reason[1:]}. Nothing changed.")


@app.get("/unsubscribe/<token>")
def confirm_page(token: str) -> Response[Any]:
    """A GET never unsubscribes: link scanners and previews fetch it. It only shows the button."""
    try:
        wiring.unsubscribe_tokens().verify(token)
    except TokenError as exc:
        return _refused(exc)
    return _page(
        200,
        "Вы больше не хотите получать наши письма? Нажмите кнопку, чтобы отписаться.",
        "Don't want our e-mails any more? Press the button to unsubscribe.",
        form=True,
    )


@app.post("/unsubscribe/<token>")
def one_click(token: str) -> Response[Any]:
    """RFC 8058: the body is ``List-Unsubscribe=One-Click``, urlencoded or multipart/form-data; cookies and
    auth are neither sent nor read."""
    try:
        form = parse_form(app.current_event)
    except FormError as exc:
        return _page(exc.status, "Запрос не понят. Ничего не изменено.", f"Malformed request ({exc}). Nothing changed.")
    if form.get("List-Unsubscribe") != "One-Click":
        return _page(400, "Запрос не понят. Ничего не изменено.", f"Expected {ONE_CLICK}. Nothing changed.")
    try:
        claim = wiring.unsubscribe_tokens().verify(token)
    except TokenError as exc:
        return _refused(exc)
    ledger = wiring.consent_ledger()
    changed = ledger.opt_out([patient_subject(claim.patient_id)], [claim.channel.value], "link", "link:one-click")
    metrics.add_metric(name="UnsubscribeLinksHonoured", unit=MetricUnit.Count, value=1)
    logger.info("one-click unsubscribe", extra={"channel": claim.channel.value, "changed": bool(changed)})
    return _page(200, "Вы отписаны. Больше писем не будет.", "You are unsubscribed. No more e-mails will follow.")


# --- Mailchimp ------------------------------------------------------------------------------------------------


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")
    list_id: str = Field(min_length=1, max_length=64)


class UnsubscribeData(_Data):
    email: str = Field(min_length=3, max_length=254, pattern=r"@")
    action: str = Field(default="unsub", max_length=16)
    reason: str = Field(default="manual", max_length=32)


class CleanedData(_Data):
    email: str = Field(min_length=3, max_length=254, pattern=r"@")
    reason: str = Field(default="hard", max_length=32)


class UpemailData(_Data):
    old_email: str = Field(min_length=3, max_length=254, pattern=r"@")
    new_email: str = Field(min_length=3, max_length=254, pattern=r"@")


class ProfileData(_Data):
    email: str = Field(min_length=3, max_length=254, pattern=r"@")


class MailchimpEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["unsubscribe", "cleaned", "upemail", "profile", "subscribe", "campaign"]
    fired_at: str = Field(default="", max_length=32)
    data: dict[str, Any]


@app.get("/webhooks/mailchimp/<secret>")
def mailchimp_validate(secret: str) -> Response[Any]:  # noqa: ARG001 - the check carries no secret worth testing
    """Mailchimp saves a webhook only after this GET answers 200."""
    return _json(200, {"status": "ok"})


@app.post("/webhooks/mailchimp/<secret>")
def mailchimp_event(secret: str) -> Response[Any]:
    secrets = wiring.clinic_secret()
    if not constant_time_equals(secret, str(secrets.get("mailchimp_webhook_secret") or "\x00")):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
        return _json(401, {"error": "bad_secret"})
    try:
        event = MailchimpEvent.model_validate(parse_php_form(http_body(app.current_event)))
        outcome = _handle(event)
    except FormError as exc:
        return _json(400, {"error": "malformed_body", "detail": str(exc)})
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return _json(400, {"error": "invalid_event", "fields": fields})
    metrics.add_metric(name="MailchimpEvents", unit=MetricUnit.Count, value=1)
    logger.info("mailchimp event", extra={"type": event.type, "outcome": outcome})
    return _json(200, {"status": outcome})  # also for unknown addresses: Mailchimp must not retry


def _handle(event: MailchimpEvent) -> str:
    config = wiring.clinic_config()
    if event.type in ("subscribe", "campaign"):
        return "ignored"  # a subscribe in Mailchimp never lifts an opt-out (only the MIS or the CRM can)
    model = {"unsubscribe": UnsubscribeData, "cleaned": CleanedData, "upemail": UpemailData, "profile": ProfileData}
    data = model[event.type].model_validate(event.data)
    audiences = {config.mailchimp.list_id} if config.mailchimp is not None else set()
    if config.directory is not None and config.directory.mailchimp is not None:  # the lab's two audiences
        audiences |= {config.directory.mailchimp.doctors_list_id, config.directory.mailchimp.organisations_list_id}
    if data.list_id not in audiences:
        return "other_audience"
    ledger = wiring.consent_ledger()
    if isinstance(data, UnsubscribeData | CleanedData):
        subjects = ledger.subjects_for_email(data.email)
        detail = f"mailchimp:{event.type}:{data.reason}"[:64]
        changed = ledger.opt_out(subjects, EMAIL_UNSUBSCRIBE, "mailchimp", detail, skip=("mailchimp",))
        known = any(subject_patient(s) is not None for s in subjects)
        return "recorded" if changed and known else "recorded_unknown" if changed else "unchanged"
    if isinstance(data, UpemailData):
        ledger.address_moved(data.old_email, data.new_email)  # consent and member follow the person
        return "linked"
    return "ignored"  # profile: merge fields only, nothing about consent


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
