"""One Logger, Metrics and Tracer for the whole package (Powertools), configured from env vars.

Log lines carry ids and counts only; names, phones and e-mails are never passed to the logger.
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger(service="clinicsync")
metrics = Metrics(namespace="clinicsync", service="clinicsync")
# Only botocore is patched: an httpx subsegment keeps the URL path, which holds the Bitrix24 webhook secret
# (/rest/<user>/<secret>/…) and Mailchimp's member hash (MD5 of an e-mail). AWS calls carry neither.
TRACED_MODULES = ("botocore",)
tracer = Tracer(service="clinicsync", patch_modules=TRACED_MODULES)
