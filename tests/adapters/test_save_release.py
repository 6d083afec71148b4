"""The save-with-release transaction when DynamoDB cancels it (``DynamoStore.save_patients`` with a
``ClaimRelease``): a message's states, its claims' deletes and its settled intents' deletes in one
TransactWriteItems. Whatever the cancellation names, a state stored with a newer version is kept, the
claims and intents are deleted only with the states they guard, and ``release.done`` tells the caller
whether to release them itself.

The first cancellation is answered by ``dynamo_faults``: moto has no concurrent transactions, so no
``TransactionConflict``, and cannot name one together with a newer state's ``ConditionalCheckFailed``.
Every resend reaches moto, which cancels again for real if a newer state is left in (the contract test
drives moto's own cancellation for a newer state alone)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.domain.state import AppointmentState, PatientState
from clinicsync.domain.store_ports import ClaimRelease
from tests.adapters.dynamo_faults import cancel_next_transaction

CLAIMED_AT = 1000
OURS, THEIRS, BEFORE = 5, 9, 4  # versions: our save's, a newer writer's, the one our sync loaded
_runs = itertools.count()  # each example's patients are new ones: one table for all (a table costs ~0.5 s)


@pytest.fixture(scope="module")
def table(template_tables: Callable[[], Table]) -> Table:
    return template_tables()


def _state(pid: str, version: int) -> PatientState:
    state = PatientState(patient_id=pid, contact_id=f"c{pid}", version=version, content_hash=f"h{version}")
    state.appointments[f"a{pid}"] = AppointmentState(appointment_id=f"a{pid}", deal_id=f"d{pid}", version=version)
    return state


def _store(store: DynamoStore, pid: str, version: int) -> None:
    store.save_patients([(_state(pid, version), [f"a{pid}"])], store.load_patients({pid: [f"a{pid}"]}))


def _versions(store: DynamoStore, pids: list[str]) -> dict[str, tuple[int, int]]:
    """Each patient's stored (STATE version, appointment version); -1: not stored."""
    states = store.load_patients({pid: [f"a{pid}"] for pid in pids})
    return {pid: (s.version, s.appointment(f"a{pid}").version) for pid, s in states.items()}


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    patients=st.integers(1, 4),
    known=st.sets(st.integers(0, 3)),
    newer=st.sets(st.integers(0, 3)),
    put_conflict=st.booleans(),
    raced=st.sampled_from([None, "claim", "intent"]),
)
@example(patients=2, known={0}, newer={1}, put_conflict=False, raced=None)  # a newer state: resent without it
@example(patients=2, known={0, 1}, newer={1}, put_conflict=False, raced="claim")  # both reasons, one resend
@example(patients=1, known=set(), newer=set(), put_conflict=False, raced="intent")  # the caller releases
@example(patients=2, known={0, 1}, newer={0, 1}, put_conflict=False, raced=None)  # nothing left to send
@example(patients=2, known=set(), newer=set(), put_conflict=True, raced=None)  # the save fails
def test_a_cancelled_save_keeps_newer_states_and_releases_only_with_the_states_stored(
    table: Table,
    patients: int,
    known: set[int],
    newer: set[int],
    put_conflict: bool,
    raced: str | None,
) -> None:
    """The first transaction is cancelled with a reason per item: ``ConditionalCheckFailed`` for the
    states a newer writer stored since our read, ``TransactionConflict`` for one of our states
    (``put_conflict``) and for a claim's or an intent's delete (``raced``: a concurrent transaction).

    Newer states are dropped and a raced release leaves the deletes to the caller, both in the one
    resend; a conflict on a state alone is not ours to settle: the save fails (the message is retried)
    with nothing stored and nothing released."""
    store = DynamoStore(table)
    run = next(_runs)
    pids = [f"r{run}p{n}" for n in range(patients)]
    for n in known & set(range(patients)):  # stored before our sync read them: versioned puts
        _store(store, pids[n], BEFORE)
    assert store.claim_patients(pids, "us", CLAIMED_AT, 600) == set(pids)
    intents = [f"P#{pid}" for pid in pids]
    store.write_intents(intents, CLAIMED_AT)
    loaded = store.load_patients({pid: [f"a{pid}"] for pid in pids})
    theirs = {pids[n] for n in newer if n < patients}
    for pid in theirs:  # a writer outside our claim (say, after it expired) stored a newer version
        _store(store, pid, THEIRS)
    ours = [pid for pid in pids if pid not in theirs]
    conflicted = keys.patient_pk(ours[0]) if put_conflict and ours else None
    raced_key = {"claim": keys.claim(pids[-1]), "intent": keys.intent(intents[-1]), None: None}[raced]
    dropped_pks = {keys.patient_pk(pid) for pid in theirs}

    def reason_for(operation: str, pk: str, sk: str) -> str | None:
        if operation == "Delete":
            return "TransactionConflict" if {"pk": pk, "sk": sk} == raced_key else None
        if pk in dropped_pks and (sk == keys.STATE or keys.appointment_of(sk)):
            return "ConditionalCheckFailed"
        return "TransactionConflict" if pk == conflicted and sk == keys.STATE else None

    release = ClaimRelease(list(pids), list(intents))
    saves = [(_state(pid, OURS), [f"a{pid}"]) for pid in pids]
    fails = conflicted is not None and not theirs and raced is None  # nothing the store may drop
    with cancel_next_transaction(table, reason_for) as sent:
        if fails:
            with pytest.raises(ClientError, match="TransactionCanceled"):
                store.save_patients(saves, loaded, release)
        else:
            store.save_patients(saves, loaded, release)

    first = {(op, pk) for op, pk, _ in sent[0]}
    assert {("Put", keys.patient_pk(pid)) for pid in pids} <= first  # all of it went in one transaction
    assert {("Delete", keys.claim(pid)["pk"]) for pid in pids} <= first
    cancelled = bool(theirs) or conflicted is not None or raced is not None
    left = [key for key in sent[0] if key[0] == "Put" and reason_for(*key) != "ConditionalCheckFailed"]
    resent = cancelled and not fails and bool(left)  # reverse maps are plain puts: they stay
    assert len(sent) == 1 + resent  # one resend settles every reason the cancellation gave
    if resent:
        assert not any(op == "Put" and pk in dropped_pks for op, pk, _ in sent[1])
        assert any(op == "Delete" for op, _, _ in sent[1]) == (raced is None)
    stored = _versions(store, pids)
    for n, pid in enumerate(pids):
        was = (BEFORE, BEFORE) if n in known else (-1, -1)
        assert stored[pid] == ((THEIRS, THEIRS) if pid in theirs else (was if fails else (OURS, OURS)))
    assert release.done == (bool(left) and not fails and raced is None)
    # Released with the states, or still held for the caller to release (nobody else can claim them).
    free = store.claim_patients(pids, "next", CLAIMED_AT + 1, 600)
    assert free == (set(pids) if release.done else set())
    assert store.load_intents(intents) == ({} if release.done else dict.fromkeys(intents, CLAIMED_AT))
