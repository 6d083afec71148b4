"""The DynamoDB store on moto, with the table created from template.yaml's own definition: what only the table
shows (requests per write, audit items). The rules both stores keep are in test_store_contract.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.aws.table import wire_client
from clinicsync.domain.models import AppointmentStatus
from clinicsync.domain.state import AppointmentState, PatientState
from tests.helpers import MSK


@pytest.fixture
def store(template_tables: Callable[[], Table]) -> DynamoStore:
    return DynamoStore(template_tables())


def _state(version: int = 3) -> PatientState:
    state = PatientState(patient_id="p1", contact_id="10", version=version, content_hash="h1", phone_key="k1")
    state.first_visit_at = datetime(2026, 10, 1, 9, 0, tzinfo=MSK)
    state.appointments["a1"] = AppointmentState(
        appointment_id="a1",
        deal_id="20",
        version=version,
        content_hash="h2",
        status=AppointmentStatus.CONFIRMED,
        category_id="0",
        stage="PREPAYMENT_INVOICE",
        starts_at=datetime(2026, 11, 25, 10, 0, tzinfo=MSK),
        lead_source="WEB",
    )
    return state


def _save(store: DynamoStore, state: PatientState) -> None:
    """As the syncer does: versioned items that already exist are replaced only if not newer."""
    store.save_patients([(state, ["a1"])], store.load_patients({state.patient_id: ["a1"]}))


def test_opt_outs_are_sticky_and_audited(store: DynamoStore) -> None:
    store.record_opt_outs("pat:p1", ["email", "sms"], "mis", 1000)
    store.record_opt_outs("pat:p1", ["email"], "crm", 2000)  # a repeat changes nothing
    assert store.opted_out_many(["pat:p1", "pat:p2"], ["email", "sms", "call"]) == {
        "pat:p1": {"email", "sms"},
        "pat:p2": set(),
    }
    audit = [i for i in store._table.scan()["Items"] if str(i["sk"]).startswith("AUDIT#")]
    assert len(audit) == 2 and all(i["source"] == "mis" and "expires_at" in i for i in audit)


def test_saving_known_patients_costs_one_request_per_hundred_items_and_keeps_newer_versions(
    store: DynamoStore,
) -> None:
    """The syncer's AWS calls per event: versioned items go in transactions of 100, not one put each;
    an item stored newer meanwhile is still never overwritten, and the others still land."""
    ids = [f"p{n}" for n in range(60)]
    for pid in ids:
        state = _state(version=5)
        state.patient_id = pid
        _save(store, state)
    loaded = store.load_patients({pid: ["a1"] for pid in ids})
    newer = {pid: loaded[pid].model_copy(deep=True) for pid in ids}
    for n, pid in enumerate(ids):
        newer[pid].version = newer[pid].appointments["a1"].version = 4 if n == 7 else 6
        newer[pid].appointments["a1"].stage = "NEW"
    calls: list[str] = []
    for client in (store._table.meta.client, wire_client(store._table)):  # the resource's and the plain one
        client.meta.events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    store.save_patients([(newer[pid], ["a1"]) for pid in ids], loaded)

    # 120 versioned items: two transactions, plus one retry without the refused older item.
    assert calls.count("TransactWriteItems") == 3 and "PutItem" not in calls
    after = store.load_patients({pid: ["a1"] for pid in ids})
    assert after["p7"].version == 5 and after["p7"].appointments["a1"].stage == "PREPAYMENT_INVOICE"
    assert all(after[pid].version == 6 and after[pid].appointments["a1"].stage == "NEW" for pid in ids if pid != "p7")


def test_a_subjects_new_opt_outs_and_their_audit_cost_one_request(store: DynamoStore) -> None:
    """A backfill records a refusal per refusing patient: one transaction for every channel and its
    audit entry, not two puts per channel. A channel already out still changes nothing."""
    calls: list[str] = []
    for client in (store._table.meta.client, wire_client(store._table)):  # the resource's and the plain one
        client.meta.events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    assert store.record_opt_outs("pat:p1", ["email", "sms", "call"], "mis", 1000, "mis:refusal_flag") == [
        "email",
        "sms",
        "call",
    ]
    assert calls == ["TransactWriteItems"]
    assert store.record_opt_outs("pat:p1", ["sms", "marketing"], "crm", 2000) == ["marketing"]
    assert store.opted_out_many(["pat:p1"], ["email", "sms", "call", "marketing"]) == {
        "pat:p1": {"email", "sms", "call", "marketing"}
    }
    audit = [i for i in store.consent_items("pat:p1") if str(i["sk"]).startswith("AUDIT#")]
    assert sorted((i["channel"], i["source"]) for i in audit) == [
        ("call", "mis"),
        ("email", "mis"),
        ("marketing", "crm"),
        ("sms", "mis"),
    ]


def test_many_subjects_opt_outs_cost_one_transaction_per_hundred_items(store: DynamoStore) -> None:
    """A sync message's refusals: every subject's channels and audit entries in transactions of up to 100
    items, never split inside a subject; a chunk holding a channel already out goes subject by subject,
    and only what changed is reported."""
    store.record_opt_outs("pat:s7", ["sms"], "crm", 500)
    wanted = {f"pat:s{n}": ["email", "sms", "call"] for n in range(20)}  # 6 items each: 16 to a transaction
    calls: list[str] = []
    for client in (store._table.meta.client, wire_client(store._table)):  # the resource's and the plain one
        client.meta.events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    changed = store.record_opt_outs_many(wanted, "mis", 1000, "mis:refusal_flag")

    assert changed == {s: ["email", "call"] if s == "pat:s7" else ["email", "sms", "call"] for s in wanted}
    # The first chunk (16 subjects, s7 among them) is cancelled: s7 goes channel by channel, its other 15
    # subjects are sent again together; the second chunk lands whole.
    assert calls.count("TransactWriteItems") == 3 and calls.count("PutItem") == 3 + 2
    assert store.opted_out_many(list(wanted), ["email", "sms", "call"]) == {s: {"email", "sms", "call"} for s in wanted}
    assert store.record_opt_outs_many(wanted, "mis", 2000) == {s: [] for s in wanted}  # a repeat changes nothing
    audit = [i for i in store.consent_items("pat:s7") if str(i["sk"]).startswith("AUDIT#")]
    assert sorted((i["channel"], i["source"]) for i in audit) == [("call", "mis"), ("email", "mis"), ("sms", "crm")]
