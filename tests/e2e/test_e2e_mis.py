"""Every MIS, end to end in the local runtime: booking, confirm, visit, cancel, no-show and reschedule
made at the MIS's front desk end with the right deal stages in the CRM emulator.

InfoClinica is read through its acknowledged change queue over mutual TLS (the first import is the
resync job over a long window), MEDODS through its updated-since cursor, Renovatio through a date
window diffed by content hash.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from clinicsync.domain.models import AppointmentStatus as S
from sandbox.local import LocalClinic
from sandbox.mis_views import action

MIS = ["medods", "infoclinica", "renovatio"]


@pytest.fixture(params=MIS)
def clinic(request: pytest.FixtureRequest, make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(mis=request.param, patients=10, appointments=12)
    first = clinic.first_import()
    assert first.poll["appointments"] > 0
    assert clinic.mismatches() == []
    return clinic


def test_first_import_matches_the_mis_and_a_second_poll_writes_nothing(clinic: LocalClinic) -> None:
    assert len(clinic.crm.deals()) == len(clinic.expected_deals()) > 0
    again = clinic.sync()
    assert (again.crm_requests, again.crm_writes) == (0, 0)


def test_a_booking_then_every_front_desk_step_moves_the_deal(clinic: LocalClinic) -> None:
    client = clinic.mis.add_client("Белова", "+7 903 555-66-77")
    visit = clinic.mis.book(client, clinic.mis.at(6, "11:00"))
    clinic.sync()
    deal = clinic.crm.deals()[str(visit)]
    assert deal["stage"] == clinic.config.pipeline(repeat=False).stages[S.BOOKED]
    for step in ("confirm", "arrive", "complete"):
        action(clinic.mis, step)(visit)
        clinic.sync()
        assert clinic.mismatches() == [], step
        assert clinic.crm.deals()[str(visit)]["id"] == deal["id"]  # the same deal all along


@pytest.mark.parametrize("step", ["cancel", "no_show"])
def test_cancel_and_no_show(clinic: LocalClinic, step: str) -> None:
    visit = clinic.open_booking()
    action(clinic.mis, step)(visit)
    clinic.sync()
    assert clinic.mismatches() == []
    expected = S.CANCELLED if step == "cancel" else S.NO_SHOW
    deal = clinic.crm.deals()[str(visit)]
    assert deal["stage"] == clinic.config.pipeline(repeat=deal["category"] == "1").stages[expected]


def test_a_reschedule_is_the_same_appointment_with_a_new_time(clinic: LocalClinic) -> None:
    visit = clinic.open_booking()
    before = clinic.crm.deals()[str(visit)]
    new_start = clinic.mis.at(8, "17:30")
    clinic.mis.emulator.reschedule(visit, new_start)
    clinic.sync()
    after = clinic.crm.deals()[str(visit)]
    assert after["id"] == before["id"]
    assert after["visit_at"][:10] == new_start.date().isoformat() != before["visit_at"][:10]
    assert after["status"] == "rescheduled"


def test_mis_refusal_flags_reach_the_consent_ledger(make_clinic: Callable[..., LocalClinic]) -> None:
    import boto3

    clinic = make_clinic(patients=5, appointments=5)
    client = clinic.medods.add_client(
        "Зайцева",
        "Ольга",
        second_name="Ивановна",
        sex="female",
        phone="+7 903 444-55-66",
        denyEmail=True,
        denySmsDispatches=True,
    )
    clinic.mis.book(client, clinic.mis.at(4, "12:00"))
    clinic.sync()
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    channels = {i["sk"] for i in table.scan()["Items"] if i["pk"] == f"CONSENT#pat:{client}"}
    assert {"CH#email", "CH#sms", "CH#marketing"} <= channels
    clinic.medods.update_client(client, denyEmail=False, denySmsDispatches=False)  # the MIS "re-subscribes"
    clinic.sync()
    after = {i["sk"] for i in table.scan()["Items"] if i["pk"] == f"CONSENT#pat:{client}"}
    assert channels <= after  # an opt-out is sticky


def test_a_cursor_feed_rereads_its_overlap_and_drops_what_it_already_sent(
    make_clinic: Callable[..., LocalClinic],
) -> None:
    clinic = make_clinic(patients=6, appointments=6)
    clinic.sync()
    requests_before = clinic.medods.request_count
    again = clinic.sync()  # the overlap window re-reads the last two minutes: all of the sample
    assert clinic.medods.request_count > requests_before  # the MIS was really read again
    assert (again.poll["patients"], again.poll["appointments"], again.drain["messages"]) == (0, 0, 0)


@pytest.mark.parametrize(("crm", "creates"), [("bitrix24", 2), ("amocrm", 1)])  # amoCRM: one leads/complex item
def test_a_new_patients_refusal_flags_ride_on_the_contact_create_with_no_second_write(
    make_clinic: Callable[..., LocalClinic], crm: str, creates: int
) -> None:
    """The sync's contact create carries the ledger's opt-outs, so the consent job queued for the new
    refusal flags has nothing left to write in the CRM (it used to update every such contact again)."""
    clinic = make_clinic(patients=5, appointments=5, crm=crm)
    clinic.sync()
    client = clinic.medods.add_client(
        "Зайцева", "Ольга", sex="female", phone="+7 903 444-55-67", denyEmail=True, denySmsDispatches=True
    )
    clinic.mis.book(client, clinic.mis.at(4, "12:00"))
    writes_before = clinic.crm.stats()["writes"]
    clinic.sync()
    contact = clinic.crm.contact_of_patient(str(client))
    assert contact is not None
    assert {"email", "sms"} <= clinic.crm.contact_opt_outs(contact)
    assert clinic.crm.stats()["writes"] - writes_before == creates  # the contact and its deal, nothing more
    assert clinic.stack.queue_depth("ConsentQueue") == 0 and clinic.stack.queue_depth("ConsentQueue", dlq=True) == 0


def test_the_crm_outputs_of_a_syncs_refusing_patients_are_marked_in_one_request(
    make_clinic: Callable[..., LocalClinic], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS calls per event: the contact creates that carried the refusals mark the consent outputs done
    together (one transaction per 100 patients), not with one UpdateItem per patient."""
    import botocore.client

    clinic = make_clinic(patients=5, appointments=5, crm="bitrix24")
    clinic.sync()
    clients = [
        clinic.medods.add_client(
            "Зайцева", name, sex="female", phone=f"+7 903 444-55-6{n}", denyEmail=True, denySmsDispatches=True
        )
        for n, name in enumerate(("Ольга", "Анна", "Мария"))
    ]
    for client in clients:
        clinic.mis.book(client, clinic.mis.at(4, "12:00"))
    marks: list[str] = []
    real = botocore.client.BaseClient._make_api_call

    def counted(client: object, operation: str, params: dict[str, object]) -> object:
        # Writes that mark the "crm" output (an UpdateItem, or a transaction of them; other targets and
        # the identity notes are batched by the consent consumer on their own).
        updates = [params] if operation == "UpdateItem" else []
        if operation == "TransactWriteItems" and isinstance(params.get("TransactItems"), list):
            updates = [item["Update"] for item in params["TransactItems"] if "Update" in item]  # type: ignore[attr-defined]
        if any("crm" in (u.get("ExpressionAttributeNames") or {}).values() for u in updates):  # type: ignore[attr-defined]
            marks.append(operation)
        return real(client, operation, params)  # type: ignore[arg-type]

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    clinic.sync()
    assert marks == ["TransactWriteItems"]
    for client in clients:
        contact = clinic.crm.contact_of_patient(str(client))
        assert contact is not None and {"email", "sms"} <= clinic.crm.contact_opt_outs(contact)
    assert clinic.stack.queue_depth("ConsentQueue") == 0 and clinic.stack.queue_depth("ConsentQueue", dlq=True) == 0
