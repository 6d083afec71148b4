"""Composition root: builds the domain's collaborators from the Lambda environment, once per container.

Secrets come only from Secrets Manager and the clinic config only from SSM (Powertools Parameters,
cached for 5 minutes); environment variables carry names and ARNs, never values. AWS clients are
created lazily so that tests and the local runtime can point them at moto first.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools.utilities import parameters

from clinicsync.adapters.aws.budget import RequestPacer, SharedLeakyBucket
from clinicsync.adapters.aws.failures import FailureLog
from clinicsync.adapters.aws.health import HealthLog
from clinicsync.adapters.aws.queue import SqsChangeQueue, SqsConsentQueue, SqsEventQueue
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.application.consent import ConsentLedger, ConsentOutputs
from clinicsync.application.crm_events import CrmCatchUp, CrmEventProcessor
from clinicsync.application.poll import Poller
from clinicsync.application.sync import Syncer
from clinicsync.domain.audience import MailchimpMembers
from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.ports import CrmGateway, MisConsentWriter, MisSource
from clinicsync.domain.unsubscribe_links import UnsubscribeTokens
from clinicsync.settings import Settings

# Adapters are imported where they are built, not here: a container loads only its clinic's MIS and
# CRM (and the lab's directory), so a cold start does not pay for the five MIS and three CRMs it never calls.

if TYPE_CHECKING:
    import httpx
    from mypy_boto3_dynamodb.service_resource import DynamoDBServiceResource
    from mypy_boto3_sqs.client import SQSClient

    from clinicsync.adapters.amocrm.client import AmoCrmClient
    from clinicsync.adapters.bitrix24.client import Bitrix24Client
    from clinicsync.adapters.lis.source import LisSource
    from clinicsync.adapters.mailchimp.client import MailchimpAudience
    from clinicsync.adapters.mailchimp.directory import DirectoryAudiences
    from clinicsync.adapters.vtiger.client import VtigerClient
    from clinicsync.application.backfill import BackfillCheckpoint
    from clinicsync.application.directory import DirectorySync
    from clinicsync.application.ident import ConnectorInbox, IdentDirectory

CACHE_SECONDS = 300


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@functools.cache
def http_client() -> httpx.Client:
    """One pooled client per container, shared by every MIS and CRM caller."""
    import httpx  # late, like the adapters that use it: a cold start that calls no HTTP API never loads it

    return httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), limits=httpx.Limits(max_connections=10))


@functools.cache
def dynamodb() -> DynamoDBServiceResource:
    return boto3.resource("dynamodb")


@functools.cache
def sqs() -> SQSClient:
    return boto3.client("sqs")


def secret(arn: str) -> dict[str, Any]:
    value = parameters.get_secret(arn, transform="json", max_age=CACHE_SECONDS)
    if not isinstance(value, dict):
        raise ValueError("secret must be a JSON object")
    return value


@functools.cache
def _parse_config(text: str) -> ClinicConfig:
    return parse_clinic_config(text)


def _config_text() -> str:
    return str(parameters.get_parameter(settings().config_parameter_name, max_age=CACHE_SECONDS))


def clinic_config() -> ClinicConfig:
    return _parse_config(_config_text())


def clinic_secret() -> dict[str, Any]:
    """hash_key, unsubscribe_key, mailchimp_api_key, mailchimp_webhook_secret."""
    return secret(settings().clinic_secret_arn)


def hasher() -> KeyedHasher:
    return KeyedHasher(str(clinic_secret()["hash_key"]).encode())


def unsubscribe_tokens() -> UnsubscribeTokens:
    ttl = clinic_config().consent.link_ttl_days
    return UnsubscribeTokens(str(clinic_secret()["unsubscribe_key"]).encode(), ttl * 86400 if ttl else None)


def consent_queue() -> SqsConsentQueue:
    return SqsConsentQueue(sqs(), settings().consent_queue_url)


def consent_ledger() -> ConsentLedger:
    return ConsentLedger(store(), consent_queue(), settings().clinic_id, hasher())


def mailchimp_audience(config: ClinicConfig) -> MailchimpAudience | None:
    from clinicsync.adapters.mailchimp.client import MailchimpAudience, MailchimpClient

    if config.mailchimp is None:
        return None
    client = MailchimpClient(str(clinic_secret()["mailchimp_api_key"]), http_client(), config.mailchimp.base_url)
    return MailchimpAudience(client, config.mailchimp.list_id)


def mis_consent_writer(config: ClinicConfig) -> MisConsentWriter | None:
    """Where the MIS API can hold "do not send" flags; None where it cannot (the flag stays ours)."""
    if config.mis.kind == "medods":
        from clinicsync.adapters.medods.source import MedodsApi, MedodsConsentWriter

        creds = secret(settings().mis_secret_arn)
        api = MedodsApi(config.mis.base_url, str(creds["identity_key"]), str(creds["secret"]), http=http_client())
        return MedodsConsentWriter(api)
    if config.mis.kind == "lis":
        return lis_source(config)  # "do not send marketing letters" on the doctor or organisation
    return None


def consent_outputs() -> ConsentOutputs:
    if clinic_config().crm.kind == "vtiger":
        # The lab case: the directory sync carries opt-outs to vTiger (emailoptout); no patient contacts.
        config = clinic_config()
        members: MailchimpMembers | None = directory_audiences(config) or mailchimp_audience(config)
        return ConsentOutputs(config, store(), None, mis_consent_writer(config), members)
    config = _verified(_config_text())
    gateway, mis = crm_gateway(config), mis_consent_writer(config)
    return ConsentOutputs(config, store(), gateway, mis, mailchimp_audience(config), crm_contacts=crm_events())


# --- the lab's directory (LIS <-> vTiger, Mailchimp audiences) -------------------------------------------


def lis_source(config: ClinicConfig) -> LisSource:
    from clinicsync.adapters.lis.source import LisApi, LisSource

    api = LisApi.from_secret(config.mis.base_url, secret(settings().mis_secret_arn), http_client())
    return LisSource(api, config.matching.default_region, config.mis.page_size, config.mis.overlap_seconds)


@functools.cache
def _vtiger_client(secret_arn: str, rate: float, burst: int) -> VtigerClient:
    """One client per container: its session survives warm invocations (renewed when vTiger expires it)."""
    from clinicsync.adapters.http.pacing import Pacer
    from clinicsync.adapters.vtiger.client import VtigerClient

    creds = secret(secret_arn)
    return VtigerClient(
        str(creds["base_url"]), str(creds["username"]), str(creds["access_key"]), http_client(), Pacer(rate, burst)
    )


def directory_audiences(config: ClinicConfig) -> DirectoryAudiences | None:
    from clinicsync.adapters.mailchimp.client import MailchimpAudience, MailchimpClient
    from clinicsync.adapters.mailchimp.directory import DirectoryAudiences

    if config.directory is None or config.directory.mailchimp is None:
        return None
    lists = config.directory.mailchimp
    key = str(clinic_secret()["mailchimp_api_key"])
    doctors = MailchimpClient(key, http_client(), lists.doctors_base_url)
    organisations = MailchimpClient(key, http_client(), lists.organisations_base_url)
    return DirectoryAudiences(
        MailchimpAudience(doctors, lists.doctors_list_id),
        MailchimpAudience(organisations, lists.organisations_list_id),
    )


def directory_sync() -> DirectorySync:
    from clinicsync.adapters.aws.directory_state import DirectoryStore
    from clinicsync.adapters.vtiger.client import VtigerDirectory
    from clinicsync.application.directory import DirectorySync

    config = clinic_config()
    if config.directory is None or config.crm.kind != "vtiger" or config.mis.kind != "lis":
        raise NotImplementedError("the directory sync needs mis.kind lis, crm.kind vtiger and a directory section")
    crm = config.crm
    client = _vtiger_client(settings().crm_secret_arn, crm.requests_per_second, crm.burst)
    the_store = store()
    return DirectorySync(
        config,
        config.directory,
        lis_source(config),
        VtigerDirectory(client, config.directory, config.matching.default_region, config.directory.page_size),
        DirectoryStore(dynamodb().Table(settings().table_name)),
        the_store,
        hasher(),
        ledger=consent_ledger(),
        audiences=directory_audiences(config),
        opted_out=lambda subjects: the_store.opted_out_many(subjects, ("email", "marketing")),
        index_emails=the_store.index_emails,
        leases=the_store,
        members=the_store,
    )


def store() -> DynamoStore:
    return DynamoStore(dynamodb().Table(settings().table_name))


def failure_log() -> FailureLog:
    return FailureLog(dynamodb().Table(settings().table_name))


def health() -> HealthLog:
    """Counters per 10-minute bucket for `clinicsync status` and the report (the dashboard has the metrics)."""
    return HealthLog(dynamodb().Table(settings().table_name))


def backfill_checkpoint() -> BackfillCheckpoint:
    from clinicsync.application.backfill import BackfillCheckpoint

    return BackfillCheckpoint(dynamodb().Table(settings().table_name), clinic_config().mis.kind)


def crm_counters() -> tuple[int, int]:
    """(requests, throttled answers) this container's CRM client has made so far; (0, 0) before its first
    use. Handlers difference two readings to report one invocation's CRM use."""
    crm = clinic_config().crm
    args = (settings().crm_secret_arn, crm.requests_per_second, crm.burst, crm.shared_budget)
    if crm.kind == "bitrix24" and _bitrix_client.cache_info().currsize:
        bitrix = _bitrix_client(*args)
        return bitrix.requests, bitrix.throttled
    if crm.kind == "amocrm" and _amocrm_client.cache_info().currsize:
        amo = _amocrm_client(*args)
        return amo.requests, amo.throttled
    return 0, 0


def change_queue() -> SqsChangeQueue:
    return SqsChangeQueue(sqs(), settings().sync_queue_url)


def mis_credentials() -> dict[str, Any]:
    """IDENT's calls are checked against it: ``integration_key`` (IDENT) and ``connector_key`` (connector)."""
    return secret(settings().mis_secret_arn)


def ident_directory() -> IdentDirectory:
    from clinicsync.application.ident import IdentDirectory

    return IdentDirectory(dynamodb().Table(settings().table_name))


def ident_inbox() -> ConnectorInbox:
    from clinicsync.application.ident import ConnectorInbox

    return ConnectorInbox(sqs(), settings().ident_inbox_queue_url)


def mis_source(config: ClinicConfig) -> MisSource:
    if config.mis.kind == "lis":
        return lis_source(config)
    if config.mis.kind == "ident":
        from clinicsync.adapters.ident.source import IdentSource

        # IDENT's connector pushes to us; nothing to call out with, only its inbox to read.
        return IdentSource(sqs(), settings().ident_inbox_queue_url, enrich=ident_directory().enrich)
    creds = secret(settings().mis_secret_arn)
    if config.mis.kind == "medods":
        from clinicsync.adapters.medods.source import MedodsApi, MedodsSource

        api = MedodsApi(config.mis.base_url, str(creds["identity_key"]), str(creds["secret"]), http=http_client())
        return MedodsSource(api, config)
    if config.mis.kind == "infoclinica":
        from clinicsync.adapters.infoclinica.api import InfoClinicaApi
        from clinicsync.adapters.infoclinica.source import InfoClinicaSource

        # Its own HTTP client: it carries the clinic's client certificate from the secret.
        return InfoClinicaSource(InfoClinicaApi.from_secret(config.mis.base_url, creds, tz=config.tz), config)
    if config.mis.kind == "renovatio":
        from clinicsync.adapters.renovatio.source import RenovatioApi, RenovatioSource

        return RenovatioSource(RenovatioApi.from_secret(config.mis.base_url, creds, http=http_client()), config)
    raise NotImplementedError(f"MIS kind {config.mis.kind!r} is not available yet")


@functools.cache
def _bitrix_client(secret_arn: str, rate: float, burst: int, shared_budget: bool) -> Bitrix24Client:
    """One client per container, so its pacer and OAuth session survive warm invocations.

    The pacer is a leaky bucket in DynamoDB shared by every concurrent syncer, keyed by the portal,
    so together they stay under the portal's 2 req/s; ``shared_budget: false`` paces in-process.
    """
    from clinicsync.adapters.bitrix24.client import Bitrix24Client, portal_budget_key
    from clinicsync.adapters.bitrix24.oauth import BITRIX24, Bitrix24OAuth
    from clinicsync.adapters.http.oauth import SecretsManagerTokenStore, lease_lock
    from clinicsync.adapters.http.pacing import Pacer

    creds = secret(secret_arn)
    table = dynamodb().Table(settings().table_name)
    pacer: RequestPacer = (
        SharedLeakyBucket(table, portal_budget_key(creds), rate, burst) if shared_budget else Pacer(rate, burst)
    )
    if creds.get("webhook_url"):
        return Bitrix24Client(str(creds["webhook_url"]), http=http_client(), pacer=pacer)
    # An OAuth app: tokens live in the same secret, are rotated there, and refreshed under a lease.
    tokens = SecretsManagerTokenStore(boto3.client("secretsmanager"), secret_arn, BITRIX24)
    oauth = Bitrix24OAuth(tokens, http_client(), lock=lease_lock(store(), BITRIX24))
    return Bitrix24Client(http=http_client(), pacer=pacer, oauth=oauth, user_id=str(creds.get("user_id", "")))


@functools.cache
def _amocrm_client(secret_arn: str, rate: float, burst: int, shared_budget: bool) -> AmoCrmClient:
    """One client per container. Pacing is a DynamoDB bucket shared by every syncer (amoCRM allows 7
    rps per integration; we run at the configured budget, 6 by default); a 403 opens a breaker that
    every container honours; tokens rotate in the secret under a lease, or a long-lived token is used."""
    from clinicsync.adapters.amocrm.client import AmoCrmClient, StoreCircuitBreaker
    from clinicsync.adapters.amocrm.oauth import AMOCRM, AmoCrmOAuth
    from clinicsync.adapters.http.pacing import Pacer

    creds = secret(secret_arn)
    table = dynamodb().Table(settings().table_name)
    key = f"amocrm:{creds.get('account_id') or creds.get('base_url') or 'account'}"
    pacer: RequestPacer = SharedLeakyBucket(table, key, rate, burst) if shared_budget else Pacer(rate, burst)
    from clinicsync.adapters.http.oauth import SecretsManagerTokenStore, lease_lock

    tokens = SecretsManagerTokenStore(boto3.client("secretsmanager"), secret_arn, AMOCRM)
    auth = AmoCrmOAuth(tokens, http_client(), lock=lease_lock(store(), AMOCRM))
    return AmoCrmClient(auth, http_client(), pacer, StoreCircuitBreaker(table, key))


def crm_gateway(config: ClinicConfig) -> CrmGateway:
    crm = config.crm
    if crm.kind == "bitrix24":
        from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway

        client = _bitrix_client(settings().crm_secret_arn, crm.requests_per_second, crm.burst, crm.shared_budget)
        return Bitrix24Gateway(client, config)
    if crm.kind == "amocrm":
        from clinicsync.adapters.amocrm.gateway import AmoCrmGateway

        amo = _amocrm_client(settings().crm_secret_arn, crm.requests_per_second, crm.burst, crm.shared_budget)
        user = str(secret(settings().crm_secret_arn).get("user_id", ""))
        # The phone index outlives the container in the table, under the clinic's keyed hash.
        return AmoCrmGateway(amo, config, user, store(), lambda e164: hasher().phone_key(e164))
    raise NotImplementedError(f"CRM kind {crm.kind!r} is not available yet")


@functools.cache
def _verified(config_text: str) -> ClinicConfig:
    """Stages are checked against the CRM once per container and config version."""
    config = _parse_config(config_text)
    return config.with_crm_closed_stages(crm_gateway(config).verify_pipelines(config.crm.pipelines))


def syncer() -> Syncer:
    config = _verified(_config_text())
    audience = mailchimp_audience(config)
    return Syncer(config, store(), crm_gateway(config), hasher(), consent_ledger(), audience, crm_contacts=crm_events())


def event_queue() -> SqsEventQueue:
    return SqsEventQueue(sqs(), settings().crm_event_queue_url)


def crm_events() -> CrmEventProcessor:
    config = _verified(_config_text())
    return CrmEventProcessor(config, store(), crm_gateway(config), hasher(), change_queue(), consent_ledger())


def crm_catch_up() -> CrmCatchUp:
    config = _verified(_config_text())
    return CrmCatchUp(store(), crm_gateway(config), crm_events())


def crm_credentials() -> dict[str, Any]:
    """What the webhook receiver checks inbound events against (application_token, member_id)."""
    return secret(settings().crm_secret_arn)


def poller() -> Poller:
    config = clinic_config()
    return Poller(config, mis_source(config), store(), change_queue(), hasher())


def reset() -> None:
    """Forget every cached client and value (tests switch clinics and endpoints)."""
    cached_values = (settings, http_client, dynamodb, sqs, _parse_config, _bitrix_client, _amocrm_client, _verified)
    for cached in (*cached_values, _vtiger_client):
        cached.cache_clear()
    parameters.clear_caches()  # type: ignore[no-untyped-call]
