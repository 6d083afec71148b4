"""How the container builds each vendor's adapter from the clinic config and its secrets.

Imported only when the container first builds a MIS source, a CRM client or the lab's directory, and each
adapter module only in its own branch: a Bitrix24 clinic never loads amoCRM's (tests/infra/test_cold_start.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import boto3

from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import CrmGateway, VerifiesInLookUp
from clinicsync.domain.ports import MisConsentWriter, MisSource
from clinicsync.runtime import deadline

if TYPE_CHECKING:
    from clinicsync.adapters.amocrm.client import AmoCrmClient
    from clinicsync.adapters.bitrix24.client import Bitrix24Client
    from clinicsync.adapters.lis.source import LisSource
    from clinicsync.adapters.mailchimp.client import MailchimpAudience
    from clinicsync.adapters.mailchimp.directory import DirectoryAudiences
    from clinicsync.adapters.vtiger.client import VtigerClient
    from clinicsync.application.crm_events import CrmEventProcessor
    from clinicsync.application.directory import DirectorySync
    from clinicsync.application.sync import Syncer
    from clinicsync.runtime.wiring import Container


def build_mis_source(parts: Container, config: ClinicConfig) -> MisSource:
    if config.mis.kind == "lis":
        return parts.lis_source(config)
    if config.mis.kind == "ident":
        from clinicsync.adapters.ident.source import IdentSource

        # IDENT's connector pushes to us; nothing to call out with, only its inbox to read.
        return IdentSource(parts.sqs(), parts.settings.ident_inbox_queue_url, enrich=parts.ident_directory().enrich)
    creds = parts.mis_credentials()
    if config.mis.kind == "medods":
        from clinicsync.adapters.medods.cards import MedodsCards
        from clinicsync.adapters.medods.source import MedodsApi, MedodsClient, MedodsSource

        api = MedodsApi(config.mis.base_url, str(creds["identity_key"]), str(creds["secret"]), http=parts.http_client())
        # The cards it has read outlive the invocation: a warm container reads again only those the feed changed.
        cards = parts.once(("medods-cards", config.mis.base_url), MedodsCards[MedodsClient])
        return MedodsSource(api, config, cards=cards)
    if config.mis.kind == "infoclinica":
        from clinicsync.adapters.infoclinica.api import InfoClinicaApi
        from clinicsync.adapters.infoclinica.source import InfoClinicaSource

        # Its own HTTP client: it carries the clinic's client certificate from the secret.
        return InfoClinicaSource(InfoClinicaApi.from_secret(config.mis.base_url, creds, tz=config.tz), config)
    if config.mis.kind == "renovatio":
        from clinicsync.adapters.renovatio.source import RenovatioApi, RenovatioSource

        return RenovatioSource(RenovatioApi.from_secret(config.mis.base_url, creds, http=parts.http_client()), config)
    raise NotImplementedError(f"MIS kind {config.mis.kind!r} is not available yet")


def build_lis_source(parts: Container, config: ClinicConfig) -> LisSource:
    from clinicsync.adapters.lis.source import LisApi, LisSource

    api = LisApi.from_secret(config.mis.base_url, parts.mis_credentials(), parts.http_client())
    return LisSource(api, config.matching.default_region, config.mis.page_size, config.mis.overlap_seconds)


def build_mis_consent_writer(parts: Container, config: ClinicConfig) -> MisConsentWriter | None:
    if config.mis.kind == "medods":
        from clinicsync.adapters.medods.consent import MedodsConsentWriter
        from clinicsync.adapters.medods.source import MedodsApi

        creds = parts.mis_credentials()
        api = MedodsApi(config.mis.base_url, str(creds["identity_key"]), str(creds["secret"]), http=parts.http_client())
        return MedodsConsentWriter(api)
    if config.mis.kind == "lis":
        return parts.lis_source(config)  # "do not send marketing letters" on the doctor or organisation
    return None


def build_crm_gateway(parts: Container, config: ClinicConfig) -> CrmGateway:
    if config.crm.kind == "bitrix24":
        from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway

        return Bitrix24Gateway(parts.bitrix_client(config), config)
    if config.crm.kind == "amocrm":
        from clinicsync.adapters.amocrm.gateway import AmoCrmGateway

        amo = parts.amocrm_client(config)
        user = str(parts.crm_credentials().get("user_id", ""))
        hasher = parts.hasher
        # The phone index outlives the container in the table, under the clinic's keyed hash.
        return AmoCrmGateway(amo, config, user, parts.store(), lambda e164: hasher().phone_key(e164))
    raise NotImplementedError(f"CRM kind {config.crm.kind!r} is not available yet")


def build_bitrix_client(parts: Container, config: ClinicConfig) -> Bitrix24Client:
    """One client per container, so its pacer and OAuth session survive warm invocations.

    The pacer is a leaky bucket in DynamoDB shared by every concurrent syncer, keyed by the portal,
    so together they stay under the portal's 2 req/s; ``shared_budget: false`` paces in-process.
    """
    from clinicsync.adapters.bitrix24.client import Bitrix24Client, portal_budget_key
    from clinicsync.adapters.bitrix24.oauth import BITRIX24, Bitrix24OAuth
    from clinicsync.adapters.http.oauth import SecretsManagerTokenStore, lease_lock

    crm, arn = config.crm, parts.settings.crm_secret_arn
    creds = parts.secret(arn)
    pacer = parts.pacer(portal_budget_key(creds), crm.requests_per_second, crm.burst, crm.shared_budget)
    if creds.get("webhook_url"):
        return Bitrix24Client(
            str(creds["webhook_url"]), http=parts.http_client(), pacer=pacer, time_left=deadline.time_left
        )
    # An OAuth app: tokens live in the same secret, are rotated there, and refreshed under a lease.
    tokens = SecretsManagerTokenStore(boto3.client("secretsmanager"), arn, BITRIX24)
    lock = lease_lock(parts.store(), BITRIX24, clock=parts.clock)
    oauth = Bitrix24OAuth(tokens, parts.http_client(), lock=lock)
    user = str(creds.get("user_id", ""))
    http = parts.http_client()
    return Bitrix24Client(http=http, pacer=pacer, oauth=oauth, user_id=user, time_left=deadline.time_left)


def build_amocrm_client(parts: Container, config: ClinicConfig) -> AmoCrmClient:
    """One client per container. Pacing is a DynamoDB bucket shared by every syncer (amoCRM allows 7
    rps per integration; we run at the configured budget, 6 by default); a 403 opens a breaker that
    every container honours; tokens rotate in the secret under a lease, or a long-lived token is used."""
    from clinicsync.adapters.amocrm.client import AmoCrmClient, StoreCircuitBreaker
    from clinicsync.adapters.amocrm.oauth import AMOCRM, AmoCrmOAuth
    from clinicsync.adapters.http.oauth import SecretsManagerTokenStore, lease_lock

    crm, arn = config.crm, parts.settings.crm_secret_arn
    creds = parts.secret(arn)
    key = f"amocrm:{creds.get('account_id') or creds.get('base_url') or 'account'}"
    pacer = parts.pacer(key, crm.requests_per_second, crm.burst, crm.shared_budget)
    tokens = SecretsManagerTokenStore(boto3.client("secretsmanager"), arn, AMOCRM)
    auth = AmoCrmOAuth(tokens, parts.http_client(), lock=lease_lock(parts.store(), AMOCRM, clock=parts.clock))
    return AmoCrmClient(auth, parts.http_client(), pacer, StoreCircuitBreaker(parts.table(), key, clock=parts.clock))


def build_vtiger_client(parts: Container, config: ClinicConfig) -> VtigerClient:
    from clinicsync.adapters.http.pacing import Pacer
    from clinicsync.adapters.vtiger.client import VtigerClient

    creds = parts.secret(parts.settings.crm_secret_arn)
    pacer = Pacer(config.crm.requests_per_second, config.crm.burst)
    return VtigerClient(
        str(creds["base_url"]), str(creds["username"]), str(creds["access_key"]), parts.http_client(), pacer
    )


def build_directory_sync(parts: Container) -> DirectorySync:
    """The lab's directory (LIS <-> vTiger, Mailchimp audiences)."""
    from clinicsync.adapters.aws.directory_state import DirectoryStore
    from clinicsync.adapters.vtiger.client import VtigerDirectory
    from clinicsync.application.directory import DirectorySync

    config = parts.clinic_config()
    if config.directory is None or config.crm.kind != "vtiger" or config.mis.kind != "lis":
        raise NotImplementedError("the directory sync needs mis.kind lis, crm.kind vtiger and a directory section")
    store, directory = parts.store(), config.directory
    crm = VtigerDirectory(parts.vtiger_client(config), directory, config.matching.default_region, directory.page_size)
    return DirectorySync(
        config,
        directory,
        parts.lis_source(config),
        crm,
        DirectoryStore(parts.table()),
        store,
        parts.hasher(),
        ledger=parts.consent_ledger(),
        audiences=parts.directory_audiences(config),
        opted_out=lambda subjects: store.opted_out_many(subjects, ("email", "marketing")),
        index_emails=store.index_emails,
        clock=parts.clock,
        leases=store,
        members=store,
    )


def build_mailchimp_audience(parts: Container, config: ClinicConfig) -> MailchimpAudience | None:
    from clinicsync.adapters.mailchimp.client import MailchimpAudience, MailchimpClient

    if config.mailchimp is None:
        return None
    key = str(parts.clinic_secret()["mailchimp_api_key"])
    return MailchimpAudience(
        MailchimpClient(key, parts.http_client(), config.mailchimp.base_url), config.mailchimp.list_id
    )


def build_directory_audiences(parts: Container, config: ClinicConfig) -> DirectoryAudiences | None:
    from clinicsync.adapters.mailchimp.client import MailchimpAudience, MailchimpClient
    from clinicsync.adapters.mailchimp.directory import DirectoryAudiences

    if config.directory is None or config.directory.mailchimp is None:
        return None
    lists = config.directory.mailchimp
    key = str(parts.clinic_secret()["mailchimp_api_key"])
    doctors = MailchimpClient(key, parts.http_client(), lists.doctors_base_url)
    organisations = MailchimpClient(key, parts.http_client(), lists.organisations_base_url)
    return DirectoryAudiences(
        MailchimpAudience(doctors, lists.doctors_list_id),
        MailchimpAudience(organisations, lists.organisations_list_id),
    )


def build_syncer(parts: Container, text: str) -> Syncer:
    """A container's first sync with a gateway that can carry the stage check in its look-up gets the config
    unchecked and the function that checks it (once per container and config version, as
    ``verified_config``) from what that look-up read; otherwise the config is checked first."""
    from clinicsync.application.sync import Syncer

    config, verify = parts.unverified_config(text), None
    gateway = parts.crm_gateway(config) if config is not None else None
    if config is not None and isinstance(gateway, VerifiesInLookUp):
        closed, unchecked = gateway.verify_in_look_up(config.crm.pipelines), config
        verify = partial(parts.once, ("verified", text), lambda: unchecked.with_crm_closed_stages(closed()))
    else:
        config = parts.verified_config()
        gateway = parts.crm_gateway(config)
    return Syncer(
        config,
        parts.store(),
        gateway,
        parts.hasher(),
        parts.consent_ledger(),
        parts.mailchimp_audience(config),
        crm_contacts=parts.crm_events() if verify is None else LaterContactReader(parts.crm_events),
        clock=parts.clock,
        verify=verify,
    )


class LaterContactReader:
    """The CRM event processor, built (with the verified config) when the sync first needs it."""

    def __init__(self, build: Callable[[], CrmEventProcessor]) -> None:
        self._build = build

    def take_in_contacts(self, contact_ids: Sequence[str]) -> object:
        return self._build().take_in_contacts(contact_ids)
