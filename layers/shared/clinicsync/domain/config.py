"""The clinic's configuration: one YAML file per clinic, validated here, stored in SSM when deployed
(as JSON, ``stored_config``, so a function's cold start never loads a YAML parser).

Secrets never appear in it; connections name a secret by reference (an ARN or a local name).
``clinic_config_json_schema()`` exports the JSON Schema that editors and the docs use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from clinicsync.domain.fieldmap import FieldMap
from clinicsync.domain.models import AppointmentStatus
from clinicsync.domain.sections import Section

SecretRef = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
StageId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class MisConnection(Section):
    kind: Literal["medods", "infoclinica", "renovatio", "ident", "lis"]
    base_url: str = Field(description="API root of the MIS, e.g. https://clinic.medods.ru/api/v2")
    secret_ref: SecretRef = Field(description="Secrets Manager ARN/name holding the MIS credentials")
    statuses: dict[str, AppointmentStatus] = Field(
        default_factory=dict,
        description="MIS status -> canonical status. Merged over the MIS kind's documented defaults.",
    )
    page_size: int = Field(default=100, ge=1, le=500)
    overlap_seconds: int = Field(default=120, ge=0, description="Cursor feeds re-read this much history")
    poll_page_records: int = Field(
        default=5000,
        ge=1,
        le=50_000,
        description="MEDODS: records one poll page reads before its changes are queued and its cursor stored",
    )
    first_poll_days: int | None = Field(
        default=None,
        ge=1,
        le=730,
        description="MEDODS: the first poll (no stored cursor) reads only this many days of changes, older "
        "history being left to `clinicsync backfill`'s window; unset, it reads every record the MIS has",
    )
    no_show_grace_minutes: int = Field(
        default=120,
        ge=0,
        le=7 * 24 * 60,
        description="IDENT: a booked visit with no reception this long after its end counts as a no-show",
    )


class Pipeline(Section):
    category_id: str = Field(description="CRM pipeline id (Bitrix24 CATEGORY_ID, amoCRM pipeline_id)")
    stages: dict[AppointmentStatus, StageId]
    closed_stages: frozenset[StageId] = Field(
        default_factory=frozenset, description="Won and lost stages: a deal there is never moved again"
    )
    continue_stages: frozenset[StageId] | None = Field(
        default=None,
        description="Open stages whose deal a new booking of the same patient continues (a re-booked "
        "no-show updates its deal, no second one). Default: the no_show stage; [] turns the rule off",
    )

    @model_validator(mode="after")
    def _every_status_mapped(self) -> Pipeline:
        missing = set(AppointmentStatus) - set(self.stages)
        if missing:
            names = ", ".join(sorted(s.value for s in missing))
            raise ValueError(f"stage map has no stage for: {names}")
        if self.continue_stages and self.continue_stages & self.closed_stages:
            raise ValueError("continue_stages must be open stages: a closed deal is never reopened")
        return self

    @property
    def continuing_stages(self) -> frozenset[str]:
        """Stages a re-booking continues; closed stages never do, whatever the config says."""
        stages = self.continue_stages
        if stages is None:
            stages = frozenset({self.stages[AppointmentStatus.NO_SHOW]})
        return stages - self.closed_stages


class Matching(Section):
    default_region: str = Field(default="RU", pattern=r"^[A-Z]{2}$", description="Region for national numbers")
    adopt_open_leads: bool = True
    adopt_lead_statuses: tuple[str, ...] = Field(
        default=("NEW", "IN_PROCESS"), description="Lead statuses a booking may adopt (Bitrix24 STATUS_ID)"
    )
    adopt_deal_stages: tuple[str, ...] = Field(
        default=("NEW", "C1:NEW"), description="Open deal stages a booking may adopt when found by phone"
    )
    converted_lead_status: str = Field(default="CONVERTED", description="Status an adopted lead is closed with")


class Filters(Section):
    branches: frozenset[str] | None = Field(default=None, description="Only these branch ids; null = all")
    doctors: frozenset[str] | None = None
    refused_processing: Literal["skip", "send_without_marketing"] = Field(
        default="skip",
        description="Patients who refused data processing in the MIS: never sent (default), or sent with "
        "every marketing channel opted out",
    )
    skip_anonymous: bool = True


# (requests per second, burst) per CRM kind, close under each CRM's limit so a backfill runs near the floor's
# time, with a margin for requests that reach the CRM after their shared slot (tests/adapters/test_budget.py):
# Bitrix24's bucket of 50 draining 2/s: 48 (1 s of lateness); amoCRM's 7 in any second: in any second a
# leaky bucket admits fewer than burst + rate × (1 + lateness), so burst 1 and 6.6/s (60 ms of lateness).
CRM_BUDGETS: dict[str, tuple[float, int]] = {"bitrix24": (2.0, 48), "amocrm": (6.6, 1), "vtiger": (5.0, 5)}


class CrmConnection(Section):
    kind: Literal["bitrix24", "amocrm", "vtiger"]
    secret_ref: SecretRef = Field(description="Secrets Manager ARN/name holding the webhook URL or OAuth pair")
    originator_id: str = Field(default="clinicsync", description="Marks records we own (ORIGINATOR_ID)")
    requests_per_second: float = Field(
        default=CRM_BUDGETS["bitrix24"][0],
        gt=0,
        le=50,
        description="The CRM's sustained request budget (default per CRM kind)",
    )
    burst: int = Field(
        default=CRM_BUDGETS["bitrix24"][1],
        ge=1,
        le=250,
        description="Requests allowed back to back (default per CRM kind)",
    )
    shared_budget: bool = Field(
        default=True, description="Pace all concurrent syncers together through a DynamoDB leaky bucket"
    )
    pipelines: dict[Literal["primary", "repeat"], Pipeline] = Field(
        default_factory=dict, description="Deal pipelines; vTiger (the lab's directory) has none"
    )

    @model_validator(mode="before")
    @classmethod
    def _budget_defaults(cls, data: Any) -> Any:
        """Each CRM's own limits (see CRM_BUDGETS): Bitrix24 drains 2 req/s from a bucket of 50; amoCRM
        allows 7 in any sliding second."""
        if isinstance(data, dict):
            rate, burst = CRM_BUDGETS.get(str(data.get("kind")), CRM_BUDGETS["bitrix24"])
            data = {"requests_per_second": rate, "burst": burst, **data}
        return data

    @model_validator(mode="after")
    def _primary_pipeline(self) -> CrmConnection:
        if "primary" not in self.pipelines and self.kind != "vtiger":
            raise ValueError("crm.pipelines needs a 'primary' pipeline")
        return self


AudienceField = Literal["city", "visit_type", "last_visit", "specialty", "branch"]
DEFAULT_MERGE_TAGS: dict[AudienceField, str] = {
    "city": "CITY",
    "visit_type": "VISITTYPE",
    "last_visit": "LASTVISIT",
    "specialty": "SPECIALTY",
    "branch": "BRANCH",
}


class MailchimpConnection(Section):
    """The clinic's Mailchimp audience. The API key and the webhook secret are in the clinic secret
    (``mailchimp_api_key``, ``mailchimp_webhook_secret``); the key's ``-usNN`` suffix names the host."""

    list_id: str = Field(pattern=r"^[A-Za-z0-9]{1,32}$", description="Audience (list) id")
    base_url: str | None = Field(default=None, description="API root override (tests); default from the key")
    merge_fields: dict[AudienceField, str] = Field(
        default_factory=lambda: dict(DEFAULT_MERGE_TAGS),
        description="Segmentation field -> Mailchimp merge tag; leave one out to not send it",
    )


class ConsentSettings(Section):
    link_base_url: str | None = Field(
        default=None, description="Public HTTPS root of the stack's HTTP API, for List-Unsubscribe links"
    )
    link_ttl_days: int | None = Field(
        default=None, ge=1, le=3650, description="One-click links expire after this many days; null = never"
    )
    mailto: str | None = Field(default=None, description="Optional mailto: address in List-Unsubscribe")


DirectoryField = Literal["first_name", "last_name", "specialty", "region", "city", "phone", "email", "name", "org_type"]
DOCTOR_MERGE_TAGS: dict[str, str] = {
    "first_name": "FNAME",
    "last_name": "LNAME",
    "specialty": "SPECIALTY",
    "region": "REGION",
    "city": "CITY",
}
ORGANISATION_MERGE_TAGS: dict[str, str] = {"name": "ORGNAME", "org_type": "ORGTYPE", "region": "REGION", "city": "CITY"}


VtigerCustomField = Literal["lis_id", "specialty", "org_type"]


def _vtiger_custom_fields() -> dict[VtigerCustomField, str]:
    return {"lis_id": "cf_lis_id", "specialty": "cf_specialty", "org_type": "cf_org_type"}


class DirectoryAudiences(Section):
    """The lab's two Mailchimp audiences (the API key is ``mailchimp_api_key`` in the clinic secret)."""

    doctors_list_id: str = Field(pattern=r"^[A-Za-z0-9]{1,32}$", description="Audience of referring doctors")
    organisations_list_id: str = Field(pattern=r"^[A-Za-z0-9]{1,32}$", description="Audience of funds and clinics")
    doctors_base_url: str | None = Field(default=None, description="API root override (tests)")
    organisations_base_url: str | None = Field(default=None, description="API root override (tests)")
    doctor_merge_fields: dict[str, str] = Field(
        default_factory=lambda: dict(DOCTOR_MERGE_TAGS), description="Directory field -> merge tag"
    )
    organisation_merge_fields: dict[str, str] = Field(
        default_factory=lambda: dict(ORGANISATION_MERGE_TAGS), description="Directory field -> merge tag"
    )


class DirectorySettings(Section):
    """The lab case: the LIS's registers of referring doctors and of funds/clinics, two-way with vTiger
    (only records with a LIS id flow back), one-way into Mailchimp audiences."""

    field_owners: dict[DirectoryField, Literal["lis", "crm"]] = Field(
        default_factory=dict,
        description="Who wins when both sides changed a field since the last sync; unlisted fields: the LIS",
    )
    vtiger_fields: dict[VtigerCustomField, str] = Field(
        default_factory=_vtiger_custom_fields,
        description="vTiger custom fields (cf_NNN) holding the LIS id, the specialty and the fund/clinic type",
    )
    page_size: int = Field(default=100, ge=1, le=100, description="VTQL returns at most 100 rows per query")
    mailchimp: DirectoryAudiences | None = None

    def owner(self, field: str) -> Literal["lis", "crm"]:
        return self.field_owners.get(field, "lis")  # type: ignore[call-overload, no-any-return]


# The clinic id names the stack and its resources: the template's ClinicId AllowedPattern is this very
# pattern (tests/infra/test_deploy_custody.py compares them), so a config that validates here deploys.
CLINIC_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$"
CLINIC_ID_MAX_LENGTH = 40


class ClinicConfig(Section):
    clinic_id: str = Field(pattern=CLINIC_ID_PATTERN, max_length=CLINIC_ID_MAX_LENGTH)
    timezone: str = "Europe/Moscow"
    mis: MisConnection
    crm: CrmConnection
    fields: FieldMap = FieldMap()
    matching: Matching = Matching()
    filters: Filters = Filters()
    mailchimp: MailchimpConnection | None = Field(default=None, description="Mailchimp audience sync; null = off")
    consent: ConsentSettings = ConsentSettings()
    directory: DirectorySettings | None = Field(
        default=None, description="Lab directory sync (LIS doctors and organisations with vTiger); null = off"
    )
    shards: int = Field(default=4, ge=1, le=256, description="FIFO message groups; a patient stays in one")
    patients_per_message: int = Field(default=50, ge=1, le=200, description="Incremental polls: patients per message")
    bulk_patients_per_message: int = Field(
        default=200,
        ge=1,
        le=200,
        description="Resync and first import: patients per message, so an invocation (10 messages) fills CRM batches",
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _per_entity_ids(self) -> ClinicConfig:
        # amoCRM field ids belong to one entity: a flat id sent in both payloads is refused for the whole
        # bulk request (400 NotSupportedChoice), so this is a config error, with the migration to make.
        shared = self.fields.shared_legacy_names() if self.crm.kind == "amocrm" else []
        if shared:
            moves = "; ".join(
                f"fields.crm_fields.contact.{n}: <contact field id> and fields.crm_fields.deal.{n}: <lead field id>"
                for n in shared
            )
            raise ValueError(
                f"fields.crm_names maps {', '.join(shared)} for both contacts and deals, but amoCRM field ids "
                f"are per entity: remove them from crm_names and set {moves} (docs/fields.md)"
            )
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def pipeline(self, repeat: bool) -> Pipeline:
        return (
            self.crm.pipelines.get("repeat", self.crm.pipelines["primary"])
            if repeat
            else (self.crm.pipelines["primary"])
        )

    def with_crm_closed_stages(self, crm_closed: frozenset[str]) -> ClinicConfig:
        """The CRM's won and lost stages (``CrmGateway.verify_pipelines``) count as closed in every
        pipeline, whatever the config lists: a deal there is never moved again."""
        pipelines = {
            name: p.model_copy(update={"closed_stages": p.closed_stages | crm_closed})
            for name, p in self.crm.pipelines.items()
        }
        return self.model_copy(update={"crm": self.crm.model_copy(update={"pipelines": pipelines})})


def parse_clinic_config(text: str) -> ClinicConfig:
    """The operator's YAML file, or the JSON a deploy stores in SSM (a stack deployed before JSON was
    stored keeps its YAML there until its next deploy)."""
    data = _document(text)
    if not isinstance(data, dict):
        raise ValueError("clinic config must be a YAML mapping")
    return ClinicConfig.model_validate(data)


def stored_config(text: str) -> str:
    """The config as a deploy stores it in SSM: the operator's document as compact JSON, which reads back
    as the same config (checked here), parsed by the functions with the stdlib's json."""
    config = parse_clinic_config(text)  # a file that does not validate is refused as it is
    try:
        stored = json.dumps(_document(text), ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError("the clinic config holds a value JSON cannot store; quote it") from exc
    if parse_clinic_config(stored) != config:
        raise ValueError("the clinic config reads differently as JSON; quote its values")
    return stored


def _document(text: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass  # a YAML flow mapping
    import yaml  # the operator's file (the CLI); a deployed function reads the stored JSON

    return yaml.safe_load(text)


def load_clinic_config(path: str | Path) -> ClinicConfig:
    return parse_clinic_config(Path(path).read_text(encoding="utf-8"))


def clinic_config_json_schema() -> dict[str, object]:
    return ClinicConfig.model_json_schema()
