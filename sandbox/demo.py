"""`make demo`: a sample clinic synced end to end on this machine, then synced again to show that
a second run changes nothing. Exits non-zero if the CRM does not end up as the MIS says."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sandbox.card import (
    CASE_B_OVERRIDES,
    CASE_C_OVERRIDES,
    amocrm_card,
    bitrix24_card,
    case_b_patient,
    create_case_fields,
)

if TYPE_CHECKING:  # imported lazily at run time: Powertools reads its env vars on import
    from sandbox.local import LocalClinic, RunSummary

app = typer.Typer(add_completion=False, help=__doc__)
console = Console()
LOG_DIR = Path(".demo")
MIS_NAMES = {
    "medods": "MEDODS",
    "infoclinica": "InfoClinica",
    "renovatio": "Renovatio",
    "ident": "IDENT (via its connector)",
}
CRM_NAMES = {"bitrix24": "Bitrix24", "amocrm": "amoCRM"}
_LOG_SINK: list[TextIO] = []


def _quiet_handlers() -> Path:
    """Handler logs (JSON, no PII) and EMF metrics go to a file, so the terminal shows the story."""
    LOG_DIR.mkdir(exist_ok=True)
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO")
    os.environ["POWERTOOLS_METRICS_DISABLED"] = "1"
    return LOG_DIR / "handlers.log"


@app.command()
def main(
    mis: Annotated[str, typer.Option(help="MIS emulator")] = "medods",
    crm: Annotated[str, typer.Option(help="CRM emulator")] = "bitrix24",
    patients: Annotated[int, typer.Option(min=1, max=5000)] = 300,
    appointments: Annotated[int, typer.Option(min=1, max=10000)] = 400,
    seed: int = 7,
) -> None:
    if mis == "lis" or crm == "vtiger":  # the lab case: its directory, not patients (sandbox/lab_demo.py)
        from sandbox.lab_demo import lab_demo

        raise typer.Exit(lab_demo(console, mis, crm, _quiet_handlers()))
    if mis not in MIS_NAMES or crm not in CRM_NAMES:
        console.print(
            f"[red]MIS={mis} CRM={crm} is not available in the demo[/red]: "
            f"MIS is one of {', '.join(MIS_NAMES)}, CRM one of {', '.join(CRM_NAMES)}."
        )
        raise typer.Exit(2)
    log_path = _quiet_handlers()
    from clinicsync.observability import logger
    from sandbox.local import start_local_clinic

    log_file = log_path.open("w", encoding="utf-8")
    _LOG_SINK.append(log_file)
    for handler in logger.handlers:
        handler.setStream(log_file)  # type: ignore[attr-defined]

    mis_name, crm_name = MIS_NAMES[mis], CRM_NAMES[crm]
    console.rule(f"[bold]clinicsync demo[/bold] — {mis_name} → {crm_name}, local runtime on moto")
    with console.status(f"Starting moto, the {mis_name} and {crm_name} emulators and the clinic's stack…"):
        # InfoClinica -> amoCRM is case C, IDENT -> Bitrix24 case B: each with its preset (docs/fields.md).
        case = {("infoclinica", "amocrm"): CASE_C_OVERRIDES, ("ident", "bitrix24"): CASE_B_OVERRIDES}
        overrides = case.get((mis, crm))
        clinic = start_local_clinic(
            seed=seed, patients=patients, appointments=appointments, crm=crm, mis=mis, config_overrides=overrides
        )
        case_b = None
        if overrides is CASE_B_OVERRIDES:
            create_case_fields(clinic)  # as `clinicsync check --create-fields` before going live
            case_b = case_b_patient(clinic)
    try:
        console.print(
            f"Sample clinic: {len(clinic.sample.patients)} patients, {len(clinic.sample.appointments)} appointments, "
            f"{len(clinic.sample.branches)} branches. Stack [cyan]{clinic.stack.stack_name}[/cyan], "
            f"queue and table created from template.yaml."
        )
        first = _run("First sync (backfill)", clinic, first_import=True)
        problems = clinic.mismatches()
        duplicates = {k: n for k, n in clinic.crm.contacts_by_origin().items() if n > 1}
        _summary(clinic, first)
        if overrides is CASE_C_OVERRIDES and (card := amocrm_card(clinic)) is not None:
            console.print(card)
        if case_b is not None:
            console.print(bitrix24_card(clinic, case_b))
        second = _run("Second sync (nothing changed in the MIS)", clinic)
        console.print(
            f"Second run: {second.poll['patients']} patients read, "
            f"[bold]{second.crm_writes} CRM writes[/bold], {second.crm_requests} CRM requests."
        )
    finally:
        clinic.close()
        log_file.close()

    ok = not problems and not duplicates and second.crm_writes == 0 and first.throttled == 0
    if problems:
        console.print(f"[red]{len(problems)} appointments are not where the MIS says:[/red]")
        for line in problems[:20]:
            console.print(f"  {line}")
    if duplicates:
        console.print(f"[red]{len(duplicates)} patients have more than one contact[/red]")
    console.print(f"Handler logs: {log_path}")
    console.rule("[green]OK[/green]" if ok else "[red]FAILED[/red]")
    raise typer.Exit(0 if ok else 1)


def _run(title: str, clinic: LocalClinic, first_import: bool = False) -> RunSummary:
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{title}: polling the MIS", total=None)

        def polled(depth: int) -> None:
            progress.update(task, description=f"{title}: syncing messages", total=depth, completed=0)

        def batch(count: int) -> None:
            progress.advance(task, count)

        # Handlers print EMF metrics and JSON logs to stdout, as on Lambda; keep them in the log file.
        with contextlib.redirect_stdout(_LOG_SINK[0]):
            run = clinic.first_import if first_import else clinic.sync
            summary = run(on_batch=batch, on_polled=polled)
        progress.update(task, total=max(1, summary.drain["messages"]), completed=max(1, summary.drain["messages"]))
    return summary


def _summary(clinic: LocalClinic, run: RunSummary) -> None:
    expected = clinic.expected_deals()
    synced = Table(title="First sync", show_header=False)
    synced.add_row(f"Patients read from {MIS_NAMES[clinic.mis.kind]}", str(run.poll["patients"]))
    synced.add_row("Appointments read", str(run.poll["appointments"]))
    synced.add_row("SQS messages (patients grouped per shard)", str(run.drain["messages"]))
    synced.add_row("Contacts in the CRM", str(len(clinic.crm.contacts())))
    synced.add_row("Deals in the CRM (expected)", f"{len(clinic.crm.deals())} ({len(expected)})")
    synced.add_row("CRM requests used", str(run.crm_requests))
    synced.add_row("CRM write commands", str(run.crm_writes))
    synced.add_row("Appointments per CRM request", f"{len(expected) / max(1, run.crm_requests):.1f}")
    synced.add_row("503/429 from the CRM", str(run.throttled))
    console.print(synced)

    stages = Table(title="Deals by funnel and stage")
    stages.add_column("Funnel")
    stages.add_column("Stage")
    stages.add_column("Deals", justify="right")
    funnels: dict[str, str] = {}
    for name, pipeline in clinic.config.crm.pipelines.items():  # one pipeline may serve both funnels
        funnels[pipeline.category_id] = (
            f"{funnels[pipeline.category_id]}+{name}" if pipeline.category_id in funnels else name
        )
    distribution: Counter[tuple[str, str]] = clinic.stage_distribution()
    for (category, stage), count in sorted(distribution.items()):
        stages.add_row(funnels.get(category, category), stage, str(count))
    console.print(stages)


if __name__ == "__main__":
    sys.exit(app())
