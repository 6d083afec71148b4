"""The clinic's field map: which canonical fields reach the CRM (the minimal payload by default, a case's
preset on request, never a diagnosis) and which CRM field, of which type, each goes to (docs/fields.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from clinicsync.domain.sections import Section

# Canonical field names the field map may send. Diagnoses are not in this list on purpose:
# no configuration can make clinicsync send them.
CONTACT_FIELDS = frozenset(
    {
        "full_name",
        "phone",
        "email",
        "birth_date",
        "sex",
        "mis_patient_id",
        "opt_outs",
        "representative",
        "age",
        "residence",
        "card_comment",
        "patient_status",
        "guarantee_letter",
        "policy_number",
        "policy_valid_until",
        "cancellation_date",
        "card_number",
        "home_address",
        "family",
        "doctors_seen",
    }
)


DEAL_FIELDS = frozenset(
    {
        "visit_at",
        "mis_appointment_id",
        "status",
        "doctor",
        "branch",
        "is_dms",
        "price",
        "booked_by",
        "booked_at",
        "service_codes",
        "comment",
        "assignment_id",
        "patient_status",
        "visit_category",
        "charged",
        "discount",
        "paid",
        "branch_address",
        "visit_type",
        "lead_source",
    }
)


MINIMAL_CONTACT_FIELDS = ("full_name", "phone", "email", "mis_patient_id")


MINIMAL_DEAL_FIELDS = ("visit_at", "mis_appointment_id", "status", "is_dms")


# Presets: the field lists of a clinic case, selected by ``fields.preset``; each still needs its CRM field
# ids (``fields.crm_fields``, proposed by ``clinicsync init``). docs/fields.md has the case tables.
FIELD_PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "minimal": (MINIMAL_CONTACT_FIELDS, MINIMAL_DEAL_FIELDS),
    "infoclinica_amocrm_case_c": (
        (
            "full_name",
            "phone",
            "representative",
            "age",
            "sex",
            "mis_patient_id",
            "birth_date",
            "residence",
            "card_comment",
            "patient_status",
            "email",
            "guarantee_letter",
            "policy_number",
            "policy_valid_until",
            "cancellation_date",
            "opt_outs",
        ),
        (
            "booked_by",
            "booked_at",
            "visit_at",
            "doctor",
            "branch",
            "status",
            "service_codes",
            "comment",
            "mis_appointment_id",
            "assignment_id",
            "patient_status",
            "visit_category",
            "price",
            "charged",
            "discount",
            "paid",
        ),
    ),
    "ident_bitrix24_case_b": (
        (
            "full_name",
            "phone",
            "birth_date",
            "sex",
            "home_address",
            "card_number",
            "family",
            "doctors_seen",
            "card_comment",
        ),
        ("visit_at", "branch_address", "visit_type", "doctor", "lead_source", "is_dms", "status", "mis_appointment_id"),
    ),
}


# A preset's name: one of FIELD_PRESETS, which is also what the schema lists (checked in FieldMap).
PresetName = Annotated[str, WithJsonSchema({"enum": list(FIELD_PRESETS), "type": "string"})]


# Custom fields every clinic may map besides the field lists: the MIS ids and the consent fields.
ALWAYS_CONTACT_FIELDS = frozenset({"mis_patient_id", "opt_outs", "opt_ins"})


ALWAYS_DEAL_FIELDS = frozenset({"mis_appointment_id"})


class CrmField(Section):
    """One CRM custom field: its id and its type in the CRM, which decides the value's shape."""

    id: str = Field(min_length=1, max_length=64, description="amoCRM field id, or Bitrix24 field name (UF_CRM_…)")
    type: str | None = Field(
        default=None,
        pattern=r"^[a-z_]{2,32}$",
        description="The CRM field's type (amoCRM: text, textarea, numeric, checkbox, select, multiselect, date, "
        "birthday, date_time…; Bitrix24: string, integer, double, boolean, date, datetime, money). "
        "Default: the canonical field's natural type (docs/fields.md); `clinicsync check` compares it with the CRM",
    )
    values: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical value -> the CRM's option for list fields, e.g. sex: {m: Мужской, f: Женский}",
    )


def _crm_field_map(value: Any) -> Any:
    """``name: "123"`` is short for ``name: {id: "123"}``."""
    if isinstance(value, dict):
        return {k: {"id": v} if isinstance(v, str | int) else v for k, v in value.items()}
    return value


class EntityCrmFields(Section):
    contact: dict[str, CrmField] = Field(default_factory=dict, description="Canonical contact field -> CRM field")
    deal: dict[str, CrmField] = Field(default_factory=dict, description="Canonical deal field -> CRM field")

    @field_validator("contact", "deal", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return _crm_field_map(value)

    @field_validator("contact", "deal")
    @classmethod
    def _known(cls, value: dict[str, CrmField], info: ValidationInfo) -> dict[str, CrmField]:
        known = {
            "contact": CONTACT_FIELDS | ALWAYS_CONTACT_FIELDS,
            "deal": DEAL_FIELDS | ALWAYS_DEAL_FIELDS,
        }[str(info.field_name)]
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown {info.field_name} fields: {sorted(unknown)}")
        return value


class FieldMap(Section):
    preset: PresetName | None = Field(
        default=None,
        description="A case's field lists (docs/fields.md); `contact`/`deal` given explicitly win over it",
    )
    contact: tuple[str, ...] = MINIMAL_CONTACT_FIELDS
    deal: tuple[str, ...] = MINIMAL_DEAL_FIELDS
    crm_fields: EntityCrmFields = Field(
        default_factory=EntityCrmFields,
        description="Per entity: canonical field -> CRM field id (or Bitrix24 name) and type",
    )
    crm_names: dict[str, str] = Field(
        default_factory=dict,
        description="Legacy flat map, canonical field -> CRM field name for both entities, e.g. is_dms: "
        "UF_CRM_DMS. crm_fields wins over it; a field in both lists needs crm_fields (docs/fields.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_lists(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in FIELD_PRESETS:
            contact, deal = FIELD_PRESETS[data["preset"]]
            given = {k: v for k, v in data.items() if v is not None}  # `contact: null`: the preset's list
            data = {"contact": list(contact), "deal": list(deal), **given}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in FIELD_PRESETS:
            raise ValueError(f"unknown preset {value!r} (known: {', '.join(FIELD_PRESETS)})")
        return value

    @field_validator("contact")
    @classmethod
    def _known_contact_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - CONTACT_FIELDS
        if unknown:
            raise ValueError(f"unknown contact fields: {sorted(unknown)}")
        return value

    @field_validator("deal")
    @classmethod
    def _known_deal_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - DEAL_FIELDS
        if unknown:
            raise ValueError(f"unknown deal fields: {sorted(unknown)}")
        return value

    def crm_field(self, entity: Literal["contact", "deal"], name: str) -> CrmField | None:
        """The CRM field a canonical field of ``entity`` goes to: ``crm_fields`` first, then ``crm_names``."""
        mapped = (self.crm_fields.contact if entity == "contact" else self.crm_fields.deal).get(name)
        if mapped is not None:
            return mapped
        legacy = self.crm_names.get(name)
        return CrmField(id=legacy) if legacy else None

    def shared_legacy_names(self) -> list[str]:
        """Fields in both lists that only the flat ``crm_names`` maps: one id would go to both entities."""
        both = set(self.contact) & set(self.deal)
        return sorted(
            n for n in both if n in self.crm_names and not (n in self.crm_fields.contact and n in self.crm_fields.deal)
        )
