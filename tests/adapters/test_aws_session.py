"""A cold start's AWS clients share one botocore session: ours (table, queues) and Powertools' parameter
providers (secrets, config), so the endpoints, retry rules and service models are parsed once, not once per
session (a session's loader costs ~270 M instructions on the first invocation, a sixth of an import)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.loaders import Loader
from moto import mock_aws

from clinicsync.runtime import wiring
from clinicsync.settings import Settings


@pytest.fixture
def cold_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Loader]]:
    """No boto3 session yet, as in a new Lambda container; yields the loaders that parse the endpoints."""
    loaders: list[Loader] = []
    original = Loader.load_data_with_path

    def load_data_with_path(self: Loader, name: str) -> Any:
        if name == "endpoints":
            loaders.append(self)
        return original(self, name)

    with mock_aws():
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        monkeypatch.setattr(Loader, "load_data_with_path", load_data_with_path)
        wiring.reset()
        try:
            yield loaders
        finally:
            wiring.reset()  # its providers hold this test's session


def test_the_table_the_queues_the_secrets_and_the_config_share_one_loader(cold_process: list[Loader]) -> None:
    secret = boto3.client("secretsmanager").create_secret(Name="s", SecretString=json.dumps({"k": "v"}))["ARN"]
    boto3.client("ssm").put_parameter(Name="/c", Value="{}", Type="String")
    cold_process.clear()  # the set-up's clients are the test's, not the handler's
    boto3.DEFAULT_SESSION = None
    settings = Settings.model_construct(**dict.fromkeys(Settings.model_fields, "x") | {"config_parameter_name": "/c"})
    container = wiring.Container(settings)

    container.table()
    container.sqs()
    assert wiring.read_secret(secret) == {"k": "v"}
    assert container._config_text() == "{}"

    assert len(cold_process) >= 1
    assert {id(loader) for loader in cold_process} == {id(cold_process[0])}
