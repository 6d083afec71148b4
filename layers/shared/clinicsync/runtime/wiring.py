"""Composition root: a ``Container`` built from the settings builds the use cases with their adapters, once per
container (a Lambda container keeps one for its life; ``reset`` drops it). Secrets come only from Secrets Manager
and the clinic config only from SSM (Powertools Parameters, cached for 5 minutes); environment variables carry names
and ARNs, never values. Parts are built and imported on first use: tests point AWS clients at moto first, a cold
start loads only what its handler calls (tests/infra/test_cold_start.py). A test or the sandbox replaces a part
(config, store, CRM gateway, MIS source, Mailchimp, clock, HTTP client, secrets) by the constructor or
``replace_parts``, never by patching.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import boto3

from clinicsync.adapters.aws.clients import PLAIN_CONFIG
from clinicsync.adapters.aws.queue import SqsChangeQueue, SqsConsentQueue, SqsEventQueue, SqsRetryTimer
from clinicsync.adapters.aws.sessions import drop_providers, secrets_provider, ssm_provider
from clinicsync.settings import Settings

if TYPE_CHECKING:
    import httpx
    from mypy_boto3_dynamodb.service_resource import DynamoDBServiceResource, Table
    from mypy_boto3_sqs.client import SQSClient

    from clinicsync.adapters.amocrm.client import AmoCrmClient
    from clinicsync.adapters.aws.budget import RequestPacer
    from clinicsync.adapters.aws.failures import FailureLog
    from clinicsync.adapters.aws.health import HealthLog
    from clinicsync.adapters.bitrix24.client import Bitrix24Client
    from clinicsync.adapters.lis.source import LisSource
    from clinicsync.adapters.mailchimp.client import MailchimpAudience
    from clinicsync.adapters.mailchimp.directory import DirectoryAudiences
    from clinicsync.adapters.vtiger.client import VtigerClient
    from clinicsync.application.consent import ConsentLedger, ConsentOutputs
    from clinicsync.application.crm_events import CrmCatchUp, CrmEventProcessor
    from clinicsync.application.directory import DirectorySync
    from clinicsync.application.ident import ConnectorInbox, IdentDirectory
    from clinicsync.application.poll import Poller
    from clinicsync.application.sync import Syncer
    from clinicsync.domain.audience import MailchimpMembers
    from clinicsync.domain.backfill import BackfillCheckpoint
    from clinicsync.domain.config import ClinicConfig
    from clinicsync.domain.crm_ports import CrmGateway
    from clinicsync.domain.crypto import KeyedHasher
    from clinicsync.domain.ports import MisConsentWriter, MisSource
    from clinicsync.domain.store_ports import Store
    from clinicsync.domain.unsubscribe_links import UnsubscribeTokens

CACHE_SECONDS = 300


def read_secret(arn: str) -> dict[str, Any]:
    value = secrets_provider().get(arn, transform="json", max_age=CACHE_SECONDS)
    if not isinstance(value, dict):
        raise ValueError("secret must be a JSON object")
    return value


class Container:
    """One clinic's parts. Each is built on first use and kept; a part given here is used as it is."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: ClinicConfig | None = None,
        store: Store | None = None,
        crm_gateway: CrmGateway | None = None,
        mis_source: MisSource | None = None,
        mailchimp: MailchimpAudience | None = None,
        clock: Callable[[], float] = time.time,
        http_client: httpx.Client | None = None,
        secrets: Callable[[str], dict[str, Any]] = read_secret,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.clock = clock
        self.secret = secrets
        self._config, self._store, self._gateway, self._source = config, store, crm_gateway, mis_source
        self._mailchimp = mailchimp
        self._http = http_client
        self._built: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.RLock()  # the local runtime invokes handlers from several threads

    def once[T](self, key: tuple[Any, ...], build: Callable[[], T]) -> T:
        with self._lock:
            if key not in self._built:
                self._built[key] = build()
            return cast("T", self._built[key])

    # --- AWS and HTTP clients -------------------------------------------------------------------------

    def http_client(self) -> httpx.Client:
        """One pooled client per container, shared by every MIS and CRM caller."""
        if self._http is not None:
            return self._http

        def build() -> httpx.Client:
            import httpx  # late, like the adapters that use it: a cold start that calls no HTTP API never loads it

            return httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), limits=httpx.Limits(max_connections=10))

        return self.once(("http",), build)

    def dynamodb(self) -> DynamoDBServiceResource:
        return self.once(("dynamodb",), lambda: boto3.resource("dynamodb", config=PLAIN_CONFIG))

    def table(self) -> Table:
        return self.once(("table",), lambda: self.dynamodb().Table(self.settings.table_name))  # once: costly

    def sqs(self) -> SQSClient:
        return self.once(("sqs",), lambda: boto3.client("sqs", config=PLAIN_CONFIG))

    # --- configuration and secrets --------------------------------------------------------------------

    def _config_text(self) -> str:
        if self._config is not None:
            return "given"  # names the given config in the caches below
        return str(ssm_provider().get(self.settings.config_parameter_name, max_age=CACHE_SECONDS))

    def _parsed(self, text: str) -> ClinicConfig:
        if self._config is not None:
            return self._config
        from clinicsync.domain.config import parse_clinic_config

        return self.once(("config", text), lambda: parse_clinic_config(text))

    def clinic_config(self) -> ClinicConfig:
        return self._parsed(self._config_text())

    def verified_config(self) -> ClinicConfig:
        """Stages are checked against the CRM once per container and config version."""
        text = self._config_text()

        def verify() -> ClinicConfig:
            config = self._parsed(text)
            return config.with_crm_closed_stages(self.crm_gateway(config).verify_pipelines(config.crm.pipelines))

        return self.once(("verified", text), verify)

    def clinic_secret(self) -> dict[str, Any]:
        """hash_key, unsubscribe_key, mailchimp_api_key, mailchimp_webhook_secret."""
        return self.secret(self.settings.clinic_secret_arn)

    def mis_credentials(self) -> dict[str, Any]:
        """IDENT's calls are checked against it: ``integration_key`` (IDENT) and ``connector_key`` (connector)."""
        return self.secret(self.settings.mis_secret_arn)

    def crm_credentials(self) -> dict[str, Any]:
        """What the webhook receiver checks inbound events against (application_token, member_id)."""
        return self.secret(self.settings.crm_secret_arn)

    def hasher(self) -> KeyedHasher:
        from clinicsync.domain.crypto import KeyedHasher

        return KeyedHasher(str(self.clinic_secret()["hash_key"]).encode())

    def unsubscribe_tokens(self) -> UnsubscribeTokens:
        from clinicsync.domain.unsubscribe_links import UnsubscribeTokens

        ttl = self.clinic_config().consent.link_ttl_days
        return UnsubscribeTokens(str(self.clinic_secret()["unsubscribe_key"]).encode(), ttl * 86400 if ttl else None)

    # --- the table and the queues ---------------------------------------------------------------------

    def store(self) -> Store:
        if self._store is not None:
            return self._store
        from clinicsync.adapters.aws.store import DynamoStore

        return DynamoStore(self.table())

    def failure_log(self) -> FailureLog:
        from clinicsync.adapters.aws.failures import FailureLog

        return FailureLog(self.table())

    def health(self) -> HealthLog:
        """Counters per 10-minute bucket for `clinicsync status` and the report (the dashboard has the metrics)."""
        from clinicsync.adapters.aws.health import HealthLog

        return HealthLog(self.table())

    def backfill_checkpoint(self) -> BackfillCheckpoint:
        from clinicsync.adapters.aws.backfill_checkpoint import DynamoBackfillCheckpoint

        return DynamoBackfillCheckpoint(self.table(), self.clinic_config().mis.kind)

    def change_queue(self) -> SqsChangeQueue:
        return SqsChangeQueue(self.sqs(), self.settings.sync_queue_url)

    def event_queue(self) -> SqsEventQueue:
        return SqsEventQueue(self.sqs(), self.settings.crm_event_queue_url)

    def consent_queue(self) -> SqsConsentQueue:
        return SqsConsentQueue(self.sqs(), self.settings.consent_queue_url)

    def retry_timer(self, queue_url: str) -> SqsRetryTimer:
        return SqsRetryTimer(self.sqs(), queue_url)

    # --- the MIS ----------------------------------------------------------------------------------------

    def mis_source(self, config: ClinicConfig) -> MisSource:
        if self._source is not None:
            return self._source
        from clinicsync.runtime.vendors import build_mis_source

        return build_mis_source(self, config)

    def lis_source(self, config: ClinicConfig) -> LisSource:
        from clinicsync.runtime.vendors import build_lis_source

        return build_lis_source(self, config)

    def ident_directory(self) -> IdentDirectory:
        from clinicsync.adapters.aws.ident_names import DynamoIdentNames
        from clinicsync.application.ident import IdentDirectory

        return IdentDirectory(DynamoIdentNames(self.table()))

    def ident_inbox(self) -> ConnectorInbox:
        from clinicsync.adapters.aws.queue import SqsConnectorInbox
        from clinicsync.application.ident import ConnectorInbox

        return ConnectorInbox(SqsConnectorInbox(self.sqs(), self.settings.ident_inbox_queue_url))

    def mis_consent_writer(self, config: ClinicConfig) -> MisConsentWriter | None:
        """Where the MIS API can hold "do not send" flags; None where it cannot (the flag stays ours)."""
        from clinicsync.runtime.vendors import build_mis_consent_writer

        return build_mis_consent_writer(self, config)

    # --- the CRM --------------------------------------------------------------------------------------

    def crm_gateway(self, config: ClinicConfig) -> CrmGateway:
        if self._gateway is not None:
            return self._gateway
        from clinicsync.runtime.vendors import build_crm_gateway

        return build_crm_gateway(self, config)

    def pacer(self, key: str, rate: float, burst: int, shared: bool) -> RequestPacer:
        """A DynamoDB leaky bucket shared by every concurrent container, or an in-process one."""
        if shared:
            from clinicsync.adapters.aws.budget import SharedLeakyBucket

            return SharedLeakyBucket(self.table(), key, rate, burst)
        from clinicsync.adapters.http.pacing import Pacer

        return Pacer(rate, burst)

    def bitrix_client(self, config: ClinicConfig) -> Bitrix24Client:
        from clinicsync.runtime.vendors import build_bitrix_client

        return self.once(("bitrix24", *_client_key(self, config)), lambda: build_bitrix_client(self, config))

    def amocrm_client(self, config: ClinicConfig) -> AmoCrmClient:
        from clinicsync.runtime.vendors import build_amocrm_client

        return self.once(("amocrm", *_client_key(self, config)), lambda: build_amocrm_client(self, config))

    def vtiger_client(self, config: ClinicConfig) -> VtigerClient:
        """One client per container: its session survives warm invocations (renewed when vTiger expires it)."""
        from clinicsync.runtime.vendors import build_vtiger_client

        return self.once(("vtiger", *_client_key(self, config)), lambda: build_vtiger_client(self, config))

    def crm_counters(self) -> tuple[int, int]:
        """(requests, throttled answers) this container's CRM client has made so far; (0, 0) before its first
        use. Handlers difference two readings to report one invocation's CRM use."""
        config = self.clinic_config()
        built = self._built.get((config.crm.kind, *_client_key(self, config)))
        if config.crm.kind in ("bitrix24", "amocrm") and built is not None:
            return built.requests, built.throttled
        return 0, 0

    # --- Mailchimp ------------------------------------------------------------------------------------

    def mailchimp_audience(self, config: ClinicConfig) -> MailchimpAudience | None:
        if self._mailchimp is not None:
            return self._mailchimp
        from clinicsync.runtime.vendors import build_mailchimp_audience

        return build_mailchimp_audience(self, config)

    def directory_audiences(self, config: ClinicConfig) -> DirectoryAudiences | None:
        from clinicsync.runtime.vendors import build_directory_audiences

        return build_directory_audiences(self, config)

    # --- use cases --------------------------------------------------------------------------------------

    def poller(self) -> Poller:
        from clinicsync.application.poll import Poller

        config, store = self.clinic_config(), self.once(("poll-store",), self.store)  # a warm poller keeps its cursor
        return Poller(config, self.mis_source(config), store, self.change_queue(), self.hasher(), self.clock)

    def syncer(self) -> Syncer:
        from clinicsync.runtime.vendors import build_syncer

        return build_syncer(self, self._config_text())

    def unverified_config(self, text: str) -> ClinicConfig | None:
        """The config of ``text`` if this container has not checked it against the CRM yet."""
        with self._lock:
            return None if ("verified", text) in self._built else self._parsed(text)

    def crm_events(self) -> CrmEventProcessor:
        from clinicsync.application.crm_events import CrmEventProcessor

        config = self.verified_config()
        gateway = self.crm_gateway(config)
        return CrmEventProcessor(
            config, self.store(), gateway, self.hasher(), self.change_queue(), self.consent_ledger()
        )

    def crm_catch_up(self) -> CrmCatchUp:
        from clinicsync.application.crm_events import CrmCatchUp

        return CrmCatchUp(self.store(), self.crm_gateway(self.verified_config()), self.crm_events())

    def consent_ledger(self) -> ConsentLedger:
        from clinicsync.application.consent import ConsentLedger

        store, queue = self.store(), self.consent_queue()
        return ConsentLedger(store, queue, self.settings.clinic_id, self.hasher(), clock=self.clock)

    def consent_outputs(self) -> ConsentOutputs:
        from clinicsync.application.consent import ConsentOutputs

        if self.clinic_config().crm.kind == "vtiger":
            # The lab case: the directory sync carries opt-outs to vTiger (emailoptout); no patient contacts.
            config = self.clinic_config()
            members: MailchimpMembers | None = self.directory_audiences(config) or self.mailchimp_audience(config)
            return ConsentOutputs(config, self.store(), None, self.mis_consent_writer(config), members)
        config = self.verified_config()
        gateway, mis = self.crm_gateway(config), self.mis_consent_writer(config)
        audience = self.mailchimp_audience(config)
        return ConsentOutputs(config, self.store(), gateway, mis, audience, crm_contacts=self.crm_events())

    def directory_sync(self) -> DirectorySync:
        from clinicsync.runtime.vendors import build_directory_sync

        return build_directory_sync(self)


def _client_key(container: Container, config: ClinicConfig) -> tuple[Any, ...]:
    crm = config.crm
    return container.settings.crm_secret_arn, crm.requests_per_second, crm.burst, crm.shared_budget


class _Process:
    """The process's one container (a Lambda container's life), and the parts every new one takes."""

    def __init__(self) -> None:
        self.current: Container | None = None
        self.parts: dict[str, Any] = {}
        self.lock = threading.Lock()


_process = _Process()


def container() -> Container:
    """This process's container, built from the environment on first use (a Lambda cold start)."""
    with _process.lock:
        if _process.current is None:
            _process.current = Container(**_process.parts)
        return _process.current


def use(replacement: Container) -> None:
    """Serve ``replacement`` from now on (a test's own container)."""
    with _process.lock:
        _process.current = replacement


def replace_parts(**parts: Any) -> None:
    """Every container built from now on takes these constructor arguments (the sandbox's chaos run gives
    its HTTP client); no argument: none. The current container is dropped."""
    with _process.lock:
        _process.parts = dict(parts)
    reset()


def reset() -> None:
    """Forget the container and every cached value (tests switch clinics and endpoints)."""
    with _process.lock:
        _process.current = None
    drop_providers()  # the secrets' and the config's cached values (Powertools' own providers are unused)
