"""One boto3 session per process for every AWS client: ours (``boto3.client`` and ``boto3.resource`` use boto3's
default session) and Powertools' parameter providers (the secrets, the clinic config), which would each make
their own. A session's loader parses ``endpoints.json``, the SDK defaults and each service model on first use:
once per cold start, not once per session (~270 M instructions on the first invocation for each extra one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import boto3
from aws_lambda_powertools.utilities import parameters


def aws_session() -> boto3.session.Session:
    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    assert boto3.DEFAULT_SESSION is not None
    return boto3.DEFAULT_SESSION


# Kept as Powertools' get_secret and get_parameter keep theirs: one of each, until ``drop_providers``.
_providers: dict[str, Any] = {}


def _provider[P](kind: str, build: Callable[[], P]) -> P:
    if kind not in _providers:
        _providers[kind] = build()
    return cast("P", _providers[kind])


def secrets_provider() -> parameters.SecretsProvider:
    return _provider("secrets", lambda: parameters.SecretsProvider(boto3_session=aws_session()))


def ssm_provider() -> parameters.SSMProvider:
    return _provider("ssm", lambda: parameters.SSMProvider(boto3_session=aws_session()))


def drop_providers() -> None:
    """Forget the providers and their cached values, as Powertools' ``clear_caches`` drops its own."""
    _providers.clear()
