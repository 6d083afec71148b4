"""Two syncer invocations on the same patient at the same moment never create two contacts or deals.

The FIFO shard groups already serialise a patient's messages; these tests take that away on purpose
(one message handed to two invocations at once, as a redelivery while the first still runs would, or
a shard count changed while messages are queued) and force the worst interleaving: the second
invocation runs while the first sits between its CRM look-up and its creates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.aws.table import wire_client
from clinicsync.application.sync import BUSY, Syncer, SyncIncomplete
from clinicsync.domain.models import SyncMessage
from clinicsync.runtime import wiring
from sandbox.crm_views import AmoCrmView
from sandbox.local import LocalClinic

WAIT = 20.0  # generous: a stuck interleaving fails the test instead of hanging it


def _wait_any(*events: threading.Event) -> bool:
    deadline = time.monotonic() + WAIT
    while not any(e.is_set() for e in events):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class PausingGateway:
    """The real gateway; ``find`` calls ``after_find`` once it has its answer, i.e. before any create."""

    def __init__(self, real: Any, after_find: Callable[[], None]) -> None:
        self._real = real
        self._after_find = after_find

    def find(self, *args: Any, **kwargs: Any) -> Any:
        result = self._real.find(*args, **kwargs)
        self._after_find()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _syncer(clinic: LocalClinic, after_find: Callable[[], None] = lambda: None) -> Syncer:
    with clinic.stack.environment():
        real = wiring.container().syncer()
    gateway = PausingGateway(real._gateway, after_find)
    return Syncer(real._config, real._store, gateway, real._hasher, claim_wait=0.3)  # type: ignore[arg-type]


def _new_booking_message(clinic: LocalClinic) -> tuple[SyncMessage, int, int]:
    """A new patient with a new visit, polled and taken off the queue as the syncer would get it."""
    client = clinic.mis.add_client("Белова", "+7 903 111-22-35")
    appointment = clinic.mis.book(client, clinic.mis.at(7, "10:00"))
    clinic.stack.run_schedule(name="Poll")
    sqs = boto3.client("sqs")
    received = sqs.receive_message(QueueUrl=clinic.stack.queue_url, MaxNumberOfMessages=10)["Messages"]
    messages = [SyncMessage.model_validate_json(m["Body"]) for m in received]
    for m in received:
        sqs.delete_message(QueueUrl=clinic.stack.queue_url, ReceiptHandle=m["ReceiptHandle"])
    mine = [m for m in messages if any(c.patient.mis_id == str(client) for c in m.changes)]
    assert len(mine) == 1
    return mine[0], client, appointment


def _created(clinic: LocalClinic, client: int, appointment: int) -> tuple[int, int]:
    """(contacts, deals) in the CRM that carry this patient's and this visit's MIS ids."""
    contacts = clinic.crm.contacts_by_origin()[str(client)]
    if isinstance(clinic.crm, AmoCrmView):
        view = clinic.crm
        deals = sum(1 for lead in view.emu.leads.values() if view._cf(lead, "mis_appointment_id") == str(appointment))
    else:
        assert clinic.bitrix is not None
        deals = sum(1 for d in clinic.bitrix.deals.values() if str(d.get("ORIGIN_ID")) == str(appointment))
    return contacts, deals


@pytest.mark.parametrize("crm", ["bitrix24", "amocrm"])
def test_same_patient_in_two_invocations_at_once_is_created_once(
    make_clinic: Callable[..., LocalClinic], crm: str
) -> None:
    clinic = make_clinic(crm=crm, patients=3, appointments=3, rate_limit=False)
    clinic.sync()
    message, client, appointment = _new_booking_message(clinic)

    first_looked_up, second_looked_up, second_done = threading.Event(), threading.Event(), threading.Event()

    def first_pauses() -> None:
        first_looked_up.set()
        # Hold the first invocation between look-up and create until the second has looked up too
        # (or given up): without a per-patient claim both then see "not found" and both create.
        assert _wait_any(second_looked_up, second_done)

    outcomes: dict[str, Any] = {}

    def run(name: str, syncer: Syncer, done: threading.Event | None = None) -> None:
        try:
            outcomes[name] = syncer.sync(message.changes, message.observations)
        except Exception as exc:
            outcomes[name] = exc
        finally:
            if done is not None:
                done.set()

    first = threading.Thread(target=run, args=("first", _syncer(clinic, first_pauses)))
    second = threading.Thread(target=run, args=("second", _syncer(clinic, second_looked_up.set), second_done))
    first.start()
    assert first_looked_up.wait(WAIT), "the first invocation never reached its look-up"
    second.start()
    second.join(WAIT)
    first.join(WAIT)
    assert not first.is_alive() and not second.is_alive()

    assert _created(clinic, client, appointment) == (1, 1), outcomes
    # The second invocation found the patient claimed and deferred it; it never looked the patient up.
    assert isinstance(outcomes["second"], SyncIncomplete), outcomes
    assert outcomes["second"].failed == {str(client): BUSY}
    assert not second_looked_up.is_set()
    assert not isinstance(outcomes["first"], Exception), outcomes

    # The deferred message comes back (the queue retries it): the patient is known now, nothing new.
    retry = _syncer(clinic).sync(message.changes, message.observations)
    assert (retry.contacts_created, retry.deals_created) == (0, 0)
    assert _created(clinic, client, appointment) == (1, 1)
    assert clinic.mismatches() == []


def test_shard_count_changed_while_messages_are_queued_still_one_writer(
    make_clinic: Callable[..., LocalClinic],
) -> None:
    """A clinic raises ``shards`` while messages are queued: the patient's old and new messages sit in
    different FIFO groups and can run at once. The claim, not the group, keeps them apart."""
    clinic = make_clinic(patients=3, appointments=3, rate_limit=False, config_overrides={"shards": 1})
    clinic.sync()
    message, client, appointment = _new_booking_message(clinic)
    assert message.shard == 0
    first_looked_up, second_done = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def hold() -> None:
        first_looked_up.set()
        assert second_done.wait(WAIT)

    def first() -> None:
        seen["first"] = _syncer(clinic, hold).sync(message.changes)

    thread = threading.Thread(target=first)
    thread.start()
    assert first_looked_up.wait(WAIT)
    # The same change set re-read into another group (shards 1 -> 4) reaches another invocation now.
    try:
        _syncer(clinic).sync(message.changes)
    except SyncIncomplete as exc:
        seen["second"] = exc.failed
    finally:
        second_done.set()
    thread.join(WAIT)
    assert seen["second"] == {str(client): BUSY}
    assert _created(clinic, client, appointment) == (1, 1)


def test_claims_are_exclusive_expire_and_are_released(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=1, appointments=1, rate_limit=False)
    store = DynamoStore(boto3.resource("dynamodb").Table(clinic.stack.table_name))
    assert store.claim_patients(["p1", "p2"], "a", now=1000, seconds=300) == {"p1", "p2"}
    assert store.claim_patients(["p2", "p3"], "b", now=1100, seconds=300) == {"p3"}  # p2 is a's
    assert store.claim_patients(["p2"], "a", now=1100, seconds=300) == {"p2"}  # the owner may renew
    assert store.claim_patients(["p2"], "b", now=1401, seconds=300) == {"p2"}  # an expired claim is taken over
    store.release_claims(["p1"])
    assert store.claim_patients(["p1"], "c", now=1402, seconds=300) == {"p1"}
    many = [f"m{i}" for i in range(130)]  # more than one transaction's 100 items
    assert store.claim_patients([*many, "p2"], "d", now=1402, seconds=300) == set(many)


def test_a_claim_that_fails_half_way_releases_what_it_took(make_clinic: Callable[..., LocalClinic]) -> None:
    """200 patients are claimed in two transactions; if the second fails (not as a cancellation), the
    first hundred must not stay held for CLAIM_SECONDS by a sync that never ran."""
    clinic = make_clinic(patients=1, appointments=1, rate_limit=False)
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    store = DynamoStore(table)
    client = wire_client(table)
    real = client.transact_write_items
    calls = 0

    def second_fails(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ClientError({"Error": {"Code": "InternalServerError", "Message": "boom"}}, "TransactWriteItems")
        return real(**kwargs)

    client.transact_write_items = second_fails  # type: ignore[method-assign]
    many = [f"h{i}" for i in range(200)]
    try:
        with pytest.raises(ClientError):
            store.claim_patients(many, "a", now=1000, seconds=300)
    finally:
        client.transact_write_items = real  # type: ignore[method-assign]
    assert store.claim_patients(many, "b", now=1001, seconds=300) == set(many)
