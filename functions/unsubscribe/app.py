"""Unsubscribe handler: one-click links and Mailchimp webhooks into the consent ledger."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync.observability import logger, metrics, tracer

app = APIGatewayHttpResolver()


def _not_yet(what: str) -> Response[Any]:
    return Response(
        status_code=501,
        content_type=content_types.APPLICATION_JSON,
        body={"error": "not_implemented", "detail": f"{what} is not enabled in this release"},
    )


@app.route("/webhooks/mailchimp/<secret>", method=["GET", "POST"])
def mailchimp(secret: str) -> Response[Any]:  # noqa: ARG001 - issue #7
    return _not_yet("Mailchimp webhook")


@app.route("/unsubscribe/<token>", method=["GET", "POST"])
def one_click(token: str) -> Response[Any]:  # noqa: ARG001 - issue #7
    return _not_yet("One-click unsubscribe")


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
