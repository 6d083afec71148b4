from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from clinicsync.domain.config import clinic_config_json_schema, parse_clinic_config
from clinicsync.domain.crypto import KeyedHasher, constant_time_equals
from clinicsync.domain.models import AppointmentStatus
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.statuses import UnknownStatus, canonical_status
from tests.helpers import DEMO_CONFIG


@pytest.mark.parametrize(
    "raw",
    ["+7 916 123-45-67", "89161234567", "9161234567", "8 (916) 123-45-67", "+79161234567", "7-916-123-45-67"],
)
def test_russian_formats_normalise_to_one_e164(raw: str) -> None:
    assert normalise_phone(raw) == "+79161234567"


@pytest.mark.parametrize("raw", [None, "", "   ", "12345", "не указан"])
def test_invalid_phones_are_none(raw: str | None) -> None:
    assert normalise_phone(raw) is None


def test_phone_key_is_keyed_and_stable() -> None:
    a, b = KeyedHasher(b"a" * 32), KeyedHasher(b"b" * 32)
    assert a.phone_key("+79161234567") == a.phone_key("+79161234567")
    assert a.phone_key("+79161234567") != b.phone_key("+79161234567")
    assert "9161234567" not in a.phone_key("+79161234567")


def test_short_hash_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        KeyedHasher(b"short")


def test_constant_time_equals() -> None:
    assert constant_time_equals("abc", "abc")
    assert not constant_time_equals("abd", "abc")
    assert not constant_time_equals(None, "abc")


def test_demo_config_loads_and_schema_exports() -> None:
    config = parse_clinic_config(DEMO_CONFIG.read_text(encoding="utf-8"))
    assert config.pipeline(repeat=True).category_id == "1"
    schema = clinic_config_json_schema()
    assert "mis" in schema["properties"] and "crm" in schema["properties"]
    json.dumps(schema)  # exportable as JSON


def _mutated(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("        cancelled: LOSE\n", "", "cancelled"),
        ("timezone: Europe/Moscow", "timezone: Mars/Olympus", "time zone"),
        ("deal: [visit_at, status, is_dms]", "deal: [visit_at, diagnosis]", "unknown deal fields"),
        ("clinic_id: demo-dental", "clinic_id: Demo Dental!", "clinic_id"),
        ("shards: 4", "shards: 4\nwebhook_password: hunter2", "webhook_password"),
    ],
)
def test_invalid_configs_are_rejected_with_a_clear_error(old: str, new: str, message: str) -> None:
    text = DEMO_CONFIG.read_text(encoding="utf-8")
    with pytest.raises(ValidationError, match=message):
        parse_clinic_config(_mutated(text, old, new))


def test_status_vocabulary_defaults_overrides_and_unknowns() -> None:
    assert canonical_status("medods", "paid") is AppointmentStatus.COMPLETED
    assert canonical_status("medods", "paid", {"paid": AppointmentStatus.ARRIVED}) is AppointmentStatus.ARRIVED
    with pytest.raises(UnknownStatus, match=r"mis\.statuses"):
        canonical_status("medods", "teleported")


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((DEMO_CONFIG.parents[2] / "docs" / "clinic-config.schema.json").read_text(encoding="utf-8"))
    assert committed == clinic_config_json_schema(), "run `make schema` and commit docs/clinic-config.schema.json"


def test_each_crm_gets_its_own_request_budget_unless_set() -> None:
    text = DEMO_CONFIG.read_text(encoding="utf-8")
    assert parse_clinic_config(text).crm.requests_per_second == 2.0
    amo = parse_clinic_config(_mutated(text, "kind: bitrix24", "kind: amocrm")).crm
    # under amoCRM's 7 per second: tests/adapters/test_budget.py
    assert (amo.requests_per_second, amo.burst) == (6.6, 1)
    custom = parse_clinic_config(_mutated(text, "kind: bitrix24", "kind: amocrm\n  burst: 3")).crm
    assert custom.burst == 3


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("25.11.2026", "2026-11-25T00:00:00+03:00"),
        ("25.11.2026 10:30", "2026-11-25T10:30:00+03:00"),
        ("20261125", "2026-11-25T00:00:00+03:00"),
        ("202611251030", "2026-11-25T10:30:00+03:00"),
        ("2026-11-25T10:30:00+05:00", "2026-11-25T08:30:00+03:00"),  # another offset, same instant
        ("2026-11-25T10:30", "2026-11-25T10:30:00+03:00"),  # no offset: the clinic's wall time
        ("1795584600", "2026-11-25T08:30:00+03:00"),  # unix seconds
        (1795584600, "2026-11-25T08:30:00+03:00"),
    ],
)
def test_mis_dates_in_four_shapes_land_in_the_clinic_time_zone(raw: str | int, expected: str) -> None:
    from zoneinfo import ZoneInfo

    from clinicsync.domain.dates import parse_mis_datetime

    assert parse_mis_datetime(raw, ZoneInfo("Europe/Moscow")).isoformat() == expected


@pytest.mark.parametrize("raw", ["", "31.02.2026", "2026/11/25", "tomorrow", "123"])
def test_unknown_date_shapes_are_refused_not_guessed(raw: str) -> None:
    from zoneinfo import ZoneInfo

    from clinicsync.domain.dates import parse_mis_datetime

    with pytest.raises(ValueError, match=r"date|day|month"):
        parse_mis_datetime(raw, ZoneInfo("Europe/Moscow"))
