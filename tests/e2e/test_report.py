"""`clinicsync report`: the HTML page's funnel matches the CRM, and it renders in headless Chromium (the
screenshot is looked at: its size, that it is not blank, and the funnel's and health chart's colours)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from clinicsync_cli.app import app as cli
from clinicsync_cli.report import COLOURS, HEALTH_COLOUR
from sandbox.local import LocalClinic
from tests.png import colour_counts, hex_rgb, read_png

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"CALL": "Звонок", "WEB": "Веб-сайт"}


def chromium() -> str:
    """`make browser` provides it (the system's, or Debian's debs unpacked into .chromium/); never skipped."""
    result = subprocess.run([str(ROOT / "sandbox" / "browser.sh")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"no headless Chromium: {result.stderr}"
    return result.stdout.strip().splitlines()[-1]


def test_the_report_shows_the_funnel_by_source_and_renders_in_chromium(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path
) -> None:
    clinic = make_clinic(patients=40, appointments=60, rate_limit=False)
    assert clinic.bitrix is not None
    # Leads as the clinic's site and phone line create them; some of these people then book in the MIS.
    phones = [p.phone for p in clinic.sample.patients if p.phone][:12]
    made = {"CALL": 0, "WEB": 0}
    for i, phone in enumerate(phones):
        source = "CALL" if i % 3 == 0 else "WEB"
        clinic.bitrix.manager_create_lead(TITLE="Заявка", NAME="Анна", SOURCE_ID=source, PHONE=[{"VALUE": phone}])
        made[source] += 1
    clinic.sync()
    # Managers close paid treatment as won (the MIS never does).
    completed = [d for d in clinic.crm.deals().values() if d["stage"].endswith("FINAL_INVOICE")][:6]
    for deal in completed:
        clinic.crm.manager_move(deal["id"], clinic.crm.won_stage(deal["category"]))
    assert completed

    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", "--stack", clinic.stack.stack_name, "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html and "http" not in html.split("</style>", 1)[1].replace(
        "http://www.w3.org/2000/svg", ""
    )

    deals = clinic.bitrix.deals
    ours = [d for d in deals.values() if d.get("ORIGINATOR_ID") == "clinicsync"]
    dms = [d for d in ours if d.get("UF_CRM_CS_DMS") in ("Y", "1", 1, True)]
    summary = re.search(r"(\d+) leads → (\d+) booked → (\d+) visited → (\d+) won \((\d+) DMS", result.output)
    assert summary, result.output
    entries, booked, visited, won, excluded = map(int, summary.groups())
    assert excluded == len(dms) and booked == len(ours) - len(dms)
    dms_ids = {str(d["ID"]) for d in dms}
    assert won == sum(1 for d in completed if d["id"] not in dms_ids)  # only managers close deals as won
    assert entries >= booked >= visited >= won
    assert visited > 0
    for source, name in SOURCES.items():
        assert name in html  # the source's own name from the portal
        row = re.search(rf"{name}</div>.*?Lead</span>.*?<span class=value>(\d+)", html, re.S)
        assert row and int(row.group(1)) <= made[source] + sum(1 for d in ours if d.get("SOURCE_ID") == source)
    for patient in clinic.sample.patients[:10]:
        assert patient.surname not in html  # counts only

    shot = tmp_path / "report.png"
    run = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1100,1500", out.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr
    if keep := os.environ.get("CLINICSYNC_KEEP_SCREENSHOT"):
        shutil.copy(shot, keep)
    width, height, pixels = read_png(shot)
    assert (width, height) == (1100, 1500)
    counts = colour_counts(pixels)
    white = counts[(255, 255, 255)]
    assert white < 0.97 * len(pixels) and len(counts) > 50  # not blank: text, bars and the chart
    for step, colour in COLOURS.items():
        assert counts[hex_rgb(colour)] > 250, f"the {step} bars are missing from the screenshot"
    assert counts[hex_rgb(HEALTH_COLOUR)] > 50  # the sync-health chart's bars
