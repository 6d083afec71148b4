"""The operator's CLI against the emulators and the local runtime: init -> check -> backfill -> status -> plan,
deploy up to the call to AWS, and the dry run's promise (nothing written, PII masked)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from typer.testing import CliRunner

from clinicsync.domain.config import load_clinic_config
from clinicsync.domain.fieldmap import CrmField
from clinicsync.domain.models import AppointmentStatus
from clinicsync_cli.app import app as cli
from clinicsync_cli.clinic import console
from clinicsync_cli.stack import StackHandle
from sandbox.local import LocalClinic

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str]:
    console.width = 220  # one table row per line, so the assertions can read them
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, terminal_width=200)
    return result.exit_code, result.output


@pytest.fixture
def lambda_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[LocalClinic], None]]:
    """boto3's lambda.invoke reaches the local runtime's handlers (AWS_ENDPOINT_URL_LAMBDA)."""
    servers = []

    def serve(clinic: LocalClinic) -> None:
        server = clinic.stack.serve_lambda()
        servers.append(server)
        monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", server.base_url)

    yield serve
    for server in servers:
        server.stop()


def table_items(clinic: LocalClinic) -> int:
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    return sum(1 for _ in table.scan()["Items"])


def test_init_check_backfill_status_plan_against_the_emulators(
    make_clinic: Callable[..., LocalClinic],
    lambda_api: Callable[[LocalClinic], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clinic = make_clinic(patients=30, appointments=40, rate_limit=False)
    lambda_api(clinic)
    cid, stack = clinic.config.clinic_id, clinic.stack.stack_name
    config_path = tmp_path / "clinic.yaml"

    # init: the portal's funnels are discovered and the demo clinic's own map comes out of the stage names.
    code, out = run(
        "init", "--clinic-id", cid, "--mis", "medods", "--mis-url", clinic.config.mis.base_url,
        "--crm", "bitrix24", "--out", str(config_path),
    )  # fmt: skip
    assert code == 0, out
    proposed = load_clinic_config(config_path)
    for role in ("primary", "repeat"):
        assert proposed.crm.pipelines[role].stages == clinic.config.crm.pipelines[role].stages
        assert set(proposed.crm.pipelines[role].closed_stages) >= set(clinic.config.crm.pipelines[role].closed_stages)
    assert proposed.fields.crm_field("deal", "status") == CrmField(id="UF_CRM_CS_STATUS", type="string")
    text = config_path.read_text(encoding="utf-8")
    assert "«Неявка — перезвонить»" in text and "serviced" in text  # stages and MIS statuses listed for review
    assert "Запись подтверждена" in out and "wrote" in out and "clinicsync check" in out
    code, again = run("init", "--clinic-id", cid, "--mis", "medods", "--mis-url", "x", "--crm", "bitrix24",
                      "--out", str(config_path))  # fmt: skip
    assert code == 1 and "--force" in again  # never overwrites a reviewed file silently

    # check: every problem in one pass (a wrong stage, an unknown MIS status, the fields the portal lacks).
    broken = yaml.safe_load(text)
    broken["crm"]["pipelines"]["primary"]["stages"]["arrived"] = "NO_SUCH_STAGE"
    broken["filters"]["branches"] = ["999"]
    bad_path = tmp_path / "broken.yaml"
    bad_path.write_text(yaml.safe_dump(broken, allow_unicode=True), encoding="utf-8")
    code, out = run("check", "-c", str(bad_path), "--api-url", clinic.api_url)
    assert code == 1
    assert "NO_SUCH_STAGE" in out and "EXECUTING" in out  # the wrong stage, with the stages to pick from
    for field in (
        "UF_CRM_CS_STATUS",
        "UF_CRM_CS_IS_DMS",
        "UF_CRM_CS_OPT_OUTS",
        "UF_CRM_CS_OPT_INS",
        "UF_CRM_CS_VISIT_AT",
    ):
        assert field in out, out
    assert "outgoing webhook" in out  # an incoming-webhook credential cannot list handlers: a warning
    assert "branch '999'" in out  # the MIS side too
    assert re.search(r"7 error\(s\), 1 warning", out), out

    code, out = run("check", "-c", str(config_path), "--api-url", clinic.api_url, "--create-fields")
    assert code == 0, out
    assert "created" in out and "check out" in out
    assert clinic.bitrix is not None
    assert {"UF_CRM_CS_STATUS", "UF_CRM_CS_IS_DMS"} <= set(clinic.bitrix._uf["deal"])
    assert clinic.bitrix._uf["deal"]["UF_CRM_CS_VISIT_AT"].user_type == "datetime"  # the visit's hour fits

    # backfill: a failed step says how to resume; an interrupted wait resumes; then it completes.
    clinic.medods.faults.fail_next(1, status=401, path_prefix="/api/v2/appointments")
    code, out = run("backfill", "--stack", stack, "--days", "120")
    assert code == 1 and "resumes" in out and "401" in out
    assert clinic.crm.deals() == {}

    calls = {"n": 0}
    real_depth = StackHandle.depth

    def interrupted(self: StackHandle, logical_id: str) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_depth(self, logical_id)

    monkeypatch.setattr(StackHandle, "depth", interrupted)
    code, out = run("backfill", "--stack", stack, "--days", "120")
    assert code == 130 and "resumes where it stopped" in out
    with clinic.stack.event_sources("SyncQueue", "CrmEventQueue", "ConsentQueue"):
        code, out = run("backfill", "--stack", stack, "--days", "120")
    assert code == 0, out
    assert "import done" in out and "0 dead letter" in out
    clinic.stack.drain_all()
    assert clinic.mismatches() == []
    assert clinic.crm.deals()

    # status: the figures come from the stack itself.
    code, out = run("status", "--stack", stack, "--json")
    assert code == 0, out
    figures = json.loads(out)
    assert figures["last_sync_at"] and figures["last_poll_at"]
    assert figures["sync_lag_seconds"] >= 0
    assert figures["queues"]["sync"] == {"queued": 0, "dead": 0}
    assert figures["crm_budget"]["requests_last_hour"] > 0
    assert figures["opt_outs_pending"] == 0
    assert figures["errors_last_hour"] >= 1  # the import step the MIS refused
    code, out = run("status", "--stack", stack)
    assert code == 0 and "sync lag" in out and "CRM budget" in out and "opt-outs pending" in out

    # plan: a new patient's booking and a confirmation, decided by the syncer, written nowhere.
    patient = clinic.mis.add_client("Дьячкова", "+7 916 500-00-01")
    new_visit = clinic.mis.book(patient, clinic.mis.at(6, "12:00"))
    moved = clinic.open_booking()
    clinic.medods.confirm(moved)
    before = (clinic.crm.stats()["writes"], table_items(clinic))
    code, out = run("plan", "--stack", stack)
    assert code == 0, out
    assert (clinic.crm.stats()["writes"], table_items(clinic)) == before  # nothing written anywhere
    assert "Дьячкова" not in out and "500-00-01" not in out and "79165000001" not in out
    assert "Д." in out  # the name, masked to an initial
    assert re.search(rf"create\s+│\s*deal\s+│\s*{new_visit}\b", out), out
    deal = clinic.crm.deals()[str(moved)]
    confirmed = clinic.config.pipeline(deal["category"] != "0").stages[AppointmentStatus.CONFIRMED]
    assert re.search(rf"move\s+│\s*deal\s+│\s*{moved}\b.*→ {re.escape(confirmed)}", out), out
    clinic.sync()  # the real sync does what the plan said
    assert clinic.crm.deals()[str(new_visit)] and clinic.crm.deals()[str(moved)]["stage"] == confirmed


def test_errors_say_what_to_do_next(tmp_path: Path, local_aws: object) -> None:
    code, out = run("status", "--stack", "clinicsync-nowhere")
    assert code == 1 and "not found" in out and "next:" in out
    code, out = run("check", "-c", str(tmp_path / "missing.yaml"))
    assert code == 1 and "clinicsync init" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("clinic_id: X\n", encoding="utf-8")
    code, out = run("check", "-c", str(bad))
    assert code == 1 and "clinic_id" in out and "next:" in out


def test_deploy_builds_the_template_and_passes_the_clinic_parameters(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path
) -> None:
    """Up to the call to AWS: the real `sam build`, and the `sam deploy` command line recorded instead of run."""
    clinic = make_clinic(patients=3, appointments=3, rate_limit=False, crm="amocrm")
    cid = "fresh-clinic"
    sm = clinic.stack.aws.client("secretsmanager")
    values = {
        k: json.loads(sm.get_secret_value(SecretId=f"clinicsync/{clinic.config.clinic_id}/{k}")["SecretString"])
        for k in ("mis", "crm")
    }
    secrets_path = tmp_path / "clinic.secrets.json"
    secrets_path.write_text(json.dumps(values), encoding="utf-8")
    # A new clinic: init from the secrets file (nothing in AWS yet) finds the amoCRM funnel and field ids.
    config_path = tmp_path / "clinic.yaml"
    code, out = run(
        "init", "--clinic-id", cid, "--mis", "medods", "--mis-url", clinic.config.mis.base_url, "--crm", "amocrm",
        "--secrets", str(secrets_path), "--out", str(config_path),
    )  # fmt: skip
    assert code == 0, out
    proposed = load_clinic_config(config_path)
    assert proposed.crm.pipelines["primary"].stages == clinic.config.crm.pipelines["primary"].stages
    found = {
        n: f.id for e in (proposed.fields.crm_fields.contact, proposed.fields.crm_fields.deal) for n, f in e.items()
    }
    assert found == dict(clinic.config.fields.crm_names)  # the field ids, found by name, per entity
    record = tmp_path / "deploy-args.json"
    sam = tmp_path / "sam"
    real_sam = ROOT / ".venv-sam" / "bin" / "sam"
    sam.write_text(
        f"#!{sys.executable}\n"
        "import json, os, subprocess, sys\n"
        "if sys.argv[1] == 'deploy':\n"
        f"    open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "    sys.exit(0)\n"
        # the same cache as `make build`, which runs first in `make test`: a rebuild only of what changed
        f"cache = ['--cached', '--cache-dir', {str(ROOT / '.aws-sam' / 'cache')!r}] if sys.argv[1] == 'build' else []\n"
        f"sys.exit(subprocess.call([{str(real_sam)!r}, *sys.argv[1:], *cache]))\n",
        encoding="utf-8",
    )
    sam.chmod(sam.stat().st_mode | stat.S_IEXEC)
    # sam keeps its cache's index (build.toml) beside the build dir: under .aws-sam, next to `make build`'s.
    build_dir = ROOT / ".aws-sam" / "deploy-test-build"
    env_path = f"{Path(sys.executable).resolve().parent}:{os.environ['PATH']}"
    os.environ["PATH"] = env_path
    code, out = run(
        "deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam),
        "--template", str(ROOT / "template.yaml"), "--build-dir", str(build_dir),
        "--alarm-topic-arn", "arn:aws:sns:eu-central-1:123456789012:clinic-alarms", "--api-url", clinic.api_url,
    )  # fmt: skip
    assert code == 0, out

    built = (build_dir / "template.yaml").read_text(encoding="utf-8")
    assert "AWS::CloudWatch::Dashboard" in built and "MisPollerFunction" in built
    assert (build_dir / "MisPollerFunction" / "app.py").is_file()
    args = json.loads(record.read_text(encoding="utf-8"))
    assert args[args.index("--template-file") + 1] == str(build_dir / "template.yaml")
    assert args[args.index("--stack-name") + 1] == f"clinicsync-{cid}"
    overrides = dict(a.split("=", 1) for a in args[args.index("--parameter-overrides") + 1 :])
    secret_arns = {k: sm.describe_secret(SecretId=f"clinicsync/{cid}/{k}")["ARN"] for k in ("mis", "crm", "clinic")}
    assert overrides == {
        "ClinicId": cid, "MisKind": "medods", "CrmKind": "amocrm",
        "ConfigParameterName": f"/clinicsync/{cid}/config",
        "MisSecretArn": secret_arns["mis"], "CrmSecretArn": secret_arns["crm"],
        "ClinicSecretArn": secret_arns["clinic"],
        "PollTimezone": "Europe/Moscow", "AlarmTopicArn": "arn:aws:sns:eu-central-1:123456789012:clinic-alarms",
    }  # fmt: skip
    for arn in secret_arns.values():
        assert arn not in built  # secrets reach the stack as parameters naming them, never in the template
    stored = clinic.stack.aws.client("ssm").get_parameter(Name=f"/clinicsync/{cid}/config")["Parameter"]["Value"]
    assert yaml.safe_load(stored)["clinic_id"] == cid
    clinic_secret = json.loads(sm.get_secret_value(SecretId=f"clinicsync/{cid}/clinic")["SecretString"])
    assert len(clinic_secret["hash_key"]) == 64  # generated once ...
    assert clinic.amocrm is not None
    hooks = [
        h for h in clinic.amocrm._webhooks.values() if h.destination.startswith(f"{clinic.api_url}/webhooks/amocrm/")
    ]
    assert hooks and {"add_lead", "status_lead", "update_contact"} <= set(hooks[0].settings)
    assert "webhook registered" in out
    code, out = run("check", "-c", str(config_path), "--secrets", str(secrets_path), "--api-url", clinic.api_url)
    assert code == 0 and "webhooks" not in out, out  # the registration is found by check

    code, out = run(
        "deploy", "-c", str(config_path), "--secrets", str(secrets_path), "--sam", str(sam),
        "--template", str(ROOT / "template.yaml"), "--build-dir", str(build_dir), "--no-webhooks",
    )  # fmt: skip
    assert code == 0, out
    again = json.loads(sm.get_secret_value(SecretId=f"clinicsync/{cid}/clinic")["SecretString"])
    assert again["hash_key"] == clinic_secret["hash_key"]  # ... and never replaced by a later deploy

    # The report reads amoCRM's funnel too (the clinic's own stack, after a sync).
    clinic.sync()
    code, out = run("report", "--stack", clinic.stack.stack_name, "--out", str(tmp_path / "report.html"))
    assert code == 0, out
    ours = clinic.crm.deals()
    booked = int(re.search(r"→ (\d+) booked", out).group(1))  # type: ignore[union-attr]
    excluded = int(re.search(r"\((\d+) DMS", out).group(1))  # type: ignore[union-attr]
    assert booked + excluded == len(ours) > 0


def test_check_reads_other_mis_kinds_through_the_stacks_adapter_and_reports_both_sides(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path
) -> None:
    clinic = make_clinic(patients=4, appointments=4, rate_limit=False, mis="renovatio")
    aws = clinic.stack.aws
    text = aws.client("ssm").get_parameter(Name=f"/clinicsync/{clinic.config.clinic_id}/config")["Parameter"]["Value"]
    config_path = tmp_path / "clinic.yaml"
    config_path.write_text(text, encoding="utf-8")
    sm = aws.client("secretsmanager")
    values = {
        k: json.loads(sm.get_secret_value(SecretId=f"clinicsync/{clinic.config.clinic_id}/{k}")["SecretString"])
        for k in ("mis", "crm")
    }
    values["mis"]["api_key"] = "key-0f9a8b7c6d"
    values["crm"]["webhook_url"] = values["crm"]["webhook_url"].replace("/rest/", "/rest/9")  # a wrong user
    secrets_path = tmp_path / "clinic.secrets.json"
    secrets_path.write_text(json.dumps(values), encoding="utf-8")
    code, out = run("check", "-c", str(config_path), "--secrets", str(secrets_path))
    assert code == 1
    assert "renovatio at" in out and "bitrix24 credentials" in out  # both systems, one pass
    assert "key-0f9a8b7c6d" not in out and values["crm"]["webhook_url"] not in out  # credentials never printed
