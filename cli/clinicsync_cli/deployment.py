"""``clinicsync deploy``'s steps: secrets to Secrets Manager, the config to SSM, and the SAM command lines."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from clinicsync.config import ClinicConfig

# Generated once per clinic and never replaced: the phone/e-mail indexes and unsubscribe links depend on them.
CLINIC_KEYS = ("hash_key", "unsubscribe_key")


def store_secrets(refs: Mapping[str, str], values: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Create or update each secret; returns the full ARNs. The clinic secret's keys are generated when
    missing and kept when present (replacing them would orphan every keyed hash already stored)."""
    sm = boto3.client("secretsmanager")
    arns: dict[str, str] = {}
    for which, ref in refs.items():
        wanted = dict(values.get(which) or {})
        try:
            current = json.loads(sm.get_secret_value(SecretId=ref).get("SecretString") or "{}")
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
            current = None
        if which == "clinic":
            existing = current if isinstance(current, dict) else {}
            for key in CLINIC_KEYS:
                wanted.setdefault(key, existing.get(key) or secrets.token_hex(32))
            wanted = {**existing, **wanted}
        body = json.dumps(wanted)
        if current is None:
            arns[which] = sm.create_secret(Name=ref, SecretString=body)["ARN"]
        else:
            if current != wanted:
                sm.put_secret_value(SecretId=ref, SecretString=body)
            arns[which] = sm.describe_secret(SecretId=ref)["ARN"]
    return arns


def store_config(name: str, text: str) -> None:
    boto3.client("ssm").put_parameter(Name=name, Value=text, Type="String", Overwrite=True, Tier="Intelligent-Tiering")


def parameter_overrides(
    config: ClinicConfig, parameter: str, arns: Mapping[str, str], alarm_topic_arn: str
) -> dict[str, str]:
    overrides = {
        "ClinicId": config.clinic_id,
        "MisKind": config.mis.kind,
        "CrmKind": config.crm.kind,
        "ConfigParameterName": parameter,
        "MisSecretArn": arns["mis"],
        "CrmSecretArn": arns["crm"],
        "ClinicSecretArn": arns["clinic"],
        "PollTimezone": config.timezone,
    }
    if alarm_topic_arn:
        overrides["AlarmTopicArn"] = alarm_topic_arn
    return overrides


def build_command(sam: str, template: Path, build_dir: Path) -> list[str]:
    return [sam, "build", "--template", str(template), "--build-dir", str(build_dir)]


def deploy_command(
    sam: str, build_dir: Path, stack: str, overrides: Mapping[str, str], region: str | None
) -> list[str]:
    command = [
        sam,
        "deploy",
        "--template-file",
        str(build_dir / "template.yaml"),
        "--stack-name",
        stack,
        "--capabilities",
        "CAPABILITY_IAM",
        "--resolve-s3",
        "--no-confirm-changeset",
        "--no-fail-on-empty-changeset",
        "--tags",
        f"app=clinicsync clinic={overrides['ClinicId']}",
        "--parameter-overrides",
        *(f"{k}={v}" for k, v in overrides.items()),
    ]
    if region:
        command += ["--region", region]
    return command
