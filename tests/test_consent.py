"""Consent units: link tokens, the List-Unsubscribe helper, the ledger's sticky opt-outs and explicit
newer opt-ins, the one CRM rule, and the Mailchimp emulator's limits and batches with our adapter."""

from __future__ import annotations

import hashlib
import string
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.adapters.mailchimp import AudienceMember, MailchimpAudience, MailchimpClient, api_root
from clinicsync.consent import (
    TokenError,
    UnsubscribeTokens,
    consent_contact_write,
    list_unsubscribe_headers,
    subscriber_hash,
)
from clinicsync.models import Channel
from clinicsync.store import DynamoStore
from sandbox.emulators.base import ServedApp
from sandbox.emulators.mailchimp import MailchimpEmulator
from tests.test_store import store  # noqa: F401 - the moto-backed store fixture

KEY = b"k" * 32

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
    emulator.slow_next(0.5, n=2)
    answers: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(httpx.get(f"{base}/3.0/ping", auth=("x", "abc-us21")).status_code)
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while emulator._in_flight < 2 and time.monotonic() < deadline:  # both slow requests are being served
        time.sleep(0.01)
    third = httpx.get(f"{base}/3.0/ping", auth=("x", "abc-us21"))
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
