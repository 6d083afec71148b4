"""The ``clinicsync fleet`` sub-commands: deploy, status, drift, add. Each parses, calls the fleet module
that does the work, and shapes the reply."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from clinicsync_cli.clinic import console, dump_json, fail
from clinicsync_cli.fleet.cells import Cells
from clinicsync_cli.fleet.clock import SystemClock
from clinicsync_cli.fleet.drift import read_drift
from clinicsync_cli.fleet.health import ClinicHealth, read_fleet
from clinicsync_cli.fleet.registry import Fleet, FleetClinic, dump_fleet, load_fleet
from clinicsync_cli.fleet.release import SamPackager
from clinicsync_cli.fleet.rollout import Rollout, RolloutError, RolloutState

fleet_app = typer.Typer(no_args_is_help=True, help="Many clinics' stacks as one: rollout, status, drift, onboarding")

FleetOption = Annotated[Path, typer.Option("--fleet", "-f", help="The fleet registry (fleet.yaml)")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def open_fleet(path: Path) -> Fleet:
    if not path.is_file():
        fail(f"no fleet registry at {path}", "start from docs/fleet.example.yaml (docs/fleet.md)")
    try:
        return load_fleet(path)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        fail(f"{path} is not a valid fleet registry:\n" + "\n".join(lines), "fix those keys (docs/fleet.md)")
    except (ValueError, yaml.YAMLError) as exc:
        fail(f"{path} is not a valid fleet registry: {exc}", "fix the YAML (docs/fleet.md)")


@contextlib.contextmanager
def aws_errors() -> Iterator[None]:
    """No credentials, a refused role, an unreachable endpoint: one line and what to do."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        fail(f"cannot reach AWS: {exc}", "check AWS_PROFILE / AWS_REGION and each cell's role_arn in fleet.yaml")


def default_state_path(fleet_path: Path) -> Path:
    return fleet_path.parent / ".clinicsync" / "rollout.json"


# --- deploy ----------------------------------------------------------------------------------------------


class RolloutProgress:
    """Progress bars driven by the rollout's events: one for the clinics, one for the current wave."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.overall = progress.add_task("clinics", total=total)
        self.wave = progress.add_task("wave", total=None, visible=False)

    def __call__(self, event: str, clinic: str | None, detail: dict[str, Any]) -> None:
        p = self.progress
        if event == "wave":
            p.reset(self.wave, total=len(detail["clinics"]), visible=True)
            p.update(self.wave, description=f"wave {detail['index']}: {len(detail['clinics'])} clinic(s)")
        elif event in ("deployed", "unchanged", "planned", "failed") and clinic is not None:
            p.advance(self.wave)
            p.advance(self.overall)
        elif event == "baking":
            p.update(self.wave, description=f"baking {len(detail['clinics'])} clinic(s) {detail['seconds']:.0f} s")
        elif event == "breach":
            p.console.print(f"[red]breach[/] in wave {detail['wave']}: {', '.join(detail['clinics'])}; rolling back")
        elif event == "rolled_back" and clinic is not None:
            p.console.print(f"  {clinic} back on {detail['release']}")
        elif event == "building":
            p.console.print(f"building and packaging {detail['release']} (once)")
        elif event == "resumed":
            p.console.print(f"resuming the unfinished rollout at wave {detail['wave']}")


def rollout_table(state: RolloutState) -> Table:
    table = Table(title=f"release {state.release}: {state.phase}")
    for column in ("clinic", "cell", "from", "state", "changes", "note"):
        table.add_column(column, overflow="fold")
    order = {clinic: n for n, wave in enumerate(state.waves) for clinic in wave}
    for clinic, entry in sorted(state.clinics.items(), key=lambda kv: (order.get(kv[0], 0), kv[0])):
        colour = {"failed": "red", "rolled_back": "yellow", "done": "green"}.get(entry.state, "white")
        table.add_row(
            clinic, entry.cell, entry.previous or "-", f"[{colour}]{entry.state}[/]", str(entry.changes), entry.reason
        )
    return table


@fleet_app.command("deploy")
def deploy(
    fleet_path: FleetOption = Path("fleet.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Create the change sets only; execute nothing")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Abandon an unfinished rollout's state")] = False,
    state_path: Annotated[Path | None, typer.Option("--state", help="Rollout state file")] = None,
    sam: Annotated[str, typer.Option("--sam", help="The sam executable")] = ".venv-sam/bin/sam",
    template: Annotated[Path, typer.Option("--template")] = Path("template.yaml"),
    build_dir: Annotated[Path, typer.Option("--build-dir")] = Path(".aws-sam/build"),
) -> None:
    """Roll the registry's release out to every clinic: change sets in waves (canary first), each wave
    baked and watched; a breach rolls that wave back. Safe to interrupt: run it again to resume."""
    fleet = open_fleet(fleet_path)
    first = next(iter(fleet.cells.values()))
    packager = SamPackager(sam, template, build_dir, first.artifacts_bucket, first.region)
    state = run_rollout(fleet, fleet_path, packager, state_path, dry_run=dry_run, restart=restart)
    if state.phase == "rolled_back":
        console.print("[yellow]next:[/] `clinicsync fleet status` for the breach, fix it, then deploy again")
        raise typer.Exit(1)
    if state.phase == "planned":
        console.print("[yellow]next:[/] review the change sets in CloudFormation, then deploy without --dry-run")


def run_rollout(
    fleet: Fleet,
    fleet_path: Path,
    packager: Any,
    state_path: Path | None,
    *,
    dry_run: bool = False,
    restart: bool = False,
    clock: Any = None,
) -> RolloutState:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        rollout = Rollout(
            fleet,
            fleet_path.parent,
            Cells(fleet.cells),
            packager,
            clock or SystemClock(),
            state_path or default_state_path(fleet_path),
            dry_run=dry_run,
            observer=RolloutProgress(progress, len(fleet.clinics)),
        )
        try:
            with aws_errors():
                state = rollout.run(restart=restart)
        except RolloutError as exc:
            progress.stop()
            fail(str(exc), "resume with the same fleet.yaml, or pass --restart")
        except KeyboardInterrupt:
            progress.stop()
            console.print("[yellow]interrupted:[/] the rollout's state is saved")
            console.print("[yellow]next:[/] run `clinicsync fleet deploy` again to resume where it stopped")
            raise typer.Exit(130) from None
    console.print(rollout_table(state))
    figures = rollout.figures
    console.print(
        f"{figures.change_sets} change set(s), {figures.executed} executed, {figures.rolled_back} rolled back, "
        f"{len(figures.api_deployments)} API deployment(s); concurrency {fleet.rollout.concurrency}"
    )
    return state


# --- status ----------------------------------------------------------------------------------------------


def _ago(at: float | None) -> str:
    if not at:
        return "never"
    seconds = max(0, int(time.time() - at))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


@fleet_app.command("status")
def status(
    fleet_path: FleetOption = Path("fleet.yaml"),
    as_json: JsonOption = False,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Clinics read at once")] = 8,
) -> None:
    """One row per clinic: release, stack status, last poll, sync lag, errors, DLQ depth, CRM budget use,
    opt-outs pending. Clinics over a threshold come first."""
    fleet = open_fleet(fleet_path)
    with aws_errors():
        found = read_fleet(fleet, Cells(fleet.cells), workers=workers)
    if as_json:
        print(dump_json([h.as_dict() for h in found]))  # plain stdout: pipes and jq
        return
    console.print(status_table(fleet, found))


def status_table(fleet: Fleet, found: list[ClinicHealth]) -> Table:
    breaching = sum(bool(h.breaches) for h in found)
    table = Table(title=f"{len(found)} clinic(s), {breaching} breaching; fleet release {fleet.release}")
    for column in ("clinic", "release", "stack", "last poll", "lag", "err/h", "DLQ", "CRM %", "opt-outs", "breach"):
        table.add_column(column, overflow="fold")
    for h in found:
        lag = f"{h.sync_lag_seconds:.0f} s" if h.sync_lag_seconds is not None else "-"
        table.add_row(
            f"[red]{h.clinic_id}[/]" if h.breaches else h.clinic_id,
            h.release or "-",
            h.stack_status,
            _ago(h.last_poll_at),
            lag,
            str(h.errors_last_hour),
            str(h.dead_letters),
            f"{h.crm_budget_percent:.0f}",
            str(h.opt_outs_pending),
            "; ".join(h.breaches),
        )
    return table


# --- drift -----------------------------------------------------------------------------------------------


@fleet_app.command("drift")
def drift(
    fleet_path: FleetOption = Path("fleet.yaml"),
    as_json: JsonOption = False,
    detect: Annotated[
        bool, typer.Option("--cloudformation/--no-cloudformation", help="Also run CloudFormation drift detection")
    ] = True,
) -> None:
    """Clinics whose stack differs from the registry: another release, other parameters, CloudFormation drift."""
    fleet = open_fleet(fleet_path)
    with aws_errors():
        found = read_drift(fleet, fleet_path.parent, Cells(fleet.cells), detect=detect)
    drifted = [d for d in found if d.differences]
    if as_json:
        print(dump_json([d.as_dict() for d in found]))
    else:
        table = Table(title=f"{len(drifted)} of {len(found)} clinic(s) differ from {fleet_path}")
        for column in ("clinic", "release", "differences"):
            table.add_column(column, overflow="fold")
        for d in drifted:
            table.add_row(d.clinic_id, d.release or "-", "; ".join(d.differences))
        console.print(table)
    if drifted:
        raise typer.Exit(1)


# --- add -------------------------------------------------------------------------------------------------


@fleet_app.command("add")
def add(
    clinic_id: Annotated[str, typer.Option("--clinic-id", help="Clinic slug, e.g. smile-dental")],
    mis: Annotated[str, typer.Option("--mis", help="medods, infoclinica, renovatio or ident")],
    mis_url: Annotated[str, typer.Option("--mis-url", help="The MIS API root")],
    crm: Annotated[str, typer.Option("--crm", help="bitrix24 or amocrm")],
    secrets: Annotated[Path, typer.Option("--secrets", help="The clinic's local credentials file")],
    fleet_path: FleetOption = Path("fleet.yaml"),
    cell: Annotated[str | None, typer.Option("--cell", help="Default: the first cell with room")] = None,
    timezone: Annotated[str, typer.Option("--timezone")] = "Europe/Moscow",
) -> None:
    """Onboard a clinic: `clinicsync init` proposes its config, `clinicsync check` validates it against the live
    systems, then the clinic joins the registry (deployed by the next `fleet deploy`)."""
    from clinicsync_cli.app import check, init  # the single-clinic onboarding path, unchanged

    fleet = open_fleet(fleet_path)
    if any(c.id == clinic_id for c in fleet.clinics):
        fail(f"{clinic_id} is already in {fleet_path}", "pick another --clinic-id, or edit its entry")
    chosen = cell or fleet.free_cell()
    if chosen is None:
        fail("every cell is full", "add a cell (an account) to fleet.yaml: docs/fleet.md, 'Past the first wall'")
    folder = fleet_path.parent / "clinics" / clinic_id
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "clinic.yaml"
    init(clinic_id=clinic_id, mis=mis, mis_url=mis_url, crm=crm, secrets=secrets, out=config, timezone=timezone)
    check(config_path=config, secrets=secrets, api_url=None, create_fields=False)
    base = fleet_path.parent.resolve()
    entry = FleetClinic(
        id=clinic_id,
        config=config.resolve().relative_to(base),
        secrets=secrets.resolve().relative_to(base) if secrets.resolve().is_relative_to(base) else secrets.resolve(),
        cell=chosen,
    )
    try:
        updated = Fleet.model_validate({**fleet.model_dump(), "clinics": [*fleet.clinics, entry]})
    except ValidationError as exc:
        fail(f"the registry would be invalid: {exc.errors()[0]['msg']}", "pick another --cell")
    fleet_path.write_text(dump_fleet(updated), encoding="utf-8")
    console.print(f"[green]✓ {clinic_id} added to {fleet_path} (cell {chosen})[/]")
    console.print("[yellow]next:[/] review the diff, commit it, then `clinicsync fleet deploy`")
