"""X -> Y (outcome unknown) -> X on amoCRM: the real syncer on moto and the amoCRM emulator, which has no
conditional write, so a stage change is read first (one list read per message) and a status found there
that our integration user set last is our own earlier write. See test_overtaken_writes.py (Bitrix24)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.amocrm.client import AmoCrmClient
from clinicsync.adapters.amocrm.gateway import AmoCrmGateway
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.application.sync import Syncer, SyncIncomplete
from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import AppointmentStatus, PatientChanges
from sandbox.emulators.amocrm import (
    CONTACT_FIELD_MIS_PATIENT_ID,
    LEAD_FIELD_MIS_APPOINTMENT_ID,
    LOST_STATUS_ID,
    MAIN_PIPELINE_ID,
    STATUS_BOOKED,
    STATUS_IN_WORK,
    STATUS_VISITED,
    WON_STATUS_ID,
    AmoCrmEmulator,
)
from sandbox.emulators.base import ServedApp
from tests.adapters.test_amocrm_gateway import FAST, _session, _store
from tests.helpers import DEMO_CONFIG, T0, appointment, days, patient


def _config() -> ClinicConfig:
    """The InfoClinica->amoCRM case's funnel (sandbox/local.py), on the demo clinic."""
    data: dict[str, Any] = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    booked, visited = str(STATUS_BOOKED), str(STATUS_VISITED)
    stages = {"booked": booked, "rescheduled": booked, "confirmed": booked, "arrived": visited}
    stages |= {"completed": visited, "no_show": str(STATUS_IN_WORK), "cancelled": str(LOST_STATUS_ID)}
    pipeline = {
        "category_id": str(MAIN_PIPELINE_ID),
        "stages": stages,
        "closed_stages": [str(WON_STATUS_ID), str(LOST_STATUS_ID)],
    }
    data["crm"] |= {"kind": "amocrm", "pipelines": {"primary": pipeline, "repeat": pipeline}}
    names = {"mis_patient_id": CONTACT_FIELD_MIS_PATIENT_ID, "mis_appointment_id": LEAD_FIELD_MIS_APPOINTMENT_ID}
    data["fields"] = {**data.get("fields", {}), "crm_names": {k: str(v) for k, v in names.items()}}
    return parse_clinic_config(yaml.safe_dump(data, allow_unicode=True))


@pytest.fixture
def amo() -> Iterator[tuple[AmoCrmEmulator, str]]:
    emulator = AmoCrmEmulator(rate_limit=False)
    server = ServedApp(emulator).start()
    yield emulator, server.base_url
    server.stop()


def _syncer(emulator: AmoCrmEmulator, base: str, store: DynamoStore) -> Syncer:
    """The real syncer on the account and the moto table, with no wait for claims."""
    config = _config()
    client = AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST)
    gateway = AmoCrmGateway(client, config, user_id=str(emulator.api_user_id))
    return Syncer(config, store, gateway, KeyedHasher(b"k" * 32), claim_wait=0)


def _visit(status: AppointmentStatus, version: int) -> list[PatientChanges]:
    return [PatientChanges(patient=patient(), appointments=(appointment(status=status, version=version),))]


def test_a_visit_back_to_the_content_we_last_stored_after_a_lost_status_change_is_written_again(
    amo: tuple[AmoCrmEmulator, str], template_tables: Callable[[], Table]
) -> None:
    """Booked, then a no-show whose PATCH lands but whose answer is lost, then booked again at the same time
    before any retry: the lead ends at «Записан на прием», read first and found set by us, not a manager."""
    emulator, base = amo
    syncer = _syncer(emulator, base, DynamoStore(template_tables()))
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [lead_id] = emulator.leads
    assert emulator.leads[lead_id]["status_id"] == STATUS_BOOKED

    emulator.faults.add(path_prefix="/api/v4/leads", method="PATCH", status=504, html=True, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))
    assert emulator.leads[lead_id]["status_id"] == STATUS_IN_WORK  # landed, unknown to us

    syncer.sync(_visit(AppointmentStatus.BOOKED, 3))  # the same content as version 1's
    assert list(emulator.leads) == [lead_id]
    assert emulator.leads[lead_id]["status_id"] == STATUS_BOOKED


def test_a_managers_move_made_under_the_integration_login_holds_against_a_reschedule(
    amo: tuple[AmoCrmEmulator, str], template_tables: Callable[[], Table]
) -> None:
    """amoCRM acts as the user who granted the token, so a manager working in that account moves leads as
    our integration user. Every write of ours was answered, so «В работе» cannot be our own lost write: the
    reschedule's read takes it for the manager's move it is, and the stage holds (it was once written over)."""
    emulator, base = amo
    syncer = _syncer(emulator, base, DynamoStore(template_tables()))
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [lead_id] = emulator.leads
    emulator.manager_move_lead(lead_id, STATUS_IN_WORK, user_id=emulator.api_user_id)  # no webhook heard yet

    moved = appointment(version=2, start=T0 + days(1))  # a reschedule: no move forward
    syncer.sync([PatientChanges(patient=patient(), appointments=(moved,))])
    assert list(emulator.leads) == [lead_id]
    assert emulator.leads[lead_id]["status_id"] == STATUS_IN_WORK


def test_a_booking_polled_with_the_retry_of_a_lost_continuation_gets_a_deal_of_its_own(
    amo: tuple[AmoCrmEmulator, str], template_tables: Callable[[], Table]
) -> None:
    """test_overtaken_writes.py's lost continuation on amoCRM: a1 is first seen as a no-show; a3's re-booking
    continues its lead, the PATCH lands and its answer is lost; the retry carries a3 with a2, booked earlier.
    The continuation noted an intent for a3, so the retry scans the leads changed since then, finds the lead
    under a3 and leaves it there; a2 gets a lead of its own."""
    emulator, base = amo
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)
    no_show = appointment("a1", status=AppointmentStatus.NO_SHOW, start=T0 + days(2), version=5)
    syncer.sync([PatientChanges(patient=patient(), appointments=(no_show,))])
    [lead_id] = emulator.leads

    rebooked = appointment("a3", start=T0 + days(6), version=6)
    emulator.faults.add(path_prefix="/api/v4/leads", method="PATCH", status=504, html=True, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync([PatientChanges(patient=patient(), appointments=(rebooked,))])
    assert _visit_of(emulator, lead_id) == "a3"  # landed, unknown to us

    other = appointment("a2", start=T0 + days(4), version=7)
    syncer.sync([PatientChanges(patient=patient(), appointments=(rebooked, other))])
    visits = {_visit_of(emulator, lid): lid for lid in emulator.leads}
    assert sorted(visits) == ["a2", "a3"] and len(emulator.leads) == 2
    assert visits["a3"] == lead_id  # the lead the CRM put under a3 stays there
    saved = store.load_patients({"p1": ["a1", "a2", "a3"]})["p1"]
    assert {aid: saved.own_deal(aid) for aid in ("a2", "a3")} == {aid: str(visits[aid]) for aid in ("a2", "a3")}
    assert saved.continued == {"a1": "a3"}


def _visit_of(emulator: AmoCrmEmulator, lead_id: int) -> str:
    """The MIS appointment id the lead names (its custom field)."""
    values = emulator.cf_value("leads", lead_id, LEAD_FIELD_MIS_APPOINTMENT_ID)
    return str(values[0]["value"]) if values else ""
