"""A whole clinic on this machine: the seeded MIS emulator, the CRM emulator, moto, and the clinic's
stack in the local runtime. Used by ``make demo`` and the end-to-end tests."""

from __future__ import annotations

import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from clinicsync.adapters.amocrm import webhook as amocrm_webhook
from clinicsync.adapters.bitrix24 import webhook as bitrix24_webhook
from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync.domain.models import AppointmentStatus, Channel
from clinicsync.domain.statuses import canonical_status
from clinicsync.domain.unsubscribe_links import UnsubscribeTokens
from sandbox.crm_views import AmoCrmView, Bitrix24View, CrmView
from sandbox.emulators.amocrm import (
    CONTACT_FIELD_BIRTHDAY,
    CONTACT_FIELD_MIS_PATIENT_ID,
    LEAD_FIELD_APPOINTMENT_AT,
    LEAD_FIELD_DOCTOR,
    LEAD_FIELD_MIS_APPOINTMENT_ID,
    LOST_STATUS_ID,
    MAIN_PIPELINE_ID,
    STATUS_BOOKED,
    STATUS_IN_WORK,
    STATUS_NEW_REQUEST,
    STATUS_VISITED,
    WON_STATUS_ID,
    AmoCrmEmulator,
)
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from sandbox.emulators.ident import IdentEmulator, IdentHttpClient
from sandbox.emulators.infoclinica import InfoClinicaEmulator, serve_tls
from sandbox.emulators.mailchimp import MailchimpEmulator
from sandbox.emulators.medods import MedodsEmulator
from sandbox.emulators.renovatio import RenovatioEmulator
from sandbox.expect import ExpectedDeal, expected_deals, mismatches
from sandbox.mis_views import IdentView, InfoClinicaView, MedodsView, MisView, RenovatioView
from sandbox.runtime import ClinicStack, LocalAws
from sandbox.seed import SampleClinic, build_sample_clinic
from sandbox.tls import loopback_pki

CLINICS = Path(__file__).resolve().parent / "clinics"
# Our local API runs a handler per request; a cold one on a loaded CI machine can take seconds (httpx waits 5).
LOCAL_API_TIMEOUT = 30.0
WEBHOOK_EVENTS = tuple(bitrix24_webhook.EVENTS)  # what discovery binds on a real portal


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
    mis: MisView
    crm: CrmView
    servers: list[ServedApp] = field(default_factory=list)
    owns_aws: bool = True
    bitrix: Bitrix24Emulator | None = None
    amocrm: AmoCrmEmulator | None = None
    ident_connector: Any = None  # clinicsync_ident.runner.Connector, when the MIS is IDENT
    ident_client: IdentHttpClient | None = None  # IDENT's own calls to the stack

    @property
    def ident(self) -> IdentEmulator:
        assert isinstance(self.mis.emulator, IdentEmulator), "this clinic does not run IDENT"
        return self.mis.emulator

    def run_connector(self, resync_days: int | None = None) -> Any:
        """The connector at the clinic: one run against the emulated IDENT database, pushing to our API."""
        assert self.ident_connector is not None, "this clinic does not run IDENT"
        return self.ident_connector.run_once(resync_days=resync_days)

    mailchimp: MailchimpEmulator | None = None
    api_url: str = ""
    crm_url: str = ""  # the CRM emulator's base URL (chaos runs disturb calls to it)
    clinic_secret: dict[str, str] = field(default_factory=dict)
    funnel_at_creation: dict[str, str] = field(default_factory=dict)  # appointment id → category id
    _booked_for_tests: int = 0  # patients open_booking made because the sample had none to fit

    @property
    def medods(self) -> MedodsEmulator:
        """The MEDODS emulator (the default MIS), for tests that use its own helpers."""
        assert isinstance(self.mis.emulator, MedodsEmulator), "this clinic does not run MEDODS"
        return self.mis.emulator

    def backfill(self, days: int = 90) -> RunSummary:
        """A first import from scratch: the resync job over a long window, through the same path.
        IDENT's database is out of the cloud's reach: its connector re-sends the window instead."""
        before = self.crm.stats()
        if self.ident_connector is not None:
            self.run_connector(resync_days=days)
            poll = self.stack.run_schedule(name="Poll")
        else:
            poll = self.stack.invoke(
                "MisPollerFunction", {**self.stack.scheduled_event(name="DeepResync"), "window_days": days}
            )
        drain = self.stack.drain_all()
        after = self.crm.stats()
        self.note_created_deals()
        return RunSummary(
            poll,
            drain,
            after["requests"] - before["requests"],
            after["writes"] - before["writes"],
            after["throttled"] - before["throttled"],
        )

    def first_import(self, on_batch: Any = None, on_polled: Any = None) -> RunSummary:
        """A change queue (InfoClinica) only carries changes made from now on: its first import is the
        resync job over a long window. Cursor and window feeds read everything on their first poll."""
        if self.mis.kind == "infoclinica":
            return self.backfill()
        return self.sync(on_batch=on_batch, on_polled=on_polled)

    def sync(self, on_batch: Any = None, on_polled: Any = None) -> RunSummary:
        """One scheduled poll, then the queues drained through the syncer, as on AWS (with IDENT, the
        connector at the clinic runs first and pushes what changed)."""
        before = self.crm.stats()
        if self.ident_connector is not None:
            self.run_connector()
        poll = self.stack.run_schedule(name="Poll")
        if on_polled is not None:
            on_polled(self.stack.queue_depth())
        drain = self.stack.drain_queue(on_batch=on_batch)
        for key, value in self.stack.drain_all().items():
            drain[key] += value
        after = self.crm.stats()
        self.note_created_deals()
        return RunSummary(
            poll=poll,
            drain=drain,
            crm_requests=after["requests"] - before["requests"],
            crm_writes=after["writes"] - before["writes"],
            throttled=after["throttled"] - before["throttled"],
        )

    # --- what the CRM holds, for checks and the demo summary ---------------------------------------

    def deliver_webhooks(self) -> int:
        """The CRM posts its queued events to our HTTP API; then the syncer handles them.
        Returns the number of events delivered (amoCRM packs several into one POST)."""
        if self.bitrix is not None:
            delivered = len(self.bitrix.deliver_events())
        else:
            assert self.amocrm is not None
            delivered = sum(len(d.events) for d in self.amocrm.deliver_webhooks() if d.ok)
        self.stack.drain_all()
        return delivered

    def catch_up(self) -> Any:
        result = self.stack.run_schedule(name="CrmCatchUp")
        self.stack.drain_all()
        return result

    # --- consent --------------------------------------------------------------------------------------

    def unsubscribe_token(self, patient_id: str | int, channel: Channel = Channel.EMAIL, ttl: int | None = None) -> str:
        """A link token as the clinic's mailer would put in List-Unsubscribe (same key as the stack)."""
        return UnsubscribeTokens(self.clinic_secret["unsubscribe_key"].encode(), ttl).issue(str(patient_id), channel)

    def one_click(self, token: str, body: str = "List-Unsubscribe=One-Click") -> httpx.Response:
        """The mailbox provider's RFC 8058 POST: form body, no cookies, no auth."""
        return httpx.post(
            f"{self.api_url}/unsubscribe/{token}",
            content=body,
            headers={"content-type": "application/x-www-form-urlencoded"},
            timeout=LOCAL_API_TIMEOUT,
        )

    def deliver_mailchimp(self) -> int:
        """Mailchimp posts its queued audience events to our webhook; then the queues drain."""
        assert self.mailchimp is not None, "this clinic runs without Mailchimp"
        delivered = self.mailchimp.deliver_webhooks()
        self.stack.drain_all()
        return len(delivered)

    def unsubscribe_to_crm_seconds(self, patient_id: str | int, timeout: float = 60.0) -> float:
        """Seconds from a one-click POST until the CRM emulator shows the contact's e-mail opt-out.

        The queues are served the way AWS does, concurrently with the click: the consent queue's event
        source mapping (batch size and batching window from template.yaml) runs in the background,
        nothing is drained by hand. For the benchmark; tests assert behaviour, never this number.
        """
        contact = self.crm.contact_of_patient(str(patient_id))
        if contact is None:
            raise LookupError("the patient has no CRM contact yet: sync first")
        with self.stack.event_sources("ConsentQueue", "CrmEventQueue", "SyncQueue"):
            started = time.perf_counter()
            response = self.one_click(self.unsubscribe_token(patient_id))
            response.raise_for_status()
            while time.perf_counter() - started < timeout:
                if "email" in self.crm.contact_opt_outs(contact):
                    return time.perf_counter() - started
                time.sleep(0.02)
        raise TimeoutError(f"the CRM showed no opt-out within {timeout} s")

    def expected_deals(self) -> dict[str, ExpectedDeal]:
        return expected_deals(self.mis, self.config, self.funnel_at_creation)

    def note_created_deals(self) -> None:
        """Remember the funnel the oracle expected for each deal when it first appeared: a deal keeps the
        funnel it was created in, even when an earlier visit is completed later (docs/statuses.md)."""
        new = set(self.crm.deals()) - set(self.funnel_at_creation)
        if new:
            expected = expected_deals(self.mis, self.config, self.funnel_at_creation)
            self.funnel_at_creation.update({aid: expected[aid].category_id for aid in new if aid in expected})

    def mismatches(self) -> list[str]:
        return mismatches(self.expected_deals(), self.crm.deals(), self.crm.appointment_history())

    def open_booking(
        self, *, refusals: bool | None = False, email: bool | None = None, family: bool | None = False
    ) -> int:
        """A synced appointment that is still only booked, of a patient with the traits the test needs
        (None: either way). Defaults: a patient who refused nothing and shares no family phone, so a
        consent or funnel step changes what the test expects whatever day the sample was built on.

        The sample moves with the calendar, so on some days it holds no such booking: then a new patient
        with exactly those traits is booked three days ahead and synced (the CRM left with no queued
        events), never a near miss picked."""
        expected = self.expected_deals()
        booked = AppointmentStatus.BOOKED
        for row in sorted(self.mis.visits(), key=lambda r: int(r["id"])):
            if row["id"] not in expected or canonical_status(self.mis.kind, row["status"]) is not booked:
                continue
            if self._has_traits(int(row["client_id"]), refusals, email, family):
                return int(row["id"])
        if True in (refusals, email, family):  # a new card has none of these
            raise LookupError("the sample has no open booking of such a patient: make one in the test")
        self._booked_for_tests += 1
        n = self._booked_for_tests  # 999: a code the sample never deals, so no family phone by accident
        client = self.mis.add_client("Тестова", f"+7 999 000-{n // 100:02d}-{n % 100:02d}")
        visit = self.mis.book(client, self.mis.at(3, "10:00"))
        self.sync()
        self.deliver_webhooks()  # our writes' echoes: a test's next CRM event must be its own
        if str(visit) not in self.crm.deals():
            raise LookupError(f"the booking made for the test did not sync: {self.mismatches()}")
        return visit

    def _has_traits(self, patient_id: int, refusals: bool | None, email: bool | None, family: bool | None) -> bool:
        patient = next((p for p in self.sample.patients if p.id == patient_id), None)
        if patient is None:  # added by a test: its traits are the test's business
            return False
        flags = (
            patient.deny_calls,
            patient.deny_email,
            patient.deny_sms_notifications,
            patient.deny_sms_dispatches,
            patient.deny_whatsapp,
            patient.deny_data_processing,
        )
        traits = ((refusals, any(flags)), (email, patient.email is not None), (family, patient.family_id is not None))
        return not patient.archived and all(want is None or want == has for want, has in traits)

    def stage_distribution(self) -> Counter[tuple[str, str]]:
        return Counter(
            (d["category"], f"{d['stage']} «{self.crm.stage_name(d['stage'])}»") for d in self.crm.deals().values()
        )

    def close(self) -> None:
        if self.ident_connector is not None:
            self.ident_connector.close()
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


def demo_config_yaml(clinic_id: str, mis_url: str, overrides: dict[str, Any] | None = None) -> str:
    data = yaml.safe_load((CLINICS / "demo-dental.yaml").read_text(encoding="utf-8"))
    data["clinic_id"] = clinic_id
    data["mis"]["base_url"] = mis_url
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
    crm: str = "bitrix24",
    mis: str = "medods",
    mailchimp: bool = False,
) -> LocalClinic:
    owns_aws = aws is None
    aws = aws or LocalAws().start()
    sample = build_sample_clinic(seed=seed, patients=patients, appointments=appointments)
    source = _mis(mis, sample)
    if crm == "bitrix24":
        portal = _bitrix24_portal(rate_limit)
    elif crm == "amocrm":
        portal = _amocrm_account(rate_limit)
    else:
        raise ValueError(f"no emulator for CRM {crm!r}")
    clinic_secret = {"hash_key": secrets.token_hex(32), "unsubscribe_key": secrets.token_hex(32)}
    chimp = None
    chimp_overrides: dict[str, Any] = {}
    if mailchimp:
        chimp = MailchimpEmulator(
            api_key=f"{secrets.token_hex(16)}-us21",
            merge_tags=("FNAME", "LNAME", "CITY", "VISITTYPE", "LASTVISIT", "SPECIALTY", "BRANCH"),
            batch_seconds=0.0,
        )
        chimp_server = ServedApp(chimp).start()
        chimp.base_url = chimp_server.base_url
        clinic_secret |= {"mailchimp_api_key": chimp.api_key, "mailchimp_webhook_secret": secrets.token_urlsafe(24)}
        chimp_overrides = {"mailchimp": {"list_id": chimp.list_id, "base_url": f"{chimp_server.base_url}/3.0"}}
    overrides = {**source.config_overrides, **portal.config_overrides, **chimp_overrides, **(config_overrides or {})}
    config_yaml = demo_config_yaml(clinic_id, source.base_url, overrides)
    stack = ClinicStack(
        aws,
        clinic_id,
        config_yaml,
        secrets={
            "mis": source.secret,
            "crm": portal.secret,
            "clinic": clinic_secret,
        },
        crm_kind=crm,
        mis_kind=mis,
    )
    api = stack.serve_http()
    portal.subscribe(api.base_url)
    config = parse_clinic_config(config_yaml)
    servers = [s for s in (source.server, portal.server, api) if s is not None]
    if chimp is not None:
        # As the clinic's admin would: audience events from people and admins, never from the API (ours).
        hook = f"{api.base_url}/webhooks/mailchimp/{clinic_secret['mailchimp_webhook_secret']}"
        chimp.add_webhook(hook, ("unsubscribe", "cleaned", "upemail", "profile"), sources=("user", "admin"))
        servers.insert(0, chimp_server)
    clinic = LocalClinic(
        aws,
        stack,
        config,
        sample,
        source.view,
        portal.view,
        servers,
        owns_aws,
        bitrix=portal.bitrix,
        amocrm=portal.amocrm,
        mailchimp=chimp,
        api_url=api.base_url,
        crm_url=portal.server.base_url,
        clinic_secret=clinic_secret,
    )
    if isinstance(source.view, IdentView):
        clinic.ident_connector = _ident_connector(source.view.emulator, source.secret, api.base_url)
        clinic.ident_client = IdentHttpClient(api.base_url, source.secret["integration_key"])
    return clinic


def _ident_connector(ident: IdentEmulator, secret: dict[str, Any], api_url: str) -> Any:
    """The connector as a clinic installs it: its own state file, the database, the stack's URL and key."""
    from clinicsync_ident.db import IdentDatabase
    from clinicsync_ident.push import StackClient
    from clinicsync_ident.runner import Connector
    from clinicsync_ident.state import load_state, save_state

    state_file = ident.path.with_name("ident-state.json")
    database = IdentDatabase.connect("sqlite", str(ident.path))
    stack = StackClient(api_url, secret["connector_key"].encode(), httpx.Client(timeout=30.0))
    return Connector(
        "sandbox-ident",
        database,
        stack,
        load_state(state_file),
        lambda state: save_state(state_file, state),
        clock=ident.clock.now,
        first_sync_days=120,
    )


@dataclass
class _Source:
    """A MIS emulator served on loopback, with the clinic's MIS secret and config for it."""

    view: MisView
    server: Any
    base_url: str
    secret: dict[str, Any]
    config_overrides: dict[str, Any]


def _mis(kind: str, sample: SampleClinic) -> _Source:
    if kind == "medods":
        identity, key = "demo-integration", secrets.token_urlsafe(64)  # HS512 wants a 64-byte key
        medods = MedodsEmulator(sample, identity_key=identity, secret=key)
        server = ServedApp(medods).start()
        return _Source(
            MedodsView(medods), server, f"{server.base_url}/api/v2", {"identity_key": identity, "secret": key}, {}
        )
    if kind == "renovatio":
        api_key = secrets.token_hex(16)
        renovatio = RenovatioEmulator(sample, api_key)
        server = ServedApp(renovatio).start()
        return _Source(
            RenovatioView(renovatio),
            server,
            f"{server.base_url}/api/public",
            {"api_key": api_key},
            {"mis.kind": "renovatio"},
        )
    if kind == "infoclinica":
        # XML over mutual TLS: a throwaway CA issues the emulator's server and our client certificate.
        pki = loopback_pki()
        infoclinica = InfoClinicaEmulator(sample)
        server = serve_tls(infoclinica, pki.server_context())
        secret = {"client_cert": pki.client.cert_pem, "client_key": pki.client.key_pem, "ca_cert": pki.ca.cert_pem}
        return _Source(
            InfoClinicaView(infoclinica), server, f"{server.base_url}/api/xml", secret, {"mis.kind": "infoclinica"}
        )
    if kind == "ident":
        # No server: IDENT's data leaves the clinic through the connector, which pushes to our API.
        ident = IdentEmulator(sample, Path(tempfile.mkdtemp(prefix="clinicsync-ident-")) / "ident.sqlite3")
        secret = {"integration_key": secrets.token_urlsafe(32), "connector_key": secrets.token_urlsafe(48)}
        return _Source(IdentView(ident), None, "connector", secret, {"mis.kind": "ident"})
    raise ValueError(f"no emulator for MIS {kind!r}")


@dataclass
class _Portal:
    """A CRM emulator served on loopback, with what the clinic's config and secret need to reach it."""

    view: CrmView
    server: ServedApp
    secret: dict[str, Any]
    config_overrides: dict[str, Any]
    subscribe: Callable[[str], None]
    bitrix: Bitrix24Emulator | None = None
    amocrm: AmoCrmEmulator | None = None


def _bitrix24_portal(rate_limit: bool) -> _Portal:
    bitrix = Bitrix24Emulator(
        webhook_secret=secrets.token_hex(8),
        application_token=secrets.token_hex(16),
        member_id=secrets.token_hex(16),
        rate_limit=rate_limit,
    )
    setup_demo_portal(bitrix)
    server = ServedApp(bitrix).start()
    secret = {
        "webhook_url": bitrix.webhook_url(server.base_url),
        "application_token": bitrix.application_token,
        "member_id": bitrix.member_id,
    }

    def subscribe(api: str) -> None:
        for event in WEBHOOK_EVENTS:
            bitrix.bind_event(event, f"{api}/webhooks/bitrix24")

    return _Portal(Bitrix24View(bitrix), server, secret, {}, subscribe, bitrix=bitrix)


# Case C's other fields as the clinic's admin creates them in amoCRM: (entity, name, label, type, options).
CASE_C_AMOCRM_FIELDS = (
    ("contact", "representative", "Представитель (опекун)", "text", {}),
    ("contact", "age", "Возраст", "numeric", {}),
    ("contact", "sex", "Пол", "select", {"m": "Мужской", "f": "Женский"}),
    ("contact", "birth_date", "Дата рождения", "birthday", {}),
    ("contact", "residence", "Место жительства", "text", {}),
    ("contact", "card_comment", "Комментарий к карте", "textarea", {}),
    ("contact", "patient_status", "Статус пациента", "text", {}),
    ("contact", "guarantee_letter", "Гарантийное письмо", "checkbox", {}),
    ("contact", "policy_number", "Номер полиса", "text", {}),
    ("contact", "policy_valid_until", "Полис действует до", "date", {}),
    ("contact", "cancellation_date", "Дата отмены", "date", {}),
    ("deal", "booked_by", "Администратор", "text", {}),
    ("deal", "booked_at", "Дата создания записи", "date_time", {}),
    ("deal", "branch", "Филиал", "text", {}),
    ("deal", "service_codes", "Коды услуг", "text", {}),
    ("deal", "comment", "Комментарий", "textarea", {}),
    ("deal", "assignment_id", "ID направления", "text", {}),
    ("deal", "patient_status", "Статус пациента", "text", {}),
    ("deal", "visit_category", "Категория приема", "text", {}),
    ("deal", "charged", "Начислено", "numeric", {}),
    ("deal", "discount", "Скидка", "numeric", {}),
    ("deal", "paid", "Оплачено", "numeric", {}),
)


def _case_c_fields(amo: AmoCrmEmulator) -> dict[str, dict[str, Any]]:
    """Creates case C's fields (the birthday and doctor fields exist already) and maps them per entity."""
    out: dict[str, dict[str, Any]] = {"contact": {}, "deal": {"doctor": {"id": str(LEAD_FIELD_DOCTOR), "type": "text"}}}
    for entity, name, label, type_, options in CASE_C_AMOCRM_FIELDS:
        if name == "birth_date":
            fid = CONTACT_FIELD_BIRTHDAY
        else:
            plural = "contacts" if entity == "contact" else "leads"
            fid = amo.add_custom_field(plural, label, type_, enums=list(options.values()))
        out[entity][name] = {"id": str(fid), "type": type_, **({"values": options} if options else {})}
    return out


def _amocrm_account(rate_limit: bool) -> _Portal:
    """The InfoClinica->amoCRM case's funnel: «Новая заявка» → «Взяли в работу» → «Записан на прием» →
    «Посетил» → 142, cancellation to 143, one pipeline for first and repeat visits."""
    amo = AmoCrmEmulator(rate_limit=rate_limit)
    fields = {
        "mis_patient_id": CONTACT_FIELD_MIS_PATIENT_ID,
        "mis_appointment_id": LEAD_FIELD_MIS_APPOINTMENT_ID,
        "visit_at": LEAD_FIELD_APPOINTMENT_AT,
        # Fields the clinic's admin adds for the sync, as in the case's field list.
        "status": amo.add_custom_field("leads", "Статус записи", "text"),
        "is_dms": amo.add_custom_field("leads", "ДМС", "checkbox"),
        "opt_outs": amo.add_custom_field("contacts", "Отказ от рассылок", "text"),
        "opt_ins": amo.add_custom_field("contacts", "Согласие на рассылки", "text"),
    }
    case_c = _case_c_fields(amo)
    server = ServedApp(amo).start()
    webhook_secret = secrets.token_urlsafe(24)
    secret = {
        **amo.issue_tokens(),
        "base_url": server.base_url,
        "client_id": amo.client_id,
        "client_secret": amo.client_secret,
        "redirect_uri": amo.redirect_uri,
        "account_id": str(amo.account_id),
        "user_id": str(amo.api_user_id),
        "webhook_secret": webhook_secret,
    }
    booked, visited = str(STATUS_BOOKED), str(STATUS_VISITED)
    stages = {
        "booked": booked,
        "rescheduled": booked,
        "confirmed": booked,
        "arrived": visited,
        "completed": visited,
        "no_show": str(STATUS_IN_WORK),
        "cancelled": str(LOST_STATUS_ID),
    }
    pipeline = {
        "category_id": str(MAIN_PIPELINE_ID),
        "stages": stages,
        "closed_stages": [str(WON_STATUS_ID), str(LOST_STATUS_ID)],
    }
    overrides: dict[str, Any] = {
        "crm.kind": "amocrm",
        "crm.pipelines": {"primary": pipeline, "repeat": pipeline},
        "fields.crm_names": {name: str(fid) for name, fid in fields.items()},
        "fields.crm_fields": case_c,
        "matching.adopt_deal_stages": [str(STATUS_NEW_REQUEST), str(STATUS_IN_WORK)],
    }

    def subscribe(api: str) -> None:
        amo.add_webhook(f"{api}/webhooks/amocrm/{webhook_secret}", amocrm_webhook.EVENTS)  # as discovery registers

    return _Portal(AmoCrmView(amo, fields), server, secret, overrides, subscribe, amocrm=amo)
