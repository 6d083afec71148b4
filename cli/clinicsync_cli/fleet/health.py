"""Every clinic's health in one pass: the figures ``clinicsync status`` shows for one stack, its alarms, its
release, and whether it breaches the fleet's thresholds. Reads run in parallel (one clinic per worker)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from clinicsync_cli.fleet.cells import Cells
from clinicsync_cli.fleet.registry import Fleet, Thresholds
from clinicsync_cli.fleet.release import release_of
from clinicsync_cli.stack import StackHandle, stack_name


@dataclass
class ClinicHealth:
    clinic_id: str
    cell: str
    release: str | None = None
    stack_status: str = "MISSING"
    last_poll_at: float | None = None
    sync_lag_seconds: float | None = None
    errors_last_hour: int = 0
    dead_letters: int = 0
    crm_budget_percent: float = 0.0
    opt_outs_pending: int = 0
    alarms: list[str] = field(default_factory=list)  # logical ids of the clinic's alarms in ALARM
    breaches: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def breaches(health: ClinicHealth, limits: Thresholds) -> list[str]:
    """The thresholds a clinic is over, as short reasons (counts and seconds only)."""
    found = []
    if health.error:
        found.append("unreadable")
    if health.sync_lag_seconds is not None and health.sync_lag_seconds > limits.max_sync_lag_seconds:
        found.append(f"sync lag {health.sync_lag_seconds:.0f} s > {limits.max_sync_lag_seconds:.0f} s")
    if health.errors_last_hour > limits.max_errors_last_hour:
        found.append(f"{health.errors_last_hour} errors/h > {limits.max_errors_last_hour}")
    if health.dead_letters > limits.max_dead_letters:
        found.append(f"{health.dead_letters} dead letters > {limits.max_dead_letters}")
    if limits.alarms and health.alarms:
        found.append("alarm " + ", ".join(health.alarms))
    if health.stack_status.endswith(("_FAILED", "ROLLBACK_COMPLETE")) or "ROLLBACK_IN" in health.stack_status:
        found.append(f"stack {health.stack_status}")
    return found


def read_clinic(cells: Cells, cell: str, clinic_id: str, limits: Thresholds) -> ClinicHealth:
    from clinicsync_cli.app import stack_status  # the one-clinic figures, exactly as `clinicsync status`

    health = ClinicHealth(clinic_id, cell)
    stack = stack_name(clinic_id)
    cfn = cells.client(cell, "cloudformation")
    try:
        described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
    except ClientError:
        return health  # no stack yet: nothing to breach
    health.stack_status = str(described["StackStatus"])
    try:
        health.release = release_of(cfn.get_template(StackName=stack, TemplateStage="Original")["TemplateBody"])
        handle = _handle(cfn, stack, described)
        with cells.bound(cell):
            figures = stack_status(handle)
        health.last_poll_at = figures["last_poll_at"]
        health.sync_lag_seconds = figures["sync_lag_seconds"]
        health.errors_last_hour = int(figures["errors_last_hour"])
        health.dead_letters = sum(int(q["dead"]) for q in figures["queues"].values())
        health.crm_budget_percent = float(figures["crm_budget"]["use_percent"])
        health.opt_outs_pending = int(figures["opt_outs_pending"])
        health.alarms = _alarms_in_alarm(cells.client(cell, "cloudwatch"), handle)
    except (ClientError, BotoCoreError, KeyError, ValueError) as exc:
        health.error = type(exc).__name__  # no message: it may quote a resource's content
    health.breaches = breaches(health, limits)
    return health


def _handle(cfn: Any, stack: str, described: dict[str, Any]) -> StackHandle:
    """The stack as ``clinicsync status`` sees it, read with the cell's client. A resource still being
    created (or one the account does not create) has no physical id yet and is left out."""
    listed = cfn.describe_stack_resources(StackName=stack)["StackResources"]
    return StackHandle(
        stack,
        {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed if r.get("PhysicalResourceId")},
        {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])},
        {p["ParameterKey"]: p.get("ParameterValue", "") for p in described.get("Parameters", [])},
    )


def _alarms_in_alarm(cloudwatch: Any, handle: StackHandle) -> list[str]:
    """The stack's own alarms (by physical name, not a name prefix another clinic's stack could share)."""
    names = {physical: logical for logical, physical in handle.resources.items() if logical.endswith("Alarm")}
    found: list[str] = []
    listed = list(names)
    for start in range(0, len(listed), 100):
        page = cloudwatch.describe_alarms(AlarmNames=listed[start : start + 100], StateValue="ALARM")
        found += [
            names[a["AlarmName"]]
            for a in page["MetricAlarms"]
            if a["AlarmName"] in names and a["StateValue"] == "ALARM"  # re-checked: not every API filters
        ]
    return sorted(found)


def read_fleet(fleet: Fleet, cells: Cells, clinic_ids: list[str] | None = None, workers: int = 8) -> list[ClinicHealth]:
    """Breaching clinics first (most breaches first), then by id."""
    wanted = [c for c in fleet.clinics if clinic_ids is None or c.id in clinic_ids]
    limits = fleet.rollout.thresholds
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(wanted)))) as pool:
        found = list(pool.map(lambda c: read_clinic(cells, c.cell, c.id, limits), wanted))
    return sorted(found, key=lambda h: (-len(h.breaches), h.clinic_id))
