"""amoCRM records as this adapter reads them: custom field ids per entity and the values of a row."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import DealMatch

WON, LOST = "142", "143"  # the same in every pipeline


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AmoFields:
    """Custom field ids and row values, shared by the gateway's reads, phone look-up and writes."""

    _config: ClinicConfig

    def _field(self, name: str, entity: str | None = None) -> int | None:
        """A custom field's id; the MIS appointment id is a lead field, the other look-up fields are contacts'."""
        entity = entity or ("deal" if name == "mis_appointment_id" else "contact")
        mapped = self._config.fields.crm_field("deal" if entity == "deal" else "contact", name)
        return int(mapped.id) if mapped is not None and mapped.id.isdigit() else None

    @staticmethod
    def _values(row: Mapping[str, Any], *, code: str | None = None, field_id: int | None = None) -> list[str]:
        out = []
        for field in row.get("custom_fields_values") or []:
            if (code and field.get("field_code") == code) or (field_id and field.get("field_id") == field_id):
                out += [str(v.get("value")) for v in field.get("values") or [] if v.get("value") is not None]
        return out

    def _value(self, row: Mapping[str, Any], field_id: int | None) -> str:
        values = self._values(row, field_id=field_id) if field_id else []
        return values[0] if values else ""


def deal_match(row: Mapping[str, Any]) -> DealMatch:
    status = str(row.get("status_id"))
    return DealMatch(str(row["id"]), str(row.get("pipeline_id")), status, status in (WON, LOST))
