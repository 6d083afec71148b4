"""Bitrix24's stage check: every configured stage exists in its category (matched by id, never by name:
portals rename stages and keep ids); the CRM's won and lost stages count as closed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clinicsync.adapters.bitrix24.client import Command, rows
from clinicsync.domain.config import Pipeline
from clinicsync.domain.crm_ports import PipelineMismatch, missing_stages


def pipeline_reads(pipelines: Mapping[Any, Pipeline]) -> dict[str, Command]:
    commands: dict[str, Command] = {"categories": ("crm.category.list", {"entityTypeId": 2})}
    for name, pipeline in pipelines.items():
        entity = "DEAL_STAGE" if pipeline.category_id == "0" else f"DEAL_STAGE_{pipeline.category_id}"
        commands[f"stages_{name}"] = ("crm.status.list", {"filter": {"ENTITY_ID": entity}})
    return commands


def closed_stages(pipelines: Mapping[Any, Pipeline], result: Mapping[str, Any]) -> frozenset[str]:
    categories = result.get("categories", {})
    known_categories = {
        str(c.get("id")) for c in (categories.get("categories", []) if isinstance(categories, dict) else [])
    }
    problems: list[str] = []
    closed: set[str] = set()
    for name, pipeline in pipelines.items():
        if pipeline.category_id not in known_categories:
            problems.append(f"pipeline {name!r}: category {pipeline.category_id} does not exist in Bitrix24")
            continue
        stages = {str(s.get("STATUS_ID")): s for s in rows(result.get(f"stages_{name}"))}
        closed |= {sid for sid, s in stages.items() if s.get("SEMANTICS") in ("S", "F")}
        problems += missing_stages(name, pipeline, stages, "stage")
    if problems:
        raise PipelineMismatch(problems)
    return frozenset(closed)
