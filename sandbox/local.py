"""A whole clinic on this machine: the seeded MIS emulator, the CRM emulator, moto, and the clinic's
stack in the local runtime. Used by ``make demo`` and the end-to-end tests."""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clinicsync.config import ClinicConfig, parse_clinic_config
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from sandbox.emulators.medods import MedodsEmulator
from sandbox.expect import ExpectedDeal, expected_deals, mismatches
from sandbox.runtime import ClinicStack, LocalAws
from sandbox.seed import SampleClinic, build_sample_clinic

CLINICS = Path(__file__).resolve().parent / "clinics"
WEBHOOK_EVENTS = ("ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMLEADADD", "ONCRMLEADUPDATE", "ONCRMCONTACTUPDATE")


@dataclass
class RunSummary:
    poll: dict[str, Any]
    drain: dict[str, int]
    crm_requests: int
    crm_writes: int
    throttled: int


@dataclass
class LocalClinic:
    aws: LocalAws
    stack: ClinicStack
    config: ClinicConfig
    sample: SampleClinic
    medods: MedodsEmulator
    bitrix: Bitrix24Emulator
    servers: list[ServedApp] = field(default_factory=list)
    owns_aws: bool = True

    def sync(self, on_batch: Any = None, on_polled: Any = None) -> RunSummary:
        """One scheduled poll, then the queues drained through the syncer, as on AWS."""
        before = self.bitrix.stats()
        poll = self.stack.run_schedule(name="Poll")
        if on_polled is not None:
            on_polled(self.stack.queue_depth())
        drain = self.stack.drain_queue(on_batch=on_batch)
        for key, value in self.stack.drain_all().items():
            drain[key] += value
        after = self.bitrix.stats()
        return RunSummary(
            poll=poll,
            drain=drain,
            crm_requests=after["requests"] - before["requests"],
            crm_writes=after["writes"] - before["writes"],
            throttled=(after["rate_limited_503"] + after["rate_limited_429"])
            - (before["rate_limited_503"] + before["rate_limited_429"]),
        )

    # --- what the CRM holds, for checks and the demo summary ---------------------------------------

    def deliver_webhooks(self) -> int:
        """Bitrix24 posts its queued events to our HTTP API; then the syncer handles them."""
        delivered = self.bitrix.deliver_events()
        self.stack.drain_all()
        return len(delivered)

    def catch_up(self) -> Any:
        result = self.stack.run_schedule(name="CrmCatchUp")
        self.stack.drain_all()
        return result

    def expected_deals(self) -> dict[str, ExpectedDeal]:
        return expected_deals(self.medods.all_clients(), self.medods.all_appointments(), self.config)

    def mismatches(self) -> list[str]:
        return mismatches(self.expected_deals(), self.deals_by_origin())

    def open_booking(self) -> int:
        """An appointment that is synced and still only booked: the start of most scenarios."""
        expected = self.expected_deals()
        for row in self.medods.all_appointments():
            if str(row["id"]) in expected and row["status"] in ("approved", "need_approval"):
                return int(row["id"])
        raise LookupError("the sample clinic has no open booking")

    def deals_by_origin(self) -> dict[str, dict[str, Any]]:
        return {str(d.get("ORIGIN_ID")): d for d in self.bitrix.deals.values() if d.get("ORIGIN_ID")}

    def contacts_by_origin(self) -> Counter[str]:
        return Counter(str(c.get("ORIGIN_ID")) for c in self.bitrix.contacts.values() if c.get("ORIGIN_ID"))

    def stage_distribution(self) -> Counter[tuple[str, str]]:
        names = {s["STATUS_ID"]: s["NAME"] for s in self._stages() if str(s["ENTITY_ID"]).startswith("DEAL_STAGE")}
        return Counter(
            (str(d.get("CATEGORY_ID")), f"{d['STAGE_ID']} «{names.get(str(d['STAGE_ID']), '?')}»")
            for d in self.bitrix.deals.values()
        )

    def _stages(self) -> list[dict[str, Any]]:
        with self.bitrix._lock:  # sandbox-only peek at the emulator's stage table
            return list(self.bitrix._statuses)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self.owns_aws:
            self.aws.stop()


# The demo clinic's funnel, as its admins set it up: stages renamed (ids kept, as on real portals)
# plus one user stage for no-shows that stays open, so the admin can call back and re-book.
DEMO_STAGE_NAMES = {
    "NEW": "Новое обращение",
    "PREPARATION": "Записан на приём",
    "PREPAYMENT_INVOICE": "Запись подтверждена",
    "EXECUTING": "Пациент пришёл",
    "FINAL_INVOICE": "Приём состоялся",
    "WON": "Лечение оплачено",
    "LOSE": "Запись отменена",
    "APOLOGY": "Отказ от лечения",
}


def setup_demo_portal(bitrix: Bitrix24Emulator) -> None:
    for category in (0, 1):
        prefix = f"C{category}:" if category else ""
        for stage, name in DEMO_STAGE_NAMES.items():
            bitrix.rename_stage(prefix + stage, name)
        bitrix.add_stage(category, "Неявка — перезвонить", status_id="UC_NOSHOW")


def demo_config_yaml(clinic_id: str, medods_url: str, overrides: dict[str, Any] | None = None) -> str:
    data = yaml.safe_load((CLINICS / "demo-dental.yaml").read_text(encoding="utf-8"))
    data["clinic_id"] = clinic_id
    data["mis"]["base_url"] = f"{medods_url}/api/v2"
    data["mis"]["secret_ref"] = f"clinicsync/{clinic_id}/mis"
    data["crm"]["secret_ref"] = f"clinicsync/{clinic_id}/crm"
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def start_local_clinic(
    *,
    clinic_id: str = "demo-dental",
    seed: int = 7,
    patients: int = 300,
    appointments: int = 400,
    aws: LocalAws | None = None,
    config_overrides: dict[str, Any] | None = None,
    rate_limit: bool = True,
) -> LocalClinic:
    owns_aws = aws is None
    aws = aws or LocalAws().start()
    sample = build_sample_clinic(seed=seed, patients=patients, appointments=appointments)
    identity, mis_secret = f"{clinic_id}-integration", secrets.token_urlsafe(64)  # HS512 wants a 64-byte key
    medods = MedodsEmulator(sample, identity_key=identity, secret=mis_secret)
    bitrix = Bitrix24Emulator(
        webhook_secret=secrets.token_hex(8),
        application_token=secrets.token_hex(16),
        member_id=secrets.token_hex(16),
        rate_limit=rate_limit,
    )
    setup_demo_portal(bitrix)
    medods_server, bitrix_server = ServedApp(medods).start(), ServedApp(bitrix).start()
    config_yaml = demo_config_yaml(clinic_id, medods_server.base_url, config_overrides)
    stack = ClinicStack(
        aws,
        clinic_id,
        config_yaml,
        secrets={
            "mis": {"identity_key": identity, "secret": mis_secret},
            "crm": {
                "webhook_url": bitrix.webhook_url(bitrix_server.base_url),
                "application_token": bitrix.application_token,
                "member_id": bitrix.member_id,
            },
            "clinic": {"hash_key": secrets.token_hex(32)},
        },
    )
    config = parse_clinic_config(config_yaml)
    api = stack.serve_http()
    for event in WEBHOOK_EVENTS:
        bitrix.bind_event(event, f"{api.base_url}/webhooks/bitrix24")
    return LocalClinic(aws, stack, config, sample, medods, bitrix, [medods_server, bitrix_server, api], owns_aws)
