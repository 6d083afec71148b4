"""The dashboard and alarms show only metrics the code really emits, and alarms notify the SNS parameter."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sandbox.cfn_yaml import load_template

ROOT = Path(__file__).resolve().parents[2]


def _emitted() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("functions/*/app.py"), *ROOT.glob("layers/shared/clinicsync/**/*.py")]:
        # Powertools' add_metric, or observe()'s own spellings of it (clinicsync/runtime/observe.py)
        found = re.findall(r'(?:add_metric\(\s*name=|_count\(|Counted\(\{)"(\w+)"', path.read_text(encoding="utf-8"))
        names |= set(found)
    return names


def test_every_dashboard_and_alarm_metric_is_emitted_by_the_code() -> None:
    template = load_template(ROOT / "template.yaml")
    body = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]
    text = body["Fn::Sub"] if isinstance(body, dict) else body
    widgets = json.loads(re.sub(r"\$\{[^}]+\}", "X", text))["widgets"]
    shown = {m[1] for w in widgets for m in w["properties"].get("metrics", []) if m[0] == "clinicsync"}
    titles = " ".join(w["properties"]["title"] for w in widgets).lower()
    for topic in ("sync lag", "events", "crm requests and throttles", "dlq depth", "unsubscribe latency"):
        assert topic in titles
    alarms = {
        r["Properties"]["MetricName"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("Namespace") == "clinicsync"
    }
    emitted = _emitted()
    assert {"SyncLagSeconds", "CrmRequests", "CrmThrottles", "UnsubscribeLatencySeconds"} <= shown
    assert shown - emitted == set() and alarms - emitted == set()
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            assert "AlarmTopicArn" in json.dumps(resource["Properties"]["AlarmActions"])
