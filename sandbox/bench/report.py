"""The bench report as rich tables (the JSON in bench/report.json is the record)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_report(report: dict[str, Any]) -> None:
    console = Console(width=200)
    table = Table(title="CRM requests and time at the rate limit (simulated clock, one run)")
    for column in (
        "CRM", "contestant", "workload", "req/appt", "requests", "floor", "× floor", "sim s", "floor s", "× floor time",
        "503/429", "note",
    ):  # fmt: skip
        table.add_column(column)
    for f in report["figures"]:
        table.add_row(
            f["crm"], f["contestant"], f["workload"], _fmt(f["requests_per_appointment"], 3),
            _fmt(f["crm_requests"], 0),
            _fmt(f["floor_requests"], 0), _fmt(f["ratio_to_floor"]), _fmt(f["sim_seconds_at_rate_limit"], 0),
            _fmt(f["floor_seconds"], 0), _fmt(f["time_ratio_to_floor"]), _fmt(f["refused_503_429"]), f["note"],
        )  # fmt: skip
    console.print(table)
    ours = Table(title="clinicsync only")
    ours.add_column("figure")
    for crm in report["ours"]:
        ours.add_column(crm)
    rows = {
        "backfill: contacts of patients without visits": lambda o: o["backfill_contacts_without_visits"]["contacts"],
        "  request ratio counting them": lambda o: o["backfill_contacts_without_visits"]["ratio_to_that_floor"],
        "  time ratio counting them": lambda o: o["backfill_contacts_without_visits"]["time_ratio_to_that_floor"],
        "CPU ms/event, backfill": lambda o: o["cpu_ms_per_event"]["backfill"],
        "CPU ms/event, steady day": lambda o: o["cpu_ms_per_event"]["steady_day"],
        "  of which in boto3 (backfill)": lambda o: o["cpu_ms_per_event"]["backfill_in_aws_sdk"],
        "  of which in boto3 (day)": lambda o: o["cpu_ms_per_event"]["steady_day_in_aws_sdk"],
        "AWS calls per event (backfill)": lambda o: o["cpu_ms_per_event"]["aws_calls_per_event_backfill"],
        "syncer peak MiB (traced; the scale run)": lambda o: o["syncer_peak_mib"],
        "MIS→CRM p95 s (target ≤ 65)": lambda o: o["mis_to_crm_seconds"]["p95"],
        "  processing p95 s": lambda o: o["mis_to_crm_seconds"]["processing_p95"],
        "unsubscribe→CRM p95 s (< 60)": lambda o: o["unsubscribe_to_crm_seconds"]["p95"],
        "webhook burst ack p99 ms": lambda o: (o["webhook_burst"] or {}).get("ack_p99_ms"),
        "webhook burst none lost": lambda o: (o["webhook_burst"] or {}).get("none_lost"),
        "AWS USD / 10k appts / month": lambda o: o["aws_cost_per_10k_appointments_month"]["total_usd"],
        "CRM mismatches after the day": lambda o: o["crm_mismatches_after_day"],
    }
    for label, pick in rows.items():
        ours.add_row(label, *[_fmt(pick(report["ours"][crm])) for crm in report["ours"]])
    console.print(ours)
    imports = Table(title="handler import time (python -X importtime, best of 3), target ≤ 300 ms")
    imports.add_column("handler")
    imports.add_column("ms")
    imports.add_column("largest parts (self time per package, ms)")
    parts = report.get("handler_import_by_package_ms", {})
    for handler, ms in report["handler_import_ms"].items():
        where = ", ".join(f"{name} {part:g}" for name, part in parts.get(handler, {}).items())
        imports.add_row(handler, _fmt(ms, 1), where)
    console.print(imports)
    console.print(f"imported with: {report.get('handler_import_interpreter', 'the running interpreter')}")
    console.print(f"wall time: {report['wall_seconds']} s")


def print_scale(report: dict[str, Any]) -> None:
    console = Console(width=200)
    table = Table(title="Scale curve: clinicsync's backfill from an empty CRM (simulated clock at the real limits)")
    for column in (
        "CRM", "seeded", "eligible", "requests", "floor", "× floor", "sim s", "floor s", "× floor time", "503/429",
        "syncer peak MiB", "CPU ms/event", "wall s", "process RSS MiB",
    ):  # fmt: skip
        table.add_column(column)
    for p in report["points"]:
        f = p["figure"]
        table.add_row(
            f["crm"], f"{p['seeded_appointments']:,}", f"{f['appointments']:,}", _fmt(f["crm_requests"], 0),
            _fmt(f["floor_requests"], 0), _fmt(f["ratio_to_floor"]), _fmt(f["sim_seconds_at_rate_limit"], 0),
            _fmt(f["floor_seconds"], 0), _fmt(f["time_ratio_to_floor"]), _fmt(f["refused_503_429"]),
            _fmt(p["syncer_peak_mib"], 1), _fmt(p["cpu_ms_per_event"]), _fmt(p["backfill_wall_seconds"], 1),
            _fmt(p["process_max_rss_mib"], 0),
        )  # fmt: skip
    console.print(table)
    for crm, check in report["linearity"].items():
        lines = [f"{crm}, largest size against smallest ({check['ratio']}):"]
        lines += [f"  {name}: ×{check['ratios'][name]} — {verdict}" for name, verdict in check["verdicts"].items()]
        console.print("\n".join(lines))
    if report["determinism"]:
        console.print(f"two runs, simulated figures identical: {report['determinism']['identical']}")
    console.print(f"wall time: {report['wall_seconds']} s")
