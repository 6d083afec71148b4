"""What each canonical field is, and how its value becomes what a CRM field of a given type takes.

The one place for field typing: the gateways convert with :func:`crm_value`, ``clinicsync check`` asks
:func:`compatible` and ``init`` proposes :func:`default_type`. A value that a field type cannot take raises
:class:`FieldValueError` before anything is sent, so only that patient fails (never the whole bulk request).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

Kind = Literal["text", "date", "datetime", "number", "money", "flag", "list", "choice"]
CrmKind = Literal["amocrm", "bitrix24", "vtiger"]

# Canonical field -> the kind of value the rules produce for it. Unlisted fields are text.
FIELD_KINDS: dict[str, Kind] = {
    "birth_date": "date",
    "policy_valid_until": "date",
    "cancellation_date": "date",
    "visit_at": "datetime",
    "booked_at": "datetime",
    "age": "number",
    "price": "money",
    "charged": "money",
    "discount": "money",
    "paid": "money",
    "guarantee_letter": "flag",
    "is_dms": "flag",
    "service_codes": "list",
    "opt_outs": "list",
    "opt_ins": "list",
    "family": "list",
    "doctors_seen": "list",
    "sex": "choice",
    "status": "choice",
    "patient_status": "choice",
    "visit_category": "choice",
    "visit_type": "choice",
}

# CRM field types that take each kind as such (text types take every kind, rendered as text).
AMOCRM_TEXT = frozenset({"text", "textarea"})
BITRIX24_TEXT = frozenset({"string"})
_NATIVE: dict[str, dict[Kind, frozenset[str]]] = {
    "amocrm": {
        "text": frozenset({"streetaddress"}),
        "date": frozenset({"date", "birthday", "date_time"}),
        "datetime": frozenset({"date_time"}),
        "number": frozenset({"numeric"}),
        "money": frozenset({"numeric", "price", "monetary"}),
        "flag": frozenset({"checkbox"}),
        "list": frozenset({"multiselect"}),
        "choice": frozenset({"select", "radiobutton", "multiselect"}),
    },
    "bitrix24": {
        "text": frozenset({"address"}),
        "date": frozenset({"date", "datetime"}),
        "datetime": frozenset({"datetime"}),
        "number": frozenset({"integer", "double"}),
        "money": frozenset({"double", "money"}),
        "flag": frozenset({"boolean"}),
        "list": frozenset(),
        "choice": frozenset({"enumeration"}),  # `values` maps each canonical value to the option's ID
    },
}
_DEFAULT: dict[str, dict[Kind, str]] = {
    "amocrm": {
        "text": "text",
        "date": "date",
        "datetime": "date_time",
        "number": "numeric",
        "money": "numeric",
        "flag": "checkbox",
        "list": "text",
        "choice": "text",
    },
    "bitrix24": {
        "text": "string",
        "date": "date",
        "datetime": "datetime",
        "number": "double",
        "money": "double",
        "flag": "boolean",
        "list": "string",
        "choice": "string",
    },
}


class FieldValueError(ValueError):
    """A value the mapped CRM field cannot take. Names the field and types only, never the value."""


def kind_of(name: str) -> Kind:
    return FIELD_KINDS.get(name, "text")


def default_type(crm: str, name: str) -> str:
    return _DEFAULT.get(crm, _DEFAULT["amocrm"])[kind_of(name)]


def compatible(crm: str, name: str, field_type: str) -> bool:
    """Whether a CRM field of ``field_type`` can hold the canonical field ``name``."""
    text = AMOCRM_TEXT if crm == "amocrm" else BITRIX24_TEXT
    native = _NATIVE.get(crm)
    return native is None or field_type in text or field_type in native[kind_of(name)]


def accepted_types(crm: str, name: str) -> list[str]:
    text = AMOCRM_TEXT if crm == "amocrm" else BITRIX24_TEXT
    return sorted(_NATIVE.get(crm, {}).get(kind_of(name), frozenset()) | text)


def _day(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _moment(value: Any, tz: tzinfo) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment


def iso_with_minute_offset(moment: datetime) -> str:
    """ISO 8601 with an offset in whole minutes, as Bitrix24 parses it.

    Zones kept local mean time into the 1920s (Vladivostok: +08:47:31), so a birth date's midnight can carry
    seconds in its offset, which ISO 8601 has no place for. The offset is floored to the minute: the instant moves
    later by under a minute, so it stays on the same calendar day in the clinic's zone.
    """
    offset = moment.utcoffset()
    if offset is None or offset % timedelta(minutes=1) == timedelta(0):
        return moment.isoformat()
    whole_minutes = timezone(offset - offset % timedelta(minutes=1))
    return moment.replace(tzinfo=whole_minutes).isoformat()


def _number(value: Any) -> int | float:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("not a number") from None
    if not number.is_finite():
        raise ValueError("not a finite number")
    return int(number) if number == number.to_integral_value() else float(number)


def _text(kind: Kind, value: Any) -> str:
    if kind == "flag":
        return "да" if value else "нет"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _items(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value if str(v)]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def crm_value(
    crm: str, name: str, field_type: str, value: Any, tz: tzinfo, options: Mapping[str, str] | None = None
) -> Any:
    """``value`` (canonical, not None) as a field of ``field_type`` in ``crm`` takes it.

    amoCRM: date, birthday and date_time fields take Unix seconds (a date is midnight in the clinic's
    zone); numbers go as JSON numbers, flags as booleans, multiselect as a list of values.
    Bitrix24: dates and datetimes as ISO 8601 with the clinic's offset, numbers as numbers, flags Y/N.
    ``options`` turns canonical list values into the CRM's options (``sex: m`` -> «Мужской»).
    """
    kind = kind_of(name)
    if options and kind in ("choice", "list"):  # the CRM's own option for each canonical value
        value = (
            [options.get(str(v), str(v)) for v in value]
            if isinstance(value, list | tuple)
            else options.get(str(value), value)
        )
    if not compatible(crm, name, field_type):
        raise FieldValueError(
            f"{name} ({kind}) cannot go to a {crm} {field_type} field; "
            f"use one of {', '.join(accepted_types(crm, name))}"
        )
    try:
        return _convert(crm, kind, field_type, value, tz)
    except (ValueError, TypeError):
        raise FieldValueError(f"{name}: the MIS value is not a valid {kind} for a {crm} {field_type} field") from None


def _convert(crm: str, kind: Kind, field_type: str, value: Any, tz: tzinfo) -> Any:
    text_types = AMOCRM_TEXT if crm == "amocrm" else BITRIX24_TEXT
    if field_type in text_types or kind == "text":
        if kind == "date":
            return _day(value).isoformat()
        return _text(kind, value)
    if kind in ("date", "datetime"):
        moment = datetime.combine(_day(value), time(0, 0), tz) if kind == "date" else _moment(value, tz).astimezone(tz)
        if crm == "amocrm":
            return int(moment.timestamp())
        return iso_with_minute_offset(moment)
    if kind in ("number", "money"):
        number = _number(value)
        if field_type == "integer":
            return int(number)
        if field_type == "money":
            return f"{number}|RUB"
        return number
    if kind == "flag":
        if not isinstance(value, bool):
            raise ValueError("not a flag")
        return value if crm == "amocrm" else ("Y" if value else "N")
    if field_type == "multiselect" or kind == "list":
        return _items(value)
    return str(value)
