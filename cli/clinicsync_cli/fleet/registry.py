"""The fleet registry: which clinics exist, where each one's config and secrets come from, which release
each runs, and how a rollout proceeds. One versioned ``fleet.yaml`` file, reviewed in git like code.

``fleet_json_schema()`` exports the JSON Schema (docs/fleet.schema.json) that editors and CI validate with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# The template's ClinicId pattern: the stack name, schedule and table names derive from it.
ClinicSlug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")]
Release = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
AccountId = Annotated[str, StringConstraints(pattern=r"^[0-9]{12}$")]
# Per-stack template parameters an operator may set; the rest come from the clinic config.
TUNABLE_PARAMETERS = frozenset({"PollSchedule", "LogRetentionDays", "SyncerMaxConcurrency", "AlarmTopicArn"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    """A clinic breaches when any of these is exceeded, or when one of its alarms is in ALARM."""

    max_sync_lag_seconds: float = Field(900.0, gt=0, description="Last poll -> CRM write lag")
    max_errors_last_hour: int = Field(20, ge=0)
    max_dead_letters: int = Field(0, ge=0, description="Messages in the clinic's DLQs")
    alarms: bool = Field(True, description="A clinicsync alarm of the clinic in state ALARM is a breach")


class RolloutPolicy(_Strict):
    canary: list[ClinicSlug] = Field(
        default_factory=list, description="Clinics deployed first, alone; empty: the first clinic of the list"
    )
    waves: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.25, 1.0],
        description="Cumulative fractions of the fleet after the canary, e.g. [0.25, 1.0]; the last must be 1.0",
    )
    concurrency: int = Field(4, ge=1, le=50, description="Stacks updated at once within a wave")
    bake_seconds: float = Field(600.0, ge=0, description="Watch each wave this long before the next one")
    poll_seconds: float = Field(60.0, gt=0, description="Health read interval during the bake")
    stack_poll_seconds: float = Field(10.0, gt=0, description="Change set / stack status poll interval")
    api_deployments_per_second: float = Field(
        0.2, gt=0, description="API Gateway CreateDeployment: 1 per 5 s per account (a fixed quota)"
    )
    cfn_calls_per_second: float = Field(2.0, gt=0, description="Our own cap on mutating CloudFormation calls")
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @model_validator(mode="after")
    def _last_wave_is_everyone(self) -> RolloutPolicy:
        if self.waves != sorted(self.waves) or self.waves[-1] != 1.0:
            raise ValueError("waves must be increasing cumulative fractions ending with 1.0")
        return self


class Cell(_Strict):
    """One AWS account (and region) holding up to ``max_clinics`` stacks: the unit past the per-account quotas."""

    account_id: AccountId
    region: str = Field("eu-central-1", pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    role_arn: str | None = Field(
        None, pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$", description="Assumed to deploy; none: ambient"
    )
    artifacts_bucket: str = Field(..., min_length=3, max_length=63, description="Release artifacts in this account")
    max_clinics: int = Field(120, ge=1, description="Capacity, from the account's first wall (docs/fleet.md)")

    @model_validator(mode="after")
    def _role_in_account(self) -> Cell:
        if self.role_arn is not None and f":{self.account_id}:" not in self.role_arn:
            raise ValueError("role_arn must be a role of the cell's own account")
        return self


class FleetClinic(_Strict):
    id: ClinicSlug
    config: Path = Field(..., description="The clinic config (clinic.yaml), relative to fleet.yaml")
    secrets: Path | None = Field(
        None, description="Local credentials file (mis, crm, clinic); none: the secrets are already stored"
    )
    cell: str = Field("default", description="Which cell (account) hosts the stack")
    release: Release | None = Field(None, description="Pin to this release instead of the fleet's")
    parameters: dict[str, str] = Field(default_factory=dict, description="Template parameter overrides")

    @model_validator(mode="after")
    def _tunable_only(self) -> FleetClinic:
        unknown = set(self.parameters) - TUNABLE_PARAMETERS
        if unknown:
            raise ValueError(f"parameters {sorted(unknown)} are not tunable per clinic ({sorted(TUNABLE_PARAMETERS)})")
        return self


class Fleet(_Strict):
    version: Literal[1] = Field(..., description="Registry format version")
    release: Release = Field(..., description="The release every unpinned clinic should run")
    alarm_topic_arn: str = ""
    cells: dict[str, Cell]
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    clinics: list[FleetClinic] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Fleet:
        ids = [c.id for c in self.clinics]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"clinic ids listed twice: {duplicates}")
        for clinic in self.clinics:
            if clinic.cell not in self.cells:
                raise ValueError(f"clinic {clinic.id}: unknown cell {clinic.cell!r}")
        for name, cell in self.cells.items():
            hosted = sum(c.cell == name for c in self.clinics)
            if hosted > cell.max_clinics:
                raise ValueError(f"cell {name} hosts {hosted} clinics, over its max_clinics {cell.max_clinics}")
        unknown = set(self.rollout.canary) - set(ids)
        if unknown:
            raise ValueError(f"canary clinics not in the fleet: {sorted(unknown)}")
        return self

    def clinic(self, clinic_id: str) -> FleetClinic:
        for clinic in self.clinics:
            if clinic.id == clinic_id:
                return clinic
        raise KeyError(clinic_id)

    def target_release(self, clinic: FleetClinic) -> str:
        return clinic.release or self.release

    def waves(self) -> list[list[str]]:
        """Canary first, then the cumulative fractions of the rest (each wave at least one clinic)."""
        ids = [c.id for c in self.clinics]
        if not ids:
            return []
        canary = list(self.rollout.canary) or ids[:1]
        rest = [i for i in ids if i not in canary]
        waves, done = [canary], 0
        for fraction in self.rollout.waves:
            upto = min(len(rest), max(done + 1, math.ceil(fraction * len(rest))))
            if upto > done:
                waves.append(rest[done:upto])
                done = upto
        return waves

    def free_cell(self) -> str | None:
        """The first cell with room for one more clinic (cells fill in the order they are listed)."""
        for name, cell in self.cells.items():
            if sum(c.cell == name for c in self.clinics) < cell.max_clinics:
                return name
        return None


def parse_fleet(text: str) -> Fleet:
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("fleet.yaml must be a YAML mapping")
    return Fleet.model_validate(data)


def load_fleet(path: Path) -> Fleet:
    return parse_fleet(path.read_text(encoding="utf-8"))


def dump_fleet(fleet: Fleet) -> str:
    """The canonical form (defaults left out; comments are not kept by a YAML round trip)."""
    return yaml.safe_dump(fleet.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True)


def fleet_json_schema() -> dict[str, object]:
    return Fleet.model_json_schema()
