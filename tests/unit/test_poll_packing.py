"""How the poller packs a page into sync messages: a first import or resync in few, full messages (an
invocation's fixed CRM costs are paid per 10 messages), an incremental poll in small ones (latency), and
no message ever too big for SQS, whatever the patients carry."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from clinicsync.adapters.aws.queue import MAX_BODY_BYTES
from clinicsync.application.poll import Poller
from clinicsync.domain.backfill import BackfillState
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import shard_of
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync_cli.memory_store import MemoryStore
from tests.e2e.test_poller_guarantees import ListQueue
from tests.helpers import appointment, demo_config, patient

HASHER = KeyedHasher(b"k" * 32)


class OnePage:
    kind = "one_page"

    def __init__(self, changes: list[PatientChanges]) -> None:
        self.changes = changes

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        return ChangePage(changes=self.changes, cursor={"page": 1}, more=False)

    def acknowledge(self, page: ChangePage) -> None:
        pass

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        return {"page": 0}


class Checkpoint:
    def __init__(self) -> None:
        self.state: BackfillState | None = None

    def load(self) -> BackfillState | None:
        return self.state

    def save(self, state: BackfillState) -> None:
        self.state = state


def _page(patients: int, comment_bytes: int = 0) -> list[PatientChanges]:
    return [
        PatientChanges(
            patient=patient(f"p{i}"),
            appointments=(appointment(f"a{i}", f"p{i}", comment="x" * comment_bytes if comment_bytes else None),),
        )
        for i in range(patients)
    ]


def _queued(config: ClinicConfig, changes: list[PatientChanges], job: str) -> ListQueue:
    queue = ListQueue()
    poller = Poller(config, OnePage(changes), MemoryStore(), queue, HASHER, clock=lambda: 1_700_000_000.0)
    if job == "backfill":
        poller.backfill(lambda: 10**6, Checkpoint(), window_days=90)  # type: ignore[arg-type]
    elif job == "resync":
        poller.resync(lambda: 10**6)
    else:
        poller.poll(lambda: 10**6)
    return queue


@settings(max_examples=25, deadline=None)
@given(
    patients=st.integers(min_value=1, max_value=700),
    shards=st.integers(min_value=1, max_value=8),
    bulk=st.integers(min_value=1, max_value=100),  # 100 of these patients stay far below the size cut
    job=st.sampled_from(["backfill", "resync"]),
)
def test_a_first_import_is_queued_in_full_bulk_messages_per_shard(
    patients: int, shards: int, bulk: int, job: str
) -> None:
    config = demo_config(shards=shards, patients_per_message=7, bulk_patients_per_message=bulk)
    changes = _page(patients)
    sent = _queued(config, changes, job).sent
    per_shard = Counter(shard_of(c.patient.mis_id, shards) for c in changes)
    assert len(sent) == sum(math.ceil(n / bulk) for n in per_shard.values())
    for message in sent:  # one shard per message, and only the last message of a shard part-filled
        assert {shard_of(c.patient.mis_id, shards) for c in message.changes} == {message.shard}
    for shard, n in per_shard.items():
        sizes = [len(m.changes) for m in sent if m.shard == shard]
        assert sizes == [bulk] * (n // bulk) + ([n % bulk] if n % bulk else [])
    assert sorted(c.patient.mis_id for m in sent for c in m.changes) == sorted(c.patient.mis_id for c in changes)


def test_an_incremental_poll_keeps_its_small_messages() -> None:
    config = demo_config(shards=1, patients_per_message=7, bulk_patients_per_message=200)
    assert [len(m.changes) for m in _queued(config, _page(20), "poll").sent] == [7, 7, 6]


def test_a_message_is_cut_by_size_before_sqs_would_refuse_it() -> None:
    # 200 patients of ~6 KB each: 1.2 MB in one message by count alone.
    config = demo_config(shards=1, patients_per_message=200, bulk_patients_per_message=200)
    changes = _page(200, comment_bytes=6_000)
    for job in ("poll", "resync"):
        sent = _queued(config, changes, job).sent
        assert all(len(m.model_dump_json().encode()) <= MAX_BODY_BYTES for m in sent)
        assert [c.patient.mis_id for m in sent for c in m.changes] == [c.patient.mis_id for c in changes]
        assert len(sent) >= 2
