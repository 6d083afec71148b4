"""amoCRM OAuth against the amoCRM emulator on loopback: refresh once, single-use refresh tokens, the new
pair persisted before use, recovery when another container refreshed, long-lived tokens that never
refresh, and no token value in a log line or an exception.

The account is ``sandbox.emulators.amocrm.AmoCrmEmulator`` served on 127.0.0.1 (rate limits off: these
tests are about tokens). It follows /work/shared/reference/amocrm.md §1.2–1.3: ``POST /oauth2/access_token``
with a JSON body, JWT access tokens with ``exp``, single-use refresh tokens (a spent one → 400, or 401,
OAuthProblemJson ``hint: "Token has been revoked"``; a refresh also revokes the old access token),
long-lived tokens without a refresh token, and a Bearer check on every ``/api/v4`` call.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import httpx
import pytest
from moto import mock_aws

from clinicsync.adapters.amocrm.client import AmoCrmBlocked, AmoCrmClient, MemoryCircuitBreaker
from clinicsync.adapters.amocrm.oauth import (
    AMOCRM,
    AmoCrmOAuth,
    AmoCrmTokens,
    jwt_expiry,
    parse_tokens,
)
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.http.oauth import OAuthError, SecretsManagerTokenStore, lease_lock
from clinicsync.adapters.http.pacing import Pacer
from sandbox.emulators.amocrm import AmoCrmEmulator
from sandbox.emulators.base import ServedApp
from tests.conftest import LogCapture

REGION = "eu-central-1"
LIFETIME = 86400


@dataclass
class Account:
    emu: AmoCrmEmulator
    base_url: str
    http: httpx.Client
    on_api_call: Callable[[str], None] | None = None
    leads_before: set[int] = field(default_factory=set)

    def secret(self, **extra: Any) -> dict[str, Any]:
        """The CRM secret as the install handler stores it: the pair, the app, the account's own keys."""
        tokens = self.emu.issue_tokens()
        return {
            "base_url": self.base_url,
            "client_id": self.emu.client_id,
            "client_secret": self.emu.client_secret,
            "redirect_uri": self.emu.redirect_uri,
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires": int(time.time()) + int(tokens["expires_in"]),
            "account_id": self.emu.account_id,
            "webhook_secret": "wh-" + secrets.token_hex(8),
            "user_id": self.emu.api_user_id,
            **extra,
        }

    def call(self, oauth: AmoCrmOAuth, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or oauth.access_token()}"}
        return self.http.get(oauth.base_url() + "/api/v4/account", headers=headers)

    def client(self, oauth: AmoCrmOAuth) -> AmoCrmClient:
        return AmoCrmClient(oauth, self.http, Pacer(rate=1000, burst=1000), backoff=0.0)

    def reuse(self, refresh_token: str) -> httpx.Response:
        body = {
            "client_id": self.emu.client_id,
            "client_secret": self.emu.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "redirect_uri": self.emu.redirect_uri,
        }
        return self.http.post(self.base_url + "/oauth2/access_token", json=body)

    def oauth_requests(self) -> int:
        return int(self.emu.stats()["oauth_requests"])

    def new_lead_names(self) -> list[str]:
        return sorted(str(lead["name"]) for lead_id, lead in self.emu.leads.items() if lead_id not in self.leads_before)


@pytest.fixture
def account() -> Iterator[Account]:
    emu = AmoCrmEmulator(rate_limit=False)
    served = ServedApp(emu).start()
    box: list[Account] = []

    def on_request(request: httpx.Request) -> None:
        """Every API call goes through here: tests check which access token the store held at that moment."""
        hook = box[0].on_api_call
        if hook is not None and request.url.path.startswith("/api/v4/"):
            hook(request.headers["Authorization"].removeprefix("Bearer "))

    with httpx.Client(timeout=5.0, event_hooks={"request": [on_request]}) as http:
        box.append(Account(emu, served.base_url, http, leads_before=set(emu.leads)))
        yield box[0]
    served.stop()


class MemoryStore:
    """The CRM secret JSON in memory; ``fail_saves`` makes the next saves raise."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = dict(data)
        self.loads = 0
        self.saves = 0
        self.fail_saves = 0
        self.lock = threading.Lock()

    def load(self) -> AmoCrmTokens:
        with self.lock:
            self.loads += 1
            return parse_tokens(self.data)

    def save(self, tokens: AmoCrmTokens) -> None:
        with self.lock:
            if self.fail_saves:
                self.fail_saves -= 1
                raise ConnectionError("secrets manager unreachable")
            self.saves += 1
            self.data.update(tokens.rotated_values())


class Leases:
    """An in-memory, atomic stand-in for the DynamoDB lease (``DynamoStore.acquire_lease``)."""

    def __init__(self) -> None:
        self.holders: dict[str, str] = {}
        self.names: list[str] = []
        self.lock = threading.Lock()

    def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool:
        with self.lock:
            self.names.append(name)
            if self.holders.get(name, owner) != owner:
                return False
            self.holders[name] = owner
            return True

    def release_lease(self, name: str, owner: str) -> None:
        with self.lock:
            if self.holders.get(name) == owner:
                del self.holders[name]


def _expired(account: Account, oauth: AmoCrmOAuth) -> str:
    """Expire the access tokens on the account; return the stale token after checking amoCRM says so."""
    stale = oauth.access_token()
    assert account.call(oauth, stale).status_code == 200
    account.emu.expire_access_tokens()
    assert account.call(oauth, stale).status_code == 401
    return stale


def _persisted_before_use(account: Account, store: MemoryStore) -> list[tuple[str, str]]:
    """Record (token sent to the API, access token in the store at that moment) for every API call from now."""
    seen: list[tuple[str, str]] = []

    def check(token: str) -> None:
        with store.lock:
            seen.append((token, store.data["access_token"]))

    account.on_api_call = check
    return seen


def _lead(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "request_id": name}]


def test_expired_token_is_refreshed_once_and_the_new_pair_is_saved_before_it_is_used(account: Account) -> None:
    store = MemoryStore(account.secret())
    old_refresh = store.data["refresh_token"]
    oauth = AmoCrmOAuth(store, account.http)
    assert not oauth.long_lived
    assert oauth.base_url() == account.base_url
    stale = _expired(account, oauth)
    seen = _persisted_before_use(account, store)

    reply = account.client(oauth).request("POST", "/api/v4/leads", json=_lead("A"))

    assert reply["_embedded"]["leads"][0]["request_id"] == "A"
    assert account.new_lead_names() == ["A"]  # the write was replayed once after the refresh
    fresh = oauth.access_token()
    assert fresh != stale
    assert account.oauth_requests() == 1
    assert oauth.refreshes == 1
    assert store.saves == 1
    assert store.data["access_token"] == fresh
    assert store.data["refresh_token"] not in ("", old_refresh)
    assert abs(store.data["expires"] - (time.time() + LIFETIME)) < 60  # from expires_in
    # The first call went out with the stale token and was refused; the replay used the new one, which
    # the store already held.
    assert seen == [(stale, stale), (fresh, fresh)]
    # A second caller that saw the same 401 gets the new token without another round-trip.
    assert oauth.refresh(stale) == fresh
    assert account.oauth_requests() == 1
    # Single use: the old refresh token is revoked, the stored one is live.
    refused = account.reuse(old_refresh)
    assert (refused.status_code, refused.json()["hint"]) == (400, "Token has been revoked")
    assert account.reuse(store.data["refresh_token"]).status_code == 200


def test_a_rotated_pair_is_never_handed_out_before_it_is_saved(account: Account) -> None:
    store = MemoryStore(account.secret())
    before = dict(store.data)
    oauth = AmoCrmOAuth(store, account.http)
    stale = _expired(account, oauth)
    store.fail_saves = 2

    with pytest.raises(OAuthError) as first:
        oauth.refresh(stale)
    assert (first.value.code, first.value.retryable) == ("token_save_failed", True)
    assert store.data == before  # not saved, and no token was returned
    with pytest.raises(OAuthError):
        oauth.refresh(stale)  # the save is retried first (and fails again): still no second refresh
    assert account.oauth_requests() == 1

    seen = _persisted_before_use(account, store)
    token = oauth.access_token()  # the next use saves the pair that was kept in memory
    assert store.data["access_token"] == token != stale
    assert account.call(oauth).status_code == 200
    assert seen == [(token, token)]
    assert account.oauth_requests() == 1
    assert account.reuse(store.data["refresh_token"]).status_code == 200  # the stored refresh token is live


@pytest.mark.parametrize("revoked_status", [400, 401])
def test_a_revoked_refresh_token_is_recovered_from_the_store_without_losing_the_request(
    account: Account, revoked_status: int
) -> None:
    """Container B read the pair just before container A refreshed and saved (no shared lock: an expired
    lease, an operator run). B's refresh is refused as revoked; B takes A's pair and its write goes on."""
    account.emu.revoked_refresh_status = revoked_status
    store = MemoryStore(account.secret())
    a, b = AmoCrmOAuth(store, account.http), AmoCrmOAuth(store, account.http)
    stale = _expired(account, a)
    assert b.access_token() == stale
    snapshot = dict(store.data)

    account.client(a).request("POST", "/api/v4/leads", json=_lead("A"))
    fresh = a.access_token()
    assert fresh != stale

    real_load = store.load
    loads = iter([parse_tokens(snapshot)])
    store.load = lambda: next(loads, None) or real_load()  # type: ignore[method-assign]
    seen = _persisted_before_use(account, store)

    reply = account.client(b).request("POST", "/api/v4/leads", json=_lead("B"))

    assert reply["_embedded"]["leads"][0]["request_id"] == "B"
    assert account.new_lead_names() == ["A", "B"]  # B's request was replayed, once
    assert seen == [(stale, fresh), (fresh, fresh)]
    assert b.access_token() == fresh
    assert account.oauth_requests() == 2  # A's refresh and B's refused one
    assert account.emu.stats()["token_refreshes"] == 1
    assert store.saves == 1
    assert store.data["access_token"] == fresh


def test_a_revoked_refresh_token_with_nothing_newer_in_the_store_is_a_clear_error(account: Account) -> None:
    store = MemoryStore(account.secret())
    oauth = AmoCrmOAuth(store, account.http)
    stale = oauth.access_token()
    assert account.reuse(store.data["refresh_token"]).status_code == 200  # spent elsewhere, never stored
    with pytest.raises(OAuthError) as refused:
        oauth.refresh(stale)
    assert (refused.value.code, refused.value.status, refused.value.retryable) == ("invalid_grant", 400, False)
    assert "Token has been revoked" in str(refused.value)
    assert store.saves == 0


def test_a_wrong_client_secret_or_redirect_uri_is_invalid_client(account: Account) -> None:
    store = MemoryStore(account.secret(redirect_uri="https://elsewhere.example/cb"))
    oauth = AmoCrmOAuth(store, account.http)
    with pytest.raises(OAuthError) as refused:
        oauth.refresh(_expired(account, oauth))
    assert (refused.value.code, refused.value.status, refused.value.retryable) == ("invalid_client", 401, False)
    assert store.saves == 0


def test_two_containers_refresh_exactly_once_under_the_lease(account: Account) -> None:
    store = MemoryStore(account.secret())
    leases = Leases()
    containers = [AmoCrmOAuth(store, account.http, lock=lease_lock(leases, AMOCRM, timeout=10)) for _ in range(2)]
    stale = [_expired(account, containers[0]), containers[1].access_token()]
    assert stale[0] == stale[1]
    seen = _persisted_before_use(account, store)
    gate = threading.Barrier(2)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(oauth: AmoCrmOAuth, name: str) -> None:
        try:
            gate.wait(5)
            results.append(account.client(oauth).request("POST", "/api/v4/leads", json=_lead(name)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c, n)) for c, n in zip(containers, "AB", strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)

    assert not errors
    assert len(results) == 2
    assert account.new_lead_names() == ["A", "B"]
    assert account.oauth_requests() == 1
    assert store.saves == 1
    fresh = store.data["access_token"]
    assert [c.access_token() for c in containers] == [fresh, fresh]
    assert [used for used, _ in seen if used != stale[0]] == [fresh, fresh]
    assert all(stored == used for used, stored in seen if used == fresh)  # saved before either used it
    assert set(leases.names) == {"amocrm-oauth"}
    assert leases.holders == {}  # released


@pytest.mark.parametrize("shape", ["long_lived_token", "access_token_only", "long_lived_wins"])
def test_a_long_lived_token_is_never_refreshed(account: Account, shape: str) -> None:
    token = account.emu.issue_long_lived_token(days=30)
    secret: dict[str, Any] = {"base_url": account.base_url + "/", "account_id": 31337, "user_id": 1}
    if shape == "long_lived_token":
        secret["long_lived_token"] = token
    elif shape == "access_token_only":
        secret.update(access_token=token, refresh_token="")
    else:  # an operator switched to a long-lived token and left the old pair behind
        secret.update(account.secret(), long_lived_token=token)
    store = MemoryStore(secret)
    oauth = AmoCrmOAuth(store, account.http)

    assert oauth.long_lived
    assert oauth.base_url() == account.base_url
    assert oauth.access_token() == token
    assert oauth.tokens().expires == jwt_expiry(token) > time.time() + 29 * 86400
    assert account.client(oauth).request("GET", "/api/v4/account")["id"] == account.emu.account_id

    account.emu.expire_access_tokens()  # revoked or past its expiry
    with pytest.raises(OAuthError) as rejected:
        account.client(oauth).request("GET", "/api/v4/account")
    assert rejected.value.code == "long_lived_token_rejected"
    assert not rejected.value.retryable
    assert "Keys and scopes" in rejected.value.description
    with pytest.raises(OAuthError) as again:
        oauth.refresh(token)
    assert again.value.code == "long_lived_token_rejected"
    assert account.oauth_requests() == 0
    assert oauth.refreshes == 0
    assert store.saves == 0
    assert token not in str(rejected.value)

    # The operator generates a new one and puts it in the secret: it is used without any refresh.
    renewed = account.emu.issue_long_lived_token()
    store.data["access_token" if shape == "access_token_only" else "long_lived_token"] = renewed
    assert oauth.refresh(token) == renewed
    assert oauth.access_token() == renewed
    assert account.client(oauth).request("GET", "/api/v4/account")["id"] == account.emu.account_id
    assert account.oauth_requests() == 0
    assert store.saves == 0


def test_no_token_value_reaches_the_logs_or_an_exception(
    account: Account, captured_logs: LogCapture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="httpx")
    caplog.set_level(logging.DEBUG, logger="httpcore")
    secret = account.secret()
    store = MemoryStore(secret)
    oauth = AmoCrmOAuth(store, account.http)
    good = oauth.refresh(_expired(account, oauth))  # a successful rotation, logged by us and by httpx
    assert account.call(oauth).status_code == 200
    rotated = store.data["refresh_token"]

    unknown = "def50200" + secrets.token_hex(64)
    store.data["refresh_token"] = unknown  # a refresh token amoCRM never issued (integration reinstalled …)
    echo = {"hint": f"Invalid refresh token {unknown}", "title": "Некорректный запрос", "status": 400}
    account.emu.faults.add("/oauth2", status=400, body=json.dumps(echo))  # a server that echoes it back
    account.emu.expire_access_tokens()
    with pytest.raises(OAuthError) as refused:
        oauth.refresh(good)
    assert (refused.value.code, refused.value.status) == ("invalid_grant", 400)
    assert "Invalid refresh token ***" in str(refused.value)

    long_lived = account.emu.issue_long_lived_token()
    ll_oauth = AmoCrmOAuth(MemoryStore({"base_url": account.base_url, "long_lived_token": long_lived}), account.http)
    with pytest.raises(OAuthError) as rejected:
        ll_oauth.refresh(ll_oauth.access_token())

    with pytest.raises(OAuthError) as broken:
        parse_tokens({**secret, "client_secret": "", "base_url": "clinic.amocrm.ru"})
    assert broken.value.code == "invalid_secret"
    assert "base_url" in str(broken.value)
    with pytest.raises(OAuthError) as incomplete:
        parse_tokens({**secret, "client_secret": "", "redirect_uri": ""})
    assert "a refresh_token needs client_secret, redirect_uri" in str(incomplete.value)

    assert "amocrm oauth token refreshed" in captured_logs.text
    assert "amocrm oauth refresh refused" in captured_logs.text
    assert "amocrm oauth long-lived token rejected" in captured_logs.text
    assert "/oauth2/access_token" in caplog.text  # httpx did log the refresh request
    values = [secret["access_token"], secret["refresh_token"], secret["client_secret"], good, rotated, unknown]
    values += [long_lived]
    texts = [captured_logs.text, caplog.text, repr(store.load()), repr(ll_oauth.tokens())]
    texts += [str(e.value) + repr(e.value) + e.value.description for e in (refused, rejected, broken, incomplete)]
    for text in texts:
        for value in values:
            assert value not in text


def test_unreachable_token_endpoint_is_retryable_and_keeps_the_stored_pair() -> None:
    store = MemoryStore(
        {
            "base_url": "http://127.0.0.1:9",  # nothing listens on the discard port
            "access_token": "a1",
            "refresh_token": "r1",
            "client_id": "cid",
            "client_secret": "s",
            "redirect_uri": "https://clinic.example/cb",
        }
    )
    with httpx.Client(timeout=2.0) as http, pytest.raises(OAuthError) as failed:
        AmoCrmOAuth(store, http).refresh("a1")
    assert (failed.value.code, failed.value.retryable) == ("unreachable", True)
    assert store.data["refresh_token"] == "r1"
    assert store.saves == 0


def test_a_5xx_from_the_token_endpoint_is_retryable_and_a_retry_tells_whether_the_pair_survived(
    account: Account,
) -> None:
    store = MemoryStore(account.secret())
    before = dict(store.data)
    oauth = AmoCrmOAuth(store, account.http)
    stale = _expired(account, oauth)

    account.emu.faults.add("/oauth2", status=503, html=True)  # refused before the grant ran
    with pytest.raises(OAuthError) as busy:
        oauth.refresh(stale)
    assert (busy.value.code, busy.value.status, busy.value.retryable) == ("HTTP_503", 503, True)
    assert store.data == before
    fresh = oauth.refresh(stale)  # the retry works: the stored pair was still live
    assert account.call(oauth, fresh).status_code == 200

    # A gateway 504 after amoCRM rotated the pair: the answer is lost, the retry says so plainly.
    account.emu.faults.add("/oauth2", status=504, html=True, after_apply=True)
    account.emu.expire_access_tokens()
    with pytest.raises(OAuthError) as lost:
        oauth.refresh(fresh)
    assert (lost.value.code, lost.value.retryable) == ("HTTP_504", True)
    with pytest.raises(OAuthError) as dead:
        oauth.refresh(fresh)
    assert (dead.value.code, dead.value.retryable) == ("invalid_grant", False)
    assert "Token has been revoked" in dead.value.description


def test_secrets_manager_store_keeps_the_other_keys_and_a_dynamodb_lease_serialises_containers(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        initial = account.secret(note="kept as is")
        sm = boto3.client("secretsmanager", region_name=REGION)
        sm.create_secret(Name="clinicsync/c1/crm", SecretString=json.dumps(initial))
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

        def container() -> AmoCrmOAuth:
            session = boto3.session.Session(region_name=REGION)
            store = SecretsManagerTokenStore(session.client("secretsmanager"), "clinicsync/c1/crm", AMOCRM)
            leases = AtomicStore(session.resource("dynamodb").Table("t"))
            return AmoCrmOAuth(store, account.http, lock=lease_lock(leases, AMOCRM, seconds=30, timeout=10))

        containers = [container(), container()]
        stale = [_expired(account, containers[0]), containers[1].access_token()]
        gate = threading.Barrier(2)
        results: list[str] = []
        errors: list[BaseException] = []

        def run(oauth: AmoCrmOAuth, token: str) -> None:
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
        assert account.oauth_requests() == 1
        stored = json.loads(sm.get_secret_value(SecretId="clinicsync/c1/crm")["SecretString"])
        assert stored["access_token"] == results[0]
        assert stored["refresh_token"] != initial["refresh_token"]
        assert stored["expires"] >= initial["expires"]
        kept = ("base_url", "client_id", "client_secret", "redirect_uri", "account_id", "webhook_secret", "user_id")
        for key in (*kept, "note"):
            assert stored[key] == initial[key]
        assert set(stored) == set(initial)
        assert account.reuse(initial["refresh_token"]).json()["hint"] == "Token has been revoked"
        assert "Item" not in ddb.Table("t").get_item(Key={"pk": "LEASE", "sk": "amocrm-oauth"})  # released
        for oauth in containers:
            assert account.call(oauth).status_code == 200


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any]) -> str:
    return f"{_b64(b'{}')}.{_b64(json.dumps(claims).encode())}.{_b64(secrets.token_bytes(16))}"


def test_jwt_expiry_reads_exp_without_verifying() -> None:
    assert jwt_expiry(_jwt({"exp": 1_900_000_000})) == 1_900_000_000
    for junk in ("", "abc", "a.b", "a.!!!.c", f"x.{_b64(b'[1]')}.y", f"x.{_b64(b'{}')}.y", f"x.{_b64(b'\xff')}.y"):
        assert jwt_expiry(junk) == 0
    assert jwt_expiry(_jwt({"exp": True})) == 0
    assert jwt_expiry(_jwt({"exp": "soon"})) == 0


def test_grant_takes_the_expiry_from_the_jwt_when_the_reply_has_no_expires_in() -> None:
    """The emulator always sends ``expires_in``; a MockTransport reply without it exercises the fallback."""
    access = _jwt({"exp": 1_900_000_000})

    def reply(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.url.path == "/oauth2/access_token"
        assert json.loads(request.content)["redirect_uri"] == "https://clinic.example/cb"
        return httpx.Response(200, json={"token_type": "Bearer", "access_token": access, "refresh_token": "r2"})

    stored = parse_tokens(
        {
            "base_url": "https://clinic.amocrm.ru/",
            "access_token": "a1",
            "refresh_token": "r1",
            "client_id": "cid",
            "client_secret": "s",
            "redirect_uri": "https://clinic.example/cb",
            "account_id": 1,
        }
    )
    assert stored.token_url == "https://clinic.amocrm.ru/oauth2/access_token"
    assert stored.expires == 0  # neither stored nor a JWT
    with httpx.Client(transport=httpx.MockTransport(reply)) as http:
        fresh = AMOCRM.grant(stored, http, now=1_800_000_000)
    assert fresh.expires == 1_900_000_000
    assert fresh.rotated_values() == {"access_token": access, "refresh_token": "r2", "expires": 1_900_000_000}
    assert (fresh.base_url, fresh.client_id, fresh.redirect_uri) == (stored.base_url, "cid", stored.redirect_uri)


def test_a_blocked_account_gets_403_on_the_token_endpoint_opens_the_circuit_and_keeps_the_tokens(
    account: Account,
) -> None:
    """amoCRM blocks the token endpoint too (amocrm-api-php #563). Here the block lands between the API's
    401 and the refresh: the refresh's 403 is the same block (breaker open, a reason that says so), never
    a crash or a lost pair; once amoCRM lifts it, the stored refresh token still works."""
    store = MemoryStore(account.secret())
    before = dict(store.data)
    oauth = AmoCrmOAuth(store, account.http)
    _expired(account, oauth)

    def block_after_a_401(response: httpx.Response) -> None:
        if response.status_code == 401 and response.request.url.path.startswith("/api/v4/"):
            account.emu.block(600)

    breaker = MemoryCircuitBreaker()
    with httpx.Client(timeout=5.0, event_hooks={"response": [block_after_a_401]}) as api_http:
        client = AmoCrmClient(oauth, api_http, Pacer(rate=1000, burst=1000), breaker, backoff=0.0)
        with pytest.raises(AmoCrmBlocked, match=r"403 on POST /oauth2/access_token .*blocked") as blocked:
            client.request("GET", "/api/v4/account")
        assert isinstance(blocked.value.__cause__, OAuthError)
        assert blocked.value.__cause__.code == "account_blocked"
        assert breaker.open_reason is not None and "/oauth2/access_token" in breaker.open_reason
        assert account.oauth_requests() == 1 and account.emu.stats()["blocked_403"] == 1
        assert (store.data, store.saves) == (before, 0)  # nothing rotated, nothing overwritten
        with pytest.raises(AmoCrmBlocked):
            client.request("GET", "/api/v4/account")
        assert account.oauth_requests() == 1  # the open circuit sends nothing, to the token endpoint neither

    account.emu.reset_limits()  # amoCRM support lifted the block
    after = AmoCrmClient(oauth, account.http, Pacer(rate=1000, burst=1000), backoff=0.0)
    assert after.request("GET", "/api/v4/account")["id"] == account.emu.account_id
    assert oauth.refreshes == 2 and store.saves == 1  # the kept refresh token was still good
