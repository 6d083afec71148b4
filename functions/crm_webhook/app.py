"""CRM webhook receiver: HTTP API v2 -> verify the sender -> enqueue -> 200 within milliseconds.

Bitrix24 never retries an event and slows down handlers that answer slowly, so nothing here calls
the CRM: the event is checked, queued, and re-fetched later by the syncer in batches.
"""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinicsync import wiring
from clinicsync.crm_events import ENTITY_OF_EVENT
from clinicsync.crypto import constant_time_equals
from clinicsync.forms import FormError, parse_php_form
from clinicsync.models import CrmEvent
from clinicsync.observability import logger, metrics, tracer

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


@app.post("/webhooks/bitrix24")
def bitrix24() -> Response[Any]:
    event = app.current_event
    try:
        form = parse_php_form(event.decoded_body or "")
        parsed = Bitrix24Event.model_validate(form)
    except FormError as exc:
        return _reply(400, {"error": "malformed_body", "detail": str(exc)})
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return _reply(400, {"error": "invalid_event", "fields": fields})
    expected = wiring.crm_credentials()
    if not constant_time_equals(parsed.auth.application_token, str(expected.get("application_token", ""))):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
        return _reply(401, {"error": "bad_application_token"})
    if not constant_time_equals(parsed.auth.member_id, str(expected.get("member_id", ""))):
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


@app.post("/webhooks/amocrm/<secret>")
def amocrm(secret: str) -> Response[Any]:  # noqa: ARG001 - issue #4
    return _reply(501, {"error": "not_implemented", "detail": "amoCRM webhooks are not enabled in this release"})


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
