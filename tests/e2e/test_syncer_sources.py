"""The stage syncer tells its three queues apart by the ARNs the template configures, never by a name's
suffix: a batch from any other queue is refused whole instead of being read as whatever its name suggests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox.local import LocalClinic

ROOT = Path(__file__).resolve().parents[2]


def _sample(name: str, arn: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((ROOT / "events" / name).read_text(encoding="utf-8"))
    for record in event["Records"]:
        record["eventSourceARN"] = arn
    return event


def test_the_syncer_reads_its_configured_queues_and_refuses_any_other(
    make_clinic: Callable[..., LocalClinic],
) -> None:
    clinic = make_clinic(patients=1, appointments=1, rate_limit=False)
    env = clinic.stack.env
    consent = clinic.stack.invoke(
        "StageSyncerFunction", _sample("stage_syncer_consent_jobs.json", env["CONSENT_QUEUE_ARN"])
    )
    assert consent == {"batchItemFailures": []}
    events = clinic.stack.invoke(
        "StageSyncerFunction", _sample("stage_syncer_crm_events.json", env["CRM_EVENT_QUEUE_ARN"])
    )
    assert events == {"batchItemFailures": []}
    # Another stack's queue, named like ours: nothing of it is read.
    foreign = env["CRM_EVENT_QUEUE_ARN"].replace(clinic.stack.stack_name, "another-stack")
    with pytest.raises(ValueError, match="not configured to read"):
        clinic.stack.invoke("StageSyncerFunction", _sample("stage_syncer_crm_events.json", foreign))
