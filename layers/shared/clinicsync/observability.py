"""One Logger, Metrics and Tracer for the whole package (Powertools), configured from env vars.

Log lines carry ids and counts only; names, phones and e-mails are never passed to the logger.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.types import CloudWatchEMFOutput
from aws_lambda_powertools.tracing.base import BaseProvider, BaseSegment
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


class NoSegment(BaseSegment):
    """The subsegment a disabled tracer hands out: accepts everything, records nothing."""

    def close(self, end_time: int | None = None) -> None:
        pass

    def add_subsegment(self, subsegment: Any) -> None:
        pass

    def remove_subsegment(self, subsegment: Any) -> None:
        pass

    def put_annotation(self, key: str, value: Any) -> None:
        pass

    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None:
        pass

    def add_exception(self, exception: BaseException, stack: Any, remote: bool = False) -> None:
        pass


class NoTraces(BaseProvider):
    """Provider for a disabled tracer. Powertools' default provider is the X-Ray SDK's recorder, imported
    even when tracing is off (and outside Lambda it builds a botocore X-Ray client at import)."""

    @contextmanager
    def in_subsegment(self, name: str | None = None, **kwargs: Any) -> Generator[BaseSegment]:
        del name, kwargs  # the base class's signature
        yield NoSegment()

    @asynccontextmanager
    async def in_subsegment_async(self, name: str | None = None, **kwargs: Any) -> AsyncGenerator[BaseSegment]:
        del name, kwargs
        yield NoSegment()

    def put_annotation(self, key: str, value: Any) -> None:
        pass

    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None:
        pass

    def patch(self, modules: Sequence[str]) -> None:
        pass

    def patch_all(self) -> None:
        pass


def build_tracer() -> Tracer:
    """X-Ray where Powertools would trace (in Lambda, POWERTOOLS_TRACE_DISABLED unset: the template's
    `Tracing: Active`); elsewhere a tracer that never imports the X-Ray SDK. Powertools' own rule decides."""
    if Tracer._is_tracer_disabled():
        return Tracer(service="clinicsync", disabled=True, provider=NoTraces())
    return Tracer(service="clinicsync", patch_modules=TRACED_MODULES)


tracer = build_tracer()
