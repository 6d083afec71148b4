"""`clinicsync deploy` against moto, `sam` stubbed at the process boundary: token custody across deploys,
the region, the retry of a failed first create, code before config, and python3.13 for `sam build`."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from moto.backends import get_backend
from pydantic import ValidationError, create_model
from typer.testing import CliRunner

from clinicsync.adapters.amocrm.oauth import AMOCRM, AmoCrmOAuth
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.http.oauth import SecretsManagerTokenStore
from clinicsync.domain.config import CLINIC_ID_MAX_LENGTH, CLINIC_ID_PATTERN, ClinicConfig
from clinicsync_cli import deployment
from clinicsync_cli.app import app as cli
from clinicsync_cli.clinic import console
from sandbox.cfn_yaml import load_template
from sandbox.local import LocalClinic
from sandbox.runtime import REGION

ROOT = Path(__file__).resolve().parents[2]
# ClinicConfig's own clinic_id field, alone (the rest of a config is beside the point here).
ClinicIdOnly = create_model("ClinicIdOnly", clinic_id=(str, ClinicConfig.model_fields["clinic_id"]))

PAIR_KEYS = ("access_token", "refresh_token", "expires")
FAKE_SAM = """\
import json, os, shutil, sys
import boto3
from botocore.exceptions import ClientError

args = sys.argv[1:]
with open(os.environ["FAKE_SAM_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "python3.13": shutil.which("python3.13")}) + "\\n")
if args[0] == "build":
    sys.exit(0)
# What `sam deploy` does to CloudFormation: create the stack, or update it (refused on ROLLBACK_COMPLETE).
stack = args[args.index("--stack-name") + 1]
region = args[args.index("--region") + 1] if "--region" in args else None
cfn = boto3.client("cloudformation", region_name=region)
body = json.dumps({
    "Description": os.urandom(4).hex(),
    "Resources": {"Queue": {"Type": "AWS::SQS::Queue"}},
    "Outputs": {"ApiUrl": {"Value": os.environ.get("FAKE_SAM_API_URL", "")}},
})
try:
    try:
        status = cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
    except ClientError:
        status = None
    if status is None:
        cfn.create_stack(StackName=stack, TemplateBody=body)
        if os.path.exists(os.environ.get("FAKE_SAM_FAIL_CREATE", "/nonexistent")):
            print("CREATE_FAILED: a resource failed")
            sys.exit(1)
    else:
        cfn.update_stack(StackName=stack, TemplateBody=body)
        if os.path.exists(os.environ.get("FAKE_SAM_FAIL_UPDATE", "/nonexistent")):
            print("UPDATE_ROLLBACK_COMPLETE: a resource failed")
            sys.exit(1)
except ClientError as exc:
    print(exc)
    sys.exit(1)
"""


def run(*args: str) -> tuple[int, str]:
    console.width = 220
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, terminal_width=200)
    return result.exit_code, result.output


def fake_sam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api_url: str = "") -> tuple[Path, Path]:
    sam = tmp_path / "bin" / "sam"
    sam.parent.mkdir(exist_ok=True)
    sam.write_text(f"#!{sys.executable}\n{FAKE_SAM}", encoding="utf-8")
    sam.chmod(sam.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "sam.log"
    monkeypatch.setenv("FAKE_SAM_LOG", str(log))
    monkeypatch.setenv("FAKE_SAM_API_URL", api_url)
    monkeypatch.setenv("FAKE_SAM_FAIL_CREATE", str(tmp_path / "fail-create"))
    monkeypatch.setenv("FAKE_SAM_FAIL_UPDATE", str(tmp_path / "fail-update"))
    return sam, log


def sam_calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


def new_clinic_files(clinic: LocalClinic, tmp_path: Path, cid: str, crm: dict[str, Any]) -> tuple[Path, Path]:
    """clinic.yaml and clinic.secrets.json for a new clinic ``cid`` on the emulators of ``clinic``."""
    sm = clinic.stack.aws.client("secretsmanager")
    old = clinic.config.clinic_id
    text = clinic.stack.aws.client("ssm").get_parameter(Name=f"/clinicsync/{old}/config")["Parameter"]["Value"]
    config_path = tmp_path / "clinic.yaml"
    config_path.write_text(text.replace(f"clinicsync/{old}/", f"clinicsync/{cid}/").replace(old, cid), "utf-8")
    mis = json.loads(sm.get_secret_value(SecretId=f"clinicsync/{old}/mis")["SecretString"])
    secrets_path = tmp_path / "clinic.secrets.json"
    secrets_path.write_text(json.dumps({"mis": mis, "crm": crm}), encoding="utf-8")
    return config_path, secrets_path


def amocrm_pair(clinic: LocalClinic) -> dict[str, Any]:
    """A fresh OAuth pair of the clinic's amoCRM integration, in the CRM secret's shape."""
    assert clinic.amocrm is not None
    sm = clinic.stack.aws.client("secretsmanager")
    crm = json.loads(sm.get_secret_value(SecretId=f"clinicsync/{clinic.config.clinic_id}/crm")["SecretString"])
    crm.pop("expires", None)
    return {**crm, **clinic.amocrm.issue_tokens()}


def stored(clinic: LocalClinic, ref: str, region: str = REGION) -> dict[str, Any]:
    sm = boto3.client("secretsmanager", endpoint_url=clinic.stack.aws.endpoint, region_name=region)
    data: dict[str, Any] = json.loads(sm.get_secret_value(SecretId=ref)["SecretString"])
    return data


def test_a_token_rotated_between_two_deploys_survives_the_second(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, crm="amocrm")
    amo = clinic.amocrm
    assert amo is not None
    cid = "rotating-clinic"
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, cid, amocrm_pair(clinic))
    sam, _log = fake_sam(tmp_path, monkeypatch, clinic.api_url)
    deploy = ("deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam))
    code, out = run(*deploy, "--api-url", clinic.api_url)
    assert code == 0, out
    ref = f"clinicsync/{cid}/crm"
    first = stored(clinic, ref)

    # The stack's own path rotates the pair in the secret (the poller's catch-up, say).
    amo.expire_access_tokens()
    sm = clinic.stack.aws.client("secretsmanager")
    with httpx.Client() as http:
        AmoCrmOAuth(SecretsManagerTokenStore(sm, ref, AMOCRM), http).refresh(first["access_token"])
    rotated = stored(clinic, ref)
    assert rotated["refresh_token"] != first["refresh_token"] and not amo.token_valid(first["access_token"])

    code, out = run(*deploy, "--no-webhooks")
    assert code == 0, out
    after = stored(clinic, ref)
    assert {k: after.get(k) for k in PAIR_KEYS} == {k: rotated[k] for k in PAIR_KEYS}
    assert amo.token_valid(after["access_token"]) and "kept the CRM's OAuth pair" in out

    # `check`, given the same (now spent) file, refreshes the secret's pair and persists it there.
    amo.expire_access_tokens()
    code, out = run("check", "-c", str(config_path), "--secrets", str(secrets_path), "--api-url", clinic.api_url)
    checked = stored(clinic, ref)
    # A new pair, persisted; its expiry is not earlier (equal when both refreshes fall in one second).
    assert checked["refresh_token"] != after["refresh_token"] and checked["expires"] >= after["expires"], out
    assert amo.token_valid(checked["access_token"])
    # A re-authorised pair replaces the stored one only when the operator says so.
    fresh = amocrm_pair(clinic)
    secrets_path.write_text(json.dumps({**json.loads(secrets_path.read_text()), "crm": fresh}), "utf-8")
    code, out = run(*deploy, "--no-webhooks", "--replace-tokens")
    assert code == 0, out
    replaced = stored(clinic, ref)
    assert replaced["refresh_token"] == fresh["refresh_token"] and "expires" not in replaced


def test_init_writes_a_refreshed_pair_back_to_the_secrets_file_before_the_first_deploy(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, crm="amocrm")
    assert clinic.amocrm is not None
    pair = amocrm_pair(clinic)
    _config, secrets_path = new_clinic_files(clinic, tmp_path, "filed-clinic", pair)
    secrets_path.chmod(0o644)
    clinic.amocrm.expire_access_tokens()
    code, out = run(
        "init", "--clinic-id", "filed-clinic", "--mis", "medods", "--mis-url", clinic.config.mis.base_url,
        "--crm", "amocrm", "--secrets", str(secrets_path), "--out", str(tmp_path / "proposed.yaml"),
    )  # fmt: skip
    assert code == 0, out
    written = yaml.safe_load(secrets_path.read_text(encoding="utf-8"))["crm"]
    assert written["refresh_token"] != pair["refresh_token"] and written["expires"] > 0
    assert clinic.amocrm.token_valid(written["access_token"])
    assert stat.S_IMODE(secrets_path.stat().st_mode) == 0o600


tokens = st.text("abcdef0123456789", min_size=1, max_size=8)
pairs = st.fixed_dictionaries({"access_token": tokens, "refresh_token": tokens, "expires": st.integers(1, 10**10)})
others = st.dictionaries(st.sampled_from(["base_url", "account_id", "webhook_secret", "user_id"]), tokens)


@given(stored_pair=pairs, file_pair=pairs, stored_rest=others, file_rest=others, force=st.booleans())
def test_a_deploy_merges_the_secret_and_keeps_the_stored_pair_unless_newer_or_forced(
    stored_pair: dict[str, Any],
    file_pair: dict[str, Any],
    stored_rest: dict[str, Any],
    file_rest: dict[str, Any],
    force: bool,
) -> None:
    merged, kept = deployment.merge_secret(
        {**stored_rest, **stored_pair}, {**file_rest, **file_pair}, PAIR_KEYS, replace_tokens=force
    )
    take_file = force or file_pair["expires"] > stored_pair["expires"]
    assert {k: merged[k] for k in PAIR_KEYS} == (file_pair if take_file else stored_pair)
    assert kept is not take_file
    assert {k: v for k, v in merged.items() if k not in PAIR_KEYS} == {**stored_rest, **file_rest}


@given(file_pair=pairs, stored_rest=others)
def test_a_deploy_stores_the_file_pair_when_the_secret_has_none_that_rotates(
    file_pair: dict[str, Any], stored_rest: dict[str, Any]
) -> None:
    merged, kept = deployment.merge_secret(stored_rest, file_pair, PAIR_KEYS)
    assert {k: merged[k] for k in PAIR_KEYS} == file_pair and not kept


def test_a_failed_first_deploy_is_deleted_and_created_again(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    crm = json.loads(
        clinic.stack.aws.client("secretsmanager").get_secret_value(
            SecretId=f"clinicsync/{clinic.config.clinic_id}/crm"
        )["SecretString"]
    )
    cid = "retried-clinic"
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, cid, crm)
    sam, _log = fake_sam(tmp_path, monkeypatch, clinic.api_url)
    deploy = ("deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam), "--no-webhooks")
    (tmp_path / "fail-create").touch()
    code, out = run(*deploy)
    assert code == 1 and "sam deploy failed" in out
    # What CloudFormation does after a failed create: roll it back, leaving the stack ROLLBACK_COMPLETE.
    cfn_backend = get_backend("cloudformation")["123456789012"][REGION]
    (failed,) = [s for s in cfn_backend.stacks.values() if s.name == f"clinicsync-{cid}"]
    failed.status = "ROLLBACK_COMPLETE"
    (tmp_path / "fail-create").unlink()

    code, out = run(*deploy)
    assert code == 0, out
    assert "ROLLBACK_COMPLETE" in out and f"deleted clinicsync-{cid}" in out
    cfn = clinic.stack.aws.client("cloudformation")
    assert cfn.describe_stacks(StackName=f"clinicsync-{cid}")["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"


def test_region_reaches_every_client_the_deploy_makes(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, crm="amocrm")
    cid = "regional-clinic"
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, cid, amocrm_pair(clinic))
    sam, log = fake_sam(tmp_path, monkeypatch, clinic.api_url)
    other = "ap-southeast-2"
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name)  # no default region: --region alone must carry the deploy
    code, out = run(
        "deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam), "--region", other
    )
    assert code == 0, out
    assert stored(clinic, f"clinicsync/{cid}/crm", other)["account_id"]
    ssm = boto3.client("ssm", endpoint_url=clinic.stack.aws.endpoint, region_name=other)
    assert ssm.get_parameter(Name=f"/clinicsync/{cid}/config")["Parameter"]["Value"]
    home = boto3.client("secretsmanager", endpoint_url=clinic.stack.aws.endpoint, region_name=REGION)
    assert not [s for s in home.list_secrets()["SecretList"] if s["Name"].startswith(f"clinicsync/{cid}/")]
    assert all(call["args"][-2:] == ["--region", other] for call in sam_calls(log) if call["args"][0] == "deploy")
    assert clinic.amocrm is not None and "webhook registered" in out


def test_config_is_stored_after_the_new_code_on_an_update(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    crm = json.loads(
        clinic.stack.aws.client("secretsmanager").get_secret_value(
            SecretId=f"clinicsync/{clinic.config.clinic_id}/crm"
        )["SecretString"]
    )
    cid = "ordered-clinic"
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, cid, crm)
    sam, _log = fake_sam(tmp_path, monkeypatch, clinic.api_url)
    deploy = ("deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam), "--no-webhooks")
    code, out = run(*deploy)
    assert code == 0, out
    ssm = clinic.stack.aws.client("ssm")
    live = ssm.get_parameter(Name=f"/clinicsync/{cid}/config")["Parameter"]["Value"]
    assert json.loads(live)["clinic_id"] == cid  # stored as the functions read it: JSON, no YAML parser
    # The next deploy's `sam deploy` fails: the running (old) code keeps the config it understands.
    changed = yaml.safe_load(config_path.read_text(encoding="utf-8")) | {"shards": 5}
    config_path.write_text(yaml.safe_dump(changed, allow_unicode=True), encoding="utf-8")
    (tmp_path / "fail-update").touch()
    code, out = run(*deploy)
    assert code == 1, out
    assert ssm.get_parameter(Name=f"/clinicsync/{cid}/config")["Parameter"]["Value"] == live
    (tmp_path / "fail-update").unlink()
    code, out = run(*deploy)
    assert code == 0, out
    assert json.loads(ssm.get_parameter(Name=f"/clinicsync/{cid}/config")["Parameter"]["Value"])["shards"] == 5


def test_sam_build_finds_python313_like_the_makefile(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pyenv-only install: python3.13 is not on PATH, only under $PYENV_ROOT/versions."""
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    crm = json.loads(
        clinic.stack.aws.client("secretsmanager").get_secret_value(
            SecretId=f"clinicsync/{clinic.config.clinic_id}/crm"
        )["SecretString"]
    )
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, "pyenv-clinic", crm)
    sam, log = fake_sam(tmp_path, monkeypatch, clinic.api_url)
    pyenv = tmp_path / "pyenv"
    python = pyenv / "versions" / "3.13.9" / "bin" / "python3.13"
    python.parent.mkdir(parents=True)
    python.symlink_to(Path(sys.executable).resolve())
    monkeypatch.setenv("PYENV_ROOT", str(pyenv))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    code, out = run(
        "deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam), "--no-webhooks"
    )
    assert code == 0, out
    build = next(call for call in sam_calls(log) if call["args"][0] == "build")
    assert build["python3.13"] == str(python)


def test_the_clinic_id_rule_is_the_templates() -> None:
    parameter = load_template(ROOT / "template.yaml")["Parameters"]["ClinicId"]
    assert parameter["AllowedPattern"] == CLINIC_ID_PATTERN
    assert int(parameter.get("MaxLength", CLINIC_ID_MAX_LENGTH)) == CLINIC_ID_MAX_LENGTH


@given(st.one_of(st.from_regex(r"[a-z0-9-]{1,44}", fullmatch=True), st.text(max_size=44)))
def test_a_clinic_id_validates_exactly_when_the_template_accepts_it(clinic_id: str) -> None:
    template_accepts = re.fullmatch(CLINIC_ID_PATTERN.strip("^$"), clinic_id) is not None
    try:
        ClinicIdOnly.model_validate({"clinic_id": clinic_id})
        config_accepts = True
    except ValidationError:
        config_accepts = False
    assert config_accepts is template_accepts


def test_a_bad_clinic_id_is_refused_before_anything_is_written(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    crm = json.loads(
        clinic.stack.aws.client("secretsmanager").get_secret_value(
            SecretId=f"clinicsync/{clinic.config.clinic_id}/crm"
        )["SecretString"]
    )
    cid = "trailing-dash-"
    config_path, secrets_path = new_clinic_files(clinic, tmp_path, cid, crm)
    sam, log = fake_sam(tmp_path, monkeypatch)
    code, out = run("deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam))
    assert code == 1 and "clinic_id" in out
    names = [s["Name"] for s in clinic.stack.aws.client("secretsmanager").list_secrets()["SecretList"]]
    assert not [n for n in names if cid in n] and not sam_calls(log)


def test_the_cli_refreshes_a_stored_pair_under_the_stacks_lease(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check` on a deployed clinic: the refresh takes the lease the stack's functions take, then persists."""
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False, crm="amocrm")
    assert clinic.amocrm is not None
    cid = clinic.config.clinic_id
    text = clinic.stack.aws.client("ssm").get_parameter(Name=f"/clinicsync/{cid}/config")["Parameter"]["Value"]
    config_path = tmp_path / "clinic.yaml"
    config_path.write_text(text, encoding="utf-8")
    leases: list[str] = []
    acquire = DynamoStore.acquire_lease

    def recorded(store: DynamoStore, name: str, owner: str, seconds: int, now: int) -> bool:
        leases.append(name)
        return acquire(store, name, owner, seconds, now)

    monkeypatch.setattr(DynamoStore, "acquire_lease", recorded)
    before = stored(clinic, f"clinicsync/{cid}/crm")
    clinic.amocrm.expire_access_tokens()
    _code, out = run("check", "-c", str(config_path), "--api-url", clinic.api_url)
    after = stored(clinic, f"clinicsync/{cid}/crm")
    assert after["refresh_token"] != before["refresh_token"] and clinic.amocrm.token_valid(after["access_token"]), out
    assert "amocrm-oauth" in leases


def test_every_stack_command_takes_the_region(
    make_clinic: Callable[..., LocalClinic], monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name)  # no default region: --region alone must reach CloudFormation, SQS, DynamoDB
    stack = clinic.stack.stack_name
    for command in (("status", "--json"), ("dlq", "list")):
        code, out = run(*command, "--stack", stack, "--region", REGION)
        assert code == 0, (command, out)
