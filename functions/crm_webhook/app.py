"""Inbound receiver: HTTP API v2 -> verify the sender -> enqueue -> answer within milliseconds.

- CRM webhooks (Bitrix24, amoCRM): Bitrix24 never retries an event and slows down handlers that answer
  slowly, so nothing here calls the CRM: the event is checked, queued, and re-fetched later in batches.
- IDENT's calls (``/ident/GetTickets``, ``/ident/PostTimeTable``), checked by ``IDENT-Integration-Key``,
  and the IDENT connector's signed change batches (``/ident/connector/*``). Refusals are plain text,
  because IDENT writes the body into its exchange log.

The middlewares (``clinicsync.runtime.middlewares``, the CRMs' in ``crm_senders``) check each sender and read
the vendors' formats through the adapters; ``clinicsync.runtime.intake`` queues or stores what they let through.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync.observability import logger, metrics, tracer
from clinicsync.runtime import crm_senders, intake
from clinicsync.runtime import ident_middlewares as ident_mw
from clinicsync.runtime import middlewares as mw

app = APIGatewayHttpResolver()
mw.answer_refusals(app)


@app.post("/webhooks/bitrix24", middlewares=[crm_senders.bitrix24_sender])
def bitrix24() -> Response[Any]:
    # An event we do not sync is answered 200 too, so Bitrix24 does not slow us down.
    return mw.json_reply(200, {"status": "queued" if intake.crm_events(app.context["crm_events"]) else "ignored"})


@app.post("/webhooks/amocrm/<secret>", middlewares=[crm_senders.amocrm_sender])
def amocrm(secret: str) -> Response[Any]:  # noqa: ARG001 - checked by the middleware
    return mw.json_reply(200, {"status": "queued", "events": intake.crm_events(app.context["crm_events"])})


@app.get("/ident/GetTickets", middlewares=[ident_mw.ident_caller])
def ident_get_tickets() -> Response[Any]:
    return mw.json_reply(200, intake.tickets_json(ident_mw.ticket_query(app)))


@app.post("/ident/PostTimeTable", middlewares=[ident_mw.ident_caller])
def ident_post_timetable() -> Response[Any]:
    intake.timetable(ident_mw.timetable(app))
    return mw.text_reply(200, "OK")


@app.get("/ident/connector/settings", middlewares=[ident_mw.connector_caller])
def ident_connector_settings() -> Response[Any]:
    return mw.json_reply(200, intake.connector_settings())


@app.post("/ident/connector/batches", middlewares=[ident_mw.connector_caller])
def ident_connector_batch() -> Response[Any]:
    return mw.json_reply(202, intake.connector_batch(ident_mw.queue_connector_batch(app)))


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
