"""The consent use cases behind the unsubscribe handler decide what a Mailchimp event may change: an event
about another audience, or a subscribe or campaign, never reaches the store or the consent queue."""

from __future__ import annotations

from typing import Any, cast, get_args

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.application.consent import ConsentLedger, ConsentQueue
from clinicsync.domain.audience import AudienceEvent, AudienceKind
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.store_ports import LedgerStore

OURS = frozenset({"our-audience"})


class Untouchable:
    """A store or queue that fails the test when anything is read or written."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} was called")


def _ledger() -> ConsentLedger:
    return ConsentLedger(
        cast(LedgerStore, Untouchable()), cast(ConsentQueue, Untouchable()), "c1", KeyedHasher(b"k" * 32)
    )


emails = st.emails()


@given(
    kind=st.sampled_from(get_args(AudienceKind)),
    list_id=st.text(min_size=1, max_size=64).filter(lambda x: x not in OURS),
    email=emails,
    new_email=emails,
)
def test_an_event_about_another_audience_changes_nothing(kind: str, list_id: str, email: str, new_email: str) -> None:
    event = AudienceEvent(kind, list_id, email, new_email)  # type: ignore[arg-type]
    assert _ledger().audience_event(event, OURS) in {"ignored", "other_audience"}


@given(kind=st.sampled_from(["subscribe", "campaign"]), email=emails)
def test_a_subscribe_in_mailchimp_never_lifts_an_opt_out(kind: str, email: str) -> None:
    event = AudienceEvent(kind, "our-audience", email)  # type: ignore[arg-type]
    assert _ledger().audience_event(event, OURS) == "ignored"
