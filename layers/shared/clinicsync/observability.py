"""One Logger, Metrics and Tracer for the whole package (Powertools), configured from env vars.

Log lines carry ids and counts only; names, phones and e-mails are never passed to the logger.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.types import CloudWatchEMFOutput
from aws_lambda_powertools.utilities.typing import LambdaContext

from clinicsync.settings import current_clinic_id

CLINIC_DIMENSION = "ClinicId"


def clinic_dimensions() -> dict[str, str]:
    """The dimension that keeps clinics sharing an account apart (the template's alarms and dashboard filter
    on it). Read at every flush, not at import: the local runtime runs several clinics in one process."""
    clinic = current_clinic_id()
    return {CLINIC_DIMENSION: clinic} if clinic else {}


class ClinicMetricsProvider(AmazonCloudWatchEMFProvider):
    """Powertools' EMF provider with the clinic's dimension on every metric, the cold start included."""

    def serialize_metric_set(
        self, metrics: dict[str, Any] | None = None, dimensions: dict[str, Any] | None = None, metadata: Any = None
    ) -> CloudWatchEMFOutput:
        target = self.dimension_set if dimensions is None else dimensions
        target.update(clinic_dimensions())
        return super().serialize_metric_set(metrics=metrics, dimensions=target, metadata=metadata)

    def add_cold_start_metric(self, context: LambdaContext) -> None:
        dimensions = {"function_name": context.function_name, **clinic_dimensions()}
        if self.service:
            dimensions["service"] = str(self.service)
        with single_metric(
            name="ColdStart", unit=MetricUnit.Count, value=1, namespace=self.namespace, default_dimensions=dimensions
        ):
            pass


logger = Logger(service="clinicsync")
metrics = Metrics(provider=ClinicMetricsProvider(namespace="clinicsync", service="clinicsync"))
# Only botocore is patched: an httpx subsegment keeps the URL path, which holds the Bitrix24 webhook secret
# (/rest/<user>/<secret>/…) and Mailchimp's member hash (MD5 of an e-mail). AWS calls carry neither.
TRACED_MODULES = ("botocore",)
tracer = Tracer(service="clinicsync", patch_modules=TRACED_MODULES)
