"""``clinicsync-ident``: the connector's console command (install it as a Windows service or a cron job).

    clinicsync-ident init  --config C:\\ProgramData\\clinicsync\\ident.yaml --stack-url https://... --dsn "..."
    clinicsync-ident check --config ...      # database reachable, stack reachable, key accepted
    clinicsync-ident run   --config ...      # every interval_seconds until stopped; --once for one run

Output is counts and ids only: no patient names, phones or e-mails are ever printed.
"""

from __future__ import annotations

import secrets
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from clinicsync_ident import __version__
from clinicsync_ident.config import ConnectorConfig, load_config, write_private
from clinicsync_ident.db import IdentDatabase
from clinicsync_ident.push import StackClient, StackRefused, StackUnavailable
from clinicsync_ident.runner import Connector, RunReport
from clinicsync_ident.state import load_state, save_state

app = typer.Typer(add_completion=False, no_args_is_help=True, help="clinicsync's IDENT connector")
console = Console(stderr=True)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The connector's YAML config file")]


def _fail(message: str, next_step: str) -> typer.Exit:
    console.print(f"[red]error:[/] {message}\n[yellow]next:[/] {next_step}")
    return typer.Exit(code=1)


def _load(config_path: Path) -> ConnectorConfig:
    try:
        return load_config(config_path)
    except FileNotFoundError:
        raise _fail(f"{config_path} does not exist", "create it with `clinicsync-ident init`") from None
    except ValueError as exc:
        raise _fail(f"{config_path} is not valid: {exc}", "fix the file (see docs/ident.md)") from None


def build_connector(config: ConnectorConfig, http: httpx.Client | None = None) -> tuple[Connector, IdentDatabase]:
    database = IdentDatabase.connect(config.database.driver, config.database.dsn)
    verify: Any = str(config.ca_bundle) if config.ca_bundle else True
    client = http or httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0), verify=verify)
    stack = StackClient(str(config.stack_url), config.signing_key(), client)
    connector = Connector(
        config.connector_id,
        database,
        stack,
        load_state(config.state_file),
        lambda state: save_state(config.state_file, state),
        first_sync_days=config.first_sync_days,
        overlap_seconds=config.overlap_seconds,
        patients_per_batch=config.patients_per_batch,
    )
    return connector, database


def _summary(report: RunReport) -> str:
    excluded = ", ".join(f"{k}: {v}" for k, v in sorted(report.excluded.items())) or "none"
    cached = " (clinic settings from cache: stack unreachable)" if report.settings_from_cache else ""
    return (
        f"sent {report.patients} patients, {report.appointments} visits in {report.batches} batches; "
        f"no-shows {report.no_shows}; excluded {excluded}; rejected {report.rejected}{cached}"
    )


@app.command()
def init(
    config_path: ConfigOption,
    stack_url: Annotated[str, typer.Option(help="The stack's HTTP API URL (stack output HttpApiUrl)")],
    dsn: Annotated[str, typer.Option(help="pyodbc connection string to IDENT's SQL Server database")],
    connector_id: Annotated[str, typer.Option(help="A name for this install")] = "ident-connector",
) -> None:
    """Write a config file and a fresh signing key next to it."""
    if config_path.exists():
        raise _fail(f"{config_path} already exists", "edit it, or choose another path")
    key_file = config_path.with_name("connector.key")
    state_file = config_path.with_name("ident-state.json")
    data = {
        "connector_id": connector_id,
        "stack_url": stack_url,
        "key_file": str(key_file),
        "state_file": str(state_file),
        "database": {"driver": "mssql", "dsn": dsn},
    }
    try:
        ConnectorConfig.model_validate(data)
    except ValidationError as exc:  # named fields and rules only: the DSN may hold a password
        wrong = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
        raise _fail(f"cannot write the config: {wrong}", "fix the option(s) and run init again") from None
    config_path.parent.mkdir(parents=True, exist_ok=True)
    # Both files are secrets: the key signs batches, and the DSN may hold database credentials.
    write_private(key_file, secrets.token_urlsafe(48))
    write_private(config_path, yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    console.print(f"wrote {config_path} and {key_file}")
    console.print(
        "[yellow]next:[/] put the key into the clinic's MIS secret as `connector_key` (see docs/ident.md), "
        "then run `clinicsync-ident check`"
    )


@app.command()
def check(config_path: ConfigOption) -> None:
    """Check the database, the stack and the key, and show what the stack says about the clinic."""
    config = _load(config_path)
    table = Table(title=f"clinicsync-ident {__version__}: {config.connector_id}")
    table.add_column("check")
    table.add_column("result")
    ok = True
    try:
        connector, database = build_connector(config)
    except Exception as exc:  # every failure is reported with its next step
        raise _fail(
            f"cannot open the database: {type(exc).__name__}", "check database.dsn and the ODBC driver"
        ) from None
    try:
        changed = database.changed_since(connector.state.changed_since or datetime(2000, 1, 1))
        table.add_row("database", f"reachable; {len(changed.patients)} patients changed since the cursor")
    except Exception as exc:
        ok = False
        table.add_row("database", f"[red]query failed: {type(exc).__name__}[/] (see docs/ident.md: schema)")
    try:
        settings = connector.settings(RunReport())
        table.add_row("stack", f"key accepted; clinic {settings.tz.key}, no-show grace {settings.grace}")
    except StackRefused as exc:
        ok = False
        table.add_row("stack", f"[red]refused: {exc.reason}[/]")
    except StackUnavailable as exc:
        ok = False
        table.add_row("stack", f"[red]unreachable: {exc}[/]")
    finally:
        database.close()
    console.print(table)
    if not ok:
        raise typer.Exit(code=1)


@app.command()
def run(
    config_path: ConfigOption,
    once: Annotated[bool, typer.Option(help="One run, then exit")] = False,
    resync_days: Annotated[int | None, typer.Option(help="Re-send everything changed in the last N days")] = None,
) -> None:
    """Push changes every ``interval_seconds`` until stopped (Ctrl+C or a service stop)."""
    config = _load(config_path)
    connector, database = build_connector(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while True:
            try:
                report = connector.run_once(resync_days=resync_days)
                console.print(_summary(report))
            except StackRefused as exc:
                raise _fail(f"the stack refused a request: {exc.reason}", "run `clinicsync-ident check`") from None
            except StackUnavailable as exc:
                console.print(f"[yellow]stack unavailable, cursor kept, will retry:[/] {exc}")
            resync_days = None
            if once or stop.wait(config.interval_seconds):
                return
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        database.close()
