"""The ``clinicsync`` command. Every error says what to do next."""

from __future__ import annotations

import contextlib
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import boto3
import typer
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from clinicsync.adapters.amocrm.client import AmoCrmClient
from clinicsync.adapters.aws.health import HealthLog, hours_ago
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync.domain.crm_ports import PipelineMismatch
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.fieldmap import FIELD_PRESETS
from clinicsync.domain.models import AppointmentStatus
from clinicsync_cli import connect, deployment
from clinicsync_cli.clinic import (
    clinic_secret_ref,
    console,
    credentials,
    dump_json,
    fail,
    load_config,
    load_secrets_file,
)
from clinicsync_cli.connect import Credentials, MissingCredentials
from clinicsync_cli.discovery import (
    CrmDiscovery,
    MisDiscovery,
    Problem,
    check_fields,
    check_filters,
    check_stages,
    check_statuses,
    check_webhooks,
    create_bitrix24_fields,
    default_mis_discovery,
    discover_crm,
    discover_medods,
    guarded,
    probe_mis,
    propose_config,
    register_webhooks,
)
from clinicsync_cli.dlq import dead_letters, replay
from clinicsync_cli.fleet.commands import fleet_app
from clinicsync_cli.funnel import crm_funnel
from clinicsync_cli.planning import plan_sync, read_changes
from clinicsync_cli.report import render_report
from clinicsync_cli.stack import QUEUES, StackHandle, StackNotFound, stack_name

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Operate a clinic's clinicsync stack")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: why messages failed, and replaying them")
app.add_typer(dlq_app, name="dlq")
app.add_typer(fleet_app, name="fleet")

StackOption = Annotated[str, typer.Option("--stack", "-s", help="The clinic's CloudFormation stack name")]
QueueOption = Annotated[str, typer.Option("--queue", "-q", help=f"Which queue: {', '.join(QUEUES)}")]
RegionOption = Annotated[
    str | None, typer.Option("--region", help="AWS region of the clinic's stack (default: boto3's)")
]


def _stack(name: str, region: str | None = None) -> StackHandle:
    try:
        return StackHandle.find(name, region)
    except StackNotFound as exc:
        fail(str(exc), "check the stack name (`aws cloudformation list-stacks`) and the region")
    except BotoCoreError as exc:
        fail(f"cannot reach AWS: {exc}", "check AWS_PROFILE / AWS_REGION (or AWS_ENDPOINT_URL for the local runtime)")


def _queue(queue: str) -> str:
    if queue not in QUEUES:
        console.print(f"[red]error:[/] unknown queue {queue!r}; [yellow]next:[/] use one of {', '.join(QUEUES)}")
        raise typer.Exit(2)
    return queue


@dlq_app.command("list")
def dlq_list(stack: StackOption, queue: QueueOption = "sync", region: RegionOption = None) -> None:
    """Every dead letter with the reason its last attempt failed (ids and counts only, never PII)."""
    handle = _stack(stack, region)
    _source, dlq = handle.queue_urls(_queue(queue))
    letters = dead_letters(handle.sqs(), dlq, handle.failure_log(), queue)
    if not letters:
        console.print(f"[green]no dead letters in {queue}[/]")
        return
    table = Table(title=f"{stack}: {len(letters)} dead letter(s) in {queue}")
    for column in ("message", "sent", "receives", "about", "reason"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        about = ", ".join(f"{k} {v}" for k, v in letter.summary().items() if k != "kind")
        sent = datetime.fromtimestamp(letter.sent_at, UTC).strftime("%Y-%m-%d %H:%M") if letter.sent_at else "?"
        table.add_row(letter.message_id, sent, str(letter.receives), about, letter.reason)
    console.print(table)
    console.print(f"[yellow]next:[/] fix the cause, then `clinicsync dlq replay --stack {stack} --queue {queue}`")


@dlq_app.command("replay")
def dlq_replay(stack: StackOption, queue: QueueOption = "sync", region: RegionOption = None) -> None:
    """Send every dead letter back to its queue (FIFO group kept), deleting each only after the send."""
    handle = _stack(stack, region)
    source, dlq = handle.queue_urls(_queue(queue))
    with console.status(f"replaying {queue} dead letters"):
        report = replay(handle.sqs(), dlq, source, handle.failure_log(), queue)
    console.print(f"replayed {report.replayed} message(s) to {queue}; {report.failed} could not be sent")
    if report.failed:
        console.print("[yellow]next:[/] check SQS permissions and run the replay again")
        raise typer.Exit(1)


# --- onboarding ------------------------------------------------------------------------------------------

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The clinic config (clinic.yaml)")]
SecretsOption = Annotated[
    Path | None,
    typer.Option("--secrets", help="Local credentials file (before the first deploy); default: Secrets Manager"),
]


def _find_stack(stack: str, region: str | None) -> StackHandle | None:
    with contextlib.suppress(StackNotFound, BotoCoreError):
        return StackHandle.find(stack, region)
    return None


def _crm_client(
    kind: str, creds: Credentials, handle: StackHandle | None = None, region: str | None = None
) -> Bitrix24Client | AmoCrmClient:
    """A refresh of a pair kept in Secrets Manager takes the stack's own lease, like the stack's functions."""
    leases = (
        DynamoStore(handle.table()) if handle is not None and creds.secret_id and "Table" in handle.resources else None
    )
    try:
        return connect.crm_client(kind, creds, connect.http_client(), leases=leases, region=region)
    except (MissingCredentials, NotImplementedError, ValueError) as exc:
        fail(f"cannot connect to {kind}: {exc}", "put the CRM credentials in the secret (docs/deploy.md, step 2)")


def _yaml_comment(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _init_header(
    clinic_id: str, out: Path, crm: str, mis: str, found: CrmDiscovery, mis_found: MisDiscovery, notes: list[str]
) -> list[str]:
    """The review notes written above a proposed clinic.yaml: what init found in the live systems."""
    header = [
        f"clinicsync config for {clinic_id}, proposed by `clinicsync init` from the live systems.",
        "REVIEW every stage and field below, then run `clinicsync check -c " + str(out) + "`.",
        "",
        f"{crm} ({found.account}) pipelines and stages (id «name» kind):",
    ]
    for pipeline in found.pipelines:
        header.append(f"  pipeline {pipeline.id} «{pipeline.name}»")
        header += [f"    {s.id} «{s.name}» {s.semantics}" for s in pipeline.stages]
    header.append("custom fields:")
    header += [f"  {f.entity} {f.key} «{f.name}» {f.type}" for f in found.fields] or ["  (none)"]
    header.append(f"{mis} statuses seen in recent visits:")
    header += [f"  {s}: {n}" for s, n in sorted(mis_found.statuses.items())] or ["  (none)"]
    header.append("branches (id «title»): " + (", ".join(f"{b} «{t}»" for b, t in mis_found.branches) or "-"))
    header.append("doctors (id specialty): " + (", ".join(f"{d} {s}" for d, s in mis_found.doctors) or "-"))
    if notes:
        header.append("to review:")
        header += [f"  - {n}" for n in notes]
    return header


@app.command()
def init(
    clinic_id: Annotated[str, typer.Option("--clinic-id", help="Clinic slug, e.g. smile-dental")],
    mis: Annotated[str, typer.Option("--mis", help="medods, infoclinica, renovatio or ident")],
    mis_url: Annotated[str, typer.Option("--mis-url", help="The MIS API root")],
    crm: Annotated[str, typer.Option("--crm", help="bitrix24 or amocrm")],
    secrets: SecretsOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the proposed config")] = Path("clinic.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
    timezone: Annotated[str, typer.Option("--timezone")] = "Europe/Moscow",
    region: RegionOption = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help=f"A case's field lists: {', '.join(FIELD_PRESETS)}")
    ] = None,
) -> None:
    """Discover the live CRM and MIS and write a proposed clinic.yaml (status -> stage map, field map) to review."""
    if out.exists() and not force:
        fail(f"{out} exists", "review it, or run again with --force to overwrite it")
    refs = {"mis": f"clinicsync/{clinic_id}/mis", "crm": f"clinicsync/{clinic_id}/crm"}
    crm_creds = credentials("crm", refs["crm"], secrets, region)
    mis_creds = credentials("mis", refs["mis"], secrets, region)
    handle = _find_stack(stack_name(clinic_id), region) if crm_creds.secret_id else None
    with console.status(f"reading {crm}: pipelines, stages, custom fields, webhooks"):
        try:
            found = discover_crm(_crm_client(crm, crm_creds, handle, region))
        except Exception as exc:
            fail(f"{crm} refused the discovery: {exc}", "check the CRM credentials (a revoked token? docs/runbook.md)")
    with console.status(f"reading {mis}: statuses, branches, doctors"):
        try:
            mis_found = (
                discover_medods(connect.medods_api(mis_url, mis_creds, connect.http_client()))
                if mis == "medods"
                else default_mis_discovery(mis)
            )
        except Exception as exc:
            fail(f"{mis} at {mis_url} refused the discovery: {exc}", "check --mis-url and the MIS credentials")
    try:
        if preset is not None and preset not in FIELD_PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(FIELD_PRESETS)})")
        proposal = propose_config(clinic_id, mis_found, mis_url, found, refs, timezone, preset)
        config = ClinicConfig.model_validate(proposal.data)
    except (ValueError, ValidationError) as exc:
        fail(f"could not propose a config: {exc}", "fix the CRM pipelines, then run init again")
    header = _init_header(clinic_id, out, crm, mis, found, mis_found, proposal.notes)
    dumped = config.model_dump(mode="json")
    for pipeline in dumped["crm"]["pipelines"].values():
        pipeline["closed_stages"] = sorted(pipeline["closed_stages"])
    body = yaml.safe_dump(dumped, allow_unicode=True, sort_keys=False)
    out.write_text(_yaml_comment(header) + "\n" + body, encoding="utf-8")
    table = Table(title=f"proposed status -> stage map ({crm})")
    table.add_column("status")
    for name in config.crm.pipelines:
        table.add_column(name)
    stage_names = {s.id: s.name for p in found.pipelines for s in p.stages}
    for status in AppointmentStatus:
        cells = [
            f"{p.stages[status]} «{stage_names.get(p.stages[status], '?')}»" for p in config.crm.pipelines.values()
        ]
        table.add_row(status.value, *cells)
    console.print(table)
    console.print(
        f"discovered {len(found.pipelines)} pipeline(s), {sum(len(p.stages) for p in found.pipelines)} stages, "
        f"{len(found.fields)} custom fields, {len(mis_found.statuses)} MIS statuses, "
        f"{len(mis_found.branches)} branches, {len(mis_found.doctors)} doctors"
    )
    for note in proposal.notes:
        console.print(f"[yellow]review:[/] {note}")
    console.print(f"wrote {out}")
    console.print(f"[yellow]next:[/] review {out}, then `clinicsync check -c {out}`")


@app.command()
def check(
    config_path: ConfigOption = Path("clinic.yaml"),
    secrets: SecretsOption = None,
    api_url: Annotated[
        str | None, typer.Option("--api-url", help="The stack's HTTP API (default: stack output)")
    ] = None,
    create_fields: Annotated[bool, typer.Option("--create-fields", help="Create missing Bitrix24 fields")] = False,
    region: RegionOption = None,
) -> None:
    """Validate a config against the live systems: credentials, stages, fields, statuses, webhooks. Every
    problem is reported in one pass."""
    config = load_config(config_path)
    problems: list[Problem] = []
    crm_creds = credentials("crm", config.crm.secret_ref, secrets, region)
    mis_creds = credentials("mis", config.mis.secret_ref, secrets, region)
    handle = _find_stack(stack_name(config.clinic_id), region)
    client = _crm_client(config.crm.kind, crm_creds, handle, region)
    with console.status(f"checking {config.crm.kind}"):
        found, failed = guarded(
            "credentials",
            f"{config.crm.kind} credentials",
            "renew the CRM token or webhook and put it in the secret (docs/runbook.md: a revoked token)",
            lambda: discover_crm(client),
        )
    problems += failed
    if found is not None and create_fields and isinstance(client, Bitrix24Client):
        for name in create_bitrix24_fields(client, config, found):
            console.print(f"[green]created[/] Bitrix24 field {name}")
        found = discover_crm(client)
    if found is not None:
        problems += check_stages(config, found) + check_fields(config, found)
        if api_url is None and handle is not None:
            api_url = handle.outputs.get("ApiUrl")
        problems += check_webhooks(config, found, api_url, crm_creds.values)
    with console.status(f"checking {config.mis.kind}"):
        if config.mis.kind == "medods":
            mis_found, failed = guarded(
                "credentials",
                f"{config.mis.kind} at {config.mis.base_url}",
                "check mis.base_url and the MIS credentials in the secret",
                lambda: discover_medods(connect.medods_api(config.mis.base_url, mis_creds, connect.http_client())),
            )
        else:
            mis_found, failed = default_mis_discovery(config.mis.kind), []
            if config.mis.kind != "ident":  # IDENT pushes through its connector: nothing to call
                probe, failed = guarded(
                    "credentials",
                    f"{config.mis.kind} at {config.mis.base_url}",
                    "check mis.base_url and the MIS credentials (certificates, API key) in the secret",
                    lambda: probe_mis(connect.mis_source(config, mis_creds, connect.http_client())),
                )
                problems.extend(probe or [])
    problems += failed
    if mis_found is not None:
        problems += check_statuses(config, mis_found) + check_filters(config, mis_found)
    errors = [p for p in problems if p.severity == "error"]
    if problems:
        table = Table(title=f"{config.clinic_id}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
        for column in ("", "area", "problem", "next step"):
            table.add_column(column, overflow="fold")
        for p in problems:
            mark = "[red]✗[/]" if p.severity == "error" else "[yellow]![/]"
            table.add_row(mark, p.area, p.message, p.next_step)
        console.print(table)
    if errors:
        console.print(f"[yellow]next:[/] fix the errors above, then `clinicsync check -c {config_path}` again")
        raise typer.Exit(1)
    console.print(f"[green]✓ {config.clinic_id}: credentials, stages, fields and statuses check out[/]")
    console.print(f"[yellow]next:[/] `clinicsync deploy -c {config_path} --secrets <file>` or `clinicsync backfill`")


# --- deploy ----------------------------------------------------------------------------------------------


def _default_sam() -> str:
    local = Path(".venv-sam/bin/sam")
    return str(local) if local.exists() else "sam"


def _clear_failed_create(stack: str, region: str | None) -> None:
    """A stack whose first create rolled back (ROLLBACK_COMPLETE) accepts no update: delete it, so the
    deploy creates it afresh. Only a create that never completed ends in that status."""
    if deployment.stack_status(stack, region) != "ROLLBACK_COMPLETE":
        return
    console.print(f"[yellow]stack {stack} is ROLLBACK_COMPLETE:[/] its first create failed and it holds nothing")
    with console.status(f"deleting {stack} so it can be created again"):
        deployment.delete_failed_create(stack, region)
    console.print(f"deleted {stack}; creating it again")


def _run_sam(sam_bin: str, steps: tuple[tuple[str, list[str]], ...]) -> None:
    # sam build resolves the Lambda runtime's python3.13 from PATH: put one there, as the Makefile does.
    python_dir = deployment.python313_dir()
    if python_dir is None:
        fail("python3.13 not found on PATH or under pyenv's versions", "install Python 3.13 (sam build needs it)")
    env = deployment.sam_environment(python_dir)
    for step, command in steps:
        console.print(f"[bold]{step}[/] …")
        try:
            result = subprocess.run(command, check=False, env=env)  # noqa: S603 - our own argv, no shell
        except FileNotFoundError:
            fail(f"{sam_bin} not found", "install the SAM CLI (`make sam-venv`) or pass --sam <path>")
        if result.returncode != 0:
            fail(
                f"{step} failed (exit {result.returncode})",
                f"read the {step} output above, fix it, and run `clinicsync deploy` again "
                "(a stack whose first create failed is deleted and created again)",
            )


@app.command()
def deploy(
    config_path: ConfigOption = Path("clinic.yaml"),
    secrets: Annotated[Path, typer.Option("--secrets", help="Credentials file: mis, crm (and clinic) objects")] = Path(
        "clinic.secrets.json"
    ),
    alarm_topic_arn: Annotated[str, typer.Option("--alarm-topic-arn", help="SNS topic for alarm notifications")] = "",
    region: RegionOption = None,
    sam: Annotated[str | None, typer.Option("--sam", help="The sam executable")] = None,
    template: Annotated[Path, typer.Option("--template")] = Path("template.yaml"),
    build_dir: Annotated[Path, typer.Option("--build-dir")] = Path(".aws-sam/build"),
    api_url: Annotated[str | None, typer.Option("--api-url", help="Override the stack's ApiUrl output")] = None,
    register_hooks: Annotated[bool, typer.Option("--webhooks/--no-webhooks", help="Register CRM webhooks")] = True,
    replace_tokens: Annotated[
        bool,
        typer.Option("--replace-tokens", help="Use the file's OAuth pair over the stored one (after re-authorising)"),
    ] = False,
) -> None:
    """Merge the secrets into Secrets Manager, `sam build` + `sam deploy` the clinic's stack, store the config
    in SSM (after the code, see docs/deploy.md), and register the CRM webhooks where the CRM's API allows."""
    config = load_config(config_path)
    values = load_secrets_file(secrets)
    if not values["mis"] or not values["crm"]:
        fail(f"{secrets} lacks mis or crm credentials", "fill both in (docs/deploy.md, step 2)")
    if problems := deployment.secret_problems(config, values):
        fail(f"{secrets}: " + "; ".join(problems), "fix the secrets file (docs/deploy.md, step 2)")
    refs = {"mis": config.mis.secret_ref, "crm": config.crm.secret_ref, "clinic": clinic_secret_ref(config.clinic_id)}
    parameter = f"/clinicsync/{config.clinic_id}/config"
    stack = stack_name(config.clinic_id)
    config_text = config_path.read_text(encoding="utf-8")
    try:
        _clear_failed_create(stack, region)
        with console.status("storing the secrets in Secrets Manager"):
            arns, kept = deployment.store_secrets(
                refs,
                values,
                crm_token_keys=connect.token_keys(config.crm.kind),
                replace_tokens=replace_tokens,
                region=region,
            )
        # Code before config: running functions re-read the config within minutes and reject keys they do
        # not know, so a changed config waits for the new code. A first deploy has no code running yet.
        config_first = not deployment.config_exists(parameter, region)
        if config_first:
            deployment.store_config(parameter, config_text, region)
    except (ClientError, BotoCoreError) as exc:
        fail(
            f"AWS refused: {exc}",
            "check your AWS credentials, region and permissions (cloudformation, secretsmanager, ssm)",
        )
    console.print(f"secrets: {', '.join(refs.values())}")
    if kept:
        console.print(
            "kept the CRM's OAuth pair stored in Secrets Manager: the stack rotates it, the file's copy may be "
            "spent (after re-authorising the app, deploy with --replace-tokens)"
        )
    overrides = deployment.parameter_overrides(config, parameter, arns, alarm_topic_arn)
    sam_bin = sam or _default_sam()
    _run_sam(
        sam_bin,
        (
            ("sam build", deployment.build_command(sam_bin, template, build_dir)),
            ("sam deploy", deployment.deploy_command(sam_bin, build_dir, stack, overrides, region)),
        ),
    )
    if not config_first:
        try:
            deployment.store_config(parameter, config_text, region)
        except (ClientError, BotoCoreError) as exc:
            fail(f"the new code is live but its config was not stored: {exc}", "run `clinicsync deploy` again")
    console.print(f"config: SSM {parameter}")
    if not register_hooks:
        console.print("[yellow]next:[/] register the CRM webhooks (docs/deploy.md, step 5), then `clinicsync backfill`")
        return
    handle = _find_stack(stack, region)
    if api_url is None:
        api_url = handle.outputs.get("ApiUrl") if handle else None
    if not api_url:
        fail(f"stack {stack} has no ApiUrl output", "check the deploy, then `clinicsync deploy` again (or --api-url)")
    # The secret now holds the live pair: registration refreshes it there, under the stack's lease.
    crm_creds = credentials("crm", refs["crm"], None, region)
    client = _crm_client(config.crm.kind, crm_creds, handle, region)
    try:
        done = register_webhooks(client, config.crm.kind, api_url, crm_creds.values)
    except Exception as exc:
        fail(
            f"webhook registration failed: {exc}",
            "check the CRM token's scopes, or add the webhook by hand (docs/deploy.md)",
        )
    console.print(done)
    console.print(f"[green]✓ {stack} deployed[/]")
    console.print(f"[yellow]next:[/] `clinicsync backfill --stack {stack}`, then `clinicsync status --stack {stack}`")


# --- backfill --------------------------------------------------------------------------------------------


@app.command()
def backfill(
    stack: StackOption,
    days: Annotated[int, typer.Option("--days", min=1, max=730, help="How far back to import")] = 365,
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming")] = False,
    pages_per_run: Annotated[int, typer.Option("--pages-per-run", min=1, max=1000)] = 1000,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the sync queue is empty")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the queue")] = 3600.0,
    region: RegionOption = None,
) -> None:
    """The first full import, with a progress bar. Safe to interrupt (Ctrl-C) and run again: it resumes
    from its checkpoint (the last page on the queue)."""
    handle = _stack(stack, region)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console) as progress:
            reading = progress.add_task("reading the MIS (pages)", total=None)
            state: dict[str, Any] = {}
            first = True
            while not state.get("done"):
                event = {
                    "job": "backfill",
                    "window_days": days,
                    "restart": restart and first,
                    "max_pages": pages_per_run,
                }
                try:
                    state = handle.invoke("MisPollerFunction", event)
                except Exception as exc:
                    progress.stop()
                    fail(
                        f"the import step failed: {exc}",
                        f"fix the cause (docs/runbook.md: MIS outage), then "
                        f"`clinicsync backfill --stack {stack}` resumes",
                    )
                if first and state.get("resumed"):
                    progress.console.print(f"resuming the import started {_ago(float(state['started_at']))}")
                first = False
                progress.update(
                    reading,
                    completed=int(state.get("pages", 0)),
                    description=f"reading the MIS: {state.get('patients', 0)} patients, "
                    f"{state.get('appointments', 0)} visits queued",
                )
            progress.update(reading, total=int(state.get("pages", 0)))
            if wait:
                messages = int(state.get("messages", 0))
                syncing = progress.add_task("writing to the CRM (messages)", total=max(messages, 1))
                deadline = time.monotonic() + timeout
                while True:
                    left = handle.depth("SyncQueue")
                    progress.update(syncing, completed=max(0, messages - left))
                    if left == 0:
                        progress.update(syncing, completed=max(messages, 1))
                        break
                    if time.monotonic() > deadline:
                        progress.stop()
                        fail(
                            f"{left} messages still queued after {timeout:.0f} s",
                            f"watch `clinicsync status --stack {stack}`; the queue keeps draining on its own",
                        )
                    time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] progress is saved in the stack")
        console.print(f"[yellow]next:[/] `clinicsync backfill --stack {stack}` resumes where it stopped")
        raise typer.Exit(130) from None
    dlq = handle.depth("SyncDLQ")
    console.print(
        f"[green]✓ import done:[/] {state.get('patients', 0)} patients, {state.get('appointments', 0)} visits "
        f"in {state.get('pages', 0)} page(s); {dlq} dead letter(s)"
    )
    if dlq:
        console.print(f"[yellow]next:[/] `clinicsync dlq list --stack {stack}`")


def _ago(at: float | None) -> str:
    if not at:
        return "never"
    seconds = max(0, int(time.time() - at))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


# --- status ----------------------------------------------------------------------------------------------


@app.command()
def status(
    stack: StackOption, as_json: Annotated[bool, typer.Option("--json")] = False, region: RegionOption = None
) -> None:
    """Sync lag, last poll, queue and DLQ depth, errors in the last hour, CRM budget use, opt-outs pending."""
    handle = _stack(stack, region)
    try:
        figures = stack_status(handle)
    except (ClientError, BotoCoreError) as exc:
        fail(f"cannot read the stack's state: {exc}", "check your AWS credentials and region")
    if as_json:
        console.print_json(dump_json(figures))
        return
    table = Table(title=f"{stack}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    lag = figures["sync_lag_seconds"]
    table.add_row("sync lag (poll → CRM)", f"{lag:.1f} s" if lag is not None else "no sync yet")
    table.add_row("last sync", _ago(figures["last_sync_at"]))
    table.add_row("last poll", _ago(figures["last_poll_at"]))
    for name, depth in figures["queues"].items():
        table.add_row(f"queue {name}", f"{depth['queued']} queued, {depth['dead']} dead")
    table.add_row("errors in the last hour", str(figures["errors_last_hour"]))
    budget = figures["crm_budget"]
    table.add_row(
        "CRM budget (last hour)",
        f"{budget['requests_last_hour']} requests of {budget['capacity_per_hour']} ({budget['use_percent']:.1f}%), "
        f"{budget['throttled_last_hour']} throttled",
    )
    table.add_row("opt-outs pending", str(figures["opt_outs_pending"]))
    console.print(table)
    dead = sum(q["dead"] for q in figures["queues"].values())
    if dead:
        console.print(f"[yellow]next:[/] `clinicsync dlq list --stack {stack} --queue <queue>` for the dead letters")


def stack_status(handle: StackHandle) -> dict[str, Any]:
    health = HealthLog(handle.table()).summary(hours_ago(1))
    queues = {}
    for name, (queue, dlq) in QUEUES.items():
        if queue in handle.resources:
            queues[name] = {"queued": handle.depth(queue), "dead": handle.depth(dlq)}
    config_text = _stack_config(handle)
    rate = 2.0
    if config_text is not None:
        with contextlib.suppress(ValueError, ValidationError):
            rate = parse_clinic_config(config_text).crm.requests_per_second
    requests = int(health.total("crm_requests"))
    capacity = int(rate * 3600)
    return {
        "sync_lag_seconds": health.last_lag,
        "last_sync_at": health.last_sync_at,
        "last_poll_at": health.last_poll_at,
        "queues": queues,
        "errors_last_hour": int(health.total("errors")),
        "crm_budget": {
            "requests_last_hour": requests,
            "capacity_per_hour": capacity,
            "use_percent": 100 * requests / capacity if capacity else 0.0,
            "throttled_last_hour": int(health.total("crm_throttles")),
        },
        "opt_outs_pending": queues.get("consent", {}).get("queued", 0) + queues.get("consent", {}).get("dead", 0),
    }


def _stack_config(handle: StackHandle) -> str | None:
    name = (
        handle.parameters.get("ConfigParameterName") or f"/clinicsync/{handle.name.removeprefix('clinicsync-')}/config"
    )
    try:
        return str(boto3.client("ssm", region_name=handle.region).get_parameter(Name=name)["Parameter"]["Value"])
    except ClientError:
        return None


# --- plan ------------------------------------------------------------------------------------------------


@app.command()
def plan(
    stack: StackOption,
    window_days: Annotated[
        int | None, typer.Option("--window-days", help="Re-read this many days instead of from the cursor")
    ] = None,
    max_pages: Annotated[int, typer.Option("--max-pages", min=1)] = 10,
    limit: Annotated[int, typer.Option("--limit", help="Rows to show")] = 50,
    region: RegionOption = None,
) -> None:
    """Dry run: what the next sync would create, update and move in the CRM. Nothing is written; PII masked."""
    handle = _stack(stack, region)
    config_text = _stack_config(handle)
    if config_text is None:
        fail(f"stack {stack} has no config in SSM", "run `clinicsync deploy` (it stores the config)")
    config = parse_clinic_config(config_text)
    mis_creds = credentials("mis", config.mis.secret_ref, None, region)
    crm_creds = credentials("crm", config.crm.secret_ref, None, region)
    clinic = credentials("clinic", clinic_secret_ref(config.clinic_id), None, region)
    http = connect.http_client()
    try:
        source = connect.mis_source(config, mis_creds, http)
    except (NotImplementedError, MissingCredentials) as exc:
        fail(str(exc), "plan reads the MIS directly; for IDENT run the connector, then `clinicsync status`")
    table = handle.table()
    cursor = (
        source.resync_cursor(window_days * 86400, time.time())
        if window_days
        else DynamoStore(table).get_cursor(source.kind)
    )
    with console.status(f"reading {config.mis.kind} changes (the cursor is not moved)"):
        try:
            changes = read_changes(source, cursor, max_pages)
        except Exception as exc:
            fail(f"the MIS read failed: {exc}", "check the MIS (docs/runbook.md: MIS outage)")
    client = _crm_client(config.crm.kind, crm_creds, handle, region)
    with console.status(f"planning against {config.crm.kind} (look-ups only)"):
        try:
            gateway = connect.crm_gateway(config, client, crm_creds)
            result = plan_sync(config, changes, table, gateway, KeyedHasher(str(clinic.values["hash_key"]).encode()))
        except PipelineMismatch as exc:
            fail(f"the config does not match the CRM: {exc}", "run `clinicsync check` and fix the stage map")
        except Exception as exc:  # a refused look-up: say which system and what to do
            fail(f"{config.crm.kind} refused a look-up: {exc}", "run `clinicsync check` (credentials, fields)")
    summary = Table(title=f"{stack}: plan for {result.patients} patient(s), {result.appointments} visit(s)")
    for column in ("", "create", "update", "move", "adopt"):
        summary.add_column(column)
    summary.add_row("contacts", str(result.count("create", "contact")), str(result.count("update", "contact")), "", "")
    summary.add_row(
        "deals",
        str(result.count("create", "deal")),
        str(result.count("update", "deal")),
        str(result.count("move", "deal")),
        "",
    )
    summary.add_row("leads", "", "", "", str(result.count("adopt", "lead")))
    console.print(summary)
    if result.writes:
        rows = Table(title="writes (PII masked)")
        for column in ("action", "entity", "MIS id", "CRM id", "stage", "fields"):
            rows.add_column(column, overflow="fold")
        for write in result.writes[:limit]:
            stage = f"{write.stage_from or '·'} → {write.stage_to}" if write.stage_to else ""
            fields = ", ".join(f"{k}={v}" for k, v in write.fields.items())
            rows.add_row(write.action, write.entity, write.mis_id, write.crm_id or "(new)", stage, fields)
        console.print(rows)
        if len(result.writes) > limit:
            console.print(f"… and {len(result.writes) - limit} more (--limit)")
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items())) or "none"
    console.print(f"skipped: {skipped}; CRM look-ups: {result.crm_reads} request(s); nothing was written")
    console.print("[yellow]next:[/] the scheduled poll applies this; `clinicsync status` shows it land")


# --- report ----------------------------------------------------------------------------------------------


@app.command()
def report(
    stack: StackOption,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("clinicsync-report.html"),
    days: Annotated[int, typer.Option("--days", min=1, max=90)] = 30,
    region: RegionOption = None,
) -> None:
    """A self-contained HTML page: sync health over time, and the funnel lead -> booked -> visited -> won by
    lead source (DMS visits excluded)."""
    handle = _stack(stack, region)
    config_text = _stack_config(handle)
    if config_text is None:
        fail(f"stack {stack} has no config in SSM", "run `clinicsync deploy` (it stores the config)")
    config = parse_clinic_config(config_text)
    client = _crm_client(config.crm.kind, credentials("crm", config.crm.secret_ref, None, region), handle, region)
    with console.status(f"reading the funnel from {config.crm.kind}"):
        try:
            funnel = crm_funnel(client, config, days)
        except Exception as exc:
            fail(f"{config.crm.kind} refused: {exc}", "run `clinicsync check` for the CRM credentials")
    health = HealthLog(handle.table()).summary(funnel.since)
    out.write_text(render_report(config.clinic_id, funnel, health), encoding="utf-8")
    total = funnel.total()
    console.print(
        f"wrote {out}: {total.entries} leads → {total.booked} booked → {total.visited} visited → {total.won} won "
        f"({funnel.dms_excluded} DMS visits excluded)"
    )
