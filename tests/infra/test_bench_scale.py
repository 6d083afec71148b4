"""The scale curve's plumbing at toy sizes (``python -m sandbox.bench --scale``): a well-formed report
whose simulated figures come out the same twice, and no report at all from a backfill that left a deal
out. No timing is asserted: the figures live in ``make bench-scale``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clinicsync.application.sync import Syncer
from sandbox.bench.__main__ import main
from sandbox.bench.scale import LINEAR_WITHIN, linearity, seeded
from sandbox.local import LocalClinic

CRMS = ("bitrix24", "amocrm")
POINT_KEYS = {
    "seeded_appointments",
    "seeded_patients",
    "syncer_invocations",
    "syncer_peak_mib",
    "syncer_invocations_traced",
    "backfill_wall_seconds",
    "process_max_rss_mib",
}
FIGURE_KEYS = {
    "crm_requests",
    "appointments",
    "floor_requests",
    "ratio_to_floor",
    "sim_seconds_at_rate_limit",
    "floor_seconds",
    "time_ratio_to_floor",
    "refused_503_429",
}


pytestmark = pytest.mark.usefixtures("bench_environment_restored")


def test_a_scale_run_twice_writes_a_well_formed_report_with_the_same_simulated_figures(tmp_path: Path) -> None:
    path = tmp_path / "scale.json"
    assert main(["--scale", "30,60", "--twice", "--serial", "--report", str(path)]) == 0
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["determinism"] == {"runs": 2, "identical": True, "differences": []}

    assert {(p["crm"], p["seeded_appointments"]) for p in report["points"]} == {(c, n) for c in CRMS for n in (30, 60)}
    for point in report["points"]:
        assert set(point) >= POINT_KEYS and set(point["figure"]) >= FIGURE_KEYS
        assert point["seeded_patients"] == seeded(point["seeded_appointments"])[0]
        assert 0 < point["figure"]["appointments"] <= point["seeded_appointments"]
        assert point["figure"]["crm_requests"] >= point["figure"]["floor_requests"] > 0
        assert point["syncer_peak_mib"] > 0 and point["syncer_invocations_traced"] >= 1
    for crm in CRMS:
        check = report["linearity"][crm]
        assert [row["seeded_appointments"] for row in check["by_size"]] == [30, 60]
        assert check["ratio"] == "60/30"
        assert (
            set(check["ratios"])
            == set(check["verdicts"])
            >= {
                "requests_per_appointment",
                "time_x_floor_time",
                "syncer_peak_mib",
            }
        )


def _lose_one_deal(clinic: LocalClinic) -> None:
    emulator: Any = clinic.crm.emu  # type: ignore[attr-defined]
    deals = emulator.deals if clinic.crm.kind == "bitrix24" else emulator.leads
    del deals[min(deals)]


@pytest.mark.parametrize("crm", CRMS)
def test_a_backfill_that_leaves_a_deal_out_fails_the_scale_run_with_no_report(
    crm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_backfill = LocalClinic.backfill

    def backfill_losing_a_deal(clinic: LocalClinic, days: int = 90) -> Any:
        summary = real_backfill(clinic, days)
        _lose_one_deal(clinic)
        return summary

    monkeypatch.setattr(LocalClinic, "backfill", backfill_losing_a_deal)
    path = tmp_path / "scale.json"
    assert main(["--scale", "30", "--serial", "--crm", crm, "--report", str(path)]) == 2
    assert not path.exists()


def test_a_backfill_whose_syncer_message_failed_and_was_retried_fails_the_scale_run_with_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retried requests would make the figure depend on the machine (on a loaded one, the emulators'
    answers can outlast the client's wall-clock timeouts): such a run gives no figure even if it completes."""
    real_sync = Syncer.sync
    failures = iter([True])

    def sync_failing_once(self: Syncer, *args: Any, **kwargs: Any) -> Any:
        if next(failures, False):
            raise TimeoutError("the CRM's answer outlasted the read timeout")
        return real_sync(self, *args, **kwargs)

    monkeypatch.setattr(Syncer, "sync", sync_failing_once)
    path = tmp_path / "scale.json"
    assert main(["--scale", "30", "--serial", "--crm", "bitrix24", "--report", str(path)]) == 2
    assert not path.exists()
    assert next(failures, None) is None  # the failure was injected


def _point(crm: str, seeded_appointments: int, eligible: int, requests: float, peak: float) -> dict[str, Any]:
    floor = eligible / 50
    figure = {
        "appointments": eligible,
        "crm_requests": requests,
        "ratio_to_floor": requests / floor,
        "time_ratio_to_floor": requests / floor,
    }
    return {
        "crm": crm,
        "seeded_appointments": seeded_appointments,
        "figure": figure,
        "syncer_peak_mib": peak,
        "cpu_ms_per_event": 2.0,
        "backfill_wall_seconds": eligible / 100,
    }


def test_linearity_compares_the_largest_size_per_appointment_with_the_smallest() -> None:
    points = [
        _point("bitrix24", 50_000, 45_000, 900.0, 30.0),  # given in any order
        _point("bitrix24", 1_000, 900, 18.0, 29.0),
        _point("amocrm", 1_000, 900, 18.0, 20.0),
        _point("amocrm", 50_000, 45_000, 900.0 * LINEAR_WITHIN * 2, 60.0),
    ]
    check = linearity(points)
    linear, worse = check["bitrix24"], check["amocrm"]
    assert linear["ratio"] == worse["ratio"] == "50,000/1,000"
    assert [row["seeded_appointments"] for row in linear["by_size"]] == [1_000, 50_000]
    assert linear["ratios"]["requests_per_appointment"] == 1.0
    assert linear["verdicts"]["requests_per_appointment"] == "linear"
    assert linear["verdicts"]["syncer_peak_mib"] == "bounded"
    assert linear["verdicts"]["cpu_ms_per_event"] == linear["verdicts"]["time_x_floor_time"] == "linear"
    assert worse["verdicts"]["requests_per_appointment"].startswith("super-linear")
    assert worse["verdicts"]["requests_x_floor"].startswith("super-linear")
    assert worse["verdicts"]["syncer_peak_mib"].startswith("grows with the clinic")
