"""Bitrix24 OAuth against the portal emulator on loopback: refresh once, rotate, persist, never leak."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
import pytest
from moto import mock_aws

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.bitrix24.oauth import (
    BITRIX24,
    Bitrix24AuthError,
    Bitrix24OAuth,
    Bitrix24Tokens,
    parse_tokens,
)
from clinicsync.adapters.http.oauth import SecretsManagerTokenStore, lease_lock
from clinicsync.adapters.http.redaction import redact_url
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from tests.conftest import LogCapture

REGION = "eu-central-1"


@dataclass
class Portal:
    emu: Bitrix24Emulator
    base_url: str
    http: httpx.Client

    def secret(self, **extra: Any) -> dict[str, Any]:
        """What the app's install handler would have stored: the token reply plus the app credentials."""
        tokens = self.emu.issue_tokens()
        return {
            **tokens,
            "client_id": self.emu.client_id,
            "client_secret": self.emu.client_secret,
            "application_token": self.emu.application_token,
            **extra,
        }

    def call(self, oauth: Bitrix24OAuth, token: str | None = None) -> httpx.Response:
        """One REST call the way the client makes it: client_endpoint + method, auth=<access token>."""
        return self.http.post(oauth.client_endpoint() + "server.time", json={"auth": token or oauth.access_token()})

    def oauth_requests(self) -> int:
        return int(self.emu.stats()["oauth_requests"])


@pytest.fixture(scope="module")
def served_portal() -> Iterator[Portal]:
    emu = Bitrix24Emulator()
    served = ServedApp(emu).start()
    emu.base_url = served.base_url  # client_endpoint of issued tokens
    emu.server_endpoint = served.base_url + "/rest/"  # the OAuth server lives on the same loopback host
    with httpx.Client(timeout=5.0) as http:
        yield Portal(emu, served.base_url, http)
    served.stop()


@pytest.fixture
def portal(served_portal: Portal) -> Portal:
    served_portal.emu.reset_stats()
    return served_portal


class MemoryStore:
    """The CRM secret JSON in memory; ``fail_saves`` makes the next saves raise."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = dict(data)
        self.loads = 0
        self.saves = 0
        self.fail_saves = 0
        self.lock = threading.Lock()

    def load(self) -> Bitrix24Tokens:
        with self.lock:
            self.loads += 1
            return parse_tokens(self.data)

    def save(self, tokens: Bitrix24Tokens) -> None:
        with self.lock:
            if self.fail_saves:
                self.fail_saves -= 1
                raise ConnectionError("secrets manager unreachable")
            self.saves += 1
            self.data.update(tokens.rotated_values())


def _expired(portal: Portal, oauth: Bitrix24OAuth) -> str:
    """Expire the access token on the portal; return the stale token after checking the portal says so."""
    stale = oauth.access_token()
    assert portal.call(oauth, stale).status_code == 200
    portal.emu.expire_access_tokens()
    response = portal.call(oauth, stale)
    assert response.status_code == 401
    assert response.json()["error"] == "expired_token"
    return stale


def _reuse(portal: Portal, refresh_token: str) -> httpx.Response:
    return portal.http.get(
        portal.base_url + "/oauth/token/",
        params={
            "grant_type": "refresh_token",
            "client_id": portal.emu.client_id,
            "client_secret": portal.emu.client_secret,
            "refresh_token": refresh_token,
        },
    )


def test_expired_token_is_refreshed_once_and_the_new_refresh_token_replaces_the_old(portal: Portal) -> None:
    store = MemoryStore(portal.secret())
    old_refresh = store.data["refresh_token"]
    oauth = Bitrix24OAuth(store, portal.http)
    stale = _expired(portal, oauth)

    fresh = oauth.refresh(stale)

    assert fresh != stale
    assert portal.oauth_requests() == 1
    assert store.saves == 1
    assert store.data["access_token"] == fresh
    assert store.data["refresh_token"] not in ("", old_refresh)
    assert store.data["expires"] > 0
    assert oauth.access_token() == fresh
    assert portal.call(oauth).status_code == 200
    # A second caller that saw the same 401 gets the new token without another round-trip.
    assert oauth.refresh(stale) == fresh
    assert portal.oauth_requests() == 1
    # The old refresh token is dead; the stored one is the live one.
    refused = _reuse(portal, old_refresh)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    assert _reuse(portal, store.data["refresh_token"]).status_code == 200


def test_a_rotated_pair_is_never_handed_out_before_it_is_saved(portal: Portal) -> None:
    store = MemoryStore(portal.secret())
    before = dict(store.data)
    oauth = Bitrix24OAuth(store, portal.http)
    stale = _expired(portal, oauth)
    store.fail_saves = 2

    with pytest.raises(Bitrix24AuthError) as first:
        oauth.refresh(stale)
    assert first.value.code == "token_save_failed"
    assert first.value.retryable
    assert store.data == before  # not saved, and no token was returned
    with pytest.raises(Bitrix24AuthError):
        oauth.refresh(stale)  # the save is retried first (and fails again): still no second refresh
    assert portal.oauth_requests() == 1

    token = oauth.access_token()  # the next use saves the pair that was kept in memory
    assert store.data["access_token"] == token != stale
    assert store.data["refresh_token"] != before["refresh_token"]
    assert portal.oauth_requests() == 1
    assert portal.call(oauth).status_code == 200
    assert _reuse(portal, store.data["refresh_token"]).status_code == 200  # the stored refresh token is live


def test_two_containers_that_both_see_the_token_expire_refresh_once(portal: Portal) -> None:
    store = MemoryStore(portal.secret())
    shared = threading.Lock()  # stands in for the DynamoDB lease (see the Secrets Manager test)
    containers = [Bitrix24OAuth(store, portal.http, lock=lambda: shared) for _ in range(2)]
    stale = [_expired(portal, containers[0]), containers[1].access_token()]
    assert stale[0] == stale[1]
    gate = threading.Barrier(2)
    results: list[str] = []

    def run(oauth: Bitrix24OAuth, token: str) -> None:
        gate.wait(5)
        results.append(oauth.refresh(token))

    threads = [threading.Thread(target=run, args=(c, s)) for c, s in zip(containers, stale, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert len(results) == 2
    assert results[0] == results[1] != stale[0]
    assert portal.oauth_requests() == 1
    assert store.saves == 1
    for oauth in containers:
        assert oauth.access_token() == results[0]
        assert portal.call(oauth).status_code == 200


def test_a_refresh_token_spent_outside_the_lock_is_recovered_from_the_store(portal: Portal) -> None:
    store = MemoryStore(portal.secret())
    a, b = Bitrix24OAuth(store, portal.http), Bitrix24OAuth(store, portal.http)  # no shared lock
    stale = _expired(portal, a)
    snapshot = dict(store.data)
    fresh = a.refresh(stale)

    # B read the store just before A saved (an expired lease, say) and refreshes with the spent token.
    real_load = store.load
    loads = iter([parse_tokens(snapshot)])
    store.load = lambda: next(loads, None) or real_load()  # type: ignore[method-assign]

    assert b.refresh(stale) == fresh
    assert portal.oauth_requests() == 2  # A's refresh and B's refused one
    assert store.saves == 1


def test_invalid_grant_is_a_clear_error_and_no_token_reaches_the_logs(
    portal: Portal, captured_logs: LogCapture, caplog: pytest.LogCaptureFixture
) -> None:
    secret = portal.secret()
    store = MemoryStore(secret)
    oauth = Bitrix24OAuth(store, portal.http)
    caplog.set_level(logging.INFO, logger="httpx")

    good = oauth.refresh(_expired(portal, oauth))  # a successful rotation, logged by us and by httpx
    assert portal.call(oauth).status_code == 200
    store.data["refresh_token"] = "f" * 48  # a refresh token the portal never issued (app reinstalled …)
    portal.emu.expire_access_tokens()
    with pytest.raises(Bitrix24AuthError) as refused:
        oauth.refresh(good)
    assert refused.value.code == "invalid_grant"
    assert refused.value.status == 400
    assert not refused.value.retryable

    assert "bitrix24 oauth token refreshed" in captured_logs.text
    assert "bitrix24 oauth refresh refused" in captured_logs.text
    assert "/oauth/token/" in caplog.text  # httpx did log the refresh request, masked
    secrets = [secret["access_token"], secret["refresh_token"], secret["client_secret"], good, "f" * 48]
    secrets += [store.data["access_token"]]
    for text in (captured_logs.text, caplog.text, str(refused.value), repr(store.load())):
        for value in secrets:
            assert value not in text


def test_secrets_manager_store_keeps_other_keys_and_a_dynamodb_lease_serialises_containers(
    portal: Portal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        initial = portal.secret(member_id=portal.emu.member_id, note="kept as is")
        boto3.client("secretsmanager", region_name=REGION).create_secret(
            Name="clinicsync/c1/crm", SecretString=json.dumps(initial)
        )
        ddb = boto3.resource("dynamodb", region_name=REGION)
        ddb.create_table(
            TableName="t",
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            BillingMode="PAY_PER_REQUEST",
        )
        table_lock = threading.Lock()  # moto's conditional put is not atomic across threads; DynamoDB's is

        class AtomicStore(DynamoStore):
            def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool:
                with table_lock:
                    return super().acquire_lease(name, owner, seconds, now)

        def container() -> Bitrix24OAuth:
            session = boto3.session.Session(region_name=REGION)
            store = SecretsManagerTokenStore(session.client("secretsmanager"), "clinicsync/c1/crm", BITRIX24)
            leases = AtomicStore(session.resource("dynamodb").Table("t"))  # type: ignore[arg-type]
            return Bitrix24OAuth(store, portal.http, lock=lease_lock(leases, BITRIX24, seconds=30, timeout=10))

        containers = [container(), container()]
        stale = [_expired(portal, containers[0]), containers[1].access_token()]
        gate = threading.Barrier(2)
        results: list[str] = []
        errors: list[BaseException] = []

        def run(oauth: Bitrix24OAuth, token: str) -> None:
            try:
                gate.wait(5)
                results.append(oauth.refresh(token))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c, s)) for c, s in zip(containers, stale, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)

        assert not errors
        assert results[0] == results[1] != stale[0]
        assert portal.oauth_requests() == 1
        stored = json.loads(
            boto3.client("secretsmanager", region_name=REGION).get_secret_value(SecretId="clinicsync/c1/crm")[
                "SecretString"
            ]
        )
        assert stored["access_token"] == results[0]
        assert stored["refresh_token"] != initial["refresh_token"]
        for key in ("application_token", "member_id", "note", "client_id", "client_secret"):
            assert stored[key] == initial[key]
        assert set(stored) == set(initial)
        assert _reuse(portal, initial["refresh_token"]).json()["error"] == "invalid_grant"
        assert "Item" not in ddb.Table("t").get_item(Key={"pk": "LEASE", "sk": "bitrix24-oauth"})  # released
        for oauth in containers:
            assert portal.call(oauth).status_code == 200


def test_lease_lock_waits_for_the_holder_and_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    class Leases:
        def __init__(self) -> None:
            self.holder: str | None = None

        def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool:
            if self.holder in (None, owner):
                self.holder = owner
                return True
            return False

        def release_lease(self, name: str, owner: str) -> None:
            if self.holder == owner:
                self.holder = None

    leases, now = Leases(), [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    lock = lease_lock(leases, BITRIX24, owner="me", timeout=1.0, clock=lambda: now[0], sleep=sleep)
    with lock():
        assert leases.holder == "me"
    assert leases.holder is None
    leases.holder = "someone else"
    with pytest.raises(Bitrix24AuthError) as timed_out, lock():
        pass
    assert timed_out.value.code == "lock_timeout"
    assert timed_out.value.retryable
    assert 1.0 <= now[0] < 3.0

    # The lease is re-entrant for its owner, so threads of one container queue on a local lock first.
    leases.holder = None
    shared = lease_lock(leases, BITRIX24, owner="me", timeout=2.0)
    entered, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with shared():
            entered.set()
            release.wait(2)

    def second() -> None:
        with shared():
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert entered.wait(2)
    threads[1].start()
    assert not second_in.wait(0.2)
    release.set()
    assert second_in.wait(2)
    for thread in threads:
        thread.join(2)


def test_the_access_token_is_cached_and_reread_once_after_it_expires() -> None:
    now = [1_000.0]
    store = MemoryStore(
        {
            "access_token": "a1",
            "refresh_token": "r1",
            "expires": 2_000,
            "client_endpoint": "https://clinic.bitrix24.ru/rest",
            "client_id": "local.x",
            "client_secret": "s",
        }
    )
    oauth = Bitrix24OAuth(store, httpx.Client(), clock=lambda: now[0])
    assert [oauth.access_token() for _ in range(3)] == ["a1"] * 3
    assert oauth.client_endpoint() == "https://clinic.bitrix24.ru/rest/"
    assert store.loads == 1
    now[0] = 2_500.0  # expired: another container may have rotated it, so look once
    store.data.update(access_token="a2", expires=5_000)
    assert oauth.access_token() == "a2"
    assert store.loads == 2
    now[0] = 6_000.0
    store.data.update(access_token="a2")  # nobody rotated: keep using it, the 401 path will refresh
    assert [oauth.access_token() for _ in range(3)] == ["a2"] * 3
    assert store.loads == 3


def test_token_url_follows_the_oauth_server_of_the_token_reply() -> None:
    base: dict[str, Any] = {
        "access_token": "a",
        "refresh_token": "r",
        "client_endpoint": "https://clinic.bitrix24.ru/rest/",
        "client_id": "local.x",
        "client_secret": "s",
    }
    assert parse_tokens(base).token_url == "https://oauth.bitrix.info/oauth/token/"
    ru = parse_tokens({**base, "server_endpoint": "https://oauth.bitrix24.tech/rest/"})
    assert ru.token_url == "https://oauth.bitrix24.tech/oauth/token/"
    explicit = parse_tokens({**base, "server_endpoint": "https://x/rest/", "oauth_url": "http://127.0.0.1:9/"})
    assert explicit.token_url == "http://127.0.0.1:9/oauth/token/"
    assert parse_tokens({**base, "oauth_url": "https://o/oauth/token"}).token_url == "https://o/oauth/token/"
    with pytest.raises(Bitrix24AuthError) as broken:
        parse_tokens({**base, "client_id": ""})
    assert "client_id" in str(broken.value)
    assert "s3cr3t" not in repr(parse_tokens({**base, "client_secret": "s3cr3t"}))
    masked = redact_url("https://o/oauth/token/?grant_type=refresh_token&refresh_token=abc&client_secret=xyz")
    assert "abc" not in masked and "xyz" not in masked and "grant_type=refresh_token" in masked


def test_unreachable_oauth_server_is_retryable_and_keeps_the_stored_pair() -> None:
    store = MemoryStore(
        {
            "access_token": "a1",
            "refresh_token": "r1",
            "client_endpoint": "http://127.0.0.1:9/rest/",
            "oauth_url": "http://127.0.0.1:9",  # nothing listens on the discard port
            "client_id": "local.x",
            "client_secret": "s",
        }
    )
    with httpx.Client(timeout=2.0) as http:
        oauth = Bitrix24OAuth(store, http)
        with pytest.raises(Bitrix24AuthError) as failed:
            oauth.refresh("a1")
    assert failed.value.code == "unreachable"
    assert failed.value.retryable
    assert store.data["refresh_token"] == "r1"
    assert store.saves == 0
