"""A stage change whose outcome was unknown, overtaken by a newer event of the same visit before any retry
stored it: the real syncer on moto and the Bitrix24 emulator (its guard in the write's batch, its
last-modifier field). Found by `make chaos` (seed 2026, Bitrix24): a deal left at "no-show" for a visit the
MIS had moved to a new time, because the newer event was planned from the state before the lost write."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway
from clinicsync.application.sync import CLAIM_SECONDS, Syncer, SyncIncomplete
from clinicsync.domain.audience import AudienceMember
from clinicsync.domain.config import MailchimpConnection
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import deal_intent
from clinicsync.domain.models import AppointmentStatus, PatientChanges
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from sandbox.local import setup_demo_portal
from tests.adapters.test_bitrix24_gateway import _client
from tests.helpers import T0, appointment, days, demo_config, patient

CONFIG = demo_config()
PRIMARY = CONFIG.pipeline(repeat=False)


@pytest.fixture
def portal() -> Iterator[tuple[Bitrix24Emulator, str]]:
    emulator = Bitrix24Emulator()
    setup_demo_portal(emulator)
    server = ServedApp(emulator).start()
    yield emulator, server.base_url
    server.stop()


def _syncer(emulator: Bitrix24Emulator, base: str, store: DynamoStore) -> Syncer:
    """The real syncer on the portal and the moto table, with no wait for claims."""
    return Syncer(CONFIG, store, Bitrix24Gateway(_client(emulator, base), CONFIG), KeyedHasher(b"k" * 32), claim_wait=0)


def _visit(status: AppointmentStatus, version: int, moved: int = 0) -> list[PatientChanges]:
    return [
        PatientChanges(
            patient=patient(), appointments=(appointment(status=status, version=version, start=T0 + days(moved)),)
        )
    ]


def test_a_stage_change_whose_response_was_lost_and_whose_message_was_overtaken_is_set_right_by_the_next_event(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """The no-show's write lands but its response is lost (the patient's state is not stored); its message
    is then overtaken (dead-lettered, replayed later as stale) by the front desk moving the visit to a new
    time. The move's stage ("booked") is the one our state remembers, yet the deal is at "no-show": the
    move sends its stage, and the guard's read finds the deal last modified by us, so that stage is our
    own lost write, not a manager's move to respect. The deal ends where the MIS says."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [deal_id] = emulator.deals
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.BOOKED]

    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.NO_SHOW]  # landed, unknown to us

    syncer.sync(_visit(AppointmentStatus.BOOKED, 3, moved=5))  # MEDODS: a moved no-show is "approved" again
    syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))  # the dead letter replayed: older, changes nothing
    assert [d["ORIGIN_ID"] for d in emulator.deals.values()] == ["a1"]
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.RESCHEDULED]
    state = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"]
    assert (state.version, state.stage, state.manual_stage) == (3, PRIMARY.stages[AppointmentStatus.RESCHEDULED], None)


def test_a_visit_back_to_the_content_we_last_stored_after_a_lost_stage_change_is_written_again(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """X -> Y (outcome unknown) -> X: the no-show's write lands, its response is lost; before any retry the
    front desk books the visit again at the same time, so the newer event's synced fields are exactly those
    of the state stored for the booking. The failed attempt marked the patient's stored digests unsure, so
    the booking is not skipped as unchanged: it is sent, its guard fails on the no-show our lost write left,
    the read finds that stage ours, and the deal ends at "booked"."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [deal_id] = emulator.deals

    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.NO_SHOW]  # landed, unknown to us

    syncer.sync(_visit(AppointmentStatus.BOOKED, 3))  # the same content as version 1's
    syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))  # the dead letter replayed: older, changes nothing
    assert [d["ORIGIN_ID"] for d in emulator.deals.values()] == ["a1"]
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.BOOKED]
    state = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"]
    assert (state.version, state.stage, state.manual_stage) == (3, PRIMARY.stages[AppointmentStatus.BOOKED], None)


def test_a_managers_move_made_under_the_integration_login_holds_against_a_reschedule(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """A manager working under the webhook's user moves the deal to "in work", so the portal records our
    integration user as its last modifier. Every write of ours was answered, so that stage cannot be our own
    lost write: the reschedule's guard fails, the read takes the stage for the manager's move it is, and it
    holds until the MIS moves forward (it was once written over with "rescheduled")."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [deal_id] = emulator.deals
    in_work = PRIMARY.stages[AppointmentStatus.NO_SHOW]
    emulator.manager_update("deal", int(deal_id), {"STAGE_ID": in_work}, user_id=emulator.user_id)  # no webhook yet
    assert emulator.deals[deal_id]["MODIFY_BY_ID"] == str(emulator.user_id)

    syncer.sync(_visit(AppointmentStatus.BOOKED, 2, moved=1))  # a reschedule: no move forward
    assert emulator.deals[deal_id]["STAGE_ID"] == in_work
    state = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"]
    assert (state.version, state.manual_stage) == (2, in_work)

    syncer.sync(_visit(AppointmentStatus.COMPLETED, 3, moved=1))  # the MIS moves forward: the sync moves on
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.COMPLETED]


def test_a_no_show_whose_continuation_and_own_booking_were_both_lost_moves_its_own_deal(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """The re-booking property's drawn history on the real syncer: a1 is booked (deal D1); a lost attempt
    carries a1's no-show and a2's booking, and a2 continues D1; another lost attempt books a1 again and
    creates its own deal D2 (each attempt's save fails after its batch); a1 is then a no-show again. The retry
    finds a2 under D1 and a1 under D2 (both noted intents): D2 moves to "no-show" (it stayed at "booked", a1
    skipped as ``deal_continued``)."""
    emulator, base = portal
    store = _StoreDownAfterTheCrmWrite(template_tables())
    syncer = _syncer(emulator, base, store)

    def visits(a1: AppointmentStatus, version: int) -> list[PatientChanges]:
        first = appointment("a1", status=a1, start=T0 + days(2), version=version)
        return [
            PatientChanges(patient=patient(), appointments=(appointment("a2", start=T0 + days(4), version=2), first))
        ]

    syncer.sync([PatientChanges(patient=patient(), appointments=(appointment("a1", start=T0 + days(2), version=1),))])
    [d1] = emulator.deals
    store.failing = True  # each attempt's writes land, its save fails: nothing of it is remembered
    for status, version in ((AppointmentStatus.NO_SHOW, 3), (AppointmentStatus.BOOKED, 4)):
        with pytest.raises(RuntimeError, match="table down"):
            syncer.sync(visits(status, version))
    store.failing = False
    [d2] = set(emulator.deals) - {d1}  # landed, unknown to us
    assert (emulator.deals[d1]["ORIGIN_ID"], emulator.deals[d2]["ORIGIN_ID"]) == ("a2", "a1")

    syncer.sync(visits(AppointmentStatus.NO_SHOW, 5))
    stages = {d["ORIGIN_ID"]: (did, d["STAGE_ID"]) for did, d in emulator.deals.items()}
    no_show, booked = PRIMARY.stages[AppointmentStatus.NO_SHOW], PRIMARY.stages[AppointmentStatus.BOOKED]
    assert stages == {"a2": (d1, booked), "a1": (d2, no_show)}


class _Crash(BaseException):
    """The invocation is killed: no handler of ours runs, nothing is released."""


class _DiesAfterTheCrmWrite(DynamoStore):
    """The store of an invocation that dies once the CRM batch ran, before its states are saved: nothing
    it would write after that point is written."""

    dying = False

    def save_patients(self, *args: Any, **kwargs: Any) -> None:
        if self.dying:
            raise _Crash
        super().save_patients(*args, **kwargs)

    def release_claims(self, *args: Any, **kwargs: Any) -> None:
        if not self.dying:
            super().release_claims(*args, **kwargs)

    def mark_unsure(self, *args: Any, **kwargs: Any) -> None:
        if not self.dying:
            super().mark_unsure(*args, **kwargs)


def test_a_visit_back_to_the_content_we_last_stored_after_a_crash_past_the_stage_change_is_written_again(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """X -> Y (the invocation dies after its batch ran: its claim stays, nothing is marked) -> X. The next
    attempt takes the dead one's claim over: that attempt may have written anything for the patient, so its
    stored digests are doubted, and the booking at the old time is sent and lands over the no-show."""
    emulator, base = portal
    store = _DiesAfterTheCrmWrite(template_tables())
    now = [1_000_000.0]
    syncer = Syncer(
        CONFIG,
        store,
        Bitrix24Gateway(_client(emulator, base), CONFIG),
        KeyedHasher(b"k" * 32),
        claim_wait=0,
        clock=lambda: now[0],
    )
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [deal_id] = emulator.deals

    store.dying = True
    with pytest.raises(_Crash):
        syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))
    store.dying = False
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.NO_SHOW]  # landed, unknown to us

    now[0] += CLAIM_SECONDS + 1  # the dead invocation's claim has expired
    syncer.sync(_visit(AppointmentStatus.BOOKED, 3))  # the same content as version 1's
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.BOOKED]
    assert store.claim_patients(["p1"], "next", int(now[0]), 60) == {"p1"}  # released, not left behind


class _LosingAudience:
    """Mailchimp's batch: every upsert lands; the ``lose``-th answer is lost (the call raises)."""

    def __init__(self, lose: int) -> None:
        self.members: dict[str, dict[str, str]] = {}
        self.calls, self.lose = 0, lose

    def upsert(self, members: Sequence[AudienceMember]) -> set[str]:
        self.calls += 1
        self.members |= {m.patient_id: dict(m.merge_fields) for m in members}
        if self.calls == self.lose:
            raise httpx.ReadTimeout("lost")
        return {m.patient_id for m in members}


def test_an_audience_member_back_to_the_content_we_last_stored_after_a_lost_upsert_is_sent_again(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """The member's city goes Moscow -> Tver (Mailchimp's answer lost: the CRM side succeeds, so the state is
    stored) -> Moscow. The lost upsert forgets the member's stored digest, so Moscow is sent again and the
    audience ends where the MIS is."""
    emulator, base = portal
    config = CONFIG.model_copy(update={"mailchimp": MailchimpConnection(list_id="L1")})
    audience = _LosingAudience(lose=2)
    syncer = Syncer(
        config,
        DynamoStore(template_tables()),
        Bitrix24Gateway(_client(emulator, base), config),
        KeyedHasher(b"k" * 32),
        audience=audience,
        claim_wait=0,
    )
    for version, city in enumerate(["Москва", "Тверь", "Москва"], start=1):
        visit = appointment(version=version)
        syncer.sync([PatientChanges(patient=patient(version=version, city=city), appointments=(visit,))])
    assert audience.calls == 3
    assert audience.members["p1"]["CITY"] == "Москва"


class _StoreDownAfterTheCrmWrite(DynamoStore):
    """The table fails once the CRM batch ran (the states' save), and the failure's mark with it if
    ``mark_too``; the invocation lives on and its handlers run."""

    failing = False
    mark_too = False

    def save_patients(self, *args: Any, **kwargs: Any) -> None:
        if self.failing:
            raise RuntimeError("table down")
        super().save_patients(*args, **kwargs)

    def mark_unsure(self, *args: Any, **kwargs: Any) -> None:
        if self.failing and self.mark_too:
            raise RuntimeError("table down")
        super().mark_unsure(*args, **kwargs)


@pytest.mark.parametrize("mark_too", [False, True], ids=["mark_stored", "mark_lost"])
def test_a_visit_back_to_the_content_we_last_stored_after_the_save_failed_past_the_stage_change_is_written_again(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table], mark_too: bool
) -> None:
    """X -> Y (the CRM took the no-show, the save failed) -> X. The error's path marks the patient's digests
    unsure before the claim goes; when that mark cannot be stored either, the claim is kept, so the patient
    waits for the claim to expire and the attempt that takes it over marks it then."""
    emulator, base = portal
    store = _StoreDownAfterTheCrmWrite(template_tables())
    store.mark_too = mark_too
    now = [1_000_000.0]
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    syncer = Syncer(CONFIG, store, gateway, KeyedHasher(b"k" * 32), claim_wait=0, clock=lambda: now[0])
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    [deal_id] = emulator.deals

    store.failing = True
    with pytest.raises(RuntimeError, match="table down"):
        syncer.sync(_visit(AppointmentStatus.NO_SHOW, 2))
    store.failing = False
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.NO_SHOW]  # landed, unknown to us

    if mark_too:
        with pytest.raises(SyncIncomplete):  # the claim is still held: deferred
            syncer.sync(_visit(AppointmentStatus.BOOKED, 3))
        now[0] += CLAIM_SECONDS + 1
    syncer.sync(_visit(AppointmentStatus.BOOKED, 3))  # the same content as version 1's
    assert emulator.deals[deal_id]["STAGE_ID"] == PRIMARY.stages[AppointmentStatus.BOOKED]


def test_a_booking_polled_with_the_retry_of_a_lost_continuation_gets_a_deal_of_its_own(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """The rebooking property's shrunk history (tests/unit/test_rebooking.py) on the real syncer: a1 is first
    seen as a no-show; a3's re-booking continues its deal D, the response is lost; the retry carries a3 with
    a2, booked earlier than a3. The continuation noted an intent for a3 as a create does, so the retry looks
    a3 up by MIS id and finds D under it: D stays a3's (a manager saw it there), and a2, planned first, gets a
    deal of its own rather than taking D over again."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)
    no_show = appointment("a1", status=AppointmentStatus.NO_SHOW, start=T0 + days(2), version=5)
    syncer.sync([PatientChanges(patient=patient(), appointments=(no_show,))])
    [deal_id] = emulator.deals

    rebooked = appointment("a3", start=T0 + days(6), version=6)
    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync([PatientChanges(patient=patient(), appointments=(rebooked,))])
    assert emulator.deals[deal_id]["ORIGIN_ID"] == "a3"  # landed, unknown to us

    other = appointment("a2", start=T0 + days(4), version=7)
    syncer.sync([PatientChanges(patient=patient(), appointments=(rebooked, other))])
    origins = {d["ORIGIN_ID"]: str(did) for did, d in emulator.deals.items()}
    assert sorted(origins) == ["a2", "a3"] and len(emulator.deals) == 2
    assert origins["a3"] == str(deal_id)  # the deal the CRM put under a3 stays there
    saved = store.load_patients({"p1": ["a1", "a2", "a3"]})["p1"]
    assert {aid: saved.own_deal(aid) for aid in ("a2", "a3")} == {aid: origins[aid] for aid in ("a2", "a3")}
    assert saved.continued == {"a1": "a3"}


def test_a_continued_no_show_booked_again_with_a_lost_response_then_a_no_show_again_moves_its_own_deal(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """The rebooking property's shrunk history on the real syncer: a2 continued a1's no-show deal; a1 is booked
    again and its new deal is created, the response lost; a1 is a no-show again. The retry looks a1 up (its
    create intent), finds it under that new deal, not the one it handed on: the deal moves to "no-show"."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)

    def visit(aid: str, status: AppointmentStatus, version: int) -> list[PatientChanges]:
        start = T0 + days(2 * int(aid[1]))
        return [
            PatientChanges(
                patient=patient(), appointments=(appointment(aid, status=status, start=start, version=version),)
            )
        ]

    syncer.sync(visit("a1", AppointmentStatus.NO_SHOW, 2))
    syncer.sync(visit("a2", AppointmentStatus.BOOKED, 3))
    [continued] = emulator.deals
    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync(visit("a1", AppointmentStatus.BOOKED, 4))
    [own] = set(emulator.deals) - {continued}  # landed, unknown to us

    syncer.sync(visit("a1", AppointmentStatus.NO_SHOW, 5))
    stages = {d["ORIGIN_ID"]: (did, d["STAGE_ID"]) for did, d in emulator.deals.items()}
    no_show, booked = PRIMARY.stages[AppointmentStatus.NO_SHOW], PRIMARY.stages[AppointmentStatus.BOOKED]
    assert stages == {"a2": (continued, booked), "a1": (own, no_show)}


def test_the_retry_of_a_lost_create_settles_its_intent_so_the_visits_next_change_looks_nothing_up(
    portal: tuple[Bitrix24Emulator, str], template_tables: Callable[[], Table]
) -> None:
    """A known patient's new visit: its create lands, the response is lost; the retry finds the deal by MIS
    id (its intent) and updates it. That update writes a deal our table did not hold for the visit, so it
    notes the intent again and settles it once the state is stored: the visit's next change costs its one
    guarded write and no look-up (the intent had stayed until it expired, two days of look-ups)."""
    emulator, base = portal
    store = DynamoStore(template_tables())
    syncer = _syncer(emulator, base, store)
    syncer.sync([PatientChanges(patient=patient(), appointments=(appointment("a0"),))])
    visit = appointment("a2", start=T0 + days(9))
    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    with pytest.raises(SyncIncomplete):
        syncer.sync([PatientChanges(patient=patient(), appointments=(visit,))])
    syncer.sync([PatientChanges(patient=patient(), appointments=(visit,))])
    assert sorted(d["ORIGIN_ID"] for d in emulator.deals.values()) == ["a0", "a2"]
    assert store.load_intents([deal_intent("a2")]) == {}
    confirmed = visit.model_copy(update={"status": AppointmentStatus.CONFIRMED, "version": 2})
    assert syncer.sync([PatientChanges(patient=patient(), appointments=(confirmed,))]).crm_requests == 1
