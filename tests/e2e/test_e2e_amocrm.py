"""amoCRM-only end-to-end behaviour: the webhook receiver's checks on real form-encoded POSTs with
several events each. The funnel scenarios shared by every CRM are in test_e2e_scenarios.py."""

from __future__ import annotations

import json
from collections.abc import Callable

import boto3
import httpx
import pytest

from sandbox.local import LOCAL_API_TIMEOUT, LocalClinic


@pytest.fixture
def clinic(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    return make_clinic(crm="amocrm", patients=3, appointments=3)


def _secret(clinic: LocalClinic) -> str:

    arn = clinic.stack.parameters["CrmSecretArn"]

    return str(
        json.loads(boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"])["webhook_secret"]
    )


def _body(account: str, *pairs: tuple[str, str]) -> str:
    return str(httpx.QueryParams([*pairs, ("account[id]", account), ("account[subdomain]", "clinic")]))


def _post(clinic: LocalClinic, secret: str, body: str) -> httpx.Response:
    api = clinic.servers[-1].base_url
    headers = {"content-type": "application/x-www-form-urlencoded"}
    return httpx.post(f"{api}/webhooks/amocrm/{secret}", content=body, headers=headers, timeout=LOCAL_API_TIMEOUT)


def test_every_event_of_one_post_is_queued(clinic: LocalClinic) -> None:
    account = str(clinic.amocrm.account_id) if clinic.amocrm else ""
    body = _body(
        account,
        ("leads[status][0][id]", "25400001"),
        ("leads[status][0][status_id]", "142"),
        ("leads[status][0][old_status_id]", "63504810"),
        ("leads[status][0][pipeline_id]", "7845123"),
        ("leads[status][1][id]", "25400002"),
        ("leads[add][0][id]", "25400009"),
        ("contacts[update][0][id]", "33100001"),
        ("leads[delete][0][id]", "25400003"),  # deletes are not synced back
    )
    response = _post(clinic, _secret(clinic), body)
    assert (response.status_code, response.json()) == (200, {"status": "queued", "events": 4})
    assert clinic.stack.queue_depth("CrmEventQueue") == 4


@pytest.mark.parametrize(
    ("case", "status"),
    [("bad_secret", 401), ("other_account", 403), ("malformed", 400), ("non_numeric_id", 400)],
)
def test_refused_posts_queue_nothing(clinic: LocalClinic, case: str, status: int) -> None:
    account = str(clinic.amocrm.account_id) if clinic.amocrm else ""
    good = _body(account, ("leads[status][0][id]", "25400001"))
    secret, body = {
        "bad_secret": ("forged-secret", good),
        "other_account": (_secret(clinic), _body("1", ("leads[status][0][id]", "25400001"))),
        "malformed": (_secret(clinic), "leads[status]][0][id]=1&%%%"),
        "non_numeric_id": (_secret(clinic), _body(account, ("leads[status][0][id]", "1; DROP"))),
    }[case]
    response = _post(clinic, secret, body)
    assert response.status_code == status, response.text
    assert clinic.stack.queue_depth("CrmEventQueue") == 0
