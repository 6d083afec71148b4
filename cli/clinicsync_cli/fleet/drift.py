"""Clinics whose stack is not what the registry says: another release, other parameters, or resources
changed outside CloudFormation (its drift detection, where the account supports it)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from clinicsync.domain.config import parse_clinic_config
from clinicsync_cli.fleet.cells import Cells
from clinicsync_cli.fleet.registry import Fleet, FleetClinic
from clinicsync_cli.fleet.release import release_of
from clinicsync_cli.stack import stack_name

# Parameters the registry and the clinic config decide (secret ARNs and the like are checked by deploy).
_FROM_CONFIG = ("ClinicId", "MisKind", "CrmKind", "PollTimezone", "ConfigParameterName")


@dataclass
class ClinicDrift:
    clinic_id: str
    release: str | None = None
    differences: list[str] = field(default_factory=list)
    cloudformation_drift: str = "not checked"  # "checked", or why it could not be

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_parameters(fleet: Fleet, base: Path, clinic: FleetClinic) -> dict[str, str]:
    config = parse_clinic_config((base / clinic.config).read_text(encoding="utf-8"))
    expected = {
        "ClinicId": config.clinic_id,
        "MisKind": config.mis.kind,
        "CrmKind": config.crm.kind,
        "PollTimezone": config.timezone,
        "ConfigParameterName": f"/clinicsync/{clinic.id}/config",
    }
    if fleet.alarm_topic_arn:
        expected["AlarmTopicArn"] = fleet.alarm_topic_arn
    return {**expected, **clinic.parameters}


def clinic_drift(fleet: Fleet, base: Path, cells: Cells, clinic: FleetClinic, detect: bool = True) -> ClinicDrift:
    found = ClinicDrift(clinic.id)
    cfn = cells.client(clinic.cell, "cloudformation")
    stack = stack_name(clinic.id)
    try:
        described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
    except ClientError:
        found.differences.append("no stack")
        return found
    found.release = release_of(cfn.get_template(StackName=stack, TemplateStage="Original")["TemplateBody"])
    wanted = fleet.target_release(clinic)
    if found.release != wanted:
        found.differences.append(f"release {found.release or 'unknown'}, registry says {wanted}")
    actual = {p["ParameterKey"]: p.get("ParameterValue", "") for p in described.get("Parameters", [])}
    for key, value in sorted(expected_parameters(fleet, base, clinic).items()):
        if (key in actual and actual[key] != value) or (key not in actual and key not in _FROM_CONFIG):
            found.differences.append(f"parameter {key}={actual.get(key, '(unset)')}, registry says {value}")
    if detect:
        found.cloudformation_drift, drifted = _cloudformation_drift(cfn, stack)
        found.differences += drifted
    return found


def _cloudformation_drift(cfn: Any, stack: str) -> tuple[str, list[str]]:
    """CloudFormation's own drift detection: resources edited by hand since the last deploy. An account
    (or emulator) that cannot run it says so instead of reporting a difference."""
    try:
        detection = cfn.detect_stack_drift(StackName=stack)["StackDriftDetectionId"]
        for _ in range(60):
            result = cfn.describe_stack_drift_detection_status(StackDriftDetectionId=detection)
            if result["DetectionStatus"] != "DETECTION_IN_PROGRESS":
                break
            time.sleep(2)
        drifted = cfn.describe_stack_resource_drifts(
            StackName=stack, StackResourceDriftStatusFilters=["MODIFIED", "DELETED"]
        )["StackResourceDrifts"]
    except (ClientError, BotoCoreError, ResponseParserError) as exc:
        code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
        return f"unavailable ({code})", []
    return "checked", [f"{d['LogicalResourceId']} {d['StackResourceDriftStatus'].lower()}" for d in drifted]


def read_drift(fleet: Fleet, base: Path, cells: Cells, detect: bool = True, workers: int = 8) -> list[ClinicDrift]:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(fleet.clinics)))) as pool:
        found = list(pool.map(lambda c: clinic_drift(fleet, base, cells, c, detect), fleet.clinics))
    return sorted(found, key=lambda d: (not d.differences, d.clinic_id))
