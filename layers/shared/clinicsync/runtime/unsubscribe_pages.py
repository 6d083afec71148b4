"""The one-click unsubscribe pages (RFC 8058): bilingual, static, and tracking nothing.

A GET shows the button (link scanners and previews fetch links, so a GET never unsubscribes); the POST's
form is checked here before the link's token is; a refused link is a page saying why and that nothing changed.
"""

from __future__ import annotations

import html
from typing import Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware

from clinicsync.adapters.aws import store  # noqa: F401 - the ledger's table (wiring builds it on first use)
from clinicsync.adapters.http.forms import FormError, parse_form
from clinicsync.domain.unsubscribe_links import TokenError
from clinicsync.runtime.observe import Counted, observe

# No scripts, images, fonts or third-party anything: the page must not track who opened it.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
ONE_CLICK = "List-Unsubscribe=One-Click"


def page(status: int, ru: str, en: str, form: bool = False) -> Response[Any]:
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


def confirm() -> Response[Any]:
    return page(
        200,
        "Вы больше не хотите получать наши письма? Нажмите кнопку, чтобы отписаться.",
        "Don't want our e-mails any more? Press the button to unsubscribe.",
        form=True,
    )


def done() -> Response[Any]:
    return page(200, "Вы отписаны. Больше писем не будет.", "You are unsubscribed. No more e-mails will follow.")


_REFUSALS_RU = {
    400: "Ссылка повреждена.",
    403: "Эта ссылка выдана не нами или была изменена.",
    410: "Срок действия ссылки истёк.",
}


def _refused(exc: TokenError) -> Response[Any]:
    observe(Counted({"UnsubscribeLinksRefused": 1}))
    ru = _REFUSALS_RU.get(exc.status, "Ссылка не принята.")
    return page(exc.status, f"{ru} Ничего не изменено.", f"{exc.reason[:1].upper()}{exc.reason[1:]}. Nothing changed.")


def answer_refused_links(app: ApiGatewayResolver) -> None:
    """A link whose token does not verify, wherever it is verified, is answered with the refusal page."""
    app.exception_handler(TokenError)(_refused)


def one_click_form(app: ApiGatewayResolver, next_middleware: NextMiddleware) -> Response[Any]:
    """RFC 8058: the body is ``List-Unsubscribe=One-Click``, urlencoded or multipart/form-data; cookies and
    auth are neither sent nor read."""
    try:
        form = parse_form(app.current_event)
    except FormError as exc:
        return page(exc.status, "Запрос не понят. Ничего не изменено.", f"Malformed request ({exc}). Nothing changed.")
    if form.get("List-Unsubscribe") != "One-Click":
        return page(400, "Запрос не понят. Ничего не изменено.", f"Expected {ONE_CLICK}. Nothing changed.")
    return next_middleware(app)
