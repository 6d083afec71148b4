"""The dry run's stand-ins: values masked, store writes kept in memory, CRM writes recorded instead of sent."""

from __future__ import annotations

from typing import Any

from clinicsync.domain.crm_ports import ContactWrite, DealWrite
from clinicsync_cli.memory_store import MemoryStore
from clinicsync_cli.planning import DryRunGateway, masked_fields


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


def test_the_dry_run_store_reads_what_is_stored_and_writes_nowhere() -> None:
    stored = MemoryStore()
    stored.index_contacts([("k1", "p1")], [])
    stored.record_opt_outs("pat:p1", ["sms"], "mis", 1000)
    stored.write_intents(["P#p1"], 1000)
    stored.put_cursor("medods", {"since": 5})
    before = stored.writes
    dry = MemoryStore(below=stored)
    assert dry.patients_by_phone("k1") == ["p1"] and dry.load_intents(["P#p1"]) == {"P#p1": 1000}
    assert dry.opted_out_many(["pat:p1"], ["sms", "email"]) == {"pat:p1": {"sms"}}
    dry.index_phone("k2", "p1", "k1")
    assert dry.record_opt_outs("pat:p1", ["sms", "email"], "link", 2000) == ["email"]  # sms: out already below
    dry.clear_intents(["P#p1"])
    dry.put_cursor("medods", {"since": 9})
    assert dry.patients_by_phone("k1") == [] and dry.load_intents(["P#p1"]) == {}  # the dry run sees its writes
    assert dry.get_cursor("medods") == {"since": 9} and dry.writes == 4
    assert stored.writes == before and stored.patients_by_phone("k1") == ["p1"]  # and nothing reached below
    assert stored.opted_out_many(["pat:p1"], ["email"]) == {"pat:p1": set()}
    assert stored.get_cursor("medods") == {"since": 5}


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
