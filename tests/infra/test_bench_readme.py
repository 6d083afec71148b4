"""README.md's Performance tables are the recorded run's figures, with verdicts computed from the targets."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.bench import readme


def _recorded() -> dict[str, Any]:
    report: dict[str, Any] = json.loads(readme.RECORD.read_text(encoding="utf-8"))
    return report


def _scale() -> dict[str, Any] | None:
    return json.loads(readme.SCALE_RECORD.read_text(encoding="utf-8")) if readme.SCALE_RECORD.exists() else None


def _row(block: str, target: str) -> str:
    return next(line for line in block.splitlines() if line.startswith(f"| {target} |"))


def test_the_readmes_tables_are_the_recorded_runs_figures() -> None:
    text = readme.README.read_text(encoding="utf-8")
    assert readme.current_block(text) == readme.render(_recorded(), _scale())


def test_a_figure_edited_by_hand_in_the_readme_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = readme.README.read_text(encoding="utf-8")
    block = readme.current_block(edited)
    ours = next(f for f in _recorded()["figures"] if f["contestant"] == "clinicsync" and f["workload"] == "backfill")
    shown = f"| {ours['crm']} | clinicsync | {ours['crm_requests']:,.0f} ("
    assert shown in block
    fake_readme = tmp_path / "README.md"
    fake_readme.write_text(edited.replace(shown, f"| {ours['crm']} | clinicsync | {ours['crm_requests'] - 1:,.0f} ("))
    monkeypatch.setattr(readme, "README", fake_readme)
    assert readme.main(["--check"]) == 1
    fake_readme.write_text(edited)
    assert readme.main(["--check"]) == 0


@pytest.mark.parametrize(
    ("workload", "field", "threshold", "target"),
    [
        ("backfill", "ratio_to_floor", 1.10, "backfill requests ≤ 1.10 × floor"),
        ("backfill", "time_ratio_to_floor", 1.15, "backfill time ≤ 1.15 × floor time"),
        ("steady day", "ratio_to_floor", 1.30, "steady day ≤ 1.30 × floor requests"),
    ],
)
def test_a_ratio_is_met_at_its_threshold_and_short_just_above(
    workload: str, field: str, threshold: float, target: str
) -> None:
    for value, verdict in ((threshold, "met"), (round(threshold + 0.01, 2), "**short**")):
        report = copy.deepcopy(_recorded())
        for f in report["figures"]:
            if f["contestant"] == "clinicsync" and f["workload"] == workload:
                f[field] = value
        assert _row(readme.render(report, None), target).endswith(f"| {verdict} |"), (target, value)


def test_a_crm_short_of_a_target_is_named_in_the_verdict() -> None:
    report = copy.deepcopy(_recorded())
    crms = list(report["ours"])
    for crm in crms:
        report["ours"][crm]["cpu_ms_per_event"] |= {"backfill": 1.5, "steady_day": 1.9}
    report["ours"][crms[-1]]["cpu_ms_per_event"]["steady_day"] = 2.01
    row = _row(readme.render(report, None), "CPU ≤ 2 ms per event")
    assert row.endswith(f"| {crms[0]} met, {crms[-1]} **short** |")


def test_throttling_anywhere_in_our_workloads_is_short() -> None:
    report = copy.deepcopy(_recorded())
    day = next(f for f in report["figures"] if f["contestant"] == "clinicsync" and f["workload"] == "steady day")
    day["refused_503_429"] = 1
    assert "**short**" in _row(readme.render(report, None), "zero 503/429")


def test_the_backfill_is_judged_against_the_fastest_peer_of_its_own_crm() -> None:
    report = copy.deepcopy(_recorded())
    crm = next(iter(report["ours"]))
    ours = next(
        f for f in report["figures"] if (f["crm"], f["contestant"], f["workload"]) == (crm, "clinicsync", "backfill")
    )
    peers = [
        f
        for f in report["figures"]
        if f["crm"] == crm and f["contestant"] != "clinicsync" and f["workload"] == "backfill"
    ]
    assert peers
    for peer in peers:
        peer["sim_seconds_at_rate_limit"] = ours["sim_seconds_at_rate_limit"] + 1
    assert readme._fastest_peer(report, crm).met is True
    peers[-1]["sim_seconds_at_rate_limit"] = ours["sim_seconds_at_rate_limit"] - 1
    assert readme._fastest_peer(report, crm).met is False


def test_a_cpu_figure_the_run_could_not_measure_is_never_met() -> None:
    report = copy.deepcopy(_recorded())
    for crm in report["ours"]:
        report["ours"][crm]["cpu_ms_per_event"] |= {"backfill": None, "steady_day": 1.5}
    row = _row(readme.render(report, None), "CPU ≤ 2 ms per event")
    assert "— (backfill)" in row and row.endswith("| not measured |")
    for crm in report["ours"]:
        report["ours"][crm]["cpu_ms_per_event"]["steady_day"] = 2.5
    assert _row(readme.render(report, None), "CPU ≤ 2 ms per event").endswith("| **short** |")


def test_a_run_with_a_pinned_wall_clock_says_where_it_was_pinned() -> None:
    report = _recorded()
    assert "pinned" not in readme.render(report, None)  # a record from before the pin says nothing of it
    report["wall_clock"] = "2026-12-07T13:46:00+03:00"
    assert "the product's wall clock pinned at 2026-12-07T13:46:00+03:00." in readme.render(report, None)
