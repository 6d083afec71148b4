"""``clinicsync deploy``'s steps: secrets to Secrets Manager, the config to SSM, and the SAM command lines."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from clinicsync.adapters.ident.contract import weak_integration_key
from clinicsync.domain.config import ClinicConfig, stored_config

# Generated once per clinic and never replaced: the phone/e-mail indexes and unsubscribe links depend on them.
CLINIC_KEYS = ("hash_key", "unsubscribe_key")


def secret_problems(config: ClinicConfig, values: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Settings the stack would run fail-open with; a deploy refuses them before writing anything."""
    problems = []
    if config.mis.kind == "ident" and (weak := weak_integration_key(values.get("mis", {}).get("integration_key"))):
        problems.append(f"mis: {weak}")
    if config.crm.kind == "amocrm" and not str(values.get("crm", {}).get("account_id") or "").strip():
        problems.append("crm: account_id is required (webhooks from any other account are refused by it)")
    return problems


def merge_secret(
    stored: Mapping[str, Any] | None,
    wanted: Mapping[str, Any],
    token_keys: tuple[str, ...] = (),
    *,
    replace_tokens: bool = False,
) -> tuple[dict[str, Any], bool]:
    """The secret a deploy writes: the stored JSON with the operator's keys merged over it. Returns it and
    whether the stored OAuth pair was kept over the file's.

    The pair (``token_keys``) is the stack's: a refresh token is single-use, so the one in the secret has
    usually been rotated since the operator's file was written. The file's pair is used only when the secret
    holds no refreshable pair, when it is newer (a later ``expires`` than the stored one), or when the
    operator forces it (``replace_tokens``, after re-authorising the app); then it replaces the stored pair
    whole (a stale ``expires`` must not outlive its pair)."""
    current = dict(stored or {})
    file_pair = {k: wanted[k] for k in token_keys if k in wanted}
    rest = {k: v for k, v in wanted.items() if k not in token_keys}
    stored_rotates = bool(current.get("refresh_token"))
    newer = _stamp(wanted) > _stamp(current) > 0
    if not file_pair or (stored_rotates and not replace_tokens and not newer):
        return {**current, **rest}, bool(file_pair) and stored_rotates
    for key in token_keys:
        current.pop(key, None)
    return {**current, **rest, **file_pair}, False


def _stamp(data: Mapping[str, Any]) -> int:
    try:
        return int(data.get("expires") or 0)
    except (TypeError, ValueError):
        return 0


def store_secrets(
    refs: Mapping[str, str],
    values: Mapping[str, Mapping[str, Any]],
    *,
    crm_token_keys: tuple[str, ...] = (),
    replace_tokens: bool = False,
    region: str | None = None,
) -> tuple[dict[str, str], bool]:
    """Create or merge each secret; returns the full ARNs and whether the stored CRM pair was kept.

    Secrets are merged, never replaced: keys only the secret has (``expires``) survive, and the CRM's OAuth
    pair follows :func:`merge_secret`. The clinic secret's keys are generated when missing and kept when
    present (replacing them would orphan every keyed hash already stored)."""
    sm = boto3.client("secretsmanager", region_name=region)
    arns: dict[str, str] = {}
    kept = False
    for which, ref in refs.items():
        wanted = dict(values.get(which) or {})
        try:
            current = json.loads(sm.get_secret_value(SecretId=ref).get("SecretString") or "{}")
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
            current = None
        existing = current if isinstance(current, dict) else {}
        if which == "clinic":
            for key in CLINIC_KEYS:
                wanted.setdefault(key, existing.get(key) or secrets.token_hex(32))
        merged, kept_here = merge_secret(
            existing, wanted, crm_token_keys if which == "crm" else (), replace_tokens=replace_tokens
        )
        kept = kept or kept_here
        body = json.dumps(merged)
        if current is None:
            arns[which] = sm.create_secret(Name=ref, SecretString=body)["ARN"]
        else:
            if current != merged:
                sm.put_secret_value(SecretId=ref, SecretString=body)
            arns[which] = sm.describe_secret(SecretId=ref)["ARN"]
    return arns, kept


def config_exists(name: str, region: str | None = None) -> bool:
    try:
        boto3.client("ssm", region_name=region).get_parameter(Name=name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ParameterNotFound":
            return False
        raise
    return True


def store_config(name: str, text: str, region: str | None = None) -> None:
    """The config file's document, stored as the functions read it (JSON: no YAML parser at a cold start)."""
    boto3.client("ssm", region_name=region).put_parameter(
        Name=name, Value=stored_config(text), Type="String", Overwrite=True, Tier="Intelligent-Tiering"
    )


def stack_status(stack: str, region: str | None = None) -> str | None:
    """The stack's status, or None when there is none."""
    cfn = boto3.client("cloudformation", region_name=region)
    try:
        return str(cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"])
    except ClientError as exc:
        if "does not exist" in str(exc.response["Error"].get("Message", "")):
            return None
        raise


def delete_failed_create(stack: str, region: str | None = None, delay: float = 5.0) -> None:
    """Delete a stack whose first create rolled back (ROLLBACK_COMPLETE): CloudFormation accepts no update
    on it, only a delete. It holds nothing of the clinic's (the create never completed)."""
    cfn = boto3.client("cloudformation", region_name=region)
    cfn.delete_stack(StackName=stack)
    cfn.get_waiter("stack_delete_complete").wait(
        StackName=stack, WaiterConfig={"Delay": max(delay, 0.1), "MaxAttempts": 360}
    )


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


def python313_dir(path: str | None = None, pyenv_root: str | None = None, home: str | None = None) -> str | None:
    """The directory of a python3.13 interpreter, found as the Makefile finds it (PATH first, then pyenv's
    versions): `sam build` resolves the Lambda runtime's python3.13 from PATH."""
    path = os.environ.get("PATH", "") if path is None else path
    root = pyenv_root or os.environ.get("PYENV_ROOT") or str(Path(home or Path.home()) / ".pyenv")
    candidates = [shutil.which("python3.13", path=path)] if path else []
    candidates += [str(p) for p in sorted(Path(root).glob("versions/3.13*/bin/python3.13"))]
    for candidate in candidates:
        if candidate and _is_python313(candidate):
            return str(Path(candidate).parent)
    return None


def _is_python313(python: str) -> bool:
    probe = "import sys; sys.exit(sys.version_info[:2] != (3, 13))"
    try:
        return subprocess.run([python, "-c", probe], check=False, capture_output=True, timeout=30).returncode == 0  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        return False


def sam_environment(python_dir: str | None) -> dict[str, str]:
    """The environment for `sam`: ours, with the python3.13 directory first on PATH."""
    env = dict(os.environ)
    if python_dir:
        env["PATH"] = os.pathsep.join([python_dir, env.get("PATH", "")]) if env.get("PATH") else python_dir
    return env
