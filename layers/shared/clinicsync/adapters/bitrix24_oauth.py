"""OAuth 2.0 for Bitrix24 local and Marketplace apps: the token pair, where it lives, and its rotation.

Calls go to ``client_endpoint + method`` with ``auth=<access token>``. The access token lives an hour;
on ``401 expired_token`` the client refreshes **once** and replays. Every refresh returns a new refresh
token and kills the old one, so the refresh is the dangerous moment:

* the new pair is saved (``TokenStore.save``) before the new access token is handed out, so a crash
  after the refresh never leaves only a dead refresh token in the store; a pair that could not be saved
  is kept in memory and saved before anything else is done with it;
* refreshes are serialised by a lock (in-process by default, a DynamoDB lease across containers, see
  :func:`lease_lock`). Under it the store is re-read first: if its access token is no longer the stale
  one, another container already refreshed and its token is used as is. Reusing the old refresh token
  would only earn ``invalid_grant``.

Token values never reach a log line or an exception message. The ``httpx`` logger prints request URLs
at INFO, and the refresh request carries the secrets in its query string, so this module installs a
filter on that logger that masks token-like query parameters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from clinicsync.observability import logger

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

DEFAULT_SERVER_ENDPOINT = "https://oauth.bitrix.info/rest/"
SENSITIVE_PARAMS = frozenset({"auth", "access_token", "refresh_token", "client_secret", "code"})
# Keys of the CRM secret JSON that a refresh rewrites; every other key is left as it was.
ROTATED_KEYS = ("access_token", "refresh_token", "expires", "client_endpoint", "server_endpoint")

LockFactory = Callable[[], AbstractContextManager[object]]


class Bitrix24AuthError(Exception):
    """The app cannot get a valid access token (``invalid_grant``, ``invalid_client``, a broken secret …).

    ``retryable`` is True only when the OAuth server never saw the request (connection refused) or
    the failure was local and transient (lock timeout, store write): trying again later is safe.
    """

    def __init__(self, code: str, description: str = "", status: int | None = None, *, retryable: bool = False) -> None:
        super().__init__(f"bitrix24 oauth {code}" + (f" ({status})" if status else "") + f": {description}")
        self.code = code
        self.description = description
        self.status = status
        self.retryable = retryable


class Bitrix24Tokens(BaseModel):
    """The OAuth part of the clinic's CRM secret JSON (other keys of that JSON are ignored here)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    access_token: SecretStr
    refresh_token: SecretStr
    expires: int = Field(default=0, description="unix time the access token expires; 0 = unknown")
    client_endpoint: str = Field(min_length=1, description="portal REST base, e.g. https://x.bitrix24.ru/rest/")
    server_endpoint: str = Field(default=DEFAULT_SERVER_ENDPOINT, description="OAuth server, from the token reply")
    oauth_url: str | None = Field(default=None, description="explicit OAuth server base; wins over server_endpoint")
    member_id: str = ""
    client_id: str = Field(min_length=1)
    client_secret: SecretStr

    @property
    def token_url(self) -> str:
        """``…/oauth/token/`` on the OAuth server: ``oauth_url`` if set, else the host of ``server_endpoint``
        (a Russian-zone portal answers with oauth.bitrix24.tech, so the host is never hard-coded)."""
        if self.oauth_url:
            base = self.oauth_url.rstrip("/")
            return base + "/" if base.endswith("/oauth/token") else base + "/oauth/token/"
        parts = urlsplit(self.server_endpoint)
        return urlunsplit((parts.scheme or "https", parts.netloc, "/oauth/token/", "", ""))

    def rotated_values(self) -> dict[str, Any]:
        """The plain values a refresh changes, as they are stored in the secret JSON."""
        return {
            "access_token": self.access_token.get_secret_value(),
            "refresh_token": self.refresh_token.get_secret_value(),
            "expires": self.expires,
            "client_endpoint": self.client_endpoint,
            "server_endpoint": self.server_endpoint,
        }


def parse_tokens(data: Mapping[str, Any]) -> Bitrix24Tokens:
    """Validate the secret JSON; errors name the fields only (pydantic would echo the input, tokens included)."""
    try:
        return Bitrix24Tokens.model_validate(dict(data))
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors(include_input=False)})
        raise Bitrix24AuthError("invalid_secret", f"bad or missing fields: {', '.join(fields)}") from None


class TokenStore(Protocol):
    def load(self) -> Bitrix24Tokens: ...

    def save(self, tokens: Bitrix24Tokens) -> None: ...


class SecretsManagerTokenStore:
    """The clinic's CRM secret: a JSON object holding the tokens next to other keys (application_token …).

    Reads go straight to Secrets Manager (no Powertools cache: a cached copy may hold a dead refresh
    token). ``save`` re-reads the JSON and rewrites only the rotated keys with ``PutSecretValue``.
    """

    def __init__(self, client: SecretsManagerClient, secret_id: str) -> None:
        self._client = client
        self._secret_id = secret_id

    def _read(self) -> dict[str, Any]:
        text = self._client.get_secret_value(SecretId=self._secret_id).get("SecretString")
        try:
            data = json.loads(text or "")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Bitrix24AuthError("invalid_secret", "the CRM secret is not a JSON object")
        return data

    def load(self) -> Bitrix24Tokens:
        return parse_tokens(self._read())

    def save(self, tokens: Bitrix24Tokens) -> None:
        data = self._read()
        data.update(tokens.rotated_values())
        self._client.put_secret_value(SecretId=self._secret_id, SecretString=json.dumps(data))


class LeaseStore(Protocol):
    """What :func:`lease_lock` needs; ``clinicsync.store.DynamoStore`` provides it."""

    def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool: ...

    def release_lease(self, name: str, owner: str) -> None: ...


def lease_lock(
    store: LeaseStore,
    name: str = "bitrix24-oauth",
    *,
    owner: str | None = None,
    seconds: int = 60,
    timeout: float = 30.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> LockFactory:
    """A lock factory for :class:`Bitrix24OAuth` that serialises refreshes across containers.

    Threads of this container queue on a local lock first (the lease is re-entrant for its owner);
    then the DynamoDB lease ``LEASE/<name>`` is taken, polling until ``timeout``. ``seconds`` must
    outlast a refresh (one HTTP call and one secret write); a crashed holder's lease expires after it.
    """
    me = owner or f"oauth-{uuid.uuid4().hex}"
    local = threading.Lock()

    @contextmanager
    def hold() -> Iterator[None]:
        with local:
            deadline = clock() + timeout
            pause = 0.05
            while not store.acquire_lease(name, me, seconds, int(clock())):
                if clock() >= deadline:
                    raise Bitrix24AuthError("lock_timeout", f"lease {name} is held elsewhere", retryable=True)
                sleep(pause)
                pause = min(pause * 2, 1.0)
            try:
                yield
            finally:
                try:
                    store.release_lease(name, me)
                except Exception as exc:  # never mask the body's outcome; the lease expires by itself
                    logger.warning("bitrix24 oauth lease not released", extra={"error": type(exc).__name__})

    return hold


class Bitrix24OAuth:
    """Hands out the current access token and rotates the pair when the portal says it expired."""

    def __init__(
        self,
        store: TokenStore,
        http: httpx.Client,
        lock: LockFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._http = http
        local = threading.Lock()
        self._lock: LockFactory = lock or (lambda: local)
        self._clock = clock
        self._tokens: Bitrix24Tokens | None = None
        self._reloaded_for: str | None = None  # the expired token we already looked past once
        self._unsaved: Bitrix24Tokens | None = None  # refreshed but not yet persisted
        self._mutex = threading.Lock()
        self.refreshes = 0  # OAuth server round-trips made by this instance

    # --- reading -----------------------------------------------------------------------------------

    def access_token(self) -> str:
        """The cached access token. Once its ``expires`` has passed the store is read again, once, in
        case another container has rotated it; otherwise the caller's 401 path refreshes."""
        return self._cached().access_token.get_secret_value()

    def client_endpoint(self) -> str:
        """Portal REST base URL ending in ``/`` (calls go to ``client_endpoint + method``)."""
        endpoint = self._cached().client_endpoint
        return endpoint if endpoint.endswith("/") else endpoint + "/"

    def _cached(self) -> Bitrix24Tokens:
        pending = self._unsaved
        if pending is not None:
            # A rotated pair whose save failed: retry the save first (nobody else can hold a newer
            # pair, the stored refresh token is dead); its access token is usable either way.
            with contextlib.suppress(Bitrix24AuthError):
                self._persist(pending)
            return pending
        with self._mutex:
            tokens = self._tokens
            if tokens is None:
                tokens = self._tokens = self._store.load()
            elif tokens.expires and tokens.expires <= self._clock():
                current = tokens.access_token.get_secret_value()
                if self._reloaded_for != current:
                    self._reloaded_for = current
                    tokens = self._tokens = self._store.load()
            return tokens

    # --- rotation ----------------------------------------------------------------------------------

    def refresh(self, stale_access_token: str) -> str:
        """Called after ``401 expired_token`` for ``stale_access_token``; returns the token to replay with.

        Under the lock: a pair refreshed earlier but not yet saved is saved now; the store is re-read,
        and if it already holds another, unexpired access token (another container refreshed) that is
        returned. Otherwise exactly one refresh is made with the *stored* refresh token and the new
        pair is saved before its access token is returned.
        """
        with self._lock():
            if self._unsaved is not None:
                self._persist(self._unsaved)
            stored = self._store.load()
            stored_access = stored.access_token.get_secret_value()
            # expires == 0 means unknown: trust a token that differs and let the next 401 tell.
            if stored_access != stale_access_token and (not stored.expires or stored.expires > self._clock()):
                logger.info("bitrix24 oauth token already rotated elsewhere", extra={"expires": stored.expires})
                self._remember(stored)
                return stored_access
            try:
                fresh = self._grant(stored)
            except Bitrix24AuthError as exc:
                if exc.code == "invalid_grant":
                    # The refresh token was spent by someone who did not hold our lock (an expired
                    # lease, an operator run): if the store moved on meanwhile, take its pair.
                    again = self._store.load()
                    if again.refresh_token.get_secret_value() != stored.refresh_token.get_secret_value():
                        logger.warning("bitrix24 oauth refresh token was rotated concurrently; using the stored pair")
                        self._remember(again)
                        return again.access_token.get_secret_value()
                logger.error("bitrix24 oauth refresh refused", extra={"code": exc.code, "status": exc.status})
                raise
            with self._mutex:
                self._unsaved = fresh
            self._persist(fresh)
            logger.info("bitrix24 oauth token refreshed", extra={"expires": fresh.expires})
            return fresh.access_token.get_secret_value()

    def _remember(self, tokens: Bitrix24Tokens) -> None:
        with self._mutex:
            self._tokens = tokens
            self._reloaded_for = None

    def _persist(self, tokens: Bitrix24Tokens) -> None:
        try:
            self._store.save(tokens)
        except Bitrix24AuthError:
            raise
        except Exception as exc:
            # The old refresh token is dead: keep the new pair in memory and save it on the next call.
            logger.error("bitrix24 oauth could not save the rotated tokens", extra={"error": type(exc).__name__})
            raise Bitrix24AuthError(
                "token_save_failed", "rotated tokens kept in memory, saved on next use", retryable=True
            ) from exc
        with self._mutex:
            self._tokens = tokens
            self._unsaved = None
            self._reloaded_for = None

    def _grant(self, stored: Bitrix24Tokens) -> Bitrix24Tokens:
        self.refreshes += 1
        params = {
            "grant_type": "refresh_token",
            "client_id": stored.client_id,
            "client_secret": stored.client_secret.get_secret_value(),
            "refresh_token": stored.refresh_token.get_secret_value(),
        }
        secrets = [params["client_secret"], params["refresh_token"], stored.access_token.get_secret_value()]
        try:
            response = self._http.get(stored.token_url, params=params)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Bitrix24AuthError("unreachable", type(exc).__name__, retryable=True) from None
        except httpx.HTTPError as exc:
            # The server may have rotated the pair and the answer is lost: the stored refresh token
            # may be dead now. Nothing can recover that but a reinstall, so say so plainly.
            raise Bitrix24AuthError("outcome_unknown", f"refresh response lost ({type(exc).__name__})") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Bitrix24AuthError("bad_response", "not a JSON object", response.status_code)
        if response.status_code != 200 or "error" in body:
            code = str(body.get("error") or f"HTTP_{response.status_code}")
            description = _scrub(str(body.get("error_description", "")), secrets)[:200]
            raise Bitrix24AuthError(code, description, response.status_code)
        try:
            expires = int(body.get("expires") or self._clock() + int(body.get("expires_in", 0)))
            return stored.model_copy(
                update={
                    "access_token": SecretStr(str(body["access_token"])),
                    "refresh_token": SecretStr(str(body["refresh_token"])),
                    "expires": expires,
                    "client_endpoint": str(body.get("client_endpoint") or stored.client_endpoint),
                    "server_endpoint": str(body.get("server_endpoint") or stored.server_endpoint),
                }
            )
        except (KeyError, TypeError, ValueError):
            raise Bitrix24AuthError("bad_response", "token reply lacks access_token/refresh_token", 200) from None


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """The URL with token-like query values masked (``auth``, ``refresh_token``, ``client_secret`` …)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = [(k, "***" if k in SENSITIVE_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="*")))


class _RedactQuerySecrets(logging.Filter):
    """httpx logs ``HTTP Request: GET <url> …`` at INFO; mask secrets carried in the query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                redact_url(str(arg)) if isinstance(arg, httpx.URL) and arg.query else arg for arg in record.args
            )
        return True


_httpx_logger = logging.getLogger("httpx")
if not any(isinstance(f, _RedactQuerySecrets) for f in _httpx_logger.filters):
    _httpx_logger.addFilter(_RedactQuerySecrets())
