"""One Logger, Metrics and Tracer for the whole package (Powertools), configured from env vars.

Log lines carry ids and counts only; names, phones and e-mails are never passed to the logger.
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger(service="clinicsync")
metrics = Metrics(namespace="clinicsync", service="clinicsync")
tracer = Tracer(service="clinicsync")
