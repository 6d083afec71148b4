"""One contract for every store: the same cases run on ``DynamoStore`` (moto, the template's table) and on
``MemoryStore``, so a unit test or a dry run on the memory store sees what the stack would.

The last test drives both with the same random sequence of conditional writes and compares every answer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.domain.audience import MemberBook, subscriber_hash
from clinicsync.domain.models import AppointmentStatus
from clinicsync.domain.state import AppointmentState, LatestDeal, PatientState, RunStart
from clinicsync.domain.store_ports import Claimed, ClaimRelease, Store
from clinicsync_cli.memory_store import MemoryStore
from tests.helpers import MSK, examples

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["dynamo", "memory"])
def new_store(request: pytest.FixtureRequest, template_tables: Callable[[], Table]) -> StoreFactory:
    if request.param == "memory":
        return MemoryStore
    return lambda: DynamoStore(template_tables())


@pytest.fixture
def store(new_store: StoreFactory) -> Store:
    return new_store()


def _state(pid: str = "p1", version: int = 3) -> PatientState:
    state = PatientState(patient_id=pid, contact_id="10", version=version, content_hash="h1", phone_key="k1")
    state.write_epoch, state.contact_epoch = 2, 1
    state.first_visit_at = datetime(2026, 10, 1, 9, 0, tzinfo=MSK)
    state.has_deal = True
    state.continued = {"a0": "a1"}
    state.appointments["a1"] = AppointmentState(
        appointment_id="a1",
        deal_id="20",
        version=version,
        content_hash="h2",
        epoch=2,
        status=AppointmentStatus.CONFIRMED,
        category_id="0",
        stage="PREPAYMENT_INVOICE",
        starts_at=datetime(2026, 11, 25, 10, 0, tzinfo=MSK),
        lead_source="WEB",
        manual_stage="NEW",
        manual_status=AppointmentStatus.BOOKED,
    )
    state.latest_deals = {"0": LatestDeal(appointment_id="a1", deal_id="20", stage="PREPAYMENT_INVOICE")}
    before_run = LatestDeal(
        appointment_id="a0", deal_id="19", stage="NO_SHOW", starts_at=datetime(2026, 11, 24, 9, 0, tzinfo=MSK)
    )
    state.run_starts = {
        "0": RunStart(
            run=datetime(2026, 11, 20, 8, 0, tzinfo=MSK),
            latest=before_run,
            first_new_at=datetime(2026, 11, 25, 10, 0, tzinfo=MSK),
            first_new_id="a1",
            moved_past=True,
        )
    }
    return state


def _save(store: Store, state: PatientState, changed: tuple[str, ...] = ("a1",)) -> None:
    """As the syncer does: versioned items that already exist are replaced only if not newer."""
    store.save_patients([(state, list(changed))], store.load_patients({state.patient_id: list(changed)}))


# --- patients, reverse maps, intents, cursors --------------------------------------------------------------------


def test_a_patient_state_round_trips_with_its_reverse_maps(store: Store) -> None:
    _save(store, _state())
    loaded = store.load_patients({"p1": ["a1", "a9"], "p2": []})
    assert loaded["p1"] == _state()
    assert loaded["p2"] == PatientState(patient_id="p2")
    assert store.load_patients({"p1": []})["p1"].appointments == {}  # only the appointments asked for
    assert store.patient_for_crm("deal", "20") == {"patient_id": "p1", "appointment_id": "a1"}
    assert store.patient_for_crm("contact", "10") == {"patient_id": "p1"}
    assert store.patient_for_crm("deal", "21") is None


def test_a_reverse_map_follows_a_new_crm_id_and_stays_for_an_unchanged_one(store: Store) -> None:
    _save(store, _state())
    for _ in range(2):  # the second save holds the same ids as loaded: the maps stay as they are
        moved = store.load_patients({"p1": ["a1"]})["p1"]
        moved.version += 1
        moved.appointments["a1"].version += 1
        _save(store, moved)
    assert store.patient_for_crm("contact", "10") == {"patient_id": "p1"}
    assert store.patient_for_crm("deal", "20") == {"patient_id": "p1", "appointment_id": "a1"}
    moved = store.load_patients({"p1": ["a1"]})["p1"]
    moved.version += 1
    moved.contact_id, moved.appointments["a1"].deal_id = "11", "21"
    _save(store, moved)
    assert store.patient_for_crm("contact", "11") == {"patient_id": "p1"}
    assert store.patient_for_crm("deal", "21") == {"patient_id": "p1", "appointment_id": "a1"}


def test_a_loaded_state_is_a_copy(store: Store) -> None:
    _save(store, _state())
    loaded = store.load_patients({"p1": ["a1"]})["p1"]
    loaded.appointments["a1"].stage = "WON"
    assert store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"].stage == "PREPAYMENT_INVOICE"


def test_a_continued_appointment_keeps_its_deal_mapped_to_the_appointment_that_took_it_over(store: Store) -> None:
    _save(store, _state())
    state = _state(version=4)
    state.appointments["a0"] = AppointmentState(appointment_id="a0", deal_id="20", version=4)
    state.continued = {"a0": "a1"}
    _save(store, state, ("a0",))
    assert store.patient_for_crm("deal", "20") == {"patient_id": "p1", "appointment_id": "a1"}


@pytest.mark.parametrize("older_first", [False, True])
def test_an_older_version_never_overwrites_a_newer_one(store: Store, older_first: bool) -> None:
    newer, older = _state(version=5), _state(version=4)
    older.appointments["a1"].stage = "PREPARATION"
    older.content_hash = "old"
    loaded = store.load_patients({"p1": ["a1"]})
    if older_first:  # both read the patient before either wrote: the first write is a fresh one
        store.save_patients([(older, ["a1"])], loaded)
        _save(store, newer)
    else:
        _save(store, newer)
        _save(store, older)
    after = store.load_patients({"p1": ["a1"]})["p1"]
    assert (after.version, after.content_hash, after.appointments["a1"].stage) == (5, "h1", "PREPAYMENT_INVOICE")


def test_a_save_with_release_keeps_a_newer_state_and_releases_with_the_states(store: Store) -> None:
    """The sync's last write: its states, claims and settled intents at once. A state stored with a newer
    version since the sync read it is kept (on the table: the transaction is cancelled for it and sent
    again without it); the other patient's is stored, and the claims and intents go with them."""
    _save(store, _state("p1"))
    assert store.claim_patients(["p1", "p2"], "sync-1", 1000, 600) == {"p1", "p2"}
    store.write_intents(["P#p2", "A#a1"], 1000)
    loaded = store.load_patients({"p1": ["a1"], "p2": ["a1"]})
    _save(store, _state("p1", version=5))  # written since the read
    release = ClaimRelease(["p1", "p2"], ["P#p2", "A#a1"])
    store.save_patients([(_state("p1", version=4), ["a1"]), (_state("p2", version=4), ["a1"])], loaded, release)
    stored = store.load_patients({"p1": ["a1"], "p2": ["a1"]})
    assert (stored["p1"].version, stored["p1"].appointments["a1"].version) == (5, 5)
    assert (stored["p2"].version, stored["p2"].appointments["a1"].version) == (4, 4)
    assert release.done  # with the states, in one write: the syncer does not release again
    assert store.claim_patients(["p1", "p2"], "sync-2", 1001, 600) == {"p1", "p2"}
    assert store.load_intents(["P#p2", "A#a1"]) == {}


def test_an_equal_version_is_written_again(store: Store) -> None:
    """A redelivered message repeats its write: safe, and it lands."""
    _save(store, _state())
    again = _state()
    again.content_hash = "h1b"
    _save(store, again)
    assert store.load_patients({"p1": []})["p1"].content_hash == "h1b"


def test_delete_patient_removes_every_trace(store: Store) -> None:
    _save(store, _state())
    store.index_phone("k1", "p1", None)
    store.index_phone("k1", "p2", None)
    store.delete_patient("p1")
    assert store.load_patients({"p1": ["a1"]})["p1"] == PatientState(patient_id="p1")
    assert store.patients_by_phone("k1") == ["p2"]
    assert store.patient_for_crm("deal", "20") is None and store.patient_for_crm("contact", "10") is None
    store.delete_patient("p1")  # safe to repeat


def test_create_intents_are_written_read_and_cleared(store: Store) -> None:
    assert store.load_intents(["P#p1"]) == {}
    store.write_intents(["P#p1", "A#a1", "P#p1"], 1000)
    store.write_intents(["A#a1"], 1005)  # a retry records the later attempt
    assert store.load_intents(["P#p1", "A#a1", "A#a2"]) == {"P#p1": 1000, "A#a1": 1005}
    store.clear_intents(["P#p1", "A#a2"])
    assert store.load_intents(["P#p1", "A#a1"]) == {"A#a1": 1005}


def test_a_syncs_read_answers_what_the_three_reads_answer(store: Store) -> None:
    """``read_for_sync`` is ``load_patients``, ``load_intents``, ``opted_out_many`` and
    ``channels_on_record_many`` at once."""
    _save(store, _state("p1"))
    store.write_intents(["P#p2", "A#a1"], 1000)
    store.record_opt_outs("pat:p1", ["email"], "mis", 1000)
    store.record_opt_outs("email:e1", ["sms"], "mailchimp", 1000)
    wanted = {"p1": ["a1", "a9"], "p2": []}
    intents = ["P#p1", "P#p2", "A#a1", "A#a9"]
    channels = ["email", "sms", "call", "marketing"]
    ledger = {"pat:p1": channels, "pat:p2": channels, "email:e1": channels, "email:e2": ["email"]}
    store.record_opt_outs("email:e2", ["sms"], "mailchimp", 1000)  # a channel not asked about
    read = store.read_for_sync(wanted, intents, ledger)
    assert read.states == store.load_patients(wanted)
    assert read.intents == store.load_intents(intents) == {"P#p2": 1000, "A#a1": 1000}
    assert read.opted_out == {"pat:p1": {"email"}, "pat:p2": set(), "email:e1": {"sms"}, "email:e2": set()}
    assert read.opted_out == {s: store.opted_out_many([s], ledger[s])[s] for s in ledger}
    store.record_opt_ins("pat:p1", ["email"], "crm", 2000)  # lifted: still on record
    read = store.read_for_sync(wanted, intents, ledger)
    assert read.opted_out["pat:p1"] == set()
    assert read.on_record == store.channels_on_record_many(ledger)
    assert read.on_record == {"pat:p1": {"email"}, "pat:p2": set(), "email:e1": {"sms"}, "email:e2": set()}


def test_releasing_claims_also_forgets_the_settled_intents_given(store: Store) -> None:
    store.write_intents(["P#p1", "A#a1", "A#a2"], 1000)
    assert store.claim_patients(["p1"], "one", 1000, 300) == {"p1"}
    store.release_claims(["p1"], ["P#p1", "A#a1"])
    assert store.load_intents(["P#p1", "A#a1", "A#a2"]) == {"A#a2": 1000}
    assert store.claim_patients(["p1"], "two", 1000, 300) == {"p1"}


def test_a_cursor_round_trips_and_is_a_copy(store: Store) -> None:
    assert store.get_cursor("medods") is None
    cursor: dict[str, Any] = {"appointments": 17, "seen": {"a1": 17}}
    store.put_cursor("medods", cursor)
    cursor["seen"]["a2"] = 18
    assert store.get_cursor("medods") == {"appointments": 17, "seen": {"a1": 17}}
    assert store.get_cursor("renovatio") is None


# --- coordination -------------------------------------------------------------------------------------------------


def test_a_lease_admits_one_holder_until_released_or_expired(store: Store) -> None:
    assert store.acquire_lease("poll:medods", "run-1", 300, now=1000)
    assert not store.acquire_lease("poll:medods", "run-2", 300, now=1100)
    assert store.acquire_lease("poll:other", "run-2", 300, now=1100)  # another name is another lease
    assert store.acquire_lease("poll:medods", "run-1", 300, now=1100)  # the holder may renew
    assert not store.acquire_lease("poll:medods", "run-2", 300, now=1400)  # renewed: alive until 1400
    assert store.acquire_lease("poll:medods", "run-2", 300, now=1401)  # expired: taken over
    store.release_lease("poll:medods", "run-1")  # not the holder any more: no effect
    assert not store.acquire_lease("poll:medods", "run-3", 300, now=1402)
    store.release_lease("poll:medods", "run-2")
    assert store.acquire_lease("poll:medods", "run-3", 300, now=1403)


def test_a_poll_holds_its_feed_alone_and_starts_from_the_cursor_stored_before(store: Store) -> None:
    assert store.take_poll("medods", "run-1", 300, now=1000)
    assert store.poll_cursor("medods") is None
    assert not store.take_poll("medods", "run-2", 300, now=1100)
    assert not store.acquire_lease("poll:medods", "run-2", 300, now=1100)  # the same lease as an older release's
    assert store.take_poll("renovatio", "run-2", 300, now=1100)  # another feed is another lease
    store.store_poll_cursor("medods", {"appointments": 17})
    store.release_poll("medods", "run-2")  # not the holder: no effect
    assert not store.take_poll("medods", "run-2", 300, now=1101)
    store.release_poll("medods", "run-1")
    assert store.take_poll("medods", "run-2", 300, now=1101)
    cursor = store.poll_cursor("medods")
    assert cursor == {"appointments": 17} and store.get_cursor("medods") == {"appointments": 17}
    cursor["appointments"] = 99  # a copy
    store.store_poll_cursor("medods", {"appointments": 18})  # and the holder crashes: the lease expires
    assert not store.take_poll("medods", "run-3", 300, now=1401)
    assert store.take_poll("medods", "run-3", 300, now=1402)
    assert store.poll_cursor("medods") == {"appointments": 18}
    store.release_poll("medods", "run-3")
    assert store.acquire_lease("poll:medods", "other", 300, now=1403)  # released: free to any taker


def test_patients_are_claimed_by_one_owner_at_a_time(store: Store) -> None:
    assert store.claim_patients(["p1", "p2", "p1"], "sync-1", 1000, 300) == {"p1", "p2"}
    assert store.claim_patients(["p2", "p3"], "sync-2", 1100, 300) == {"p3"}
    assert store.claim_patients(["p1", "p2"], "sync-1", 1100, 300) == {"p1", "p2"}  # a retry by the owner
    assert store.claim_patients(["p2"], "sync-2", 1401, 300) == {"p2"}  # expired: taken over
    store.release_claims(["p1", "p2", "p9"])
    assert store.claim_patients(["p1", "p2"], "sync-3", 1402, 300) == {"p1", "p2"}
    assert store.claim_patients([], "sync-3", 1402, 300) == set()


def test_a_claim_left_behind_is_known_to_the_attempt_that_takes_it_over(store: Store) -> None:
    """A claim that expired without being released (its owner died) is taken over, and said so; a
    released claim, a first claim and a retry by the owner are not."""
    assert store.claim_patients(["p1", "p2"], "dead", 1000, 300).taken_over == set()
    store.release_claims(["p2"])
    assert store.claim_patients(["p1", "p3"], "next", 1200, 300).taken_over == set()  # p1 is held: not claimed
    claimed = store.claim_patients(["p1", "p2", "p3"], "next", 1301, 300)
    assert (claimed, claimed.taken_over) == ({"p1", "p2", "p3"}, {"p1"})
    assert store.claim_patients(["p1"], "next", 1302, 300).taken_over == set()  # the owner's retry


def test_marking_a_patient_unsure_raises_its_write_epoch_alone(store: Store) -> None:
    state = _state()
    store.save_patients([(state, ["a1"])], {})
    store.mark_unsure(["p1", "never-stored"])
    loaded = store.load_patients({"p1": ["a1"], "never-stored": []})
    assert loaded["p1"] == state.model_copy(update={"write_epoch": state.write_epoch + 1})
    assert loaded["never-stored"] == PatientState(patient_id="never-stored")


def test_a_crm_record_is_adopted_by_one_appointment(store: Store) -> None:
    assert store.claim_adoptions({"L5": "a1", "D7": "a1"}, 1000, 60) == set()
    assert store.claim_adoptions({"L5": "a2", "L6": "a2"}, 1010, 60) == {"L5"}
    assert store.claim_adoptions({"L5": "a1"}, 1020, 60) == set()  # a redelivery of the adopter
    assert store.claim_adoptions({"D7": "a3"}, 1061, 60) == set()  # expired


# --- indexes -----------------------------------------------------------------------------------------------------


def test_the_phone_index_moves_with_the_phone(store: Store) -> None:
    """The poll adds a page's entries; a sync moves a patient's changed phone, the poll's entry with it."""
    store.index_contacts([("k1", "p1"), ("k1", "p2"), ("k1", "p2")], [])  # a family sharing one phone
    store.index_contacts([("k1", "p2")], [])  # the next page holds p2 again: safe to repeat
    assert store.patients_by_phone("k1") == ["p1", "p2"]
    store.index_phone("k2", "p1", "k1")
    store.index_phone("k2", "p1", "k2")  # unchanged: safe to repeat
    assert (store.patients_by_phone("k1"), store.patients_by_phone("k2")) == (["p2"], ["p1"])
    store.index_phone("k3", "p3", None)  # a first phone, no entry to move
    assert (store.patients_by_phone("k3"), store.patients_by_phone("k4")) == (["p3"], [])


def test_crm_phone_index_entries_are_added_and_dropped_per_contact(store: Store) -> None:
    assert store.crm_phone_index() == (None, {})
    store.update_crm_phones(add=[("11", "k1"), ("11", "k2"), ("12", "k1")], drop=[])
    store.update_crm_phones(add=[("11", "k3")], drop=[("11", "k1"), ("13", "k9")])  # a missing one is fine
    store.update_crm_phones(add=[("12", "k5")], drop=[("12", "k5")])  # in both: it stays
    assert store.crm_phone_index() == (None, {"11": {"k2", "k3"}, "12": {"k1", "k5"}})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(moves=st.lists(st.integers(min_value=1, max_value=2**40), min_size=1, max_size=8))
def test_the_crm_phone_index_cursor_only_moves_forward_whatever_the_order_containers_report(
    new_store: StoreFactory, moves: list[int]
) -> None:
    """Containers store how far they read in any order: a slower one never moves the cursor back, or a
    new container would skip the contacts changed in between."""
    store = new_store()
    for seen_to in moves:
        store.advance_crm_phones(seen_to)
    assert store.crm_phone_index()[0] == max(moves)


def test_the_email_index_finds_every_subject_of_an_address(store: Store) -> None:
    store.index_emails([("e1", "pat:p1"), ("e1", "pat:p2"), ("e1", "pat:p1"), ("e2", "pat:p3")])
    assert store.subjects_by_email("e1") == ["pat:p1", "pat:p2"]
    assert store.subjects_by_email("e9") == []


def test_a_poll_pages_phones_and_e_mails_are_indexed_together(store: Store) -> None:
    phones = [("k1", "p1"), ("k1", "p2"), ("k1", "p1")]  # a family's phone, a patient twice on a page
    store.index_contacts(phones, [("e1", "pat:p1"), ("e1", "pat:p1"), ("e2", "pat:p2")])
    store.index_contacts([], [])
    store.index_emails([("e2", "pat:p2")])  # consent's write of the same entry: one key format, one entry
    assert store.patients_by_phone("k1") == ["p1", "p2"]
    assert (store.subjects_by_email("e1"), store.subjects_by_email("e2")) == (["pat:p1"], ["pat:p2"])


# --- the consent ledger --------------------------------------------------------------------------------------------


def test_opt_outs_are_sticky_and_only_a_newer_mis_or_crm_opt_in_lifts_one(store: Store) -> None:
    assert store.record_opt_outs("pat:p1", ["email", "sms", "email"], "link", 1000) == ["email", "sms"]
    assert store.record_opt_outs("pat:p1", ["email", "call"], "mis", 2000) == ["call"]  # email: already out
    with pytest.raises(ValueError, match="MIS or the CRM"):
        store.record_opt_ins("pat:p1", ["email"], "mailchimp", 3000)
    assert store.record_opt_ins("pat:p1", ["email"], "crm", 1000) == []  # not newer than the opt-out
    assert store.record_opt_ins("pat:p1", ["marketing"], "crm", 3000) == []  # never out: nothing to lift
    assert store.record_opt_ins("pat:p1", ["email"], "mis", 3000) == ["email"]
    assert store.opted_out_many(["pat:p1", "pat:p2"], ["email", "sms", "call", "marketing"]) == {
        "pat:p1": {"sms", "call"},
        "pat:p2": set(),
    }
    assert store.record_opt_outs("pat:p1", ["email"], "mailchimp", 2500) == []  # older than the opt-in
    assert store.record_opt_outs("pat:p1", ["email"], "mailchimp", 3000) == ["email"]  # as new: out wins
    assert store.record_opt_outs("pat:p1", [], "mis", 4000) == []


def test_the_ledger_says_which_channels_it_has_any_record_of(store: Store) -> None:
    """An opt-out, lifted or not, is on record; a channel never recorded, or another subject's, is not. A
    memory store over another store asks it for what it has not seen itself."""
    store.record_opt_outs("pat:p1", ["email", "sms"], "link", 1000)
    store.record_opt_ins("pat:p1", ["sms"], "mis", 2000)
    store.record_opt_outs("pat:p2", ["call"], "link", 1000)
    assert store.channels_on_record("pat:p1", ["email", "sms", "call", "marketing"]) == {"email", "sms"}
    assert store.channels_on_record("pat:p3", ["email"]) == set()
    wanted = {"pat:p1": ["sms", "call"], "pat:p2": ["call", "email"], "pat:p3": ["email"]}
    assert store.channels_on_record_many(wanted) == {"pat:p1": {"sms"}, "pat:p2": {"call"}, "pat:p3": set()}
    layered = MemoryStore(below=store)
    layered.record_opt_outs("pat:p1", ["marketing"], "crm", 3000)
    assert layered.channels_on_record("pat:p1", ["email", "sms", "call", "marketing"]) == {"email", "sms", "marketing"}


def test_a_crm_opt_in_counts_only_once_gained_on_the_mapped_contact(store: Store) -> None:
    def observe(*args: Any, **kwargs: Any) -> tuple[list[str], int | None]:
        seen = store.observe_crm_opt_ins(*args, **kwargs)
        return seen.gained, seen.last_seen_at

    assert observe("pat:p1", "c1", ["email"], 1000) == ([], None)  # first sight: a baseline, never an opt-in
    assert observe("pat:p1", "c1", ["email", "sms"], 2000) == (["sms"], 1000)  # gained after the sighting at 1000
    assert observe("pat:p1", "c1", ["email", "sms", "call"], 1500)[0] == []  # older than the last snapshot
    assert observe("pat:p1", "c1", ["email", "sms", "call"], 3000, held=["call"]) == ([], 2000)  # opted out there
    assert observe("pat:p1", "c1", ["email", "sms", "call"], 3100) == (["call"], 3000)  # counted once released
    assert observe("pat:p1", "c2", ["email", "sms", "call", "marketing"], 3200) == ([], None)  # another contact
    assert observe("pat:p1", "c2", [], 3300) == ([], 3200)
    assert observe("pat:p1", "c2", ["sms"], 3400) == (["sms"], 3300)
    assert observe("pat:p1", "c2", ["sms", "call"], 3400) == (["call"], 3400)  # as new as the last one: not older


def test_outputs_remember_the_digest_each_target_reached(store: Store) -> None:
    assert store.output_done("pat:p1") == {}
    store.mark_output("pat:p1", "crm", "email")
    store.mark_outputs("mis", {"pat:p1": "email", "pat:p2": "-"})
    store.mark_outputs("crm", {})
    store.note_identity("pat:p1", {"phone_key": "k1", "email_key": None})
    assert store.output_done("pat:p1") == {"crm": "email", "mis": "email"}
    assert store.output_done("pat:p2") == {"mis": "-"}
    store.mark_outputs_many({"pat:p2": {"crm": "sms", "mailchimp": "sms"}, "pat:p3": {"mis": "-"}, "pat:p4": {}})
    store.note_identities({"pat:p2": {"mis_id": "p2", "crm_contact_id": None}, "pat:p3": {"email_key": None}})
    assert store.outputs_done_many(["pat:p1", "pat:p2", "pat:p3", "pat:p4"]) == {
        "pat:p1": {"crm": "email", "mis": "email"},
        "pat:p2": {"mis": "-", "crm": "sms", "mailchimp": "sms"},
        "pat:p3": {"mis": "-"},
        "pat:p4": {},
    }


def test_a_subjects_mailchimp_members_are_all_remembered(store: Store) -> None:
    old, new, other = subscriber_hash("a@example.org"), subscriber_hash("b@example.org"), subscriber_hash("c@x.org")
    assert store.mailchimp_members_many(["pat:p1"]) == {"pat:p1": MemberBook()}
    store.note_mailchimp_member("pat:p1", old)
    store.note_mailchimp_member("pat:p1", new, moved_from=old)
    assert store.mailchimp_members_many(["pat:p1", "pat:p2"]) == {
        "pat:p1": MemberBook(current=new, moved={old: new}, known={old, new}),
        "pat:p2": MemberBook(),
    }
    store.note_mailchimp_member("pat:p1", old, moved_from=other)  # back to the first: not moved away any more
    assert store.mailchimp_members_many(["pat:p1"])["pat:p1"] == MemberBook(
        current=old, moved={other: old}, known={old, new, other}
    )
    with pytest.raises(ValueError, match="subscriber hash"):
        store.note_mailchimp_member("pat:p1", "a@example.org")


# --- both at once ------------------------------------------------------------------------------------------------

_names = st.sampled_from(["a", "b", "c"])
_times = st.integers(min_value=0, max_value=6)  # few values: equal times and expiries happen often
_seconds = st.integers(min_value=0, max_value=3)
_channels = st.lists(st.sampled_from(["email", "sms", "call"]), max_size=3, unique=True)
_ops = st.one_of(
    st.tuples(st.just("acquire_lease"), _names, _names, _seconds, _times),
    st.tuples(st.just("release_lease"), _names, _names),
    st.tuples(st.just("claim_patients"), st.lists(_names, max_size=3), _names, _times, _seconds),
    st.tuples(st.just("release_claims"), st.lists(_names, max_size=3)),
    st.tuples(st.just("claim_adoptions"), st.dictionaries(_names, _names, max_size=2), _times, _seconds),
    st.tuples(st.just("record_opt_outs"), _names, _channels, st.sampled_from(["mis", "link", "crm"]), _times),
    st.tuples(st.just("record_opt_ins"), _names, _channels, st.sampled_from(["mis", "crm"]), _times),
    st.tuples(
        st.just("record_opt_outs_many"),
        st.dictionaries(_names, _channels, max_size=3),
        st.sampled_from(["mis", "link", "crm"]),
        _times,
    ),
    st.tuples(st.just("observe_crm_opt_ins"), _names, _names, _channels, _times, _channels),
    st.tuples(st.just("opted_out_many"), st.lists(_names, max_size=3), _channels),
    st.tuples(st.just("index_phone"), _names, _names, st.one_of(st.none(), _names)),
    st.tuples(st.just("patients_by_phone"), _names),
    st.tuples(st.just("advance_crm_phones"), _times),
)


def _answer(value: Any) -> Any:
    """Answers compared as values: a set's order, a list of channels' order, is the implementation's own."""
    if isinstance(value, Claimed):
        return sorted(value), sorted(value.taken_over)
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _answer(v) for k, v in value.items()}
    return value


@settings(
    max_examples=min(examples(60), 600), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_ops, min_size=1, max_size=25))
def test_both_stores_answer_every_sequence_of_conditional_writes_alike(
    template_tables: Callable[[], Table], ops: list[tuple[Any, ...]]
) -> None:
    dynamo, memory = DynamoStore(template_tables()), MemoryStore()
    for name, *args in ops:
        answers = [_answer(getattr(store, name)(*args)) for store in (dynamo, memory)]
        assert answers[0] == answers[1], (name, args)
    assert dynamo.crm_phone_index() == memory.crm_phone_index()
