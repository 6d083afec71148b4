"""Consent units: link tokens, the List-Unsubscribe helper, the ledger's sticky opt-outs and explicit
newer opt-ins, the one CRM rule, and the Mailchimp emulator's limits and batches with our adapter."""

from __future__ import annotations

import functools
import hashlib
import itertools
import string
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import boto3
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinicsync.adapters.aws.queue import SqsConsentQueue
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.aws.table import wire_client
from clinicsync.adapters.mailchimp.client import AudienceMember, MailchimpAudience, MailchimpClient, api_root
from clinicsync.application.consent import MEMBER_MOVED, ConsentLedger, ConsentOutputs, consent_contact_write
from clinicsync.application.crm_events import CrmEventProcessor, EventReport
from clinicsync.application.sync_consent import SyncConsent
from clinicsync.domain.audience import MemberBook, audience_member, note_accepted_members, subscriber_hash
from clinicsync.domain.crm_ports import ContactWrite, WriteOutcome
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import Channel, Consent, ConsentJob, CrmEvent, PatientChanges
from clinicsync.domain.state import PatientState
from clinicsync.domain.unsubscribe_links import TokenError, UnsubscribeTokens, list_unsubscribe_headers
from sandbox.emulators.base import ServedApp
from sandbox.emulators.mailchimp import MailchimpEmulator
from tests.adapters.test_store import store  # noqa: F401 - the moto-backed store fixture
from tests.helpers import QueuedJobs, demo_config, examples, patient

KEY = b"k" * 32
_EXAMPLES = itertools.count()
_CONFIG = functools.cache(demo_config)

# --- tokens ------------------------------------------------------------------------------------------------


def test_a_token_round_trips_without_pii_and_names_the_list() -> None:
    tokens = UnsubscribeTokens(KEY)
    token = tokens.issue("10042", Channel.MARKETING)
    claim = tokens.verify(token)
    assert (claim.patient_id, claim.channel, claim.expires_at) == ("10042", Channel.MARKETING, 0)
    assert len(token) < 64 and "@" not in token and "+7" not in token


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda t: UnsubscribeTokens(b"x" * 32).issue("10042"), 403),  # forged: another key
        (lambda t: "AQEAAAAAOTk5OTk." + t.split(".")[1], 403),  # payload swapped for another patient
        (lambda t: t.replace(".", ""), 400),
        (lambda t: "%%%.%%%", 400),
        (lambda t: t + "." + t, 400),
    ],
)
def test_bad_tokens_are_refused_with_a_plain_reason(make: object, status: int) -> None:
    tokens = UnsubscribeTokens(KEY)
    bad = make(tokens.issue("10042"))  # type: ignore[operator]
    with pytest.raises(TokenError) as refused:
        tokens.verify(bad)
    assert refused.value.status == status and refused.value.reason


_B64URL = string.ascii_letters + string.digits + "-_"


@given(
    key=st.binary(min_size=16, max_size=64),
    patient_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=16),
    channel=st.sampled_from(list(Channel)),
)
def test_every_single_character_edit_of_a_token_is_refused(key: bytes, patient_id: str, channel: Channel) -> None:
    """Tokens are canonical: base64 ignores a last character's unused low bits, so without that rule
    some edits of the last character of either part decoded to the same bytes and verified."""
    tokens = UnsubscribeTokens(key)
    token = tokens.issue(patient_id, channel)
    assert tokens.verify(token).channel == channel
    for index, original in enumerate(token):
        for replacement in _B64URL + ".":
            if replacement == original:
                continue
            edited = token[:index] + replacement + token[index + 1 :]
            with pytest.raises(TokenError) as refused:
                tokens.verify(edited)
            assert refused.value.status in (400, 403)


def test_links_expire_only_when_configured() -> None:
    now = [1_000_000.0]
    never = UnsubscribeTokens(KEY, None, clock=lambda: now[0]).issue("1")
    week = UnsubscribeTokens(KEY, 7 * 86400, clock=lambda: now[0]).issue("1")
    now[0] += 8 * 86400
    checker = UnsubscribeTokens(KEY, 7 * 86400, clock=lambda: now[0])
    assert checker.verify(never).patient_id == "1"
    with pytest.raises(TokenError) as expired:
        checker.verify(week)
    assert expired.value.status == 410


def test_list_unsubscribe_headers_follow_rfc_8058() -> None:
    headers = list_unsubscribe_headers("https://api.example.org/", "TOKEN", mailto="unsub@example.org")
    assert headers == {
        "List-Unsubscribe": "<https://api.example.org/unsubscribe/TOKEN>, "
        "<mailto:unsub@example.org?subject=unsubscribe>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert "\n" not in headers["List-Unsubscribe"]  # never folded (DKIM)
    with pytest.raises(ValueError, match="https"):
        list_unsubscribe_headers("http://api.example.org", "TOKEN")


def test_subscriber_hash_is_md5_of_the_trimmed_lower_cased_address() -> None:
    assert subscriber_hash("  Olga.Smirnova@Example.ORG ") == hashlib.md5(b"olga.smirnova@example.org").hexdigest()


# --- the ledger ---------------------------------------------------------------------------------------------


def test_opt_outs_are_sticky_and_only_a_newer_mis_or_crm_opt_in_lifts_one(store: DynamoStore) -> None:  # noqa: F811
    assert store.record_opt_outs("pat:p1", ["email"], "link", 1000, "link:one-click") == ["email"]
    assert store.record_opt_outs("pat:p1", ["email"], "mis", 2000) == []  # already out: no change, no audit
    with pytest.raises(ValueError, match="MIS or the CRM"):
        store.record_opt_ins("pat:p1", ["email"], "mailchimp", 3000)
    assert store.record_opt_ins("pat:p1", ["email"], "crm", 900) == []  # older than the opt-out
    assert store.opted_out_many(["pat:p1"], ["email"]) == {"pat:p1": {"email"}}
    assert store.record_opt_ins("pat:p1", ["email"], "crm", 3000, "crm:opt_in_field") == ["email"]
    assert store.opted_out_many(["pat:p1"], ["email"]) == {"pat:p1": set()}
    assert store.record_opt_outs("pat:p1", ["email"], "mailchimp", 2500) == []  # older than the opt-in
    assert store.record_opt_outs("pat:p1", ["email"], "mailchimp", 4000) == ["email"]
    items = {i["sk"]: i for i in store.consent_items("pat:p1")}
    audit = sorted((i["at"], i["event"], i["source"]) for sk, i in items.items() if sk.startswith("AUDIT#"))
    assert audit == [(1000, "opt_out", "link"), (3000, "opt_in", "crm"), (4000, "opt_out", "mailchimp")]
    assert all(i["expires_at"] > i["at"] for sk, i in items.items() if sk.startswith("AUDIT#"))
    assert items["CH#email"]["source"] == "mailchimp"


def test_the_crm_rule_writes_exactly_the_ledger_for_every_crm() -> None:
    write = consent_contact_write("p1", "77", ["sms", "email", "email"])
    assert (write.contact_id, dict(write.fields)) == ("77", {"mis_patient_id": "p1", "opt_outs": ["email", "sms"]})
    assert consent_contact_write("p1", "77", []).fields["opt_outs"] is None  # cleared after an opt-in


# --- Mailchimp emulator and adapter ---------------------------------------------------------------------------


@pytest.fixture
def chimp() -> Iterator[tuple[MailchimpEmulator, str]]:
    emulator = MailchimpEmulator(api_key="abc-us21", merge_tags=("CITY",), max_connections=2)
    with ServedApp(emulator) as server:
        emulator.base_url = server.base_url
        yield emulator, server.base_url


def test_api_root_comes_from_the_keys_data_centre() -> None:
    assert api_root("0123-us21") == "https://us21.api.mailchimp.com/3.0"


def test_batch_upsert_never_resubscribes_and_patch_unsubscribes(chimp: tuple[MailchimpEmulator, str]) -> None:
    emulator, base = chimp
    audience = MailchimpAudience(MailchimpClient("abc-us21", httpx.Client(), f"{base}/3.0"), emulator.list_id)
    members = [AudienceMember("1", "A@example.org", {"CITY": "Москва"}), AudienceMember("2", "b@example.org", {})]
    assert audience.upsert(members) == {"1", "2"}
    assert emulator.member("a@example.org")["merge_fields"]["CITY"] == "Москва"  # type: ignore[index]
    assert audience.unsubscribe("a@example.org") is True
    assert audience.unsubscribe("nobody@example.org") is False  # 404: not in the audience
    assert audience.upsert(members) == {"1", "2"}  # status_if_new: the unsubscribed stays unsubscribed
    assert emulator.member("a@example.org")["status"] == "unsubscribed"  # type: ignore[index]
    bad = [AudienceMember("3", "c@example.org", {"NOPE": "x"})]
    assert audience.upsert(bad) == set()  # the operation failed inside the batch: reported, not accepted


def test_emulator_refuses_bad_keys_and_an_eleventh_connection(chimp: tuple[MailchimpEmulator, str]) -> None:
    emulator, base = chimp
    assert httpx.get(f"{base}/3.0/ping", auth=("x", "wrong-us21")).status_code == 401
    release = emulator.hold_next(2)
    answers: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(httpx.get(f"{base}/3.0/ping", auth=("x", "abc-us21")).status_code)
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30  # a bound on a loaded machine, not a timing
    while emulator._in_flight < 2 and time.monotonic() < deadline:  # both slow requests are being served
        time.sleep(0.01)
    third = httpx.get(f"{base}/3.0/ping", auth=("x", "abc-us21"))
    release.set()
    for thread in threads:
        thread.join()
    assert third.status_code == 429 and third.json()["title"] == "Too Many Requests"
    assert sorted(answers) == [200, 200]
    put = httpx.put(
        f"{base}/3.0/lists/{emulator.list_id}/members/{subscriber_hash('x@example.org')}",
        json={"email_address": "x@example.org", "status": "unsubscribed"},
        auth=("x", "abc-us21"),
    )
    assert put.status_code == 200
    again = httpx.patch(
        f"{base}/3.0/lists/{emulator.list_id}/members/{subscriber_hash('x@example.org')}",
        json={"status": "subscribed"},
        auth=("x", "abc-us21"),
    )
    assert (again.status_code, again.json()["title"]) == (400, "Member In Compliance State")


# --- CRM events into the ledger: who may speak for a patient, and what counts as an opt-in --------------------

CONTACT_OF = {"p1": "501"}  # the contact we map to each patient
INTEGRATION_USER = "1"


class _Gateway:
    """Only what the event processor reads when events carry their snapshot (as the catch-up's do)."""

    kind = "bitrix24"

    def integration_user(self) -> str:
        return INTEGRATION_USER

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        return {}


def _ledger(store: DynamoStore, now: list[float]) -> ConsentLedger:  # noqa: F811
    return ConsentLedger(store, QueuedJobs(), "demo", KeyedHasher(KEY), clock=lambda: now[0])


def _handle(
    store: DynamoStore,  # noqa: F811
    event: CrmEvent,
    report: EventReport | None = None,
    now: float = 0.0,
) -> None:
    """One webhook batch: a fresh processor, as each syncer invocation builds; ``now`` times a field opt-out."""
    ledger = _ledger(store, [now])
    processor = CrmEventProcessor(_CONFIG(), store, _Gateway(), KeyedHasher(KEY), QueuedJobs(), ledger)  # type: ignore[arg-type]
    processor.handle(event, report or EventReport())


def _map_contacts(store: DynamoStore, contacts: dict[str, str]) -> None:  # noqa: F811
    for pid, contact in contacts.items():
        state = PatientState(patient_id=pid, contact_id=contact, version=1)
        store.save_patients([(state, [])], {})


def _contact_event(contact: str, owner: str, at: int, opt_ins: str = "", opt_outs: str = "", by: str = "7") -> CrmEvent:
    snapshot = {
        "entity": "contact",
        "id": contact,
        "owner": owner,
        "modified_by": by,
        "modified_at": datetime.fromtimestamp(at, UTC).isoformat(),
        "opt_outs": opt_outs,
        "opt_ins": opt_ins,
    }
    return CrmEvent(
        crm="bitrix24", event="ONCRMCONTACTUPDATE", entity="contact", crm_id=contact, received_at=at, snapshot=snapshot
    )


def _opted_out(store: DynamoStore, pid: str = "p1") -> bool:  # noqa: F811
    return "email" in store.opted_out_many([f"pat:{pid}"], ["email"])[f"pat:{pid}"]


def test_an_unrelated_crm_edit_never_lifts_a_fresh_opt_out(store: DynamoStore) -> None:  # noqa: F811
    now = [1_000_000.0]
    ledger = _ledger(store, now)
    _map_contacts(store, CONTACT_OF)
    report = EventReport()
    _handle(store, _contact_event("501", "p1", 999_000, opt_ins="email"), report)  # an old opt-in, seen
    ledger.opt_out(["pat:p1"], ["email"], "link", "link:one-click")  # the patient clicks at 1 000 000
    _handle(store, _contact_event("501", "p1", 1_000_060, opt_ins="email"), report)  # a comment edit
    assert _opted_out(store)
    assert report.opt_ins == 0
    _handle(store, _contact_event("501", "p1", 1_000_120, opt_ins=""), report)  # the field cleared...
    _handle(store, _contact_event("501", "p1", 1_000_180, opt_ins="email"), report)  # ...and set again
    assert not _opted_out(store)
    assert report.opt_ins == 1


def test_a_contact_first_seen_with_an_opt_in_does_not_lift_an_opt_out(store: DynamoStore) -> None:  # noqa: F811
    now = [1_000_000.0]
    ledger = _ledger(store, now)
    _map_contacts(store, CONTACT_OF)
    ledger.opt_out(["pat:p1"], ["email"], "link", "link:one-click")
    _handle(store, _contact_event("501", "p1", 1_000_060, opt_ins="email"), EventReport())
    assert _opted_out(store)  # we never saw the field without it: no change is proven


def test_our_own_write_is_the_baseline_so_a_managers_first_opt_in_counts(store: DynamoStore) -> None:  # noqa: F811
    now = [1_000_000.0]
    ledger = _ledger(store, now)
    _map_contacts(store, CONTACT_OF)
    ledger.opt_out(["pat:p1"], ["email"], "link", "link:one-click")
    report = EventReport()
    _handle(store, _contact_event("501", "p1", 1_000_010, opt_outs="email", by=INTEGRATION_USER), report)
    assert report.echoes == 1 and _opted_out(store)
    _handle(store, _contact_event("501", "p1", 1_000_060, opt_ins="email", opt_outs="email"), report)
    assert _opted_out(store)  # both fields list it: the opt-in waits until the opt-out field is cleared
    _handle(store, _contact_event("501", "p1", 1_000_070, opt_ins="email"), report)  # opt-out field cleared
    assert not _opted_out(store)


def test_an_opt_in_ticked_under_our_login_lifts_only_an_opt_out_older_than_the_field_last_seen_without_it(
    store: DynamoStore,  # noqa: F811
) -> None:
    """We never write the opt-in field, so a tick in it saved under the integration's login is a manager's
    (amoCRM acts as the user who granted the token). The save's time may be a later write of ours, so it is
    dated when the field was last seen without the channel: it lifts an opt-out from before that sighting,
    never one that may have come after the tick."""
    now = [1_000_000.0]
    ledger = _ledger(store, now)
    _map_contacts(store, {"p1": "501", "p2": "502"})
    ledger.opt_out(["pat:p1", "pat:p2"], ["email"], "link", "link:one-click")  # at 1 000 000
    report = EventReport()
    for contact, owner in (("501", "p1"), ("502", "p2")):  # our consent write's echo: the baseline
        _handle(store, _contact_event(contact, owner, 1_000_010, opt_outs="email", by=INTEGRATION_USER), report)
    assert store.record_opt_ins("pat:p2", ["email"], "mis", 1_000_020, "mis:consent") == ["email"]
    now[0] = 1_000_050.0
    ledger.opt_out(["pat:p2"], ["email"], "link", "link:one-click")  # p2 opts out again after that sighting
    for contact, owner in (("501", "p1"), ("502", "p2")):  # a manager ticks "email" under our login
        _handle(store, _contact_event(contact, owner, 1_000_100, opt_ins="email", by=INTEGRATION_USER), report)
    assert not _opted_out(store, "p1") and report.opt_ins == 1
    audit = [i for i in store.consent_items("pat:p1") if str(i["sk"]).startswith("AUDIT#")]
    assert (int(audit[-1]["at"]), audit[-1]["event"], audit[-1]["detail"]) == (
        1_000_010,
        "opt_in",
        "crm:opt_in_field:echo",
    )
    assert _opted_out(store, "p2")  # last seen without it at 1 000 010: the tick may predate 1 000 050


def test_an_opt_out_saved_under_our_login_counts_unless_the_ledger_holds_the_channel(store: DynamoStore) -> None:  # noqa: F811
    """A manager working under the integration's login ticks "email": it is never our write (the ledger has
    no record of it), so it is an opt-out. Once an opt-in lifted "sms", a save under our login still listing
    "sms" may be a field we have not rewritten yet: it never undoes the lift."""
    now = [1_000_000.0]
    ledger = _ledger(store, now)
    _map_contacts(store, {"p3": "503"})
    ledger.opt_out(["pat:p3"], ["sms"], "link", "link:one-click")
    assert ledger.opt_in("pat:p3", ["sms"], "mis", 1_000_050, "mis:consent") is True  # the MIS lifts it
    report = EventReport()
    _handle(store, _contact_event("503", "p3", 1_000_100, opt_outs="email,sms", by=INTEGRATION_USER), report)
    assert report.echoes == 1 and report.opt_outs == 1
    assert store.opted_out_many(["pat:p3"], ["email", "sms"])["pat:p3"] == {"email"}
    _handle(store, _contact_event("777", "p3", 1_000_110, opt_outs="call", by=INTEGRATION_USER), report)
    assert report.opt_outs == 1  # a hand-made duplicate has no say, under any login


def test_an_echo_with_an_opt_out_and_an_opt_in_reads_the_contacts_mapping_once(
    store: DynamoStore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both of an echo's consent fields ask whether the contact is the one we map to the patient: one read."""
    now = [1_000_000.0]
    _ledger(store, now).opt_out(["pat:p4"], ["sms"], "link", "link:one-click")
    _map_contacts(store, {"p4": "504", "p5": "505"})
    report = EventReport()
    _handle(store, _contact_event("504", "p4", 1_000_010, opt_outs="sms", by=INTEGRATION_USER), report)  # our write
    reads: list[str] = []
    lookup = store.patient_for_crm
    monkeypatch.setattr(store, "patient_for_crm", lambda kind, crm_id: reads.append(crm_id) or lookup(kind, crm_id))
    ticked = _contact_event("504", "p4", 1_000_100, opt_ins="sms", opt_outs="email", by=INTEGRATION_USER)
    _handle(store, ticked, report)
    assert (report.opt_outs, report.opt_ins, reads) == (1, 1, ["504"])
    _handle(store, _contact_event("505", "p5", 1_000_100, opt_outs="email", by="p4"), report)  # not an echo
    assert reads == ["504", "505"]


def test_consent_changes_only_from_the_contact_we_map_to_the_patient(store: DynamoStore) -> None:  # noqa: F811
    _map_contacts(store, {"p1": "501", "p2": "502"})
    report = EventReport()
    _handle(store, _contact_event("777", "p1", 1_000_010, opt_outs="email"), report)  # a hand-made duplicate
    _handle(store, _contact_event("502", "p1", 1_000_010, opt_outs="email"), report)  # p2's, relabelled
    assert not _opted_out(store)
    assert report.foreign_contacts == 2 and report.opt_outs == 0
    _handle(store, _contact_event("501", "p1", 1_000_020, opt_outs="email"), report)
    assert _opted_out(store) and report.opt_outs == 1


# Independent model of the ledger rules for one patient's e-mail channel, events in any order. An opt-out
# (a link, or the mapped contact's opt-out field, at t) is sticky unless a later explicit opt-in lifts it.
# A save under our integration user ("echo": our own write, or a manager using its login) counts its
# opt-out field only for a channel the ledger has never recorded (our writes list only recorded ones).
# A manager's edit of the mapped contact, or an echo, shows the opt-in field; it is an
# opt-in only where the field gained "email" since the previous, not older, sighting (never the first), and
# the opt-out field does not list it at that moment (then it waits for that field to be cleared). A
# manager's edit is dated t and lifts an opt-out older than t. We never write the opt-in field, so an echo's
# gain is a manager's tick under our login, dated at the previous sighting (the save may be a later write of
# ours): it lifts only an opt-out older than that. A duplicate contact carrying the MIS id has no say at all.
_EVENT = st.tuples(
    st.sampled_from(["link", "manager", "echo"]),
    st.integers(-5, 20),  # minutes after the previous event's time (negative: it arrives out of order)
    st.booleans(),  # the opt-in field lists email
    st.booleans(),  # the opt-out field lists email
    st.sampled_from(["501", "777"]),  # the mapped contact or a duplicate with the same MIS id
)


class _Model:
    def __init__(self) -> None:
        self.out: tuple[bool, int] | None = None  # (opted out, at)
        self.seen: tuple[bool, int] | None = None  # the opt-in field as last seen: (lists email, at)

    def opted_out(self) -> bool:
        return self.out is not None and self.out[0]

    def _opt_out(self, t: int) -> None:
        if self.out is None or (not self.out[0] and self.out[1] <= t):
            self.out = (True, t)

    def apply(self, kind: str, t: int, opt_in: bool, opt_out: bool, contact: str) -> None:
        if kind == "link":
            self._opt_out(t)
            return
        if kind == "manager":
            if contact != "501":
                return
            if opt_out:
                self._opt_out(t)
        if kind == "echo" and opt_out and self.out is None:
            self._opt_out(t)  # never recorded: a manager ticked it under our login
        if self.seen is not None and t < self.seen[1]:
            return
        before = self.seen
        gained = before is not None and opt_in and not before[0]
        waiting = gained and opt_out
        self.seen = (opt_in and not waiting, t)
        if not gained or waiting or before is None or self.out is None or not self.out[0]:
            return
        dated = t if kind == "manager" else before[1]
        if self.out[1] < dated:
            self.out = (False, dated)


def _emptied(store: DynamoStore) -> DynamoStore:  # noqa: F811
    """The fixture's table with every item deleted. moto copies the whole table for each item of a
    transaction (to roll back), so on a table the examples shared each one cost more than the last
    (the same events: 0.25 s an example at first, 0.85 s by the 240th; emptied, 0.25-0.33 s)."""
    table = store._table
    keys = [{"pk": item["pk"], "sk": item["sk"]} for item in table.scan(ProjectionExpression="pk, sk")["Items"]]
    with table.batch_writer() as batch:
        for key in keys:
            batch.delete_item(Key=key)
    return store


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_EVENT, min_size=1, max_size=14))
def test_ledger_rules_match_an_independent_model_in_any_order(
    store: DynamoStore,  # noqa: F811
    events: list[tuple[str, int, bool, bool, str]],
) -> None:
    store, pid = _emptied(store), "p1"  # every example starts from an empty table
    _map_contacts(store, {pid: "501"})
    model = _Model()
    t = 0
    for kind, delta, opt_in, opt_out, contact in events:
        t += delta
        at = 1_000_000 + 60 * t
        if kind == "link":
            _ledger(store, [float(at)]).opt_out([f"pat:{pid}"], ["email"], "link", "link:one-click")
        else:
            event = _contact_event(
                "501" if kind == "echo" else contact,
                pid,
                at,
                opt_ins="email" if opt_in else "sms",
                opt_outs="email" if opt_out else "",
                by=INTEGRATION_USER if kind == "echo" else "7",
            )
            _handle(store, event, now=at)
        was_out, seen_before = model.opted_out(), model.seen
        model.apply(kind, t, opt_in, opt_out, contact)
        assert _opted_out(store, pid) == model.opted_out()
        unchanged_field = seen_before is None or not opt_in or seen_before[0] or kind == "link"
        if was_out and unchanged_field:
            assert _opted_out(store, pid)  # opt-out wins over any observation of an unchanged field


class _FieldCrm(_Gateway):
    """One CRM contact's opt-out field: read in bulk, replaced by our write (made as our integration user)."""

    def __init__(self, contacts: dict[str, dict[str, str]]) -> None:
        self.contacts = contacts
        self.reads = 0

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        self.reads += 1
        return {i: dict(self.contacts[i]) for i in crm_ids if entity == "contact" and i in self.contacts}

    def apply(self, writes: Sequence[ContactWrite]) -> WriteOutcome:
        for write in writes:
            field = self.contacts[str(write.contact_id)]
            field |= {"opt_outs": ",".join(write.fields["opt_outs"] or []), "modified_by": INTEGRATION_USER}
        return WriteOutcome()


_CHANNELS = st.sets(st.sampled_from([c.value for c in Channel]), min_size=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ours=_CHANNELS, ticked=_CHANNELS, manager=st.sampled_from(["7", INTEGRATION_USER]))
def test_a_consent_write_keeps_every_channel_a_manager_ticked_before_its_webhook(
    store: DynamoStore,  # noqa: F811
    ours: set[str],
    ticked: set[str],
    manager: str,
) -> None:
    """Our write replaces the whole field: the contacts are read first (one request per batch) and a
    manager's tick not yet heard of goes to the ledger as a CRM opt-out, so the field keeps it, also when
    the manager works under the integration's login (the amoCRM user who granted the token)."""
    n = next(_EXAMPLES)
    pid, contact, subject = f"w{n}", str(700_000 + n), f"pat:w{n}"
    _map_contacts(store, {pid: contact})
    snapshot = _contact_event(contact, pid, 999_000, opt_outs=",".join(sorted(ticked)), by=manager).snapshot
    assert snapshot is not None
    crm = _FieldCrm({contact: snapshot})  # the manager's edit; its webhook is still on its way
    jobs = QueuedJobs()
    ledger = ConsentLedger(store, jobs, "demo", KeyedHasher(KEY), clock=lambda: 1_000_000.0)
    ledger.opt_out([subject], sorted(ours), "mis", "mis:refusal_flag", skip=("mis",))
    processor = CrmEventProcessor(_CONFIG(), store, crm, KeyedHasher(KEY), QueuedJobs(), ledger)  # type: ignore[arg-type]
    outputs = ConsentOutputs(_CONFIG(), store, crm, None, None, crm_contacts=processor)  # type: ignore[arg-type]
    report = outputs.push(jobs.sent)
    assert set(crm.contacts[contact]["opt_outs"].split(",")) == ours | ticked
    assert report.failed == {} and crm.reads == 1
    assert store.opted_out_many([subject], [c.value for c in Channel])[subject] == ours | ticked
    sources = {i["sk"].removeprefix("CH#"): i["source"] for i in store.consent_items(subject) if i["sk"][:3] == "CH#"}
    assert {c for c, source in sources.items() if source == "crm"} == ticked - ours


# --- Mailchimp members: one person, every address they ever had -----------------------------------------------


def test_the_emulator_moves_a_member_with_its_address(chimp: tuple[MailchimpEmulator, str]) -> None:
    emulator, base = chimp
    audience = MailchimpAudience(MailchimpClient("abc-us21", httpx.Client(), f"{base}/3.0"), emulator.list_id)
    assert audience.upsert([AudienceMember("1", "old@example.org", {}), AudienceMember("2", "b@example.org", {})])
    emulator.member_changes_email("old@example.org", "new@example.org")
    assert emulator.member("old@example.org") is None and emulator.member("new@example.org") is not None
    assert audience.unsubscribe("old@example.org") is False  # the old hash is gone: 404
    with pytest.raises(ValueError, match="already"):
        emulator.member_changes_email("new@example.org", "b@example.org")
    # Our PUT naming another address moves the member too (the MIS changed it); a taken one is refused.
    moved = AudienceMember("1", "third@example.org", {}, member=subscriber_hash("new@example.org"))
    assert audience.upsert([moved]) == {"1"}
    assert [m["email_address"] for m in emulator.members()] == ["b@example.org", "third@example.org"]
    taken = AudienceMember("1", "b@example.org", {}, member=subscriber_hash("third@example.org"))
    assert audience.upsert([taken]) == set()


def test_the_audience_rule_keeps_one_member_per_person() -> None:
    old, new = subscriber_hash("old@example.org"), subscriber_hash("new@example.org")
    moved = MemberBook(current=new, moved={old: new}, known={old, new})
    # Mailchimp moved the MIS's address: the person's member gets the merge fields, the old one is not re-created.
    assert audience_member("1", "old@example.org", {"CITY": "x"}, moved) == AudienceMember(
        "1", "old@example.org", {"CITY": "x"}, new, keep_address=True, new=False
    )
    # The MIS changed the address: the person's member moves to it.
    assert audience_member("1", "third@example.org", {}, moved) == AudienceMember(
        "1", "third@example.org", {}, new, new=False
    )
    # A member the person has is updated, never created: Mailchimp may have moved it before telling us.
    assert audience_member("1", "new@example.org", {}, moved) == AudienceMember("1", "new@example.org", {}, new=False)
    # Only a person without a member gets a new one.
    assert audience_member("1", "a@example.org", {}, MemberBook()) == AudienceMember("1", "a@example.org", {})


def test_an_opt_out_unsubscribes_every_member_the_person_ever_had(
    store: DynamoStore,  # noqa: F811
    chimp: tuple[MailchimpEmulator, str],
) -> None:
    emulator, base = chimp
    audience = MailchimpAudience(MailchimpClient("abc-us21", httpx.Client(), f"{base}/3.0"), emulator.list_id)
    hasher = KeyedHasher(KEY)
    jobs = QueuedJobs()
    ledger = ConsentLedger(store, jobs, "demo", hasher, clock=lambda: 1_000_000.0)
    store.index_emails([(hasher.email_key("old@example.org"), "pat:p1")])
    assert audience.upsert([AudienceMember("p1", "old@example.org", {})]) == {"p1"}
    note_accepted_members(store, {"pat:p1": AudienceMember("p1", "old@example.org", {})})
    emulator.member_changes_email("old@example.org", "new@example.org")
    ledger.address_moved("old@example.org", "new@example.org")  # the upemail webhook
    # Before this fix the audience sync re-created the old address: a second member of the same person.
    assert audience.upsert([AudienceMember("p1", "old@example.org", {})]) == {"p1"}
    emulator.member_unsubscribes("new@example.org")
    subjects = ledger.subjects_for_email("new@example.org")
    assert subjects == ["pat:p1"]
    ledger.opt_out(subjects, ["email"], "mailchimp", "mailchimp:unsubscribe:manual", skip=("mailchimp",))
    report = ConsentOutputs(_CONFIG(), store, None, None, audience).push(jobs.sent)
    assert report.failed == {}
    assert {m["email_address"]: m["status"] for m in emulator.members()} == {
        "new@example.org": "unsubscribed",
        "old@example.org": "unsubscribed",
    }
    assert all("@" not in str(item) for item in store.consent_items("pat:p1"))  # hashes only, no address


# --- requests per batch: a message's refusals and a batch of jobs cost a few requests, not a few per subject --


def _dynamo_calls(store: DynamoStore) -> list[str]:  # noqa: F811
    calls: list[str] = []
    for client in (store._table.meta.client, wire_client(store._table)):  # the resource's and the plain one
        client.meta.events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    return calls


@pytest.mark.parametrize("refusing", [1, 10, 23, 26])
def test_a_messages_refusal_flags_cost_one_transaction_and_one_job_send_per_ten(
    store: DynamoStore,  # noqa: F811
    refusing: int,
) -> None:
    """A backfill message with N newly refusing patients records them in one transaction (up to 100
    items) and sends their N consent jobs in ceil(N/10) SendMessageBatch calls, not one of each per patient."""
    n = next(_EXAMPLES)
    sqs = boto3.client("sqs", region_name="eu-central-1")
    queue = SqsConsentQueue(sqs, sqs.create_queue(QueueName=f"consent-{n}")["QueueUrl"])
    sends: list[int] = []
    sqs.meta.events.register(
        "provide-client-params.sqs.SendMessageBatch", lambda params, **_: sends.append(len(params["Entries"]))
    )
    hasher = KeyedHasher(KEY)
    ledger = ConsentLedger(store, queue, "demo", hasher, clock=lambda: 1_000_000.0)
    sync = SyncConsent(_CONFIG(), store, hasher, ledger, None, None)
    refusal = Consent(sms_opt_out=True, call_opt_out=True)
    live = [
        PatientChanges(patient=patient(f"r{n}x{i}", consent=refusal if i < refusing else Consent()))
        for i in range(refusing + 3)
    ]
    calls = _dynamo_calls(store)
    _, own = sync.ledger(live)

    # Two channels and their audit entries: 4 items a patient, 100 to a transaction.
    assert [c for c in calls if c != "BatchGetItem"] == ["TransactWriteItems"] * -(-refusing * 4 // 100)
    assert sends == [min(10, refusing - start) for start in range(0, refusing, 10)]
    assert all(own[f"r{n}x{i}"] == ({"sms", "call"} if i < refusing else set()) for i in range(refusing + 3))
    sent = [ConsentJob.model_validate_json(m["Body"]) for m in _drain(sqs, queue)]
    assert sorted(j.subject for j in sent) == sorted(f"pat:r{n}x{i}" for i in range(refusing))
    assert all(j.skip == ("mis",) and j.emails == ("maria@example.org",) for j in sent)
    assert sync.ledger(live)[1] == own and len(sends) == -(-refusing // 10)  # a repeat changes and sends nothing


def test_a_ledger_read_without_a_prefetch_costs_a_batched_read_per_channel_set(
    store: DynamoStore,  # noqa: F811
) -> None:
    """The contact-update re-read reads the ledger itself: every patient's channels in one batched read
    (100 keys a request), their address's e-mail channel in another, never one request per subject."""
    n = next(_EXAMPLES)
    sync = SyncConsent(_CONFIG(), store, KeyedHasher(KEY), None, None, None)
    live = [PatientChanges(patient=patient(f"q{n}x{i}")) for i in range(30)]  # one shared address
    calls = _dynamo_calls(store)
    ledger, _ = sync.ledger(live)
    assert all(ledger[f"q{n}x{i}"] == set() for i in range(30))
    assert calls == ["BatchGetItem"] * (-(-30 * len(Channel) // 100) + 1)


def _drain(sqs: Any, queue: SqsConsentQueue) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while batch := sqs.receive_message(QueueUrl=queue._url, MaxNumberOfMessages=10).get("Messages", []):
        messages.extend(batch)
        for m in batch:
            sqs.delete_message(QueueUrl=queue._url, ReceiptHandle=m["ReceiptHandle"])
    return messages


def test_a_batch_of_consent_jobs_reads_and_marks_its_outputs_in_one_request_each(
    store: DynamoStore,  # noqa: F811
) -> None:
    """The consent consumer's batch (up to 50 jobs): what each target reached is read in one BatchGetItem
    and written in one transaction, the subjects' identities in another, never a GetItem or an
    UpdateItem per job; a redelivered batch finds every target done and writes nothing again."""
    contacts = {f"m{i}": str(800_000 + i) for i in range(30)}
    _map_contacts(store, contacts)
    crm = _FieldCrm({c: {"opt_outs": "", "modified_by": INTEGRATION_USER} for c in contacts.values()})
    jobs = QueuedJobs()
    ledger = ConsentLedger(store, jobs, "demo", KeyedHasher(KEY), clock=lambda: 1_000_000.0)
    ledger.opt_out([f"pat:{pid}" for pid in contacts], ["sms"], "mis", "mis:refusal_flag", skip=("mis",))
    outputs = ConsentOutputs(_CONFIG(), store, crm, None, None)  # type: ignore[arg-type]
    calls = _dynamo_calls(store)
    report = outputs.push(jobs.sent)

    assert report.crm_written == 30 and report.failed == {}
    assert "GetItem" not in calls and "UpdateItem" not in calls
    assert calls.count("TransactWriteItems") == 2  # the marks, the identities
    done = store.outputs_done_many([f"pat:{pid}" for pid in contacts])
    assert all(targets == {"crm": "sms", "mis": "sms"} for targets in done.values())
    assert all(crm.contacts[c]["opt_outs"] == "sms" for c in contacts.values())
    calls.clear()
    again = outputs.push(jobs.sent)
    assert again.crm_written == 0 and calls.count("TransactWriteItems") == 1  # the identities only


def test_an_upemail_makes_the_mailchimp_target_due_again_for_every_opted_out_holder_in_one_write(
    store: DynamoStore,  # noqa: F811
) -> None:
    """A family sharing an address: the moved member must be unsubscribed for each member who opted out,
    and their Mailchimp marks are written together (one transaction), not one update per person."""
    hasher = KeyedHasher(KEY)
    jobs = QueuedJobs()
    ledger = ConsentLedger(store, jobs, "demo", hasher, clock=lambda: 1_000_000.0)
    family = [f"pat:fam{i}" for i in range(4)]
    store.index_emails([(hasher.email_key("home@example.org"), s) for s in family])
    ledger.opt_out(family[:3], ["email"], "mis", "mis:refusal_flag", skip=("mis",))
    store.mark_outputs("mailchimp", dict.fromkeys(family[:3], "email"))  # the opt-outs reached the old member
    jobs.sent.clear()
    calls = _dynamo_calls(store)
    assert sorted(ledger.address_moved("home@example.org", "moved@example.org")) == family

    assert calls.count("TransactWriteItems") == 1 and calls.count("UpdateItem") == len(family)  # marks; members
    done = store.outputs_done_many(family)
    assert [done[s].get("mailchimp") for s in family] == [MEMBER_MOVED] * 3 + [None]
    assert sorted(j.subject for j in jobs.sent) == family[:3]


class _LosingFieldCrm(_FieldCrm):
    """Every write lands; the answer to the ``lose``-th apply is lost (its patients reported failed)."""

    def __init__(self, contacts: dict[str, dict[str, str]], lose: int) -> None:
        super().__init__(contacts)
        self.applies, self.lose = 0, lose

    def apply(self, writes: Sequence[ContactWrite]) -> WriteOutcome:
        super().apply(writes)
        self.applies += 1
        lost = {w.patient_id: "outcome_unknown" for w in writes} if self.applies == self.lose else {}
        return WriteOutcome(failed=lost)


def test_a_consent_target_whose_write_was_lost_is_due_again_when_the_ledger_returns_to_its_mark(
    store: DynamoStore,  # noqa: F811
) -> None:
    """Opted out (the CRM shows it, marked done), opted in again (the CRM write lands, its answer is lost),
    opted out again before that job is retried: the ledger's digest is the one the CRM target was marked
    with, yet the CRM shows the opt-in. The lost write marked the target due again, so the opt-out is
    written."""
    _map_contacts(store, {"p1": "801"})
    crm = _LosingFieldCrm({"801": {"opt_outs": "", "modified_by": INTEGRATION_USER}}, lose=2)
    outputs = ConsentOutputs(_CONFIG(), store, crm, None, None)  # type: ignore[arg-type]
    job = ConsentJob(clinic_id="demo", subject="pat:p1", reason="test", skip=("mis",), produced_at=0)

    store.record_opt_outs("pat:p1", ["sms"], "mis", 1000)
    assert outputs.push([job]).crm_written == 1 and crm.contacts["801"]["opt_outs"] == "sms"
    store.record_opt_ins("pat:p1", ["sms"], "mis", 2000)
    assert outputs.push([job]).failed == {"pat:p1": "crm:outcome_unknown"}
    assert crm.contacts["801"]["opt_outs"] == ""  # landed, unknown to us
    store.record_opt_outs("pat:p1", ["sms"], "mis", 3000)
    assert outputs.push([job]).crm_written == 1
    assert crm.contacts["801"]["opt_outs"] == "sms"
