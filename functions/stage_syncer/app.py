"""Stage syncer: three SQS event sources, each processed as one batch (``clinicsync.runtime.batch``).

- The FIFO sync queue carries patients' change sets and CRM observations, grouped by patient shard:
  the whole SQS batch (up to 10 messages of 50 patients) is planned and applied as one sync, so CRM
  batches and bulk writes go out full; a message fails if any of its patients failed (then the rest
  of its group comes back too, and the finished patients cost nothing on the retry).
- The CRM event queue carries webhook events: the whole batch is re-fetched at once, then each event
  is judged on its own (echo, manual move, new lead, opt-out).
- The consent queue carries consent jobs: the whole batch's outputs (CRM opt-out fields, MIS flags,
  Mailchimp members) are pushed at once; a job whose outputs are not all done is reported failed and
  comes back after a growing delay (``runtime.batch.retry_delay``), until done (then the DLQ alarm).

The queue is told by the event source's ARN, as the template configures it.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync.observability import logger, metrics, tracer
from clinicsync.runtime.batch import processor_for


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    records = event.get("Records") or [{}]
    processor = processor_for(str(records[0].get("eventSourceARN", "")))
    return process_partial_response(event=event, record_handler=processor.judge, processor=processor, context=context)
