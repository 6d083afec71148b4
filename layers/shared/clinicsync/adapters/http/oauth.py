"""OAuth 2.0 refresh-token sessions for CRMs: one refresh per expiry, persisted before use, never logged.

A CRM's access token expires; the client then refreshes it **once** and replays. Every refresh returns a
new refresh token and kills the old one (Bitrix24, amoCRM), so the refresh is the dangerous moment:

* the new pair is saved (``TokenStore.save``) before the new access token is handed out, so a crash
  after the refresh never leaves only a dead refresh token in the store; a pair that could not be saved
  is kept in memory and saved before anything else is done with it;
* refreshes are serialised by a lock (in-process by default, a DynamoDB lease ``<vendor>-oauth``
  across containers, see :func:`lease_lock`). Under it the store is re-read first: if its access token
  is no longer the stale one, another container already refreshed and its token is used as is. Reusing
  the old refresh token would only earn ``invalid_grant``;
* if the grant is refused as ``invalid_grant`` anyway (someone spent the refresh token without holding
  the lock: an expired lease, an operator run), the store is read once more and, if it moved on, its
  pair is used.

:class:`OAuthSession` is that algorithm. What differs per CRM is an :class:`OAuthVendor` strategy: how
the secret JSON becomes a tokens model, which keys of that JSON a rotation rewrites, and the HTTP call
that turns the stored pair into a new one (``grant``). The vendor modules
(``clinicsync.adapters.bitrix24.oauth``, ``clinicsync.adapters.amocrm.oauth``) hold those; the token
store and the lease here take the vendor as their only vendor-specific part.

Token values never reach a log line or an exception message: importing this module installs
``redaction``'s filter on the ``httpx`` logger, which masks token-like query parameters.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from clinicsync.adapters.http.redaction import install_httpx_filter
from clinicsync.domain.crypto import constant_time_equals
from clinicsync.domain.store_ports import Leases
from clinicsync.observability import logger
from clinicsync.retrying import exponential, poll

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient


LockFactory = Callable[[], AbstractContextManager[object]]


class OAuthError(Exception):
    """The app cannot get a valid access token (``invalid_grant``, ``invalid_client``, a broken secret …).

    ``retryable`` is True only when the OAuth server never saw the request (connection refused) or
    the failure was local and transient (lock timeout, store write): trying again later is safe.
    ``vendor`` only prefixes the message (``"bitrix24 oauth invalid_grant (400): …"``).
    """

    def __init__(
        self,
        code: str,
        description: str = "",
        status: int | None = None,
        *,
        retryable: bool = False,
        vendor: str = "",
    ) -> None:
        prefix = f"{vendor} oauth" if vendor else "oauth"
        super().__init__(f"{prefix} {code}" + (f" ({status})" if status else "") + f": {description}")
        self.code = code
        self.description = description
        self.status = status
        self.retryable = retryable
        self.vendor = vendor


class OAuthTokens(Protocol):
    """What the session reads from a vendor's tokens model (a frozen pydantic model in practice).

    ``refresh_token`` is None for a token that cannot be refreshed (amoCRM's long-lived tokens);
    ``expires`` is the unix time the access token expires, 0 when unknown.
    """

    @property
    def access_token(self) -> SecretStr: ...

    @property
    def refresh_token(self) -> SecretStr | None: ...

    @property
    def expires(self) -> int: ...


class OAuthVendor[T: OAuthTokens](Protocol):
    """The vendor-specific part of an OAuth session (a small, stateless strategy object)."""

    @property
    def name(self) -> str:
        """Short vendor name for log lines and error messages (``"bitrix24"``, ``"amocrm"``)."""
        ...

    @property
    def rotated_keys(self) -> tuple[str, ...]:
        """Keys of the secret JSON a refresh rewrites (attribute names of the tokens model); every
        other key of the secret is left as it was."""
        ...

    def parse(self, data: Mapping[str, Any]) -> T:
        """The secret JSON as a tokens model; raises :class:`OAuthError` ``invalid_secret`` naming
        fields only (see :func:`parse_model`)."""
        ...

    def grant(self, stored: T, http: httpx.Client, now: float) -> T:
        """One refresh-token grant with the stored pair; returns the new pair (other fields kept).

        Raises :class:`OAuthError`; a refused refresh token must come out as code ``invalid_grant``
        so the session can look for a pair another container stored meanwhile.
        """
        ...


def parse_model[M: BaseModel](model: type[M], data: Mapping[str, Any], vendor: str = "") -> M:
    """Validate the secret JSON; errors name the fields only (pydantic would echo the input, tokens included)."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_context=False, include_url=False)
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in errors if e["loc"]})
        # A model-level check has no location; its message is the model's own text, never the input.
        checks = sorted({e["msg"].removeprefix("Value error, ") for e in errors if not e["loc"]})
        described = [f"bad or missing fields: {', '.join(fields)}"] if fields else []
        raise OAuthError("invalid_secret", "; ".join(described + checks), vendor=vendor) from None


def rotated_values(tokens: object, keys: tuple[str, ...]) -> dict[str, Any]:
    """The plain values of ``keys`` on a tokens model, as they are stored in the secret JSON
    (``SecretStr`` unwrapped; None values left out, so they never blank a stored key)."""
    values: dict[str, Any] = {}
    for key in keys:
        value = getattr(tokens, key)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            values[key] = value
    return values


class TokenStore[T](Protocol):
    def load(self) -> T: ...

    def save(self, tokens: T) -> None: ...


class SecretsManagerTokenStore[T: OAuthTokens]:
    """The clinic's CRM secret: a JSON object holding the tokens next to other keys (application_token …).

    Reads go straight to Secrets Manager (no Powertools cache: a cached copy may hold a dead refresh
    token). ``save`` re-reads the JSON and rewrites only the vendor's rotated keys with ``PutSecretValue``.
    """

    def __init__(self, client: SecretsManagerClient, secret_id: str, vendor: OAuthVendor[T]) -> None:
        self._client = client
        self._secret_id = secret_id
        self._vendor = vendor

    def _read(self) -> dict[str, Any]:
        text = self._client.get_secret_value(SecretId=self._secret_id).get("SecretString")
        try:
            data = json.loads(text or "")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise OAuthError("invalid_secret", "the CRM secret is not a JSON object", vendor=self._vendor.name)
        return data

    def load(self) -> T:
        return self._vendor.parse(self._read())

    def save(self, tokens: T) -> None:
        data = self._read()
        data.update(rotated_values(tokens, self._vendor.rotated_keys))
        self._client.put_secret_value(SecretId=self._secret_id, SecretString=json.dumps(data))


def lease_lock(
    store: Leases,
    vendor: OAuthVendor[Any],
    *,
    owner: str | None = None,
    seconds: int = 60,
    timeout: float = 30.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> LockFactory:
    """A lock factory for :class:`OAuthSession` that serialises a vendor's refreshes across containers.

    Threads of this container queue on a local lock first (the lease is re-entrant for its owner);
    then the DynamoDB lease ``LEASE/<vendor>-oauth`` is taken, polling until ``timeout``. ``seconds`` must
    outlast a refresh (one HTTP call and one secret write); a crashed holder's lease expires after it.
    """
    name = f"{vendor.name}-oauth"
    me = owner or f"oauth-{uuid.uuid4().hex}"
    local = threading.Lock()

    @contextmanager
    def hold() -> Iterator[None]:
        with local:
            deadline = clock() + timeout
            acquired = poll(
                lambda: store.acquire_lease(name, me, seconds, int(clock())),
                until=bool,
                wait=exponential(0.05, cap=1.0),
                sleep=sleep,
                stop=lambda _: clock() >= deadline,
            )
            if not acquired:
                raise OAuthError("lock_timeout", f"lease {name} is held elsewhere", retryable=True)
            try:
                yield
            finally:
                try:
                    store.release_lease(name, me)
                except Exception as exc:  # never mask the body's outcome; the lease expires by itself
                    logger.warning("oauth lease not released", extra={"lease": name, "error": type(exc).__name__})

    return hold


class OAuthSession[T: OAuthTokens]:
    """Hands out the current access token and rotates the pair when the CRM says it expired."""

    def __init__(
        self,
        vendor: OAuthVendor[T],
        store: TokenStore[T],
        http: httpx.Client,
        lock: LockFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._vendor = vendor
        self._store = store
        self._http = http
        local = threading.Lock()
        self._lock: LockFactory = lock or (lambda: local)
        self._clock = clock
        self._tokens: T | None = None
        self._reloaded_for: str | None = None  # the expired token we already looked past once
        self._unsaved: T | None = None  # refreshed but not yet persisted
        self._mutex = threading.Lock()
        self.refreshes = 0  # token-endpoint round-trips made by this instance

    # --- reading -----------------------------------------------------------------------------------

    def access_token(self) -> str:
        """The cached access token. Once its ``expires`` has passed the store is read again, once, in
        case another container has rotated it; otherwise the caller's 401 path refreshes."""
        return self.tokens().access_token.get_secret_value()

    def tokens(self) -> T:
        """The current tokens model (for vendor fields such as the portal URL); see :meth:`access_token`."""
        pending = self._unsaved
        if pending is not None:
            # A rotated pair whose save failed: retry the save first (nobody else can hold a newer
            # pair, the stored refresh token is dead); its access token is usable either way.
            with contextlib.suppress(OAuthError):
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
        """Called after the CRM refused ``stale_access_token`` as expired; returns the token to replay with.

        Under the lock: a pair refreshed earlier but not yet saved is saved now; the store is re-read,
        and if it already holds another, unexpired access token (another container refreshed) that is
        returned. Otherwise exactly one refresh is made with the *stored* refresh token and the new
        pair is saved before its access token is returned.
        """
        name = self._vendor.name
        with self._lock():
            if self._unsaved is not None:
                self._persist(self._unsaved)
            stored = self._store.load()
            if self._moved_on(stored, stale_access_token):
                logger.info(f"{name} oauth token already rotated elsewhere", extra={"expires": stored.expires})
                self._remember(stored)
                return stored.access_token.get_secret_value()
            try:
                self.refreshes += 1
                fresh = self._vendor.grant(stored, self._http, self._clock())
            except OAuthError as exc:
                if exc.code == "invalid_grant":
                    # The refresh token was spent by someone who did not hold our lock (an expired
                    # lease, an operator run): if the store moved on meanwhile, take its pair.
                    again = self._store.load()
                    if not constant_time_equals(_secret(again.refresh_token), _secret(stored.refresh_token)):
                        logger.warning(f"{name} oauth refresh token was rotated concurrently; using the stored pair")
                        self._remember(again)
                        return again.access_token.get_secret_value()
                logger.error(f"{name} oauth refresh refused", extra={"code": exc.code, "status": exc.status})
                raise
            with self._mutex:
                self._unsaved = fresh
            self._persist(fresh)
            logger.info(f"{name} oauth token refreshed", extra={"expires": fresh.expires})
            return fresh.access_token.get_secret_value()

    def _moved_on(self, stored: T, stale_access_token: str) -> bool:
        """The store holds an access token other than the stale one that is not known to be expired
        (``expires == 0`` means unknown: trust a token that differs and let the next 401 tell)."""
        return not constant_time_equals(stored.access_token.get_secret_value(), stale_access_token) and (
            not stored.expires or stored.expires > self._clock()
        )

    def _remember(self, tokens: T) -> None:
        with self._mutex:
            self._tokens = tokens
            self._reloaded_for = None

    def _persist(self, tokens: T) -> None:
        try:
            self._store.save(tokens)
        except OAuthError:
            raise
        except Exception as exc:
            # The old refresh token is dead: keep the new pair in memory and save it on the next call.
            name = self._vendor.name
            logger.error(f"{name} oauth could not save the rotated tokens", extra={"error": type(exc).__name__})
            raise OAuthError(
                "token_save_failed", "rotated tokens kept in memory, saved on next use", retryable=True, vendor=name
            ) from exc
        with self._mutex:
            self._tokens = tokens
            self._unsaved = None
            self._reloaded_for = None


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


# --- helpers for the vendors' grant calls ------------------------------------------------------------


def send_token_request(http: httpx.Client, request: httpx.Request, vendor: str) -> httpx.Response:
    """Send a token-endpoint request, mapping transport failures to :class:`OAuthError` without
    echoing the URL (it may carry secrets): ``unreachable`` (retryable, the server never saw it) or
    ``outcome_unknown`` (the server may have rotated the pair and the answer is lost)."""
    try:
        return http.send(request)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise OAuthError("unreachable", type(exc).__name__, retryable=True, vendor=vendor) from None
    except httpx.HTTPError as exc:
        # The stored refresh token may be dead now. Nothing can recover that but a re-authorisation,
        # so say so plainly rather than retry.
        raise OAuthError("outcome_unknown", f"refresh response lost ({type(exc).__name__})", vendor=vendor) from None


def json_object(response: httpx.Response, vendor: str) -> dict[str, Any]:
    """The reply body as a JSON object, else ``bad_response``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise OAuthError("bad_response", "not a JSON object", response.status_code, vendor=vendor)
    return body


install_httpx_filter()
