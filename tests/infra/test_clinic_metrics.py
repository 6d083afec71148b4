"""Per-clinic observability: every metric carries its clinic, so clinics sharing an account are distinct
series, and every alarm and dashboard row of a clinic's stack watches only that clinic's series."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.metrics import MetricUnit
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.observability import metrics
from sandbox.cfn_yaml import load_template, resolve, resources_of_type

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(ROOT / "template.yaml")
CLINIC_ID = st.from_regex(TEMPLATE["Parameters"]["ClinicId"]["AllowedPattern"], fullmatch=True)

Series = tuple[str, str, frozenset[tuple[str, str]]]


@dataclass
class _Context:
    function_name: str = "clinicsync-x-StageSyncerFunction-AbC"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:eu-central-1:123456789012:function:x"
    memory_limit_in_mb: int = 512
    aws_request_id: str = "r1"


def _series(emf: dict[str, Any]) -> set[Series]:
    found: set[Series] = set()
    for directive in emf["_aws"]["CloudWatchMetrics"]:
        for names in directive["Dimensions"]:
            dims = frozenset((name, str(emf[name])) for name in names)
            found |= {(directive["Namespace"], m["Name"], dims) for m in directive["Metrics"]}
    return found


def _flush(clinic: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> set[Series]:
    """What one invocation of a clinic's function ships to CloudWatch (EMF lines on stdout)."""
    monkeypatch.setenv("CLINIC_ID", clinic)
    capsys.readouterr()
    metrics.add_metric(name="CrmThrottles", unit=MetricUnit.Count, value=1)
    metrics.flush_metrics()
    metrics.provider.add_cold_start_metric(_Context())  # type: ignore[arg-type]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return set().union(*(_series(line) for line in lines if "_aws" in line))


@given(st.lists(CLINIC_ID, min_size=2, max_size=2, unique=True))
def test_two_clinics_metrics_are_distinct_series(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], clinics: list[str]
) -> None:
    first, second = (_flush(clinic, monkeypatch, capsys) for clinic in clinics)
    assert {name for _, name, _ in first} == {"CrmThrottles", "ColdStart"}
    assert first.isdisjoint(second)
    for clinic, series in zip(clinics, (first, second), strict=True):
        for _, name, dims in series:
            assert ("ClinicId", clinic) in dims, name


def _alarm_dimensions(alarm: dict[str, Any], clinic: str) -> frozenset[tuple[str, str]]:
    refs = {"ClinicId": clinic}
    dims = alarm["Properties"].get("Dimensions", [])
    return frozenset((d["Name"], str(resolve(d["Value"], refs=refs, get_att=lambda r, a: f"{r}.{a}"))) for d in dims)


def test_each_clinicsync_alarm_watches_exactly_its_clinics_series(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CloudWatch matches an alarm to a series only when the dimension sets are equal: the alarm's set must
    be the one the code emits for this clinic, and never another clinic's."""
    emitted = {name: dims for _, name, dims in _flush("smile-dental", monkeypatch, capsys)}
    other = {name: dims for _, name, dims in _flush("other-clinic", monkeypatch, capsys)}
    alarms = resources_of_type(TEMPLATE, "AWS::CloudWatch::Alarm")
    own = [a for a in alarms.values() if a["Properties"]["Namespace"] == "clinicsync"]
    assert own
    for alarm in own:
        watched = _alarm_dimensions(alarm, "smile-dental")
        assert watched == emitted["CrmThrottles"], alarm["Properties"]["MetricName"]
        assert watched != other["CrmThrottles"]


def test_each_aws_metric_alarm_watches_a_resource_of_its_own_stack() -> None:
    """AWS/SQS and AWS/Lambda metrics carry no ClinicId; their queue or function is the stack's own."""
    for name, alarm in resources_of_type(TEMPLATE, "AWS::CloudWatch::Alarm").items():
        props = alarm["Properties"]
        if props["Namespace"] == "clinicsync":
            continue
        assert props["Namespace"].startswith("AWS/"), name
        for dimension in props["Dimensions"]:
            value = dimension["Value"]
            target = value.get("Ref") or (value.get("Fn::GetAtt") or [None])[0]
            assert target in TEMPLATE["Resources"], f"{name}: {dimension}"


def test_every_dashboard_metric_row_is_filtered_on_the_clinic() -> None:
    body = TEMPLATE["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    widgets = json.loads(re.sub(r"\$\{([^}]+)\}", r"<\1>", body))["widgets"]
    rows = [row for w in widgets for row in w["properties"].get("metrics", [])]
    own = [row for row in rows if row[0] == "clinicsync"]
    assert own
    for row in own:
        dims = dict(zip(row[2::2], row[3::2], strict=False))
        assert dims.get("ClinicId") == "<ClinicId>", row
    for row in rows:
        assert row[0] in ("clinicsync", "AWS/SQS", "..."), row
