"""What every command needs: the clinic config, its credentials, and errors that say what to do next."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError
from rich.console import Console

from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync_cli.connect import Credentials, MissingCredentials, read_secret

console = Console()
SECRET_KEYS = ("mis", "crm", "clinic")


def fail(message: str, next_step: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/] {message}")
    console.print(f"[yellow]next:[/] {next_step}")
    raise typer.Exit(code)


def load_config(path: Path) -> ClinicConfig:
    if not path.is_file():
        fail(f"no config at {path}", "create one with `clinicsync init`, or pass --config")
    try:
        return parse_clinic_config(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        fail(f"{path} is not a valid clinic config:\n" + "\n".join(lines), "fix those keys (docs/config-reference.md)")
    except (ValueError, yaml.YAMLError) as exc:
        fail(f"{path} is not a valid clinic config: {exc}", "fix the YAML (docs/config-reference.md)")


def clinic_secret_ref(clinic_id: str) -> str:
    return f"clinicsync/{clinic_id}/clinic"


def load_secrets_file(path: Path) -> dict[str, dict[str, Any]]:
    """The operator's local credentials before the first deploy: {"mis": {...}, "crm": {...}, "clinic": {...}}."""
    if not path.is_file():
        fail(
            f"no secrets file at {path}", "write one (docs/deploy.md, step 2) or drop --secrets to read Secrets Manager"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        fail(f"{path} is not JSON or YAML: {exc}", "fix the file (docs/deploy.md, step 2)")
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in SECRET_KEYS):
        fail(f"{path} must be a mapping with mis, crm (and optionally clinic) objects", "see docs/deploy.md, step 2")
    return {k: dict(data.get(k) or {}) for k in SECRET_KEYS}


def credentials(which: str, ref: str, secrets_file: Path | None, region: str | None = None) -> Credentials:
    """From the local secrets file when given, else from Secrets Manager by the config's reference.

    Token custody: once a secret in AWS holds a refreshable OAuth pair, that pair is the live one (the stack
    rotates it), so the CRM is reached with the secret even when a file is given; the file's copy may be spent.
    Before that, the file is the store and a refresh is written back to it."""
    if secrets_file is not None:
        values = load_secrets_file(secrets_file)[which]
        if not values and which != "clinic":
            fail(f"{secrets_file} has no {which!r} credentials", f"add a {which!r} object (docs/deploy.md, step 2)")
        if which == "crm" and values.get("refresh_token"):
            with contextlib.suppress(ClientError, BotoCoreError, MissingCredentials, json.JSONDecodeError):
                stored = read_secret(ref, region)
                if stored.values.get("refresh_token"):
                    return stored
        return Credentials(values, source_file=secrets_file, section=which)
    try:
        return read_secret(ref, region)
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        step = (
            "deploy first (`clinicsync deploy` puts it there) or pass --secrets <file>"
            if code == "ResourceNotFoundException"
            else "check your AWS credentials and region (AWS_PROFILE, AWS_REGION)"
        )
        fail(f"cannot read secret {ref!r} ({code})", step)
    except (BotoCoreError, MissingCredentials, json.JSONDecodeError) as exc:
        fail(f"cannot read secret {ref!r}: {exc}", "check your AWS credentials and region, or pass --secrets <file>")


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)
