"""The benchmark's plumbing at toy sizes: it runs every contestant on both CRMs, twice, and writes a
well-formed report whose simulated figures came out the same both times. It proves nothing about speed
and asserts no timing (the figures live in `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.bench.__main__ import main

WORKLOADS = {"backfill", "empty poll", "single change", "steady day"}
CONTESTANTS = {
    "bitrix24": {"clinicsync", "fast_bitrix24", "per-record loop"},
    "amocrm": {"clinicsync", "amocrm-api"},
}
FIGURE_KEYS = {
    "crm_requests",
    "requests_per_appointment",
    "floor_requests",
    "ratio_to_floor",
    "sim_seconds_at_rate_limit",
    "floor_seconds",
    "time_ratio_to_floor",
    "refused_503_429",
}


pytestmark = pytest.mark.usefixtures("bench_environment_restored")


def test_a_reduced_bench_run_twice_writes_a_well_formed_report_with_the_same_simulated_figures(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.json"
    assert main(["--smoke", "--twice", "--report", str(path)]) == 0
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["determinism"] == {"runs": 2, "identical": True, "differences": []}

    seen = {(f["crm"], f["contestant"], f["workload"]) for f in report["figures"]}
    for crm, contestants in CONTESTANTS.items():
        assert {(crm, c, w) for c in contestants for w in WORKLOADS} <= seen
    for figure in report["figures"]:
        assert set(figure) >= FIGURE_KEYS
        assert figure["crm_requests"] >= 0 and figure["refused_503_429"] >= 0
    for crm in CONTESTANTS:
        ours = report["ours"][crm]
        assert {"backfill", "steady_day"} <= set(ours["cpu_ms_per_event"])
        assert ours["syncer_peak_mib"] is None  # not traced here (CPU per event counts every invocation)
        extra = ours["backfill_contacts_without_visits"]
        assert extra["contacts"] >= 0 and extra["ratio_to_that_floor"] > 0
        assert {"p95", "processing_p95", "poll_interval"} <= set(ours["mis_to_crm_seconds"])
        assert ours["unsubscribe_to_crm_seconds"]["samples"] >= 1
        assert ours["aws_cost_per_10k_appointments_month"]["total_usd"] >= 0
    burst = report["ours"]["bitrix24"]["webhook_burst"]
    assert burst["sent"] == burst["acknowledged"] and burst["none_lost"] is True
    assert set(report["handler_import_ms"]) == {"mis_poller", "stage_syncer", "crm_webhook", "unsubscribe"}
    assert all(ms > 0 for ms in report["handler_import_ms"].values())
    parts = report["handler_import_by_package_ms"]
    assert set(parts) == set(report["handler_import_ms"])
    # self times per package add up to no more than the handler's whole import
    assert all(0 < sum(parts[h].values()) <= report["handler_import_ms"][h] for h in parts)
    assert report["handler_import_interpreter"]
