"""The Bitrix24 client and gateway against the emulator on loopback: batching, retries, HTML bodies,
per-method pauses, lost responses, OAuth and the start-up stage check."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from clinicsync.adapters.bitrix24.client import DEADLINE_MARGIN, Bitrix24Client, Bitrix24MethodBlocked, php_query
from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway
from clinicsync.adapters.bitrix24.oauth import Bitrix24OAuth, Bitrix24Tokens
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.domain.crm_ports import CHANGED_SINCE_READ, ContactWrite, DealWrite, PipelineMismatch
from sandbox.bench.simclock import SimClock
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import OPERATING_LIMIT_PAGE, Bitrix24Emulator
from tests.helpers import demo_config

CONFIG = demo_config()


@pytest.fixture
def emu() -> Iterator[tuple[Bitrix24Emulator, str]]:
    emulator = Bitrix24Emulator()
    server = ServedApp(emulator).start()
    yield emulator, server.base_url
    server.stop()


def _client(emulator: Bitrix24Emulator, base: str, **kw: Any) -> Bitrix24Client:
    return Bitrix24Client(emulator.webhook_url(base), pacer=Pacer(rate=1000, burst=1000), backoff=0.0, **kw)


def _writes(n: int, start: int = 0) -> list[ContactWrite | DealWrite]:
    writes: list[ContactWrite | DealWrite] = []
    visit = datetime(2026, 12, 1, 10, 0, tzinfo=ZoneInfo("Europe/Moscow")).isoformat()
    for i in range(start, start + n):
        pid = f"p{i}"
        writes.append(ContactWrite(pid, None, {"full_name": {"last": "Тест", "first": "Т", "middle": ""}}))
        writes.append(DealWrite(f"a{i}", pid, None, "0", "PREPARATION", {"visit_at": visit, "title": "Приём"}))
    return writes


def test_php_query_encodes_plus_and_keeps_references() -> None:
    query = php_query({"fields": {"PHONE": [{"VALUE": "+79161234567"}], "CONTACT_ID": "$result[c_1]"}})
    assert "fields[PHONE][0][VALUE]=%2B79161234567" in query
    assert "fields[CONTACT_ID]=$result[c_1]" in query


def test_sixty_new_patients_take_three_batch_requests(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    outcome = gateway.apply(_writes(60))
    assert outcome.failed == {}
    assert len(outcome.contact_ids) == 60 and len(outcome.deal_ids) == 60
    assert emulator.stats()["requests"] == 3  # 120 commands, 50 per batch
    for appointment, deal_id in outcome.deal_ids.items():
        deal = emulator.deals[int(deal_id)]
        assert deal["ORIGIN_ID"] == appointment
        assert deal["CONTACT_ID"] == outcome.contact_ids[appointment.replace("a", "p")]


def _patients(visits: list[int]) -> list[ContactWrite | DealWrite]:
    """A new contact per patient, with that many new deals."""
    writes: list[ContactWrite | DealWrite] = []
    visit = datetime(2026, 12, 1, 10, 0, tzinfo=ZoneInfo("Europe/Moscow")).isoformat()
    for i, n in enumerate(visits):
        writes.append(ContactWrite(f"p{i}", None, {"full_name": {"last": "Тест", "first": "Т", "middle": ""}}))
        writes += [DealWrite(f"a{i}_{k}", f"p{i}", None, "0", "PREPARATION", {"visit_at": visit}) for k in range(n)]
    return writes


@given(visits=st.lists(st.integers(min_value=0, max_value=5), min_size=30, max_size=80))
@example(visits=[1] * 24 + [4])  # 48 commands, then a patient of 5
def test_write_batches_are_filled_to_fifty_commands_and_split_patients_keep_their_contact(visits: list[int]) -> None:
    """Backfill near the floor: every batch but the last carries 50 commands, whatever the patients'
    sizes; a patient split across two batches still gets every deal on its own contact."""
    emulator = Bitrix24Emulator()
    server = ServedApp(emulator).start()
    try:
        outcome = Bitrix24Gateway(_client(emulator, server.base_url), CONFIG).apply(_patients(visits))
    finally:
        server.stop()
    commands = len(visits) + sum(visits)
    assert outcome.failed == {}
    assert emulator.stats()["requests"] == -(-commands // 50)
    assert len(emulator.contacts) == len(visits) and len(emulator.deals) == sum(visits)
    for appointment, deal_id in outcome.deal_ids.items():
        patient = appointment.split("_")[0].replace("a", "p")
        assert str(emulator.deals[int(deal_id)]["CONTACT_ID"]) == outcome.contact_ids[patient]


def test_a_lost_response_for_a_split_patients_head_never_sends_its_tail(emu: tuple[Bitrix24Emulator, str]) -> None:
    """The head of a patient split across batches is lost: its deals are not sent without their contact,
    the patient is retried (outcome unknown), and the look-up finds the contact the lost write made."""
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    outcome = gateway.apply(_patients([1] * 24 + [4]))  # 48 commands, then p24's contact + 1 deal | 3 deals
    assert outcome.failed == {f"p{i}": "outcome_unknown" for i in range(25)}
    assert emulator.stats()["requests"] == 1  # the tail was never sent
    assert len(emulator.contacts) == 25 and len(emulator.deals) == 25
    assert set(gateway.find(["p24"], []).contacts) == {"p24"}


def test_find_uses_one_request_for_mis_ids_and_phones(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    gateway.apply(_writes(3))
    emulator.reset_stats()
    matches = gateway.find(["p0", "p1", "p9"], ["a0", "a9"], phones=["+79990000000"])
    assert set(matches.contacts) == {"p0", "p1"} and set(matches.deals) == {"a0"}
    assert emulator.stats()["requests"] == 1


def test_a_look_up_of_an_invocations_new_patients_is_one_request(emu: tuple[Bitrix24Emulator, str]) -> None:
    """Backfill near the floor: MIS ids cost a command per 500, not per 50, so the look-up of a full
    invocation (500 new patients, 1,000 visits, their phones at 20 per findbycomm) fits one ``batch``."""
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    patients = [f"p{i}" for i in range(500)]
    visits = [f"a{i}_{k}" for i in range(500) for k in range(2)]
    phones = [f"+7999{i:07d}" for i in range(500)]
    matches = gateway.find(patients, visits, phones=phones)
    assert matches.contacts == {} and matches.deals == {}
    assert emulator.stats()["requests"] == 1


@given(found=st.integers(min_value=0, max_value=130), missing=st.integers(min_value=1, max_value=30))
def test_a_look_up_by_mis_id_finds_every_existing_record_whatever_its_pages(found: int, missing: int) -> None:
    """Look-ups by MIS id before any create: rows beyond a list's first page of 50 are read too, and
    only the lists that answered ``next`` cost more requests."""
    emulator = Bitrix24Emulator()
    server = ServedApp(emulator).start()
    try:
        gateway = Bitrix24Gateway(_client(emulator, server.base_url), CONFIG)
        if found:
            assert gateway.apply(_writes(found)).failed == {}
        emulator.reset_stats()
        ids = range(found + missing)
        matches = gateway.find([f"p{i}" for i in ids], [f"a{i}" for i in ids])
    finally:
        server.stop()
    assert set(matches.contacts) == {f"p{i}" for i in range(found)}
    assert set(matches.deals) == {f"a{i}" for i in range(found)}
    assert emulator.stats()["requests"] == max(1, -(-found // 50))


def test_html_error_pages_on_reads_are_retried(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    gateway.apply(_writes(1))
    emulator.faults.add(method="batch", status=502, html=True, times=2)
    matches = gateway.find(["p0"], [])
    assert matches.contacts.keys() == {"p0"}


def test_a_lost_write_response_is_reported_not_resent(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    emulator.faults.add(method="batch", status=504, html=True, times=1, after_apply=True)
    outcome = gateway.apply(_writes(2))
    assert outcome.failed == {"p0": "outcome_unknown", "p1": "outcome_unknown"}
    assert len(emulator.contacts) == 2  # applied once, never sent again
    assert set(gateway.find(["p0", "p1"], []).contacts) == {"p0", "p1"}  # the retry finds them


def test_limit_exceeded_is_retried_until_the_portal_drains(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    client = _client(emulator, base)
    emulator.faults.add(
        method="batch", status=503, error="QUERY_LIMIT_EXCEEDED", description="Too many requests", times=2
    )
    outcome = Bitrix24Gateway(client, CONFIG).apply(_writes(1))
    assert outcome.failed == {}
    assert client.throttled == 2 and len(emulator.contacts) == 1


def test_operating_time_limit_pauses_only_the_blocked_method(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    client = _client(emulator, base)
    with pytest.raises(Bitrix24MethodBlocked):
        emulator.limits.method_costs["crm.deal.list"] = 1000.0  # one call exhausts the 480 s budget
        client.call("crm.deal.list", {})
        client.call("crm.deal.list", {})
    assert client.blocked_until("crm.deal.list") is not None
    assert client.blocked_until("crm.contact.list") is None
    assert "result" in client.call("crm.contact.list", {})  # other methods keep working


def test_writes_for_a_paused_method_wait_while_others_go_through(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    client = _client(emulator, base)
    gateway = Bitrix24Gateway(client, CONFIG)
    client.note_blocked("crm.deal.add", {"error": "OPERATION_TIME_LIMIT"})
    contact_only = ContactWrite("p9", None, {"full_name": {"last": "А", "first": "Б", "middle": ""}})
    outcome = gateway.apply([*_writes(1), contact_only])
    assert outcome.failed == {"p0": "method_blocked"}
    assert set(outcome.contact_ids) == {"p9"}


def _clocked(costs: dict[str, float]) -> tuple[Bitrix24Emulator, Bitrix24Client, SimClock, ServedApp]:
    """A portal and a client on one simulated clock: waiting costs no test time, and the portal's
    operating-time window moves only as the client waits."""
    clock = SimClock(start=1_800_000_000.0)
    emulator = Bitrix24Emulator(clock=clock)
    emulator.limits.method_costs.update(costs)
    emulator.limits.bucket_size = 10_000  # the request bucket is not what these tests are about
    server = ServedApp(emulator).start()
    pacer = Pacer(rate=1000, burst=1000, clock=clock.monotonic, sleep=clock.sleep)
    client = Bitrix24Client(
        emulator.webhook_url(server.base_url), pacer=pacer, backoff=0.0, sleep=clock.sleep, clock=clock.now
    )
    return emulator, client, clock, server


def test_an_import_larger_than_a_methods_operating_budget_is_paced_under_it_not_refused() -> None:
    """Regression (the 20k/50k scale runs): a first import spends crm.deal.add's 480 s of any 10 minutes
    long before it ends (at 0.05 s a command, 9,601 deals of 18,601 were written, the rest refused with
    OPERATION_TIME_LIMIT and their messages dead-lettered). Each method's time is now spent through a
    bucket no 10-minute window can take past the budget: every write lands, none is refused."""
    emulator, client, clock, server = _clocked({"crm.contact.add": 0.5, "crm.deal.add": 0.5})
    try:
        started = clock.now()
        outcome = Bitrix24Gateway(client, CONFIG).apply(_writes(1000))  # 500 s of each method
        assert outcome.failed == {}
        assert len(emulator.deals) == len(emulator.contacts) == 1000
        stats = emulator.stats()
        assert stats["operation_limited_commands"] == 0 and stats["rate_limited_429"] == 0
        assert emulator.operating_time("crm.deal.add") <= 480.0
        assert clock.now() - started >= (500.0 - 240.0) / 0.4  # the part past the burst went at 0.4 s a second
    finally:
        server.stop()


def test_a_budget_wait_that_would_outlive_the_invocation_pauses_the_method_instead() -> None:
    """Pacing must not sleep through Lambda's deadline (the 50k run's open risk: a full invocation needs
    ~390 s of crm.deal.add against the syncer's 300 s, and Lambda kills it mid-batch, before any state is
    stored). A wait that would run into the invocation's last DEADLINE_MARGIN seconds is not slept: the
    method pauses, the invocation ends in time, nothing is refused by the portal, and every patient is
    either written whole or failed as ``method_blocked`` (its message comes back)."""
    emulator, _, clock, server = _clocked({"crm.contact.add": 0.5, "crm.deal.add": 0.5})
    try:
        started = clock.now()
        deadline = started + 300.0
        client = Bitrix24Client(
            emulator.webhook_url(server.base_url),
            pacer=Pacer(rate=1000, burst=1000, clock=clock.monotonic, sleep=clock.sleep),
            backoff=0.0,
            sleep=clock.sleep,
            clock=clock.now,
            time_left=lambda: deadline - clock.now(),
        )
        outcome = Bitrix24Gateway(client, CONFIG).apply(_writes(1000))  # 650 s of waiting at the budget

        assert clock.now() <= deadline - DEADLINE_MARGIN
        assert emulator.stats()["operation_limited_commands"] == 0
        assert client.blocked_until("crm.deal.add") is not None
        written = {str(d["ORIGIN_ID"]) for d in emulator.deals.values()}
        assert written and set(outcome.failed.values()) == {"method_blocked"}
        assert {f"p{i}" for i in range(1000)} == {f"p{a[1:]}" for a in written} | set(outcome.failed)
        assert not {f"p{a[1:]}" for a in written} & set(outcome.failed)
    finally:
        server.stop()


def test_an_import_within_the_operating_burst_is_not_slowed() -> None:
    """A 5,000-visit import spends ~230 s of crm.deal.add: inside the burst, so nothing waits."""
    emulator, client, clock, server = _clocked({})
    try:
        started = clock.now()
        outcome = Bitrix24Gateway(client, CONFIG).apply(_writes(300))
        assert outcome.failed == {} and len(emulator.deals) == 300
        assert clock.now() == started
    finally:
        server.stop()


# --- the operating-time limit answered as an HTML page (fast_bitrix24 issue 216) -------------------------


def test_an_html_operating_limit_page_on_a_read_pauses_its_methods_and_is_not_retried(
    emu: tuple[Bitrix24Emulator, str],
) -> None:
    """Regression: the page was read as a transient error, the batch was sent six times and no pause
    engaged. Now one request, the call's methods pause, and other methods keep working."""
    emulator, base = emu
    client = _client(emulator, base)
    gateway = Bitrix24Gateway(client, CONFIG)
    gateway.apply(_writes(1))
    emulator.limits.operating_html = True
    emulator.limits.method_costs["crm.contact.list"] = 1000.0  # one call exhausts the 480 s budget
    gateway.find(["p0"], [])
    emulator.reset_stats()
    with pytest.raises(Bitrix24MethodBlocked):
        gateway.find(["p0"], [])
    assert emulator.stats()["requests"] == 1 and emulator.stats()["rate_limited_429"] == 1
    assert client.blocked_until("crm.contact.list") is not None and client.throttled == 1
    with pytest.raises(Bitrix24MethodBlocked):  # paused: not even sent
        gateway.find(["p0"], [])
    assert emulator.stats()["requests"] == 1
    assert "result" in client.call("crm.deal.list", {})  # other methods keep working


def test_an_html_operating_limit_page_refusing_a_write_batch_is_not_outcome_unknown(
    emu: tuple[Bitrix24Emulator, str],
) -> None:
    """A 429 page is a refusal: the portal ran none of the batch, so the patients wait for the pause
    (``method_blocked``) instead of being marked as possibly written."""
    emulator, base = emu
    client = _client(emulator, base)
    gateway = Bitrix24Gateway(client, CONFIG)
    emulator.limits.operating_html = True
    emulator.limits.method_costs["crm.contact.add"] = 1000.0
    assert gateway.apply(_writes(1)).failed == {}
    emulator.reset_stats()
    outcome = gateway.apply(_writes(2, start=1))
    assert outcome.failed == {"p1": "method_blocked", "p2": "method_blocked"}
    assert len(emulator.contacts) == 1 and len(emulator.deals) == 1  # nothing of the refused batch ran
    assert emulator.stats()["requests"] == 1  # not resent
    assert client.blocked_until("crm.contact.add") is not None
    assert gateway.apply(_writes(1, start=3)).failed == {"p3": "method_blocked"}
    assert emulator.stats()["requests"] == 1  # the pause holds later writes back without a request


def test_an_operating_limit_page_in_another_status_leaves_a_write_outcome_unknown(
    emu: tuple[Bitrix24Emulator, str],
) -> None:
    """Only a 429 proves nothing ran. A page naming the limit in a 5xx may follow a partly run batch:
    the pause engages, and the writes stay outcome-unknown (the retry looks them up first)."""
    emulator, base = emu
    client = _client(emulator, base)
    gateway = Bitrix24Gateway(client, CONFIG)
    page = OPERATING_LIMIT_PAGE.replace("429", "502")
    emulator.faults.add(method="batch", status=502, html=True, body=page, after_apply=True)
    outcome = gateway.apply(_writes(2))
    assert outcome.failed == {"p0": "outcome_unknown", "p1": "outcome_unknown"}
    assert len(emulator.contacts) == 2  # the portal did run them
    assert client.blocked_until("crm.contact.add") is not None and client.blocked_until("crm.deal.add") is not None
    assert client.blocked_until("crm.contact.list") is None


def test_stage_check_names_every_missing_stage(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    emulator.add_stage(0, "Неявка", status_id="UC_NOSHOW")
    emulator.add_stage(1, "Неявка", status_id="UC_NOSHOW")
    closed = gateway.verify_pipelines(CONFIG.crm.pipelines)
    assert {"WON", "LOSE", "APOLOGY", "C1:WON"} <= closed
    broken = CONFIG.crm.pipelines["primary"].model_copy(
        update={"stages": {**CONFIG.crm.pipelines["primary"].stages, "confirmed": "UC_MISSING"}}
    )
    with pytest.raises(PipelineMismatch, match="UC_MISSING"):
        gateway.verify_pipelines({"primary": broken, "repeat": CONFIG.crm.pipelines["repeat"]})


@pytest.mark.parametrize("look_up", [True, False])
def test_the_stage_check_rides_in_the_first_look_up_or_goes_alone(
    emu: tuple[Bitrix24Emulator, str], look_up: bool
) -> None:
    """A container's first sync checks the stages in its look-up's batch (no request of its own), with the
    same answer and the same refusal of a missing stage; without a look-up the check is sent alone."""
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    emulator.add_stage(0, "Неявка", status_id="UC_NOSHOW")
    emulator.add_stage(1, "Неявка", status_id="UC_NOSHOW")
    expected = gateway.verify_pipelines(CONFIG.crm.pipelines)
    emulator.reset_stats()
    closed = gateway.verify_in_look_up(CONFIG.crm.pipelines)
    if look_up:
        gateway.find(["p1"], ["a1"], ["+79990000001"])
    assert closed() == expected
    assert emulator.stats()["requests"] == 1
    gateway.find(["p1"], ["a1"])
    assert emulator.stats()["batch_commands"]["crm.category.list"] == 1  # read once, not with every look-up
    broken = CONFIG.crm.pipelines["primary"].model_copy(
        update={"stages": {**CONFIG.crm.pipelines["primary"].stages, "confirmed": "UC_MISSING"}}
    )
    later = gateway.verify_in_look_up({"primary": broken, "repeat": CONFIG.crm.pipelines["repeat"]})
    gateway.find(["p1"], ["a1"])
    with pytest.raises(PipelineMismatch, match="UC_MISSING"):
        later()


class MemoryTokens:
    def __init__(self, tokens: Bitrix24Tokens) -> None:
        self.tokens = tokens
        self.saves = 0

    def load(self) -> Bitrix24Tokens:
        return self.tokens

    def save(self, tokens: Bitrix24Tokens) -> None:
        self.tokens = tokens
        self.saves += 1


def test_oauth_client_refreshes_once_on_expiry_and_keeps_writing(emu: tuple[Bitrix24Emulator, str]) -> None:
    emulator, base = emu
    emulator.base_url = base
    issued = emulator.issue_tokens()
    store = MemoryTokens(
        Bitrix24Tokens.model_validate(
            {
                **issued,
                "client_id": emulator.client_id,
                "client_secret": emulator.client_secret,
                "oauth_url": base,
                "client_endpoint": emulator.oauth_endpoint(base),
            }
        )
    )
    oauth = Bitrix24OAuth(store, httpx.Client())
    client = Bitrix24Client(pacer=Pacer(rate=1000, burst=1000), backoff=0.0, oauth=oauth, user_id="1")
    gateway = Bitrix24Gateway(client, CONFIG)
    gateway.apply(_writes(1))
    old_refresh = store.tokens.refresh_token.get_secret_value()
    emulator.expire_access_tokens()
    outcome = gateway.apply(_writes(1, start=1))
    assert outcome.failed == {} and len(emulator.contacts) == 2  # no write lost across the refresh
    assert store.saves == 1
    assert store.tokens.refresh_token.get_secret_value() != old_refresh  # rotated and persisted


def _moved(deal_id: str | None, contact_id: str | None, stage: str) -> list[ContactWrite | DealWrite]:
    """p0's guarded writes: a contact update that expects us as its last modifier, a stage change."""
    return [
        ContactWrite("p0", contact_id, {"full_name": {"last": "Тест", "first": "Т", "middle": ""}}, expect_ours=True),
        DealWrite("a0", "p0", deal_id, "0", stage, {"title": "Приём"}, expect_stage="PREPARATION"),
    ]


@pytest.mark.parametrize("manager_did", ["closed the deal", "moved the deal", "edited the contact"])
def test_a_guarded_write_over_a_managers_change_fails_as_changed_since_read_and_never_writes_over_it(
    emu: tuple[Bitrix24Emulator, str], manager_did: str
) -> None:
    """A deal a manager closed or moved is never moved back, and a contact a manager edited is never written
    over, even before their webhooks: the guard in the write's own batch fails, the patient comes back as
    CHANGED_SINCE_READ, and the other patients in that batch are written."""
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    created = gateway.apply(_writes(2))
    deal, contact = int(created.deal_ids["a0"]), int(created.contact_ids["p0"])
    if manager_did == "closed the deal":
        emulator.manager_update_deal(deal, STAGE_ID="LOSE")
    elif manager_did == "moved the deal":
        emulator.manager_update_deal(deal, STAGE_ID="EXECUTING")
    else:
        emulator.manager_update_contact(contact, NAME="Тома")
    managers = dict(emulator.contacts[contact] if manager_did == "edited the contact" else emulator.deals[deal])
    other = DealWrite("a1", "p1", created.deal_ids["a1"], "0", "WON", {"title": "Приём"}, expect_stage="PREPARATION")
    emulator.reset_stats()
    outcome = gateway.apply([*_moved(str(deal), str(contact), "WON"), other])
    assert outcome.failed == {"p0": CHANGED_SINCE_READ}
    assert (emulator.contacts[contact] if manager_did == "edited the contact" else emulator.deals[deal]) == managers
    assert emulator.deals[int(created.deal_ids["a1"])]["STAGE_ID"] == "WON"  # sent again after the halt
    assert emulator.stats()["requests"] == 2


def test_guarded_writes_over_records_as_we_left_them_cost_no_read(emu: tuple[Bitrix24Emulator, str]) -> None:
    """The steady day near the floor: the stage and last-modifier checks ride in the write's own batch."""
    emulator, base = emu
    gateway = Bitrix24Gateway(_client(emulator, base), CONFIG)
    created = gateway.apply(_writes(1))
    emulator.reset_stats()
    outcome = gateway.apply(_moved(created.deal_ids["a0"], created.contact_ids["p0"], "WON"))
    assert outcome.failed == {} and outcome.deal_ids == {"a0": created.deal_ids["a0"]}
    assert emulator.deals[int(created.deal_ids["a0"])]["STAGE_ID"] == "WON"
    assert emulator.stats()["requests"] == 1
