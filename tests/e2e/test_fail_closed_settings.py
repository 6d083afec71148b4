"""Settings never fail open: an empty amoCRM account id accepts nothing, a weak IDENT key serves nothing, the
Bitrix24 budget key is never the webhook secret, and the IDENT connector's files and stack URL stay private."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from clinicsync.adapters.bitrix24.client import portal_budget_key
from clinicsync.adapters.ident.contract import INTEGRATION_KEY_MIN_CHARS, KEY_HEADER, weak_integration_key
from clinicsync.runtime import wiring
from clinicsync_ident.cli import app as connector_cli
from clinicsync_ident.config import ConnectorConfig
from sandbox.local import LocalClinic

HTTP = httpx.Client(timeout=30.0)


def _secret(clinic: LocalClinic, which: str) -> tuple[str, dict[str, Any]]:
    arn = clinic.stack.parameters[f"{which}SecretArn"]
    sm = clinic.stack.aws.client("secretsmanager")
    return arn, dict(json.loads(sm.get_secret_value(SecretId=arn)["SecretString"]))


def _put_secret(clinic: LocalClinic, arn: str, value: dict[str, Any]) -> None:
    clinic.stack.aws.client("secretsmanager").put_secret_value(SecretId=arn, SecretString=json.dumps(value))
    wiring.reset()  # the functions' secret cache


def test_an_amocrm_secret_without_account_id_accepts_no_webhook(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, crm="amocrm")
    arn, crm = _secret(clinic, "Crm")
    crm.pop("account_id")
    _put_secret(clinic, arn, crm)
    url = f"{clinic.api_url}/webhooks/amocrm/{crm['webhook_secret']}"
    form = {"content-type": "application/x-www-form-urlencoded"}
    for body in ("leads[status][0][id]=7", "leads[status][0][id]=7&account[id]="):
        assert HTTP.post(url, content=body, headers=form).status_code == 403, body
    assert clinic.stack.queue_depth("CrmEventQueue") == 0


def test_a_weak_ident_integration_key_serves_nothing(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, mis="ident")
    arn, mis = _secret(clinic, "Mis")
    _put_secret(clinic, arn, {**mis, "integration_key": "k"})
    start = datetime.now(UTC) - timedelta(days=1)
    query = (
        f"dateTimeFrom={quote(start.isoformat(), safe='')}&dateTimeTo={quote(datetime.now(UTC).isoformat(), safe='')}"
    )
    reads = clinic.crm.stats()["requests"]
    response = HTTP.get(f"{clinic.api_url}/ident/GetTickets?{query}", headers={KEY_HEADER: "k"})
    assert response.status_code == 503 and "too weak" in response.text
    assert clinic.crm.stats()["requests"] == reads  # refused before any CRM read


@given(st.text(max_size=INTEGRATION_KEY_MIN_CHARS - 1))
def test_an_integration_key_shorter_than_32_random_bytes_is_weak(key: str) -> None:
    assert weak_integration_key(key)


def test_a_deploy_refuses_fail_open_secrets_before_writing(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path
) -> None:
    from tests.infra.test_deploy_custody import amocrm_pair, new_clinic_files, run

    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, crm="amocrm")
    crm = {k: v for k, v in amocrm_pair(clinic).items() if k != "account_id"}
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, "open-clinic", crm)
    code, out = run("deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", "/nonexistent")
    assert code == 1 and "account_id is required" in out
    names = [s["Name"] for s in clinic.stack.aws.client("secretsmanager").list_secrets()["SecretList"]]
    assert not [n for n in names if "open-clinic" in n]


def test_the_bitrix24_budget_key_is_never_the_webhook_secret(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=3, appointments=3, rate_limit=False)
    assert clinic.bitrix is not None
    arn, crm = _secret(clinic, "Crm")
    crm.pop("member_id")  # webhook mode without the portal's member id
    _put_secret(clinic, arn, crm)
    clinic.sync()
    assert clinic.crm.deals()  # the sync went through the budget
    table = boto3.resource("dynamodb", endpoint_url=clinic.stack.aws.endpoint).Table(clinic.stack.table_name)
    budget_keys = [i["sk"] for i in table.scan()["Items"] if i["pk"] == "BUDGET"]
    assert budget_keys
    assert not [k for k in budget_keys if clinic.bitrix.webhook_secret in k or "/rest/" in k]


@given(user=st.integers(1, 10**6), secret=st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=24))
def test_a_budget_key_holds_no_part_of_the_webhook_path(user: int, secret: str) -> None:
    key = portal_budget_key({"webhook_url": f"https://clinic.bitrix24.ru/rest/{user}/{secret}/"})
    assert key == "bitrix24:clinic.bitrix24.ru"


def test_connector_init_writes_its_files_for_the_owner_only(tmp_path: Path) -> None:
    config = tmp_path / "ident.yaml"
    dsn = "DRIVER={ODBC Driver 18 for SQL Server};SERVER=.;UID=sa;PWD=s3cret-pw"
    result = CliRunner().invoke(
        connector_cli, ["init", "-c", str(config), "--stack-url", "https://abc.example.org", "--dsn", dsn]
    )
    assert result.exit_code == 0, result.output
    for written in (config, tmp_path / "connector.key"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o600, written


@pytest.mark.parametrize("url", ["http://abc.execute-api.eu-central-1.amazonaws.com", "http://10.0.0.5:8080"])
def test_connector_refuses_a_plain_http_stack_url(tmp_path: Path, url: str) -> None:
    config = tmp_path / "ident.yaml"
    dsn = "DRIVER={ODBC Driver 18 for SQL Server};SERVER=.;UID=sa;PWD=s3cret-pw"
    result = CliRunner().invoke(connector_cli, ["init", "-c", str(config), "--stack-url", url, "--dsn", dsn])
    assert result.exit_code == 1 and "https" in result.output and "s3cret-pw" not in result.output
    assert not config.exists() and not (tmp_path / "connector.key").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:9000", "http://[::1]:80"])
def test_connector_accepts_plain_http_only_on_loopback(tmp_path: Path, url: str) -> None:
    settings = {
        "connector_id": "c",
        "stack_url": url,
        "key_file": str(tmp_path / "k"),
        "state_file": str(tmp_path / "s"),
        "database": {"driver": "sqlite", "dsn": "x.db"},
    }
    assert str(ConnectorConfig.model_validate(settings).stack_url).startswith("http://")
    with pytest.raises(ValidationError):
        ConnectorConfig.model_validate({**settings, "stack_url": "http://example.org"})
