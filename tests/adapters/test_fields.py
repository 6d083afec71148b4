"""Field maps per entity and typed per CRM field (issue 17, part A): each entity gets its own field ids,
values take the shape of the CRM field's type, and a value the CRM refuses fails only its patient."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from clinicsync.adapters.amocrm.client import AmoCrmClient, AmoCrmError
from clinicsync.adapters.amocrm.gateway import AmoCrmGateway
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import ContactWrite, DealWrite
from clinicsync.domain.fieldmap import FIELD_PRESETS
from clinicsync.domain.fieldtypes import FieldValueError, crm_value
from clinicsync.domain.models import AppointmentStatus
from clinicsync_cli.discovery import CrmDiscovery, check_fields, propose_fields
from clinicsync_cli.discovery import CrmField as LiveField
from sandbox.emulators.amocrm import (
    CONTACT_FIELD_BIRTHDAY,
    CONTACT_FIELD_MIS_PATIENT_ID,
    LEAD_FIELD_APPOINTMENT_AT,
    LEAD_FIELD_MIS_APPOINTMENT_ID,
    MAIN_PIPELINE_ID,
    STATUS_BOOKED,
    AmoCrmEmulator,
)
from sandbox.emulators.base import ServedApp
from tests.adapters.test_amocrm_gateway import FAST, _session, _store
from tests.helpers import demo_config

MOSCOW = ZoneInfo("Europe/Moscow")
IDS = {
    "contact": {"mis_patient_id": str(CONTACT_FIELD_MIS_PATIENT_ID)},
    "deal": {"mis_appointment_id": str(LEAD_FIELD_MIS_APPOINTMENT_ID)},
}


def amo_config(fields: dict[str, Any]) -> ClinicConfig:
    data = demo_config().model_dump(mode="json")
    stages = {s.value: str(STATUS_BOOKED) for s in AppointmentStatus}
    data["crm"] = {
        "kind": "amocrm",
        "secret_ref": "clinicsync/test/crm",
        "pipelines": {"primary": {"category_id": str(MAIN_PIPELINE_ID), "stages": stages}},
    }
    data["fields"] = fields
    return ClinicConfig.model_validate(data)


@pytest.fixture
def amo() -> Iterator[tuple[AmoCrmEmulator, AmoCrmClient]]:
    emulator = AmoCrmEmulator()
    server = ServedApp(emulator).start()
    yield emulator, AmoCrmClient(_session(_store(emulator, server.base_url)), httpx.Client(), FAST)
    server.stop()


def _custom(client: AmoCrmClient, entity: str, crm_id: str) -> dict[int, list[Any]]:
    """A record's custom fields as amoCRM's own API returns them: field id -> values."""
    row = client.request("GET", f"/api/v4/{entity}/{crm_id}")
    return {f["field_id"]: [v["value"] for v in f["values"]] for f in row.get("custom_fields_values") or []}


def _visit(pid: str, aid: str, fields: dict[str, Any]) -> list[ContactWrite | DealWrite]:
    contact = ContactWrite(
        pid, None, {"full_name": {"last": "Тестова", "first": "Ая", "middle": ""}, **fields.get("contact", {})}
    )
    deal = DealWrite(
        aid, pid, None, str(MAIN_PIPELINE_ID), str(STATUS_BOOKED), {"title": "Приём", **fields.get("deal", {})}
    )
    return [contact, deal]


def test_a_field_in_both_lists_goes_to_each_entitys_own_amocrm_field(amo: tuple[AmoCrmEmulator, AmoCrmClient]) -> None:
    emulator, client = amo
    contact_status = emulator.add_custom_field("contacts", "Статус пациента")
    lead_status = emulator.add_custom_field("leads", "Статус пациента")
    config = amo_config(
        {
            "preset": "infoclinica_amocrm_case_c",
            "crm_fields": {
                "contact": {**IDS["contact"], "patient_status": str(contact_status)},
                "deal": {**IDS["deal"], "patient_status": str(lead_status)},
            },
        }
    )
    assert "patient_status" in config.fields.contact and "patient_status" in config.fields.deal
    writes = _visit("p1", "a1", {"contact": {"patient_status": "ВИП"}, "deal": {"patient_status": "первичный"}})
    outcome = AmoCrmGateway(client, config).apply(writes)
    assert outcome.failed == {}
    assert _custom(client, "contacts", outcome.contact_ids["p1"])[contact_status] == ["ВИП"]
    assert _custom(client, "leads", outcome.deal_ids["a1"])[lead_status] == ["первичный"]


def test_a_flat_amocrm_id_for_a_field_in_both_lists_is_refused_with_the_migration() -> None:
    with pytest.raises(ValidationError, match=r"crm_fields\.contact\.patient_status.*crm_fields\.deal\.patient_status"):
        amo_config({"preset": "infoclinica_amocrm_case_c", "crm_names": {"patient_status": "900"}})
    # A flat map with no field in both lists keeps working (existing configs).
    legacy = amo_config({"crm_names": {"mis_patient_id": "500", "mis_appointment_id": "501", "is_dms": "7"}})
    assert legacy.fields.crm_field("deal", "is_dms") is not None


def test_dates_reach_amocrm_date_fields_as_unix_time(amo: tuple[AmoCrmEmulator, AmoCrmClient]) -> None:
    _, client = amo
    config = amo_config(
        {
            "contact": ["full_name", "birth_date"],
            "deal": ["visit_at", "booked_at"],
            "crm_fields": {
                "contact": {**IDS["contact"], "birth_date": {"id": str(CONTACT_FIELD_BIRTHDAY), "type": "birthday"}},
                "deal": {**IDS["deal"], "booked_at": {"id": str(LEAD_FIELD_APPOINTMENT_AT), "type": "date_time"}},
            },
        }
    )
    booked = datetime(2026, 11, 30, 17, 45, tzinfo=MOSCOW)
    writes = _visit("p1", "a1", {"contact": {"birth_date": "2015-03-09"}, "deal": {"booked_at": booked.isoformat()}})
    outcome = AmoCrmGateway(client, config).apply(writes)
    assert outcome.failed == {}
    midnight = datetime.combine(date(2015, 3, 9), time(0, 0), MOSCOW)
    assert _custom(client, "contacts", outcome.contact_ids["p1"])[CONTACT_FIELD_BIRTHDAY] == [int(midnight.timestamp())]
    assert _custom(client, "leads", outcome.deal_ids["a1"])[LEAD_FIELD_APPOINTMENT_AT] == [int(booked.timestamp())]


def test_a_value_amocrm_refuses_fails_only_that_patient(amo: tuple[AmoCrmEmulator, AmoCrmClient]) -> None:
    emulator, client = amo
    category = emulator.add_custom_field("leads", "Категория приема", "select", enums=["первичный", "повторный"])
    config = amo_config(
        {
            "deal": ["visit_category"],
            "crm_fields": {
                "contact": IDS["contact"],
                "deal": {**IDS["deal"], "visit_category": {"id": str(category), "type": "select"}},
            },
        }
    )
    writes = [
        *_visit("p1", "a1", {"deal": {"visit_category": "первичный"}}),
        *_visit("p2", "a2", {"deal": {"visit_category": "консультация"}}),  # no such option in the CRM
        *_visit("p3", "a3", {"deal": {"visit_category": "повторный"}}),
    ]
    outcome = AmoCrmGateway(client, config).apply(writes)
    assert set(outcome.failed) == {"p2"}
    assert "NotSupportedChoice" in outcome.failed["p2"] and f"visit_category ({category})" in outcome.failed["p2"]
    assert {a: _custom(client, "leads", outcome.deal_ids[a])[category] for a in ("a1", "a3")} == {
        "a1": ["первичный"],
        "a3": ["повторный"],
    }


def test_a_value_its_field_type_cannot_take_fails_only_that_patient_before_sending(
    amo: tuple[AmoCrmEmulator, AmoCrmClient],
) -> None:
    emulator, client = amo
    paid = emulator.add_custom_field("leads", "Оплачено", "numeric")
    config = amo_config(
        {"deal": ["paid"], "crm_fields": {"contact": IDS["contact"], "deal": {**IDS["deal"], "paid": str(paid)}}}
    )
    writes = [*_visit("p1", "a1", {"deal": {"paid": "1500.50"}}), *_visit("p2", "a2", {"deal": {"paid": "half"}})]
    outcome = AmoCrmGateway(client, config).apply(writes)
    assert outcome.failed == {
        "p2": "invalid_field: paid: the MIS value is not a valid money for a amocrm numeric field"
    }
    assert _custom(client, "leads", outcome.deal_ids["a1"])[paid] == ["1500.5"]


def test_the_case_c_preset_lists_all_sixteen_contact_and_sixteen_deal_fields() -> None:
    contact, deal = FIELD_PRESETS["infoclinica_amocrm_case_c"]
    assert (len(set(contact)), len(set(deal))) == (16, 16)
    assert demo_config().fields.contact == ("full_name", "phone", "email")  # the minimal payload stays the default


ZONES = st.sampled_from([ZoneInfo(z) for z in ("Europe/Moscow", "Asia/Vladivostok", "Europe/Kaliningrad", "UTC")])


@given(day=st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)), tz=ZONES)
def test_a_date_is_midnight_in_the_clinics_zone_on_both_crms(day: date, tz: ZoneInfo) -> None:
    midnight = datetime.combine(day, time(0, 0), tz)
    for field_type in ("date", "birthday", "date_time"):
        assert crm_value("amocrm", "birth_date", field_type, day.isoformat(), tz) == int(midnight.timestamp())
    written = datetime.fromisoformat(crm_value("bitrix24", "birth_date", "date", day.isoformat(), tz))
    # Compare instants: == between zones is False for a midnight in a transition gap (PEP 495).
    assert timedelta(0) <= written.astimezone(UTC) - midnight.astimezone(UTC) < timedelta(minutes=1)
    assert written.astimezone(tz).date() == day
    assert written.utcoffset() == _floored_to_minute(midnight.utcoffset())
    assert crm_value("amocrm", "birth_date", "text", day.isoformat(), tz) == day.isoformat()


def _floored_to_minute(offset: timedelta | None) -> timedelta:
    assert offset is not None
    return offset - offset % timedelta(minutes=1)


def test_regression_a_birth_date_in_a_zone_still_on_local_mean_time_has_a_whole_minute_offset() -> None:
    # Hypothesis drew it: Vladivostok kept +08:47:31 until 1922-11-15, whose midnight begins the switch to +09.
    written = crm_value("bitrix24", "birth_date", "date", "1922-11-15", ZoneInfo("Asia/Vladivostok"))
    assert written == "1922-11-15T00:00:00+08:47"
    assert datetime.fromisoformat(written).astimezone(ZoneInfo("Asia/Vladivostok")).date() == date(1922, 11, 15)


@given(
    moment=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)),
    source=ZONES,
    tz=ZONES,
)
def test_a_datetime_keeps_its_instant_and_hour_on_both_crms(moment: datetime, source: ZoneInfo, tz: ZoneInfo) -> None:
    canonical = moment.astimezone(source).isoformat()  # as the rules write it: with the offset
    assert crm_value("amocrm", "visit_at", "date_time", canonical, tz) == int(moment.timestamp())
    iso = datetime.fromisoformat(crm_value("bitrix24", "visit_at", "datetime", canonical, tz))
    assert iso == moment and iso.utcoffset() == moment.astimezone(tz).utcoffset()


@given(amount=st.decimals(min_value=Decimal(0), max_value=Decimal(10**9), places=2))
def test_money_is_a_number_and_flags_are_flags(amount: Decimal) -> None:
    assert Decimal(str(crm_value("amocrm", "paid", "numeric", str(amount), MOSCOW))) == amount
    assert crm_value("amocrm", "guarantee_letter", "checkbox", True, MOSCOW) is True
    assert crm_value("bitrix24", "guarantee_letter", "boolean", False, MOSCOW) == "N"


def test_a_field_type_that_cannot_hold_the_value_is_named_with_what_fits() -> None:
    with pytest.raises(FieldValueError, match=r"birth_date \(date\) cannot go to a amocrm checkbox field; use one of"):
        crm_value("amocrm", "birth_date", "checkbox", "2015-03-09", MOSCOW)


def _live(*fields: tuple[str, str, str, str]) -> CrmDiscovery:
    return CrmDiscovery("amocrm", "test", [], [LiveField(e, k, n, t) for e, k, n, t in fields], None)  # type: ignore[arg-type]


def test_check_names_the_type_to_set_and_the_field_that_cannot_hold_a_value() -> None:
    crm = _live(
        ("contact", "500", "ID пациента в МИС", "text"),
        ("contact", "502", "Дата рождения", "birthday"),
        ("deal", "501", "ID записи в МИС", "text"),
        ("deal", "610", "Оплачено", "checkbox"),
    )
    config = amo_config(
        {
            "contact": ["full_name", "birth_date"],
            "deal": ["paid"],
            "crm_fields": {"contact": {**IDS["contact"], "birth_date": "502"}, "deal": {**IDS["deal"], "paid": "610"}},
        }
    )
    problems = {
        p.message: p.next_step for p in check_fields(config, crm) if "birth_date" in p.message or "paid" in p.message
    }
    assert problems == {
        "contact field birth_date: the config sends it as date, but «Дата рождения» (502) is a birthday field": (
            'set fields.crm_fields.contact.birth_date: {id: "502", type: birthday}'
        ),
        "deal field paid goes to «Оплачено» (610), a checkbox field, which cannot hold a money: the CRM would "
        "refuse the patient": "map fields.crm_fields.deal.paid to a field of type monetary or numeric or price or text "
        "or textarea",
    }


def test_init_proposes_each_entitys_field_with_its_live_type() -> None:
    crm = _live(
        ("contact", "500", "ID пациента в МИС", "text"),
        ("contact", "510", "Статус пациента", "select"),
        ("contact", "512", "Номер полиса", "text"),
        ("contact", "514", "Полис действует до", "date"),
        ("contact", "516", "Пол", "select"),
        ("deal", "501", "ID записи в МИС", "text"),
        ("deal", "610", "Статус пациента", "text"),
        ("deal", "612", "Скидка", "numeric"),
        ("deal", "614", "Оплачено", "checkbox"),
    )
    found, missing = propose_fields(
        crm, ("sex", "patient_status", "policy_number", "policy_valid_until"), ("patient_status", "discount", "paid")
    )
    assert found["contact"]["patient_status"] == {"id": "510", "type": "select"}
    assert found["deal"]["patient_status"] == {"id": "610", "type": "text"}
    assert found["contact"]["sex"] == {"id": "516", "type": "select"}  # «Пол», not «Номер полиса»
    assert found["contact"]["policy_valid_until"] == {"id": "514", "type": "date"}
    assert found["deal"]["discount"] == {"id": "612", "type": "numeric"}
    assert "paid" not in found["deal"] and any("«Оплачено» (614) is a checkbox field" in m for m in missing)


class _RefusingClient:
    """amoCRM refusing any bulk request that holds one bad item, without naming it (400, no validation-errors)."""

    requests = 0

    def __init__(self, bad: str) -> None:
        self.bad = bad
        self.sent: list[list[str]] = []

    def request(self, method: str, path: str, *, json: Any = None, params: Any = None) -> Any:
        keys = [item["request_id"] for item in json]
        self.sent.append(keys)
        if any(item["name"] == self.bad for item in json):
            raise AmoCrmError(400, "Bad Request")
        return [{"id": 100 + n, "contact_id": 200 + n, "request_id": [key]} for n, key in enumerate(keys)]

    def expecting(self, requests: int) -> contextlib.nullcontext[None]:  # no pacing here
        return contextlib.nullcontext()


def test_a_refusal_that_names_no_item_is_bisected_until_the_bad_patient_is_alone() -> None:
    config = amo_config({"crm_fields": IDS})
    client = _RefusingClient(bad="Приём p5")
    writes = [w for i in range(8) for w in _visit(f"p{i}", f"a{i}", {"deal": {"title": f"Приём p{i}"}})]
    outcome = AmoCrmGateway(client, config).apply(writes)  # type: ignore[arg-type]
    assert outcome.failed == {"p5": "refused: Bad Request"}
    assert sorted(outcome.deal_ids) == [f"a{i}" for i in range(8) if i != 5]
    assert len(client.sent) <= 1 + 2 * 3  # log2(8) rounds of halves
