"""An opt-in that lifts an opt-out reaches the MIS: the "do not send" flag we set is cleared, and only that
one. A flag the front desk set and the poller has not read yet is the MIS's own and stays. A flag read in a
sync is dated by the syncer's clock, which the ledger's order runs on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.adapters.lis.source import LisSource
from clinicsync.adapters.medods.consent import MEDODS_FLAGS, MedodsConsentWriter
from clinicsync.application.consent import ALL_CHANNELS, ConsentLedger, ConsentOutputs
from clinicsync.application.sync_consent import SyncConsent
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import Consent, PatientChanges
from clinicsync_cli.memory_store import MemoryStore
from tests.helpers import QueuedJobs, demo_config, patient

CHANNELS = sorted(ALL_CHANNELS)


class Mis:
    """The card's flags as our outputs write them and as staff tick them at the desk."""

    writable_channels = frozenset(CHANNELS)

    def __init__(self) -> None:
        self.flags: set[str] = set()

    def write_opt_outs(self, patient_id: str, channels: Sequence[str], cleared: Sequence[str] = ()) -> None:
        assert not set(channels) & set(cleared)
        self.flags = (self.flags - set(cleared)) | set(channels)


def _clinic() -> tuple[ConsentLedger, ConsentOutputs, QueuedJobs, Mis, list[float]]:
    store, jobs, mis, now = MemoryStore(), QueuedJobs(), Mis(), [1_000_000.0]
    ledger = ConsentLedger(store, jobs, "demo", KeyedHasher(b"k" * 32), clock=lambda: now[0])
    return ledger, ConsentOutputs(demo_config(), store, None, mis, None), jobs, mis, now


def _push(outputs: ConsentOutputs, jobs: QueuedJobs) -> None:
    sent, jobs.sent = jobs.sent, []
    outputs.push(sent)


@given(
    refused=st.sets(st.sampled_from(CHANNELS), min_size=1),
    at_desk=st.sets(st.sampled_from(CHANNELS)),
    lifted=st.sets(st.sampled_from(CHANNELS), min_size=1),
    again=st.sets(st.sampled_from(CHANNELS)),
)
def test_an_opt_in_clears_the_flags_it_lifted_and_no_other(
    refused: set[str], at_desk: set[str], lifted: set[str], again: set[str]
) -> None:
    """A link refuses ``refused`` (our job sets those flags); staff tick ``at_desk`` (not polled yet); a manager's
    opt-in lifts ``lifted``; before the job runs, the patient refuses ``again`` by link. The card then shows
    every refusal in the ledger and every desk flag; it loses only what the opt-in lifted and nothing refused since."""
    ledger, outputs, jobs, mis, now = _clinic()
    ledger.opt_out(["pat:p1"], sorted(refused), "link", "link:one-click")
    _push(outputs, jobs)
    assert mis.flags == refused
    mis.flags |= at_desk
    now[0] += 10
    ledger.opt_in("pat:p1", sorted(lifted), "crm", int(now[0]), "crm:opt_in_field")
    now[0] += 10
    ledger.opt_out(["pat:p1"], sorted(again), "link", "link:one-click")
    _push(outputs, jobs)
    _push(outputs, jobs)  # a job delivered twice changes nothing more
    still_refused = (refused - lifted) | again
    assert mis.flags == still_refused | (at_desk - (lifted & refused - again))


def test_an_opt_in_of_a_channel_nobody_refused_writes_nothing() -> None:
    ledger, _, jobs, mis, now = _clinic()
    mis.flags = {"sms"}  # the desk's, not polled yet
    assert ledger.opt_in("pat:p1", ["sms"], "crm", int(now[0]), "crm:opt_in_field") is False
    assert jobs.sent == []
    assert mis.flags == {"sms"}


class _Api:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def put(self, path: str, body: Any) -> None:
        self.calls.append((path, body))

    def call(self, method: str, path: str, body: Any = None) -> None:
        self.calls.append((f"{method} {path}", body))


def test_medods_clears_a_lifted_flag_beside_the_ones_it_sets() -> None:
    api = _Api()
    MedodsConsentWriter(api).write_opt_outs("77", ["sms"], cleared=["email", "sms"])  # type: ignore[arg-type]
    assert api.calls == [("/clients/77", {MEDODS_FLAGS["email"]: False, MEDODS_FLAGS["sms"]: True})]


def test_the_labs_one_marketing_flag_is_cleared_only_when_no_channel_it_covers_is_refused() -> None:
    api = _Api()
    lis = LisSource.__new__(LisSource)
    lis._api = api  # type: ignore[attr-defined]
    lis.write_opt_outs("doctor:5", [], cleared=["email"])
    lis.write_opt_outs("doctor:5", ["marketing"], cleared=["email"])
    assert [body for _, body in api.calls] == [{"do_not_send_marketing": False}, {"do_not_send_marketing": True}]


def test_a_refusal_flag_read_in_a_sync_is_dated_by_the_syncers_clock() -> None:
    """The ledger's order (an opt-in lifts only an older opt-out) runs on the clock the sync is given."""
    store = MemoryStore()
    sync = SyncConsent(demo_config(), store, KeyedHasher(b"k" * 32), None, None, None, clock=lambda: 1_234_567.0)
    sync.ledger([PatientChanges(patient=patient("p9", consent=Consent(sms_opt_out=True)))])
    assert [(e.subject, e.channel, e.event, e.at) for e in store.audit] == [("pat:p9", "sms", "opt_out", 1_234_567)]
