"""The lab case on this machine (clinic_cases.md §A): the LIS emulator with its registers of referring
doctors and funds/clinics, the vTiger emulator, two Mailchimp audiences, moto, and the clinic's stack in
the local runtime. Used by ``make demo MIS=lis CRM=vtiger`` and tests/e2e/test_e2e_lab.py."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import yaml

from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from sandbox.emulators.base import ServedApp
from sandbox.emulators.lis import LisEmulator
from sandbox.emulators.mailchimp import MailchimpEmulator
from sandbox.emulators.vtiger import VtigerEmulator
from sandbox.runtime import ClinicStack, LocalAws

DOCTOR_TAGS = ("FNAME", "LNAME", "SPECIALTY", "REGION", "CITY")
ORGANISATION_TAGS = ("ORGNAME", "ORGTYPE", "REGION", "CITY")
AUDIENCE_EVENTS = ("unsubscribe", "cleaned", "upemail", "profile")


@dataclass
class LocalLab:
    aws: LocalAws
    stack: ClinicStack
    config: ClinicConfig
    lis: LisEmulator
    vtiger: VtigerEmulator
    doctors_audience: MailchimpEmulator
    organisations_audience: MailchimpEmulator
    servers: list[ServedApp] = field(default_factory=list)
    owns_aws: bool = True
    api_url: str = ""
    clinic_secret: dict[str, str] = field(default_factory=dict)

    def sync(self) -> dict[str, Any]:
        """One scheduled poll (both sides), then the consent queue drained, as on AWS."""
        report = dict(self.stack.run_schedule(name="Poll"))
        self.stack.drain_all()
        return report

    def deliver_mailchimp(self) -> int:
        """Both audiences post their queued events to our webhook; then the queues drain."""
        delivered = len(self.doctors_audience.deliver_webhooks()) + len(self.organisations_audience.deliver_webhooks())
        self.stack.drain_all()
        return delivered

    def crm_record(self, module: str, lis_id: str) -> dict[str, Any] | None:
        lis_field = self.config.directory.vtiger_fields["lis_id"] if self.config.directory else "cf_lis_id"
        found = [r for r in self.vtiger.records(module) if r.get(lis_field) == lis_id]
        assert len(found) <= 1, f"{len(found)} {module} carry LIS id {lis_id}"
        return found[0] if found else None

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self.owns_aws:
            self.aws.stop()


def lab_config_yaml(
    clinic_id: str,
    lis_url: str,
    doctors: MailchimpEmulator,
    organisations: MailchimpEmulator,
    field_owners: dict[str, str] | None = None,
) -> str:
    data: dict[str, Any] = {
        "clinic_id": clinic_id,
        "timezone": "Europe/Sofia",
        "mis": {"kind": "lis", "base_url": lis_url, "secret_ref": f"clinicsync/{clinic_id}/mis", "page_size": 50},
        "crm": {"kind": "vtiger", "secret_ref": f"clinicsync/{clinic_id}/crm", "shared_budget": False},
        "matching": {"default_region": "BG"},
        "directory": {
            "field_owners": field_owners or {"phone": "crm"},
            "mailchimp": {
                "doctors_list_id": doctors.list_id,
                "organisations_list_id": organisations.list_id,
                "doctors_base_url": f"{doctors.base_url}/3.0",
                "organisations_base_url": f"{organisations.base_url}/3.0",
            },
        },
    }
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _audience(api_key: str, list_id: str, tags: tuple[str, ...]) -> tuple[MailchimpEmulator, ServedApp]:
    chimp = MailchimpEmulator(api_key=api_key, list_id=list_id, merge_tags=tags, batch_seconds=0.0)
    server = ServedApp(chimp).start()
    chimp.base_url = server.base_url
    return chimp, server


def start_local_lab(
    *,
    clinic_id: str = "demo-lab",
    aws: LocalAws | None = None,
    doctors: int = 24,
    seed: int = 11,
    field_owners: dict[str, str] | None = None,
) -> LocalLab:
    owns_aws = aws is None
    aws = aws or LocalAws().start()
    lis = LisEmulator(doctors=doctors, seed=seed)
    lis_server = ServedApp(lis).start()
    vtiger = VtigerEmulator()
    integration = vtiger.add_user("clinicsync")
    vtiger_server = ServedApp(vtiger).start()
    api_key = f"{secrets.token_hex(16)}-us21"
    doctor_list, doctor_server = _audience(api_key, "d0c7025", DOCTOR_TAGS)
    org_list, org_server = _audience(api_key, "f0d5c11", ORGANISATION_TAGS)
    clinic_secret = {
        "hash_key": secrets.token_hex(32),
        "unsubscribe_key": secrets.token_hex(32),
        "mailchimp_api_key": api_key,
        "mailchimp_webhook_secret": secrets.token_urlsafe(24),
    }
    config_yaml = lab_config_yaml(clinic_id, lis_server.base_url, doctor_list, org_list, field_owners)
    stack = ClinicStack(
        aws,
        clinic_id,
        config_yaml,
        secrets={
            "mis": {"api_key": lis.api_key},
            "crm": {
                "base_url": vtiger_server.base_url,
                "username": integration["user_name"],
                "access_key": integration["access_key"],
            },
            "clinic": clinic_secret,
        },
        mis_kind="lis",
        crm_kind="vtiger",
    )
    api = stack.serve_http()
    hook = f"{api.base_url}/webhooks/mailchimp/{clinic_secret['mailchimp_webhook_secret']}"
    for chimp in (doctor_list, org_list):  # as the lab's admin would: people and admins, never the API
        chimp.add_webhook(hook, AUDIENCE_EVENTS, sources=("user", "admin"))
    return LocalLab(
        aws,
        stack,
        parse_clinic_config(config_yaml),
        lis,
        vtiger,
        doctor_list,
        org_list,
        [doctor_server, org_server, lis_server, vtiger_server, api],
        owns_aws,
        api.base_url,
        clinic_secret,
    )
