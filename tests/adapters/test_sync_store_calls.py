"""What a sync costs in DynamoDB requests: the real syncer on moto with a CRM that answers at once, every
store request counted by operation. The CPU per event is mostly the AWS SDK's, per request and per item."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.aws.table import wire_client
from clinicsync.application.sync import Syncer
from clinicsync.application.sync_claims import claim_patients
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import contact_intent, deal_intent
from clinicsync.domain.models import AppointmentStatus, PatientChanges
from tests.adapters.dynamo_faults import cancel_next_transaction
from tests.helpers import CRM_CALL as CRM
from tests.helpers import T0, InstantCrm, appointment, days, demo_config, patient


def _store_with_log(template_tables: Callable[[], Table]) -> tuple[DynamoStore, list[str]]:
    store = DynamoStore(template_tables())
    log: list[str] = []
    for client in (store._table.meta.client, wire_client(store._table)):  # the resource's and the plain one
        client.meta.events.register("before-call.dynamodb", lambda model, **_: log.append(model.name))
    return store, log


def test_a_syncs_reads_transactions_and_batch_writes_skip_boto3s_resource_layer(
    template_tables: Callable[[], Table],
) -> None:
    """A sync's read of hundreds of keys, its transactions (claims, states) and its batch writes (the
    claims' release) go out in DynamoDB's own format on a plain client: none through the resource's
    client, whose conversion of every key and item was most of their CPU; the states read back are the
    ones saved."""
    store, log = _store_with_log(template_tables)
    through_resource: list[str] = []
    store._table.meta.client.meta.events.register(
        "before-call.dynamodb", lambda model, **_: through_resource.append(model.name)
    )
    syncer = Syncer(demo_config(), store, InstantCrm(log), KeyedHasher(b"k" * 32))
    syncer.sync(_message(3, AppointmentStatus.BOOKED))
    through_resource.clear()
    log.clear()
    syncer.sync(_message(3, AppointmentStatus.CONFIRMED, version=2))
    assert log.count("BatchGetItem") == 1 and log.count("TransactWriteItems") == 2
    assert log.count("BatchWriteItem") == 0 and through_resource == []  # the claims went with the states
    states = store.load_patients({f"p{n}": [f"a{n}"] for n in range(3)})
    assert all(states[f"p{n}"].appointments[f"a{n}"].version == 2 for n in range(3))


def _message(patients: int, status: AppointmentStatus, version: int = 1) -> list[PatientChanges]:
    return [
        PatientChanges(
            patient=patient(f"p{n}", email=f"p{n}@example.org"),
            appointments=(appointment(f"a{n}", f"p{n}", status=status, version=version),),
        )
        for n in range(patients)
    ]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patients=st.integers(1, 8), known=st.booleans())
def test_a_sync_reads_states_intents_and_ledger_in_one_request(
    template_tables: Callable[[], Table], patients: int, known: bool
) -> None:
    """Before it plans, a message's states, create intents and consent ledger (patient and address
    subjects, every channel) are read together: one BatchGetItem while they fit in 100 keys."""
    store, log = _store_with_log(template_tables)
    syncer = Syncer(demo_config(), store, InstantCrm(log), KeyedHasher(b"k" * 32))
    if known:
        syncer.sync(_message(patients, AppointmentStatus.BOOKED))
    log.clear()
    syncer.sync(_message(patients, AppointmentStatus.CONFIRMED, version=2))
    before_crm = log[: log.index(CRM)] if CRM in log else log
    assert before_crm.count("BatchGetItem") == 1
    assert "GetItem" not in log and "Query" not in before_crm


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patients=st.integers(1, 8))
def test_a_known_patients_status_change_costs_one_request_each_to_claim_read_and_save_with_the_release(
    template_tables: Callable[[], Table], patients: int
) -> None:
    """The steady day's common message: known patients whose visit moved. Their reverse maps name the same
    CRM ids as before, so nothing but the state and the visit is written, in one transaction, which also
    releases the claims: the next invocation claims the patients at once."""
    store, log = _store_with_log(template_tables)
    syncer = Syncer(demo_config(), store, InstantCrm(log), KeyedHasher(b"k" * 32))
    syncer.sync(_message(patients, AppointmentStatus.BOOKED))
    log.clear()
    syncer.sync(_message(patients, AppointmentStatus.CONFIRMED, version=2))
    aws = [call for call in log if call != CRM]
    assert aws == ["TransactWriteItems", "BatchGetItem", "TransactWriteItems"]
    assert store.claim_patients([f"p{n}" for n in range(patients)], "next", 0, 60) == {f"p{n}" for n in range(patients)}
    states = store.load_patients({f"p{n}": [f"a{n}"] for n in range(patients)})
    for n in range(patients):
        deal_id = str(states[f"p{n}"].appointments[f"a{n}"].deal_id)
        assert store.patient_for_crm("deal", deal_id) == {"patient_id": f"p{n}", "appointment_id": f"a{n}"}


@pytest.mark.parametrize("with_create", [False, True], ids=["alone", "with_a_create"])
def test_a_continuation_notes_its_intent_with_the_creates_and_settles_it_with_the_states(
    template_tables: Callable[[], Table], with_create: bool
) -> None:
    """A re-booking's continuation writes the visit's id on the no-show's deal, so its intent is noted before
    the CRM write (a lost response is looked up on the retry, docs/statuses.md): in the one BatchWriteItem
    that notes the message's creates, and deleted with the claims in the states' transaction. No CRM request
    is added, now or by the next message of the patient (nothing is left to look up)."""
    store, log = _store_with_log(template_tables)
    syncer = Syncer(demo_config(), store, InstantCrm(log), KeyedHasher(b"k" * 32))
    syncer.sync(_message(1, AppointmentStatus.NO_SHOW))
    rebooked = appointment("r0", "p0", start=T0 + days(3))
    message = [PatientChanges(patient=patient("p0", email="p0@example.org"), appointments=(rebooked,))]
    message += _message(2, AppointmentStatus.BOOKED)[1:] if with_create else []  # a new patient: looked up, created
    log.clear()
    syncer.sync(message)
    look_up = [CRM] if with_create else []  # the new patient's; none for the re-booking
    assert log == ["TransactWriteItems", "BatchGetItem", *look_up, "BatchWriteItem", CRM, "TransactWriteItems"]
    state = store.load_patients({"p0": ["a0", "r0"]})["p0"]
    assert state.continued == {"a0": "r0"} and state.appointments["r0"].deal_id == state.appointments["a0"].deal_id
    assert store.load_intents([deal_intent("r0"), deal_intent("a1")]) == {}

    log.clear()
    confirmed = rebooked.model_copy(update={"status": AppointmentStatus.CONFIRMED, "version": 2})
    syncer.sync([PatientChanges(patient=patient("p0", email="p0@example.org"), appointments=(confirmed,))])
    assert log.count(CRM) == 1  # the write; no look-up


def test_a_new_patients_phone_is_indexed_once_by_the_poller_not_again_by_the_syncer(
    template_tables: Callable[[], Table],
) -> None:
    """The poller indexes every page's phones before it queues them (family members in other shards see
    each other); the syncer writes the index only when a known patient's phone changed."""
    store = DynamoStore(template_tables())
    phone_writes: list[str] = []

    def note(model: Any, params: dict[str, Any], **_: Any) -> None:
        if model.name in ("BatchWriteItem", "PutItem", "DeleteItem", "TransactWriteItems") and "PHONE#" in str(params):
            phone_writes.append(model.name)

    for client in (store._table.meta.client, wire_client(store._table)):
        client.meta.events.register("before-call.dynamodb", note)
    hasher = KeyedHasher(b"k" * 32)
    syncer = Syncer(demo_config(), store, InstantCrm([]), hasher)
    message = _message(3, AppointmentStatus.BOOKED)
    store.index_contacts([(hasher.phone_key(str(c.patient.phone)), c.patient.mis_id) for c in message], [])  # poller
    syncer.sync(message)
    assert phone_writes == ["TransactWriteItems"]  # the poller's
    moved = [
        c.model_copy(update={"patient": c.patient.model_copy(update={"phone": "+79160000001", "version": 2})})
        for c in message[:1]
    ]
    syncer.sync(moved)
    assert phone_writes == ["TransactWriteItems", "DeleteItem", "PutItem"]  # the old key goes, the new one comes
    assert store.patients_by_phone(hasher.phone_key("+79160000001")) == ["p0"]
    assert store.patients_by_phone(hasher.phone_key(str(message[0].patient.phone))) == ["p1", "p2"]


def test_a_sync_reads_only_the_e_mail_channel_of_an_address(template_tables: Callable[[], Table]) -> None:
    """An address's own ledger subject holds only what a Mailchimp unsubscribe records (its e-mail
    channel), so that is all a sync reads of it; the patient's subject is read whole."""
    store = DynamoStore(template_tables())
    asked: list[str] = []

    def note(model: Any, params: dict[str, Any], **_: Any) -> None:
        if model.name == "BatchGetItem":  # the request as sent: each key's partition named once
            asked.extend(re.findall(r"CONSENT#(?:pat|email):[^\"]+", params["body"].decode()))

    wire_client(store._table).meta.events.register("before-call.dynamodb", note)
    syncer = Syncer(demo_config(), store, InstantCrm([]), KeyedHasher(b"k" * 32))
    syncer.sync(_message(3, AppointmentStatus.BOOKED))
    address = [pk for pk in asked if pk.startswith("CONSENT#email:")]
    patients = [pk for pk in asked if pk.startswith("CONSENT#pat:")]
    assert len(address) == 3 and len(set(address)) == 3
    assert len(patients) == 3 * 4


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patients=st.integers(1, 20))
def test_new_patients_states_claims_and_settled_intents_go_in_one_transaction_while_they_fit(
    template_tables: Callable[[], Table], patients: int
) -> None:
    """After the CRM accepted the creates: the new states, the settled create intents' deletes and the
    claims' in one transaction while they fit in 100 items (atomic: an intent never goes without its
    state); beyond, the states in batches, then one batch that forgets the intents and releases."""
    store, log = _store_with_log(template_tables)
    syncer = Syncer(demo_config(), store, InstantCrm(log), KeyedHasher(b"k" * 32))
    syncer.sync(_message(patients, AppointmentStatus.BOOKED))
    after_apply = log[len(log) - log[::-1].index(CRM) :]
    new_items = 4 * patients  # each patient's STATE, visit, contact map and deal map
    if new_items + 3 * patients <= 100:  # and each patient's claim and two intents
        assert after_apply == ["TransactWriteItems"]
    else:
        assert after_apply == ["BatchWriteItem"] * (-(-new_items // 25) - (-3 * patients // 25))  # 25 a batch
    intents = [contact_intent(f"p{n}") for n in range(patients)] + [deal_intent(f"a{n}") for n in range(patients)]
    assert store.load_intents(intents) == {}
    assert store.claim_patients([f"p{n}" for n in range(patients)], "next", 0, 60) == {f"p{n}" for n in range(patients)}
    states = store.load_patients({f"p{n}": [f"a{n}"] for n in range(patients)})
    assert all(states[f"p{n}"].appointments[f"a{n}"].deal_id for n in range(patients))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patients=st.integers(1, 60), with_email=st.integers(0, 60))
def test_a_poll_pages_phone_and_e_mail_indexes_go_in_one_request_while_they_fit(
    template_tables: Callable[[], Table], patients: int, with_email: int
) -> None:
    """The poller indexes a page's phones and e-mails before it queues the page: one transaction of up
    to 100 puts (two batch writes of 25 before), batches beyond that; every entry findable after."""
    store, log = _store_with_log(template_tables)
    phones = [(f"k{n}", f"p{n}") for n in range(patients)]
    emails = [(f"e{n}", f"pat:p{n}") for n in range(min(with_email, patients))]
    store.index_contacts(phones, emails)
    items = len(phones) + len(emails)
    assert log == (["TransactWriteItems"] if items <= 100 else ["BatchWriteItem"] * -(-items // 25))
    assert all(store.patients_by_phone(k) == [p] for k, p in phones)
    assert all(store.subjects_by_email(e) == [s] for e, s in emails)


class _SaveFails(DynamoStore):
    def save_patients(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the states' write failed")


def test_a_sync_whose_states_are_not_stored_releases_its_claims_but_keeps_its_create_intents(
    template_tables: Callable[[], Table],
) -> None:
    """The settled intents go with the states' write or after it, never without it: the creates landed
    in the CRM but the states did not, so the retry must find the intents and look the records up."""
    store = _SaveFails(template_tables())
    syncer = Syncer(demo_config(), store, InstantCrm([]), KeyedHasher(b"k" * 32))
    with pytest.raises(RuntimeError, match="states"):
        syncer.sync(_message(2, AppointmentStatus.BOOKED))
    intents = [contact_intent(f"p{n}") for n in range(2)] + [deal_intent(f"a{n}") for n in range(2)]
    assert set(store.load_intents(intents)) == set(intents)
    assert store.claim_patients(["p0", "p1"], "next", 0, 60) == {"p0", "p1"}


@pytest.mark.parametrize("conflict", ["claim delete", "state put"])
def test_a_syncs_last_transaction_cancelled_by_a_concurrent_one_still_frees_its_claims(
    template_tables: Callable[[], Table], conflict: str
) -> None:
    """The sync's last write (states, claims' and settled intents' deletes) cancelled by a concurrent
    transaction on one item (moto has none: ``dynamo_faults`` answers). A raced claim delete leaves the
    release to the syncer, after the states are stored; a conflicting state write fails the message:
    its claims released, its create intents kept, so the retry looks the CRM's new records up."""
    table = template_tables()
    store = DynamoStore(table)
    syncer = Syncer(demo_config(), store, InstantCrm([]), KeyedHasher(b"k" * 32))

    def reason_for(operation: str, pk: str, sk: str) -> str | None:
        if conflict == "claim delete":
            cause = operation == "Delete" and {"pk": pk, "sk": sk} == keys.claim("p1")
        else:
            cause = operation == "Put" and (pk, sk) == (keys.patient_pk("p1"), keys.STATE)
        return "TransactionConflict" if cause else None

    with cancel_next_transaction(table, reason_for) as sent:
        if conflict == "state put":
            with pytest.raises(ClientError, match="TransactionCanceled"):
                syncer.sync(_message(2, AppointmentStatus.BOOKED))
        else:
            syncer.sync(_message(2, AppointmentStatus.BOOKED))
            assert not any(op == "Delete" for op, _, _ in sent[-1])  # the states resent alone
    assert store.claim_patients(["p0", "p1"], "next", 0, 60) == {"p0", "p1"}  # released either way
    states = store.load_patients({f"p{n}": [f"a{n}"] for n in range(2)})
    intents = [contact_intent(f"p{n}") for n in range(2)] + [deal_intent(f"a{n}") for n in range(2)]
    if conflict == "state put":
        assert all(s.version < 0 for s in states.values())
        assert set(store.load_intents(intents)) == set(intents)
    else:
        assert all(states[f"p{n}"].appointments[f"a{n}"].deal_id for n in range(2))
        assert store.load_intents(intents) == {}


def _claim_item(table: Table, pid: str, owner: str, hold_ends: int, legacy: bool) -> None:
    """A claim as the syncer leaves it (held until ``held_until``), or one stored before ``held_until``
    existed (held until its ``expires_at``)."""
    hold = {"expires_at": hold_ends} if legacy else {"held_until": hold_ends, "expires_at": hold_ends + 10**6}
    table.put_item(Item={**keys.claim(pid), "owner": owner, **hold})


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(live=st.integers(1, 3), left=st.integers(0, 2), free=st.integers(0, 3), legacy=st.booleans())
def test_each_wait_round_on_a_patient_another_invocation_holds_costs_one_request(
    template_tables: Callable[[], Table], live: int, left: int, free: int, legacy: bool
) -> None:
    """The cancelled claim transaction returns each item it failed on (``ALL_OLD``): a live hold is known
    from it, so a wait round is that one request (a read, or a take-over attempt, after it was a second).
    Only the first round costs more: the free patients' claims sent again without the held ones, and the
    take-over of claims their owners left behind, which are reported as such."""
    store, log = _store_with_log(template_tables)
    now = 1_000_000
    held = [f"h{n}" for n in range(live)]
    dead = [f"d{n}" for n in range(left)]
    for pid in held:
        _claim_item(store._table, pid, "other", now + 300, legacy)
    for pid in dead:
        _claim_item(store._table, pid, "died", now - 1, legacy)
    log.clear()
    claimed = claim_patients(
        store, held + dead + [f"f{n}" for n in range(free)], "me", 600, lambda: now, lambda _: log.append("sleep"), 3.0
    )
    rounds = " ".join(log).split(" sleep ")
    assert len(rounds) > 2  # it waited, more than once, for the live holds
    assert rounds[0].split() == ["TransactWriteItems"] * (1 + (free > 0) + (left > 0))
    assert all(later.split() == ["TransactWriteItems"] for later in rounds[1:])
    assert claimed == set(dead) | {f"f{n}" for n in range(free)} and claimed.taken_over == set(dead)


def test_a_cancellation_that_does_not_return_the_item_still_takes_a_claim_left_behind_over(
    template_tables: Callable[[], Table],
) -> None:
    """A reason without its item (a ``TransactionConflict`` never has one) says nothing of the hold: the
    patient is tried as left behind, as before the items came back, never held until the item's TTL."""
    table = template_tables()
    store = DynamoStore(table)
    _claim_item(table, "p1", "died", 999, legacy=False)

    def reason_for(operation: str, pk: str, sk: str) -> str | None:
        return "ConditionalCheckFailed" if {"pk": pk, "sk": sk} == keys.claim("p1") else None

    with cancel_next_transaction(table, reason_for) as sent:
        claimed = store.claim_patients(["p0", "p1"], "next", 1000, 600)
    assert (claimed, claimed.taken_over) == ({"p0", "p1"}, {"p1"})
    assert len(sent) == 3  # cancelled without items, p0 alone, p1 taken over
