"""Security checks as tests: constant-time secret comparison everywhere, secrets only from Secrets
Manager (never env vars, never logs), refused senders enqueue nothing, and two clinics' stacks in one
runtime never touch each other's table, queues, secrets or config. (Wildcards and resources outside
the stack in IAM: tests/infra/test_template.py.)"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.client
import httpx
import pytest

from sandbox.local import LOCAL_API_TIMEOUT, LocalClinic
from sandbox.runtime import ClinicStack
from tests.helpers import ROOT

SOURCES = [
    *sorted((ROOT / "functions").glob("*/app.py")),
    *sorted((ROOT / "layers" / "shared" / "clinicsync").rglob("*.py")),
    *sorted((ROOT / "connector").rglob("*.py")),
]
SECRETISH = re.compile(
    r"(secret|token|signature|password|passwd|api_?key|integration_key|connector_key|hash_key)", re.I
)
# Comparisons that mention a secret-ish name but compare no secret value (checked by hand).
NOT_SECRETS = {"token_type"}  # OAuth's "Bearer"


def _secret_comparisons(source: str) -> Iterator[tuple[int, str]]:
    """``==`` / ``!=`` / ``in`` between expressions whose text names a secret: those leak timing."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            continue
        sides = [node.left, *node.comparators]
        texts = [ast.unparse(side) for side in sides]
        if any(isinstance(s, ast.Constant) for s in sides):
            continue  # against a literal (an error code, a presence check): no secret value is compared
        if any(SECRETISH.search(t) for t in texts) and not any(n in " ".join(texts) for n in NOT_SECRETS):
            yield node.lineno, " vs ".join(texts)


def test_detector_flags_a_plain_secret_comparison() -> None:
    sample = "def f(given, creds):\n    return given == creds['webhook_secret']\n"
    assert [line for line, _ in _secret_comparisons(sample)] == [2]
    assert not list(
        _secret_comparisons("def f(given, creds):\n    return constant_time_equals(given, creds['token'])\n")
    )


def test_no_secret_is_compared_with_eq() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in SOURCES
        for line, text in _secret_comparisons(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "use clinicsync.domain.crypto.constant_time_equals / hmac.compare_digest:\n" + "\n".join(found)


def test_inbound_checks_use_constant_time_comparison() -> None:
    """Each receiver's check (the routes' middlewares) calls the constant-time, fail-closed helper (the AST test
    above forbids the other way)."""
    checks = ("middlewares.py", "crm_senders.py", "ident_middlewares.py")
    runtime = ROOT / "layers" / "shared" / "clinicsync" / "runtime"
    webhook = "".join((runtime / name).read_text(encoding="utf-8") for name in checks)
    for checked in ("application_token", "member_id", "webhook_secret", "account_id", "integration_key"):
        assert re.search(rf"credential_matches\([^\n]*{checked}", webhook), checked
    signing = (ROOT / "layers" / "shared" / "clinicsync" / "adapters" / "http" / "signing.py").read_text(
        encoding="utf-8"
    )
    assert "hmac.compare_digest" in signing
    crypto = (ROOT / "layers" / "shared" / "clinicsync" / "domain" / "crypto.py").read_text(encoding="utf-8")
    assert "hmac.compare_digest" in crypto and "and constant_time_equals(given, expected)" in crypto


# --- secrets: only from Secrets Manager, never in env vars or logs ------------------------------------------


def test_handlers_read_settings_from_env_in_one_place_only() -> None:
    """Env vars carry names and ARNs, read once by settings.Settings (pydantic-settings); secrets come via
    Powertools' SecretsProvider (adapters.aws.sessions), read in the composition root."""
    readers = [
        f"{p.relative_to(ROOT)}"
        for p in SOURCES
        if "connector" not in p.parts and re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text(encoding="utf-8"))
    ]
    assert readers == ["layers/shared/clinicsync/settings.py"]
    wiring = (ROOT / "layers" / "shared" / "clinicsync" / "runtime" / "wiring.py").read_text(encoding="utf-8")
    assert "secrets_provider().get(" in wiring
    settings = (ROOT / "layers" / "shared" / "clinicsync" / "settings.py").read_text(encoding="utf-8")
    assert re.search(r"class Settings\(BaseSettings\).*?def from_env", settings, re.S)
    fields = re.findall(r"^    (\w+): str = Field", settings, re.M)
    assert all(f.endswith(("_arn", "_url", "_name", "_id")) for f in fields), fields


def _secret_values(stack: ClinicStack) -> set[str]:
    sm = boto3.client("secretsmanager")
    values: set[str] = set()
    for key in ("MisSecretArn", "CrmSecretArn", "ClinicSecretArn"):
        secret = json.loads(sm.get_secret_value(SecretId=stack.parameters[key])["SecretString"])
        for value in secret.values():
            text = str(value)
            if key == "CrmSecretArn" and text.startswith("http"):
                values.update(seg for seg in text.split("/") if len(seg) >= 12 and ":" not in seg)  # webhook token
            elif len(text) >= 12 and not text.isdigit():
                values.update(line for line in text.splitlines() if len(line) >= 12 and "-----" not in line)
    return values


@pytest.mark.parametrize("crm", ["bitrix24", "amocrm"])
def test_secrets_never_reach_env_vars_or_logs(
    make_clinic: Callable[..., LocalClinic], captured_logs: Any, capsys: pytest.CaptureFixture[str], crm: str
) -> None:
    clinic = make_clinic(crm=crm, patients=6, appointments=6, rate_limit=False)
    secrets = _secret_values(clinic.stack)
    assert len(secrets) >= 3
    env = json.dumps(clinic.stack.env)
    assert [s for s in secrets if s in env] == []

    clinic.sync()
    deal = next(iter(clinic.crm.deals().values()))
    clinic.crm.manager_move(deal["id"], clinic.crm.manual_stage(deal["category"]))
    clinic.deliver_webhooks()
    clinic.catch_up()
    api = clinic.servers[-1].base_url
    httpx.post(f"{api}/webhooks/amocrm/forged", content=b"account[id]=1", timeout=LOCAL_API_TIMEOUT)  # refusals log too
    httpx.post(f"{api}/webhooks/bitrix24", content=b"auth[application_token]=forged", timeout=LOCAL_API_TIMEOUT)
    logged = captured_logs.text + capsys.readouterr().out
    assert len(logged) > 1000, "the flow logged almost nothing: the scan would prove nothing"
    leaked = [s[:6] + "…" for s in secrets if s in logged]
    assert leaked == []


# --- refused senders enqueue nothing (extends the per-CRM tests with missing credentials) ------------------


def _invoke(stack: ClinicStack, method: str, path: str, body: str, headers: dict[str, str] | None = None) -> int:
    route = next(r for r in stack.routes() if r.method == method and r.match(method, path) is not None)
    event = {
        "version": "2.0",
        "routeKey": f"{method} {route.path}",
        "rawPath": path,
        "headers": headers or {"content-type": "application/x-www-form-urlencoded"},
        "pathParameters": route.match(method, path) or None,
        "requestContext": {
            "http": {"method": method, "path": path, "sourceIp": "127.0.0.1"},
            "requestId": "r",
            "stage": "$default",
        },
        "body": body,
        "isBase64Encoded": False,
    }
    return int(stack.invoke(route.function, event)["statusCode"])


def test_missing_credentials_are_refused_and_nothing_is_enqueued(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    assert clinic.bitrix is not None
    member, token = clinic.bitrix.member_id, clinic.bitrix.application_token
    event = "event=ONCRMDEALUPDATE&data[FIELDS][ID]=1"
    cases = {
        "no auth at all": (event, 400),
        "token only": (f"{event}&auth[application_token]={token}", 400),
        "member only": (f"{event}&auth[member_id]={member}", 400),
        "empty token": (f"{event}&auth[application_token]=&auth[member_id]={member}", 400),
        "token of another case": (f"{event}&auth[application_token]={token.upper()}&auth[member_id]={member}", 401),
        "token as member": (f"{event}&auth[application_token]={member}&auth[member_id]={token}", 401),
    }
    for name, (body, status) in cases.items():
        assert _invoke(clinic.stack, "POST", "/webhooks/bitrix24", body) == status, name
    # amoCRM's path secret, for a clinic on Bitrix24 (no webhook_secret in its CRM secret): never matches.
    assert _invoke(clinic.stack, "POST", "/webhooks/amocrm/x", "account[id]=") == 401
    assert clinic.stack.queue_depth("CrmEventQueue") == 0
    assert clinic.stack.queue_depth("SyncQueue") == 0


# --- two clinics in one runtime --------------------------------------------------------------------------


def _names(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("TableName", "QueueUrl", "SecretId", "Name", "Names"):
                yield from ([inner] if isinstance(inner, str) else inner)
            if key in ("RequestItems",):
                yield from inner.keys()
            yield from _names(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _names(inner)


def _owned(stack: ClinicStack) -> set[str]:
    return {
        *(v for v in stack.physical.values()),
        *(stack.parameters[k] for k in ("MisSecretArn", "CrmSecretArn", "ClinicSecretArn", "ConfigParameterName")),
    }


def test_two_clinics_in_one_runtime_never_touch_each_others_data(
    make_clinic: Callable[..., LocalClinic], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_clinic(patients=6, appointments=6, rate_limit=False)
    b = make_clinic(crm="amocrm", patients=6, appointments=6, rate_limit=False)
    b.sync()
    b_items = boto3.client("dynamodb").scan(TableName=b.stack.table_name, Select="COUNT")["Count"]
    assert b_items > 0

    touched: list[tuple[str, str]] = []
    real = botocore.client.BaseClient._make_api_call

    def recording(self: Any, operation: str, params: dict[str, Any]) -> Any:
        touched.extend((operation, name) for name in _names(params))
        return real(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    a.sync()
    deal = next(iter(a.crm.deals().values()))
    a.crm.manager_move(deal["id"], a.crm.manual_stage(deal["category"]))
    a.deliver_webhooks()
    a.catch_up()
    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", real)

    mine, theirs = _owned(a.stack), _owned(b.stack)
    assert {name for _, name in touched} & mine, "nothing recorded: the check would prove nothing"
    crossed = sorted({(op, name) for op, name in touched if name in theirs})
    assert crossed == []
    strangers = sorted({(op, name) for op, name in touched if name not in mine})
    assert strangers == []
    assert boto3.client("dynamodb").scan(TableName=b.stack.table_name, Select="COUNT")["Count"] == b_items
    assert b.stack.queue_depth("SyncQueue") == b.stack.queue_depth("CrmEventQueue") == 0
