"""The docs the operators rely on exist, cover what they must, and the generated reference is current."""

from __future__ import annotations

import json
import re
from pathlib import Path

from clinicsync.domain.config import clinic_config_json_schema
from clinicsync_cli.docs import render

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_config_reference_is_generated_from_the_current_schema() -> None:
    schema = json.loads((DOCS / "clinic-config.schema.json").read_text(encoding="utf-8"))
    assert schema == clinic_config_json_schema()
    assert (DOCS / "config-reference.md").read_text(encoding="utf-8") == render(schema), "run `make docs`"
    text = render(schema)
    for key in ("clinic_id", "secret_ref", "requests_per_second", "closed_stages", "crm_names", "link_ttl_days"):
        assert f"`{key}`" in text


def test_the_architecture_has_a_sequence_diagram_per_flow() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    diagrams = re.findall(r"```mermaid\nsequenceDiagram\n(.*?)```", text, re.S)
    headings = re.findall(r"^## (.+)$", text, re.M)
    for flow in ("MIS poll → sync", "CRM webhook", "Unsubscribe", "Catch-up and consent outputs"):
        assert any(flow in h for h in headings)
    assert len(diagrams) >= 4 and all("->>" in d for d in diagrams)


def test_the_runbook_and_the_deploy_guide_cover_the_cases() -> None:
    headings = [h.lower() for h in re.findall(r"^## (.+)$", (DOCS / "runbook.md").read_text(encoding="utf-8"), re.M)]
    for case in ("dlq", "throttling", "revoked token", "rotated secret", "mis outage"):
        assert any(case in h for h in headings), case
    deploy = (DOCS / "deploy.md").read_text(encoding="utf-8")
    for command in (
        "clinicsync init",
        "clinicsync check",
        "clinicsync deploy",
        "clinicsync backfill",
        "clinicsync status",
    ):
        assert command in deploy
