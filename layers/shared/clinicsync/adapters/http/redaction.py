"""Secrets and PII never reach a log line through a URL.

The ``httpx`` logger prints request URLs at INFO, and some token endpoints take secrets in the query
string (and amoCRM's search URLs carry a phone's digits), so importing this module installs a filter on
that logger that masks those query parameters. ``scrub`` masks known secret values in vendor text.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

# Secrets, and PII that search URLs carry (amoCRM's ``query`` holds a phone's digits): httpx logs URLs at INFO.
SENSITIVE_PARAMS = frozenset(
    {"auth", "access_token", "refresh_token", "client_secret", "code", "long_lived_token", "query", "phone", "email"}
)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every non-empty value of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """The URL with token-like query values masked (``auth``, ``refresh_token``, ``client_secret`` …)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = [(k, "***" if k in SENSITIVE_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="*")))


class RedactQuerySecrets(logging.Filter):
    """httpx logs ``HTTP Request: GET <url> …`` at INFO; mask secrets carried in the query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                redact_url(str(arg)) if isinstance(arg, httpx.URL) and arg.query else arg for arg in record.args
            )
        return True


def install_httpx_filter() -> None:
    """Put :class:`RedactQuerySecrets` on the ``httpx`` logger (idempotent; done on import)."""
    httpx_logger = logging.getLogger("httpx")
    if not any(isinstance(f, RedactQuerySecrets) for f in httpx_logger.filters):
        httpx_logger.addFilter(RedactQuerySecrets())


install_httpx_filter()
