"""The dry run's stand-ins: values masked, store writes dropped, CRM writes recorded instead of sent."""

from __future__ import annotations

from typing import Any

from clinicsync.domain.ports import ContactWrite, DealWrite
from clinicsync_cli.planning import DryRunGateway, ReadOnlyTable, masked_fields


def test_pii_is_masked_and_other_values_are_shown() -> None:
    shown = masked_fields(
        {
            "full_name": {"last": "Дьячкова", "first": "Анна", "middle": "Сергеевна"},
            "phone": "+79165000001",
            "email": "anna.dyachkova@example.org",
            "birth_date": "1990-04-01",
            "comment": "аллергия на лидокаин",
            "status": "booked",
            "is_dms": False,
            "opt_outs": ["email", "sms"],
        }
    )
    text = " ".join(shown.values())
    for secret in ("Дьячкова", "Анна", "5000001", "dyachkova", "example", "1990", "лидокаин"):
        assert secret not in text
    assert shown["full_name"] == "Д. А. С." and shown["phone"].endswith("01") and shown["email"].endswith(".org")
    assert shown["status"] == "booked" and shown["is_dms"] == "False" and shown["opt_outs"] == "email,sms"


class _Table:
    name = "t"

    class meta:
        client = object()

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_item(self, **_: Any) -> dict[str, Any]:
        self.calls.append("get_item")
        return {}

    def put_item(self, **_: Any) -> None:
        raise AssertionError("a plan must not write")


def test_the_read_only_table_reads_and_drops_every_write() -> None:
    inner = _Table()
    table = ReadOnlyTable(inner)
    table.get_item(Key={"pk": "x", "sk": "y"})
    table.put_item(Item={})
    table.update_item(Key={})
    table.delete_item(Key={})
    with table.batch_writer() as batch:
        batch.put_item(Item={})
    assert inner.calls == ["get_item"] and table.dropped_writes == 4
    assert table.meta.client.transact_write_items(TransactItems=[]) == {}


class _Gateway:
    kind = "bitrix24"
    lookups_need_intents = False
    guards_writes = False

    def apply(self, writes: Any) -> Any:
        raise AssertionError("a plan must not send writes")

    def requests_made(self) -> int:
        return 0


def test_the_dry_run_gateway_records_writes_and_invents_ids_for_creates() -> None:
    gateway = DryRunGateway(_Gateway())  # type: ignore[arg-type]
    outcome = gateway.apply(
        [
            ContactWrite("p1", None, {}),
            DealWrite("a1", "p1", None, "0", "NEW", {}),
            DealWrite("a2", "p1", "77", "0", "WON", {}),
        ]
    )
    assert len(gateway.writes) == 3 and outcome.failed == {}
    assert outcome.contact_ids["p1"].startswith("new-") and outcome.deal_ids["a2"] == "77"
