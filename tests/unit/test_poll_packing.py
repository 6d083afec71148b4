"""How the poller packs a page into sync messages: a first import or resync in few, full messages (an
invocation's fixed CRM costs are paid per 10 messages), an incremental poll in small ones (latency), and
no message ever too big for SQS, whatever the patients carry."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from typing import Any, get_args

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from clinicsync.adapters.aws.queue import MAX_BODY_BYTES, SqsChangeQueue
from clinicsync.application.poll import Poller
from clinicsync.domain.backfill import BackfillState
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import shard_of
from clinicsync.domain.models import PatientChanges, SyncMessage, lean_json
from clinicsync.domain.ports import ChangePage, Cursor
from clinicsync_cli.memory_store import MemoryStore
from tests.e2e.test_poller_guarantees import ListQueue
from tests.helpers import appointment, demo_config, examples, patient

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


@settings(max_examples=examples(25), deadline=None)
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
        assert all(len(lean_json(m).encode()) <= MAX_BODY_BYTES for m in sent)
        assert [c.patient.mis_id for m in sent for c in m.changes] == [c.patient.mis_id for c in changes]
        assert len(sent) >= 2


def test_a_lean_message_body_reads_back_as_the_same_message() -> None:
    """Leaving None out of a body is lossless only while no field that allows None defaults to anything else."""
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            default = info.get_default(call_default_factory=True)
            args = [b for a in get_args(info.annotation) or (info.annotation,) for b in get_args(a) or (a,)]
            assert not (type(None) in args and default is not None), f"{model.__name__}.{name}"
            for arg in args:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg)

    walk(SyncMessage)
    assert {m.__name__ for m in seen} >= {"Patient", "Appointment", "Consent", "CrmObservation"}
    message = SyncMessage(
        clinic_id="c",
        shard=1,
        produced_at=datetime(2026, 12, 6, tzinfo=UTC),
        changes=tuple(_page(3, comment_bytes=10)),
    )
    body = lean_json(message)
    assert SyncMessage.model_validate_json(body) == message
    assert len(body) < 0.6 * len(message.model_dump_json())  # most optional fields are unset


class CapturingSqs:
    def __init__(self) -> None:
        self.bodies: list[str] = []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.bodies.extend(str(e["MessageBody"]) for e in Entries)
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}


def test_the_queue_sends_the_body_the_poller_cut_by_size() -> None:
    """The poller sizes messages by their lean body; the queue must send exactly that body, or a full
    message would pass SQS's limit and stall the import."""
    config = demo_config(shards=1, bulk_patients_per_message=200)
    changes = _page(200, comment_bytes=1_000)
    sqs = CapturingSqs()
    queue = SqsChangeQueue(sqs, "url")  # type: ignore[arg-type]
    Poller(config, OnePage(changes), MemoryStore(), queue, HASHER, clock=lambda: 1_700_000_000.0).resync(lambda: 10**6)
    sent = [SyncMessage.model_validate_json(body) for body in sqs.bodies]
    assert all(len(body.encode()) <= MAX_BODY_BYTES for body in sqs.bodies)
    assert [c for m in sent for c in m.changes] == changes
