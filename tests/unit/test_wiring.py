"""The composition root is a container: a test gives it parts (config, store, CRM gateway, secrets…) through
its constructor or ``replace_parts``, never by patching the wiring module."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.stub import Stubber

from clinicsync.runtime import wiring
from clinicsync.settings import Settings
from clinicsync_cli.memory_store import MemoryStore
from tests.helpers import demo_config

SECRETS = {"hash_key": "k" * 32, "mailchimp_api_key": "key-us1", "identity_key": "i", "secret": "s"}


class _QuietCrm:
    """A CRM gateway where nothing changed; counts its start-up checks."""

    kind = "bitrix24"
    lookups_need_intents = False

    def __init__(self) -> None:
        self.verified = 0

    def verify_pipelines(self, pipelines: Mapping[Any, Any]) -> frozenset[str]:
        self.verified += 1
        return frozenset()

    def changed_since(self, entity: str, since: str, limit: int) -> list[dict[str, str]]:
        return []

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        return {}

    def integration_user(self) -> str:
        return "1"


def _settings() -> Settings:
    return Settings.model_construct(**dict.fromkeys(Settings.model_fields, "x"))  # names only: nothing is called


@pytest.fixture(autouse=True)
def _region(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")  # queue clients are built, never called
    yield
    wiring.replace_parts()


def test_a_container_builds_its_use_cases_on_the_parts_it_is_given() -> None:
    store, crm = MemoryStore(), _QuietCrm()
    parts = wiring.Container(
        _settings(), config=demo_config(), store=store, crm_gateway=crm, secrets=lambda arn: SECRETS
    )
    now = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    parts.crm_catch_up().run(now)
    assert store.get_cursor("crm-catchup") == {"since": (now - timedelta(hours=1)).isoformat()}
    parts.syncer()
    parts.consent_outputs()
    assert crm.verified == 1  # the stages are checked once per container and config


def test_the_process_serves_the_container_a_test_installs() -> None:
    parts = wiring.Container(_settings(), config=demo_config())
    wiring.use(parts)
    assert wiring.container() is parts
    wiring.reset()
    wiring.replace_parts(settings=_settings(), config=demo_config())
    assert wiring.container() is not parts


def test_every_container_built_after_replace_parts_takes_them() -> None:
    store = MemoryStore()
    wiring.replace_parts(settings=_settings(), store=store)
    first = wiring.container()
    assert first.store() is store and wiring.container() is first  # one per process until reset
    wiring.reset()  # a cold start (the local runtime switching clinics) keeps the replaced parts
    assert wiring.container() is not first and wiring.container().store() is store


def test_a_container_builds_its_table_once_and_skips_client_side_parameter_checks() -> None:
    """Building a boto3 Table walks the resource model: once per container, not once per part. Our AWS
    requests are built by code, so botocore's check of every parameter (most of a DynamoDB call's
    client-side CPU) is off; AWS still validates them."""
    parts = wiring.Container(_settings(), config=demo_config())
    table = parts.table()
    assert parts.table() is table
    checks = ((table.meta.client, "list_tables", "Limit"), (parts.sqs(), "list_queues", "MaxResults"))
    for client, operation, name in checks:
        with Stubber(client) as stub:
            stub.add_response(operation, {})
            getattr(client, operation)(**{name: "ten"})  # text for a number: refused if botocore checks


def test_a_containers_polls_share_one_store_so_a_warm_poller_keeps_the_cursor_it_stored() -> None:
    parts = wiring.Container(_settings(), config=demo_config(), secrets=lambda arn: SECRETS)
    first, second = parts.poller(), parts.poller()
    assert first._store is second._store  # what the poll memory lives on (adapters/aws/cursors.py)
    assert parts.store() is not parts.store()  # the other use cases' stores hold nothing between invocations


def test_the_amocrm_breaker_reads_its_shared_item_once_per_ten_seconds_of_the_containers_clock() -> None:
    """Every container honours a tripped breaker; it reads the shared item at most every 10 s by the
    container's clock (the one tests and the bench control), not by the process's wall clock."""
    from clinicsync.runtime.vendors import build_amocrm_client

    now = [1_000_000.0]
    secrets = {**SECRETS, "account_id": "31", "base_url": "https://clinic.amocrm.ru", "access_token": "t"}
    parts = wiring.Container(_settings(), config=demo_config(), secrets=lambda arn: secrets, clock=lambda: now[0])
    breaker = build_amocrm_client(parts, demo_config())._breaker
    item = {"Item": {"pk": {"S": "CIRCUIT"}, "sk": {"S": "amocrm:31"}, "open_until": {"N": "1000030"}}}
    with Stubber(parts.table().meta.client) as stub:  # a call without a queued answer fails the test
        stub.add_response("get_item", item)
        assert breaker.is_open()
        now[0] += 9
        assert breaker.is_open()  # the same reading
        stub.add_response("get_item", {})
        now[0] += 2
        assert not breaker.is_open()  # 11 s on: read again, and a manager reset it
        stub.assert_no_pending_responses()
