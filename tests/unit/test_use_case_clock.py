"""The poller and the syncer read the time from the container's clock, never the wall clock, so a test or
the bench that gives a container its clock controls every time they write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from clinicsync.application.sync import SyncIncomplete
from clinicsync.domain.crm_ports import ContactWrite, CrmMatches, CrmWrite, WriteOutcome
from clinicsync.domain.keys import contact_intent, deal_intent
from clinicsync.domain.models import PatientChanges, SyncMessage
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync.runtime import wiring
from clinicsync.settings import Settings
from clinicsync_cli.memory_store import MemoryStore
from tests.helpers import appointment, demo_config, patient

# A fixed instant years away from any wall clock a run may have (pinned runs included).
NOW = datetime(2031, 5, 17, 3, 0, tzinfo=UTC)
CHANGES = [PatientChanges(patient=patient(), appointments=(appointment(),))]


class _OnePage:
    kind = "medods"

    def __init__(self) -> None:
        self.resync_asked_at: list[float] = []

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        self.resync_asked_at.append(now)
        return {}

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        return ChangePage(changes=CHANGES, cursor={"page": 1})

    def acknowledge(self, page: ChangePage) -> None:
        pass


class _FailingCreates:
    """A CRM whose look-ups need create intents and whose every write for the patient fails."""

    kind = "amocrm"
    lookups_need_intents = True
    guards_writes = False

    def verify_pipelines(self, pipelines: Mapping[Any, Any]) -> frozenset[str]:
        return frozenset()

    def find(self, *args: Any, **kwargs: Any) -> CrmMatches:
        return CrmMatches()

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        return WriteOutcome(failed={w.patient_id: "server_error" for w in writes if isinstance(w, ContactWrite)})

    def requests_made(self) -> int:
        return 0


class _Parts(wiring.Container):
    """The container with an in-memory change queue (a part the constructor does not take)."""

    sent: list[SyncMessage]

    def change_queue(self) -> Any:
        self.sent = []
        return self

    def send(self, messages: Sequence[SyncMessage]) -> None:
        self.sent.extend(messages)


def _parts(store: MemoryStore, source: _OnePage | None = None, clock: Any = NOW.timestamp) -> _Parts:
    settings = Settings.model_construct(**dict.fromkeys(Settings.model_fields, "x"))  # names only
    return _Parts(
        settings,
        config=demo_config(),
        store=store,
        mis_source=source,
        crm_gateway=_FailingCreates(),  # type: ignore[arg-type]
        secrets=lambda arn: {"hash_key": "k" * 32, "mailchimp_api_key": "key-us1"},
        clock=clock,
    )


def test_the_poller_stamps_its_messages_and_resync_windows_with_the_containers_clock() -> None:
    source = _OnePage()
    parts = _parts(MemoryStore(), source)
    poller = parts.poller()
    assert poller.poll(lambda: 60_000).messages == 1
    poller.resync(lambda: 60_000)
    assert [m.produced_at for m in parts.sent] == [NOW, NOW]
    assert source.resync_asked_at == [NOW.timestamp()]


class _ThreePages(_OnePage):
    """A feed of three pages, one patient each; reading a page takes a minute of the container's clock."""

    def __init__(self, now: list[float]) -> None:
        super().__init__()
        self.now = now

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        n = int((cursor or {}).get("page", 0)) + 1
        self.now[0] += 60
        changes = [PatientChanges(patient=patient(f"p{n}"), appointments=(appointment(f"a{n}", f"p{n}"),))]
        return ChangePage(changes=changes, cursor={"page": n}, more=n < 3)


@pytest.mark.parametrize("run", ["poll", "resync"])
def test_every_message_of_one_poll_run_carries_the_runs_start(run: str) -> None:
    """The syncer tells what one run read by ``produced_at`` (a no-show and its re-booking first seen in one
    run keep two deals, whichever pages they came in: tests/unit/test_rebooking.py), so it is the run's
    start on every page's messages, not the time each page was read."""
    now = [NOW.timestamp()]
    parts = _parts(MemoryStore(), _ThreePages(now), clock=lambda: now[0])
    poller = parts.poller()
    getattr(poller, run)(lambda: 60_000)
    assert len(parts.sent) == 3 and {m.produced_at for m in parts.sent} == {NOW}


def test_the_syncer_dates_its_create_intents_with_the_containers_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")  # its queue clients are built, never called
    store = MemoryStore()
    with pytest.raises(SyncIncomplete):
        _parts(store).syncer().sync(CHANGES)
    intents = [contact_intent("p1"), deal_intent("a1")]
    assert store.load_intents(intents) == dict.fromkeys(intents, int(NOW.timestamp()))


def test_the_consent_ledger_dates_its_opt_outs_and_jobs_with_the_containers_clock() -> None:
    parts = _parts(MemoryStore())
    jobs: list[Any] = []

    class Jobs:
        def send(self, sent: Sequence[Any]) -> None:
            jobs.extend(sent)

    parts.consent_queue = Jobs  # type: ignore[assignment,method-assign]
    assert parts.consent_ledger().opt_out(["pat:p1"], ["sms"], "mis", "mis:refusal_flag") == ["pat:p1"]
    assert [job.produced_at for job in jobs] == [int(NOW.timestamp())]
