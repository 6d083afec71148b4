"""Case B's fields (IDENT -> Bitrix24, issue 17): the preset, the visit type from the repeat-funnel rule,
the lead source copied from the adopted lead in the look-up it already makes, and the Bitrix24 fields
`init` proposes and `check --create-fields` creates for them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.domain.config import ClinicConfig, clinic_config_json_schema
from clinicsync.domain.crm_ports import CrmMatches, DealWrite, PhoneCandidates
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.fieldmap import FIELD_PRESETS, FieldMap
from clinicsync.domain.fieldtypes import crm_value
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.rules import Adoption, plan_patient
from clinicsync.domain.state import PatientState
from clinicsync_cli.discovery import (
    MisDiscovery,
    check_fields,
    create_bitrix24_fields,
    discover_bitrix24,
    propose_config,
)
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from tests.helpers import T0, appointment, demo_config, patient

HASHER = KeyedHasher(b"k" * 32)
PRESET = "ident_bitrix24_case_b"
MOSCOW = demo_config().tz


def case_b_config(**fields: Any) -> ClinicConfig:
    data = demo_config().model_dump(mode="json")
    data["fields"] = {"preset": PRESET, **fields}
    return ClinicConfig.model_validate(data)


def _deal(plan_writes: list[Any]) -> DealWrite:
    [deal] = [w for w in plan_writes if isinstance(w, DealWrite)]
    return deal


@pytest.fixture
def portal() -> Iterator[tuple[Bitrix24Emulator, Bitrix24Client]]:
    emulator = Bitrix24Emulator()
    server = ServedApp(emulator).start()
    yield emulator, Bitrix24Client(emulator.webhook_url(server.base_url), pacer=Pacer(rate=1000, burst=1000))
    server.stop()


# --- the preset -------------------------------------------------------------------------------------


def test_the_case_b_preset_lists_the_cases_fields_and_presets_are_named_in_one_place() -> None:
    contact, deal = FIELD_PRESETS[PRESET]
    assert set(contact) == {
        "full_name", "phone", "birth_date", "sex", "home_address", "card_number", "family", "doctors_seen",
        "card_comment",
    }  # fmt: skip
    assert set(deal) == {
        "visit_at", "branch_address", "visit_type", "doctor", "lead_source", "is_dms", "status", "mis_appointment_id",
    }  # fmt: skip
    assert case_b_config().fields.deal == deal
    # The config's choice of presets is FIELD_PRESETS itself: its schema and its validation.
    schema = clinic_config_json_schema()["$defs"]["FieldMap"]["properties"]["preset"]
    assert schema["anyOf"][0]["enum"] == list(FIELD_PRESETS)
    with pytest.raises(ValidationError, match=r"unknown preset 'case_z' \(known: minimal, infoclinica"):
        FieldMap.model_validate({"preset": "case_z"})


# --- the visit type: the repeat funnel's rule --------------------------------------------------------


@given(first_visit=st.one_of(st.none(), st.integers(min_value=-400, max_value=400)))
def test_the_visit_type_is_repeat_exactly_when_the_deal_goes_to_the_repeat_funnel(first_visit: int | None) -> None:
    config = case_b_config()
    state = PatientState(patient_id="p1")
    if first_visit is not None:
        state.first_visit_at = T0 + timedelta(days=first_visit)  # the first completed visit, before or after
    plan = plan_patient(
        PatientChanges(patient=patient(), appointments=(appointment(),)), state, CrmMatches(), config, HASHER
    )
    deal = _deal(plan.writes)
    repeat = deal.category_id == config.crm.pipelines["repeat"].category_id
    assert deal.fields["visit_type"] == ("repeat" if repeat else "primary")


# --- the lead source: the adopted lead's own -------------------------------------------------------


def _adoption(sources: dict[str, str]) -> Adoption:
    return Adoption(PhoneCandidates(leads=("41",), lead_sources=sources), claimed=set())


def test_a_deal_adopting_a_lead_takes_its_source_and_keeps_it_without_another_write() -> None:
    config = case_b_config()
    changes = PatientChanges(patient=patient(), appointments=(appointment(),))
    plan = plan_patient(
        changes, PatientState(patient_id="p1"), CrmMatches(), config, HASHER, adoption=_adoption({"41": "WEB"})
    )
    deal = _deal(plan.writes)
    assert (deal.lead_id, deal.lead_source, deal.fields["lead_source"]) == ("41", "WEB", "WEB")

    # Later syncs of the visit know no lead any more: the source is remembered, never blanked or re-sent
    # as a change (the content is the same, so nothing is written).
    assert plan.next_state is not None
    state = plan.next_state.model_copy(deep=True)
    state.appointments["a1"] = state.appointments["a1"].model_copy(update={"deal_id": "900"})
    again = plan_patient(changes, state, CrmMatches(), config, HASHER)
    assert again.skipped.get("a1") == "unchanged"
    moved = PatientChanges(patient=patient(), appointments=(appointment(status=S.CONFIRMED, version=2),))
    later = _deal(plan_patient(moved, state, CrmMatches(), config, HASHER).writes)
    assert (later.lead_id, later.lead_source, later.fields["lead_source"]) == (None, None, "WEB")


@pytest.mark.parametrize("sources", [{}, None], ids=["adopted lead without a source", "no lead adopted"])
def test_a_deal_without_a_sourced_lead_gets_no_source(sources: dict[str, str] | None) -> None:
    adoption = _adoption(sources) if sources is not None else None
    changes = PatientChanges(patient=patient(), appointments=(appointment(),))
    plan = plan_patient(
        changes, PatientState(patient_id="p1"), CrmMatches(), case_b_config(), HASHER, adoption=adoption
    )
    deal = _deal(plan.writes)
    assert deal.lead_source is None and "lead_source" not in deal.fields  # never invented, never blanked


def test_the_lead_look_up_reads_the_source_in_the_request_adoption_already_makes(
    portal: tuple[Bitrix24Emulator, Bitrix24Client],
) -> None:
    emulator, client = portal
    lead = emulator.manager_create_lead(TITLE="Заявка", SOURCE_ID="WEB", PHONE=[{"VALUE": "+79165550001"}])
    unsourced = emulator.manager_create_lead(TITLE="Звонок", PHONE=[{"VALUE": "+79165550002"}])
    gateway = Bitrix24Gateway(client, case_b_config())
    matches = gateway.find(["p1", "p2"], ["a1", "a2"], phones=["+79165550001", "+79165550002"])
    assert matches.phones["+79165550001"].lead_sources == {str(lead): "WEB"}
    assert matches.phones["+79165550002"].lead_sources == {}
    assert matches.phones["+79165550002"].leads == (str(unsourced),)
    assert gateway.requests_made() == 1  # the read-back, with the source, rides in the look-up's batch

    fields = {"title": "Приём", "lead_source": "WEB"}
    deal = DealWrite("a1", "p1", None, "0", "PREPARATION", fields, None, str(lead), lead_source="WEB")
    outcome = gateway.apply([deal])
    written = emulator.deals[int(outcome.deal_ids["a1"])]
    assert (written["SOURCE_ID"], written["LEAD_ID"], written["UF_CRM_CS_LEAD_SOURCE"]) == ("WEB", str(lead), "WEB")


# --- typed values, init and check --create-fields on Bitrix24 ------------------------------------------


def test_lists_join_into_a_bitrix24_string_and_the_visit_type_takes_the_crms_option() -> None:
    doctors = ["Петров Пётр Петрович", "Сидорова Анна Ивановна"]
    assert (
        crm_value("bitrix24", "doctors_seen", "string", doctors, MOSCOW)
        == "Петров Пётр Петрович, Сидорова Анна Ивановна"
    )
    assert crm_value("bitrix24", "family", "string", ["900012", "900013"], MOSCOW) == "900012, 900013"
    options = {"primary": "45", "repeat": "46"}  # an enumeration's option ids
    assert crm_value("bitrix24", "visit_type", "enumeration", "repeat", MOSCOW, options) == "46"
    assert crm_value("bitrix24", "visit_type", "string", "primary", MOSCOW, {"primary": "Первичный"}) == "Первичный"


def test_init_proposes_and_check_create_fields_creates_case_bs_bitrix24_fields(
    portal: tuple[Bitrix24Emulator, Bitrix24Client],
) -> None:
    emulator, client = portal
    refs = {"mis": "clinicsync/b/mis", "crm": "clinicsync/b/crm"}
    proposal = propose_config("b", MisDiscovery("ident"), "connector", discover_bitrix24(client), refs, preset=PRESET)
    config = ClinicConfig.model_validate(proposal.data)
    expected = {
        "contact": {
            "card_number": "string", "home_address": "string", "family": "string", "doctors_seen": "string",
            "card_comment": "string", "sex": "string",
        },
        "deal": {
            "visit_at": "datetime", "branch_address": "string", "visit_type": "string", "doctor": "string",
            "lead_source": "string", "is_dms": "boolean", "status": "string",
        },
    }  # fmt: skip
    for entity, fields in expected.items():
        mapped = config.fields.crm_fields.contact if entity == "contact" else config.fields.crm_fields.deal
        for name, field_type in fields.items():
            assert (mapped[name].id, mapped[name].type) == (f"UF_CRM_CS_{name.upper()}", field_type)
    assert any("UF_CRM_CS_DOCTORS_SEEN" in note for note in proposal.notes)  # missing until created

    created = create_bitrix24_fields(client, config, discover_bitrix24(client))
    assert {f"UF_CRM_CS_{n.upper()}" for fields in expected.values() for n in fields} <= set(created)
    assert emulator._uf["deal"]["UF_CRM_CS_VISIT_AT"].user_type == "datetime"
    assert emulator._uf["deal"]["UF_CRM_CS_IS_DMS"].user_type == "boolean"
    assert check_fields(config, discover_bitrix24(client)) == []


def test_an_adopted_managers_deal_keeps_its_own_source(portal: tuple[Bitrix24Emulator, Bitrix24Client]) -> None:
    """The lead's source goes to a deal we create; a deal a manager made (adopted by phone) was already
    sourced by the manager, and a sync never overwrites the CRM's own data."""
    emulator, client = portal
    lead = emulator.manager_create_lead(TITLE="Заявка", SOURCE_ID="WEB", PHONE=[{"VALUE": "+79165550003"}])
    own = emulator.manager_create_deal(TITLE="Звонок", SOURCE_ID="CALL", CATEGORY_ID="0")
    gateway = Bitrix24Gateway(client, case_b_config())
    fields = {"title": "Приём", "lead_source": "WEB"}
    adopted = DealWrite("a3", "p3", str(own), "0", "PREPARATION", fields, None, str(lead), True, "WEB")
    gateway.apply([adopted])
    written = emulator.deals[int(own)]
    assert (written["SOURCE_ID"], written["LEAD_ID"], written["UF_CRM_CS_LEAD_SOURCE"]) == ("CALL", str(lead), "WEB")
